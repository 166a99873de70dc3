import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lgm_jax import augment


def _images(n=3, res=32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=(n, res, res, 3)), jnp.float32)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_identity_parameters_return_the_input(mode):
    cfg = augment.AugmentConfig(mode=mode, input_res=32)
    x = _images()
    np.testing.assert_allclose(augment.apply(x, augment.identity_params(3, cfg), cfg), x, atol=1e-6)


def test_crop_matches_torch_affine_grid_sample():
    cfg = augment.AugmentConfig(mode="eval", input_res=24)
    x = _images(4, 32, seed=1)
    params = augment.sample(jax.random.key(0), 4, cfg)
    params["flip_u"] = jnp.ones(4)  # no flip: compare the crop alone
    u = np.asarray(params["crop_u"], np.float64)
    s = 0.08 + 0.92 * u[:, 0]
    r = np.exp(np.log(3 / 4) + u[:, 1] * (np.log(4 / 3) - np.log(3 / 4)))
    sw, sh = np.sqrt(s * r), np.sqrt(s / r)
    x1, y1 = u[:, 2] * (1 - sw), u[:, 3] * (1 - sh)
    theta = np.zeros((4, 2, 3))
    theta[:, 0, 0], theta[:, 1, 1] = sw, sh
    theta[:, 0, 2], theta[:, 1, 2] = 2 * (x1 + sw / 2 - 0.5), 2 * (y1 + sh / 2 - 0.5)
    t = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2)).double()
    grid = torch.nn.functional.affine_grid(
        torch.from_numpy(theta), (4, 3, 24, 24), align_corners=False
    )
    want = torch.nn.functional.grid_sample(
        t, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    got = augment.apply(x, params, cfg)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want.numpy(), atol=1e-5)


def test_flip_and_noise_follow_their_draws():
    cfg = augment.AugmentConfig(mode="train", input_res=32, noise_mean=0.5)
    x = _images(2)
    params = augment.identity_params(2, cfg)
    params["flip_u"] = jnp.array([0.1, 0.9])
    z = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    params["noise_z"], params["noise_apply_u"] = z, jnp.array([0.9, 0.2])
    out = augment.apply(x, params, cfg)
    np.testing.assert_allclose(out[0], x[0, :, ::-1], atol=1e-6)
    np.testing.assert_allclose(out[1], x[1] + 0.2 * z[1] + 0.5, atol=1e-6)


def test_sample_shapes_and_off_mode():
    cfg = augment.AugmentConfig()
    p = augment.sample(jax.random.key(0), 5, cfg)
    assert p["crop_u"].shape == (5, 4) and p["noise_z"].shape == (5, 224, 224, 3)
    assert "noise_z" not in augment.sample(jax.random.key(0), 5, augment.AugmentConfig(mode="eval"))
    off = augment.AugmentConfig(mode="off", input_res=24)
    x = _images(2, 32)
    np.testing.assert_array_equal(augment.apply(x, {}, off), x[:, 4:28, 4:28])


def test_gradient_flows_through_the_crop():
    cfg = augment.AugmentConfig(mode="train", input_res=16)
    params = augment.sample(jax.random.key(0), 2, cfg)
    g = jax.grad(lambda x: augment.apply(x, params, cfg).sum())(_images(2, 32))
    assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).sum()) > 0


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((2, 3, 32, 32), np.float32), "NHWC"),
        (np.zeros((2, 32, 32, 3), np.uint8), "floats"),
        (np.full((2, 32, 32, 3), 2.0, np.float32), r"\[0, 1\]"),
        (np.zeros((2, 32, 16, 3), np.float32), "square"),
    ],
)
def test_bad_images_get_a_clear_error(images, match):
    cfg = augment.AugmentConfig(input_res=16)
    with pytest.raises(ValueError, match=match):
        augment.apply(jnp.asarray(images), augment.sample(jax.random.key(0), 2, cfg), cfg)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode"):
        augment.AugmentConfig(mode="strong")
