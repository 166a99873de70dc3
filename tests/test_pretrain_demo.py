"""python -m lgm_jax.pretrain_demo: SimCLR on a few images lowers the loss; the weights load."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lgm_jax import pretrain_demo as pretrain_tool
from lgm_jax.models import registry


def _images(n=16, res=32):
    """Blobs at random places on black: a few 'digits' with something to tell apart."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:res, :res]
    out = np.zeros((n, res, res, 3), np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(8, res - 8, 2)
        r = rng.uniform(3, 7)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2) * rng.uniform(120, 255)
        out[i] = blob[..., None].astype(np.uint8)
    return out


def test_nt_xent_prefers_matching_pairs():
    z = jax.random.normal(jax.random.key(0), (8, 16))
    matched = pretrain_tool.nt_xent(z, z, 0.2)
    shuffled = pretrain_tool.nt_xent(z, z[::-1], 0.2)
    assert float(matched) < float(shuffled)
    assert np.isfinite(float(matched))


def test_pretrain_lowers_loss_and_weights_load(tmp_path):
    images = _images()
    kw = dict(steps=20, batch=8, lr=3e-3, warmup=3, seed=0, log=None)
    backbone, params, losses = pretrain_tool.pretrain(images, **kw)
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])

    registry.save_converted(str(tmp_path), backbone, params)
    loaded, lparams = registry.build("dinov2_tiny", str(tmp_path))
    assert loaded.config == backbone.config
    x = jnp.asarray(images[:4, 2:30, 2:30], jnp.float32) / 255.0
    f = loaded.features
    np.testing.assert_allclose(f(lparams, x), f(params, x), rtol=1e-5, atol=1e-5)
    _, random_params = registry.build("dinov2_tiny")
    assert not np.allclose(f(random_params, x), f(lparams, x))


def test_pretrain_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        pretrain_tool.pretrain(np.zeros((4, 32, 32, 3), np.float32), steps=1)


def test_bad_settings_are_input_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # refused by the flag's type, before anything runs
        pretrain_tool.main(["--out", str(tmp_path), "--steps", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: python -m lgm_jax.pretrain_demo: argument")
