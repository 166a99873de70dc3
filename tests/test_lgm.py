import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lgm_jax import augment, lgm, pyramid
from lgm_jax.models import vit


def _step_cfg(**kw):
    base = dict(
        num_classes=3, ipc=1, aug_rounds=2, syn_res=32, augment=augment.AugmentConfig(out_res=28)
    )
    base.update(kw)
    return lgm.StepConfig(**base)


def test_closed_form_probe_grad_equals_autodiff():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    w, b = lgm.sample_probe(k1, 5, 16, std=0.5)
    b = b + 0.1
    feats = jax.random.normal(k2, (12, 16))
    labels = jax.random.randint(k3, (12,), 0, 5)
    np.testing.assert_allclose(
        lgm.probe_grad(w, b, feats, labels),
        lgm.probe_grad_autodiff(w, b, feats, labels),
        rtol=1e-5,
        atol=1e-7,
    )


def test_probe_grad_of_shards_sums_to_the_full_gradient():
    w, b = lgm.sample_probe(jax.random.key(0), 4, 8)
    feats = jax.random.normal(jax.random.key(1), (10, 8))
    labels = jnp.arange(10) % 4
    parts = lgm.probe_grad(w, b, feats[:6], labels[:6], 10) + lgm.probe_grad(
        w, b, feats[6:], labels[6:], 10
    )
    np.testing.assert_allclose(parts, lgm.probe_grad(w, b, feats, labels), rtol=1e-5, atol=1e-8)


def test_match_loss_is_one_minus_cosine():
    a, b = jnp.array([1.0, 0.0, 0.0]), jnp.array([1.0, 1.0, 0.0])
    assert float(lgm.match_loss(a, b)) == pytest.approx(1 - 1 / np.sqrt(2))
    assert float(lgm.match_loss(a, a)) == pytest.approx(0.0, abs=1e-7)


def _meta_setup(tiny_vit, cfg):
    model, params, _ = tiny_vit
    features = lambda p, x: model.apply({"params": p}, x)
    levels = pyramid.init(jax.random.key(1), cfg.num_syn, [1, 2, 4])
    probe, real_aug, syn_aug = lgm.draws(jax.random.key(2), 32, cfg)
    real = jax.random.uniform(jax.random.key(3), (cfg.num_real, 32, 32, 3))
    # Skewed real labels and a wide probe keep g_real and g_syn apart, so the loss is well above
    # float32 rounding and its gradient is informative.
    labels = jnp.arange(cfg.num_real) * cfg.num_classes // (2 * cfg.num_real)
    z = lgm.real_features(features, params, real, real_aug, cfg)
    g_real = lgm.probe_grad(*probe, z, labels)
    loss = functools.partial(
        lgm.meta_loss,
        params=params,
        probe=probe,
        g_real=g_real,
        aug_params=syn_aug,
        features=features,
        cfg=cfg,
    )
    return levels, loss


def test_meta_gradient_matches_finite_differences(tiny_vit):
    # In float64, so that central differences resolve the small meta-loss changes.
    cfg = _step_cfg(probe_std=1.0)
    model, params, vcfg = tiny_vit
    with jax.enable_x64(True):
        params64 = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params)
        levels, loss = _meta_setup((vit.ViT(vcfg.replace(dtype="float64")), params64, vcfg), cfg)
        levels = tuple(lvl.astype(jnp.float64) for lvl in levels)
        loss_fn = jax.jit(loss)
        grads = jax.grad(loss)(levels)
        assert grads[0].dtype == jnp.float64
        rng, eps = np.random.default_rng(0), 1e-6
        for _ in range(3):
            v = tuple(jnp.asarray(rng.normal(size=lvl.shape)) for lvl in levels)
            shift = lambda s, v=v: tuple(lvl + s * eps * d for lvl, d in zip(levels, v))
            fd = (float(loss_fn(shift(1.0))) - float(loss_fn(shift(-1.0)))) / (2 * eps)
            ad = sum(float(jnp.vdot(g, d)) for g, d in zip(grads, v))
            assert ad == pytest.approx(fd, rel=1e-4)
            assert abs(fd) > 1e-7  # the direction moves the loss: the comparison has teeth


def test_bfloat16_meta_loss_close_to_float32(tiny_vit):
    cfg = _step_cfg(probe_std=1.0)
    model, params, vcfg = tiny_vit
    levels, loss32 = _meta_setup(tiny_vit, cfg)
    model16 = vit.ViT(vcfg.replace(dtype="bfloat16"))
    f16 = lambda p, x: model16.apply({"params": p}, x)
    _, loss16 = _meta_setup((model16, params, vcfg), cfg)
    l32, l16 = float(loss32(levels)), float(loss16(levels))
    assert abs(l16 - l32) <= 2e-2 * abs(l32), (l32, l16)
    assert f16(params, jnp.zeros((1, 28, 28, 3))).dtype == jnp.float32


def test_train_step_updates_and_skips_non_finite(tiny_vit):
    model, params, _ = tiny_vit
    cfg = _step_cfg()
    tx = lgm.optimizer()
    state = lgm.init_state(jax.random.key(0), cfg, tx, start_res=[1, 2])
    features = lambda p, x: model.apply({"params": p}, x)
    step = lgm.jit_train_step(features, 32, tx, cfg)
    real = jnp.asarray(
        np.random.default_rng(0).integers(0, 256, (cfg.num_real, 32, 32, 3)), jnp.uint8
    )
    labels = jnp.arange(cfg.num_real, dtype=jnp.int32) % cfg.num_classes
    before = jax.tree_util.tree_map(np.asarray, state.levels)
    state, m = step(state, params, real, labels)
    assert int(state.step) == 1 and bool(m["finite"]) and 0 <= float(m["loss"]) <= 2
    assert any(np.abs(a - b).max() > 0 for a, b in zip(before, state.levels))
    # NaN inputs give a non-finite loss: the update is skipped, the levels stay as they were.
    bad = jax.tree_util.tree_map(lambda p: p * jnp.nan, params)
    kept = jax.tree_util.tree_map(np.asarray, state.levels)
    state, m = step(state, bad, real, labels)
    assert int(state.step) == 2 and not bool(m["finite"])
    for a, b in zip(kept, state.levels):
        np.testing.assert_array_equal(a, b)


def test_step_draws_depend_only_on_step_number(tiny_vit):
    cfg = _step_cfg()
    a = lgm.draws(jax.random.fold_in(jax.random.key(5), 7), 32, cfg)
    b = lgm.draws(jax.random.fold_in(jax.random.key(5), 7), 32, cfg)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)
