import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lgm_jax import lgm, pyramid, resample


def test_bilinear_matrix_matches_torch_interpolate():
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 4)).astype(np.float32)
    want = torch.nn.functional.interpolate(
        torch.from_numpy(x), size=(16, 16), mode="bilinear", align_corners=False
    ).numpy()
    a = resample.bilinear_matrix(4, 16)
    got = resample.resize_separable(jnp.asarray(x.transpose(0, 2, 3, 1)), a, a)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, atol=1e-6)


@pytest.mark.parametrize("scale", [None, 37 / 16.1])
def test_bicubic_matrix_matches_torch_interpolate(scale):
    x = np.random.default_rng(1).normal(size=(1, 5, 37, 37)).astype(np.float32)
    t = torch.from_numpy(x)
    if scale is None:
        want = torch.nn.functional.interpolate(
            t, size=(16, 16), mode="bicubic", align_corners=False
        )
    else:
        want = torch.nn.functional.interpolate(
            t, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic", align_corners=False
        )
    a = resample.bicubic_matrix(37, 16, scale)
    got = resample.resize_separable(jnp.asarray(x.transpose(0, 2, 3, 1)), a, a)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want.numpy(), atol=1e-5)


def test_decode_of_one_pixel_level_is_constant():
    levels = pyramid.init(jax.random.key(0), 3, [1])
    images = np.asarray(pyramid.decode(levels, 64))
    assert images.shape == (3, 64, 64, 3)
    np.testing.assert_allclose(images, np.broadcast_to(images[:, :1, :1], images.shape), atol=1e-7)
    assert images.min() > 0 and images.max() < 1


def test_colour_matrix_is_normalised_by_its_largest_column():
    norms = np.linalg.norm(pyramid.COLOR_CORRELATION_NORMALIZED, axis=0)
    assert norms.max() == pytest.approx(1.0)
    assert np.linalg.norm(pyramid.COLOR_CORRELATION, axis=0).max() == pytest.approx(0.4619524)


def test_extend_noise_rescales_old_levels():
    levels = pyramid.init(jax.random.key(0), 2, [1, 2])
    new = pyramid.extend(jax.random.key(1), levels, "noise")
    assert [lvl.shape[1] for lvl in new] == [1, 2, 4]
    for old, lvl in zip(levels, new):
        np.testing.assert_allclose(lvl, old * 2 / 3, rtol=1e-6)
    # The new level is N(0, 1)/3: check its spread on a larger draw.
    big = pyramid.extend(jax.random.key(2), pyramid.init(jax.random.key(3), 64, [8]), "noise")
    assert float(jnp.std(big[-1])) == pytest.approx(0.5, rel=0.05)


def test_extend_zero_mode_keeps_the_pre_sigmoid_image():
    levels = pyramid.init(jax.random.key(0), 2, [1, 2, 4])
    new = pyramid.extend(jax.random.key(1), levels, "zero")
    # Exact at the new level's resolution ...
    np.testing.assert_allclose(
        pyramid.upsampled_sum(new, 8), pyramid.upsampled_sum(levels, 8), atol=1e-6
    )
    # ... and up to bilinear re-interpolation at full resolution.
    before, after = pyramid.upsampled_sum(levels, 64), pyramid.upsampled_sum(new, 64)
    assert float(jnp.abs(after - before).max()) < 0.1 * float(jnp.abs(before).max())
    # A pyramid that starts from zero stays zero.
    zeros = pyramid.init(jax.random.key(0), 2, [1], mode="zero")
    assert float(jnp.abs(pyramid.extend(jax.random.key(0), zeros, "zero")[-1]).max()) == 0


def test_grow_resets_adam_state():
    tx = lgm.optimizer()
    cfg = lgm.StepConfig(num_classes=2)
    state = lgm.init_state(jax.random.key(0), cfg, tx)
    grads = jax.tree_util.tree_map(jnp.ones_like, state.levels)
    _, opt_state = tx.update(grads, state.opt_state, state.levels)
    state = state.replace(opt_state=opt_state)
    assert int(state.opt_state[0].count) == 1
    grown = lgm.grow(state, tx)
    assert len(grown.levels) == 2
    fresh = tx.init(grown.levels)
    for a, b in zip(jax.tree_util.tree_leaves(grown.opt_state), jax.tree_util.tree_leaves(fresh)):
        np.testing.assert_array_equal(a, b)


def test_bad_pyramid_settings_are_refused():
    with pytest.raises(ValueError, match="init mode"):
        pyramid.init(jax.random.key(0), 1, [1], mode="ones")
    with pytest.raises(ValueError, match="double"):
        pyramid.init(jax.random.key(0), 1, [1, 4])
    with pytest.raises(ValueError, match="power of two"):
        pyramid.resolutions(1, 100)
    assert pyramid.resolutions(1, 256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
