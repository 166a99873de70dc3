"""Test setup: 8 fake CPU devices and no hub access, fixed before jax is imported anywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pathlib  # noqa: E402

import pytest  # noqa: E402

GOLDEN = pathlib.Path(__file__).resolve().parents[2] / "shared" / "golden" / "lgm_step"


@pytest.fixture(scope="session")
def golden_dir():
    """The recorded reference step (../shared/golden/lgm_step beside the checkout)."""
    path = pathlib.Path(os.environ.get("LGM_GOLDEN", GOLDEN))
    if not (path / "step.npz").exists():
        pytest.skip(f"golden step not found at {path} (set LGM_GOLDEN)")
    return path


@pytest.fixture(scope="session")
def tiny_vit():
    """A tiny random DINOv2-style ViT at 28 px (2x2 patches of 14): (model, params, cfg).

    Without layer scale: DINOv2's initial 1e-5 layer scale makes a random network's CLS token
    nearly blind to the image, and the gradients the tests compare would be almost zero."""
    import jax
    import jax.numpy as jnp

    from lgm_jax.models import dinov2, vit

    cfg = dinov2.variant("S/14").replace(
        width=32, depth=2, heads=2, mlp_dim=64, pos_grid=4, input_res=28, layer_scale=False
    )
    model = vit.ViT(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)))["params"]
    return model, params, cfg
