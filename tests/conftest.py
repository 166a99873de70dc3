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
    """The registry's tiny DINOv2 (28 px: 2x2 patches of 14), 32 wide: (model, params, config).

    Without layer scale: DINOv2's initial 1e-5 layer scale makes a random network's CLS token
    nearly blind to the image, and the gradients the tests compare would be almost zero."""
    from lgm_jax.models import registry, vit

    backbone, params = registry.build("dinov2_tiny", width=32, mlp_dim=64, layer_scale=False)
    return vit.ViT(backbone.config), params, backbone.config


@pytest.fixture(scope="session")
def run_env(tmp_path_factory):
    """The environment of the tiny distillation runs (tests/tiny_run.py)."""
    import tiny_run

    return tiny_run.run_env(tmp_path_factory.getbasetemp() / "jax_cache")


@pytest.fixture(scope="session")
def reference(tmp_path_factory, run_env):
    """The tiny run, uninterrupted (evaluated at the end, steps 1 and 2 profiled, a grid every 5
    steps): what every interrupted, corrupted or resumed run must end with."""
    import tiny_run

    workdir = tmp_path_factory.mktemp("uninterrupted")
    evaluation = ["--config.eval.at_end=true", "--config.eval.epochs=3", "--config.eval.seeds=2"]
    profile = ["--config.profile.start=1", "--config.profile.steps=2"]
    rc, out = tiny_run.run(workdir, run_env, *evaluation, *profile, "--config.image_every=5")
    assert rc == 0, out
    assert "profile of steps 1..2" in out and "by phase:" in out
    return workdir
