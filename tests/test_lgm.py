import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lgm_jax import augment, lgm, pyramid
from lgm_jax.models import vit


def _step_cfg(**kw):
    base = dict(
        num_classes=3, ipc=1, aug_rounds=2, syn_res=32, augment=augment.AugmentConfig(input_res=28)
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
    k_probe, k_real, k_syn = lgm.step_keys(jax.random.key(2), 0)
    probe = lgm.sample_probe(k_probe, cfg.num_classes, 32, cfg.probe_std)
    real_aug = augment.sample(k_real, cfg.num_real, cfg.augment)
    syn_aug = augment.sample(k_syn, cfg.num_real, cfg.augment)
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
    l32, l16 = float(jax.jit(loss32)(levels)), float(jax.jit(loss16)(levels))
    assert abs(l16 - l32) <= 2e-2 * abs(l32), (l32, l16)
    assert f16(params, jnp.zeros((1, 28, 28, 3))).dtype == jnp.float32


def test_train_step_updates_and_skips_non_finite(tiny_vit):
    model, params, _ = tiny_vit
    cfg = _step_cfg()
    tx = lgm.optimizer()
    state = lgm.init_state(jax.random.key(0), cfg, tx, start_res=[1, 2])
    features = lambda p, x: model.apply({"params": p}, x)
    step = lgm.make_step(features, 32, tx, cfg)
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


def test_row_draws_do_not_depend_on_how_the_batch_is_split():
    cfg = augment.AugmentConfig(input_res=16)
    whole = augment.sample_rows(jax.random.key(5), jnp.arange(6), cfg)
    part = augment.sample_rows(jax.random.key(5), jnp.arange(3, 6), cfg)
    for k in whole:
        np.testing.assert_array_equal(whole[k][3:], part[k])
    keys_a, keys_b = lgm.step_keys(jax.random.key(1), 7), lgm.step_keys(jax.random.key(1), 7)
    for a, b in zip(keys_a, keys_b):
        np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))


_REFERENCE = {}


def _grad_setup(tiny_vit, **kw):
    """A 4-class problem, its step inputs, and (loss, grads) by direct autodiff (computed once:
    the reference does not depend on the chunking settings that the tests vary)."""
    model, params, _ = tiny_vit
    features = lambda p, x: model.apply({"params": p}, x)
    cfg = _step_cfg(num_classes=4, probe_std=1.0, **kw)
    levels = pyramid.init(jax.random.key(0), cfg.num_syn, [1, 2, 4])
    real = jnp.asarray(
        np.random.default_rng(0).integers(0, 256, (cfg.num_real, 32, 32, 3)), jnp.uint8
    )
    labels = jnp.array([0, 1, 2, 3, 0, 0, 1, 2], jnp.int32)
    keys = lgm.step_keys(jax.random.key(3), 11)
    args = (levels, params, real, labels, keys)
    if id(model) not in _REFERENCE:
        ref_cfg = _step_cfg(num_classes=4, probe_std=1.0)
        fn = functools.partial(lgm.reference_grad, features=features, feat_dim=32, cfg=ref_cfg)
        _REFERENCE[id(model)] = jax.jit(fn)(*args)
    return features, cfg, args, _REFERENCE[id(model)]


def _assert_grads_close(got, want, rtol=2e-5):
    (l1, g1), (l0, g0) = got, want
    assert float(l1) == pytest.approx(float(l0), rel=1e-5)
    for a, b in zip(g1, g0):
        scale = float(jnp.abs(b).max())
        assert scale > 0
        np.testing.assert_allclose(a, b, atol=rtol * scale)


@pytest.mark.parametrize("chunk", [None, 3])
def test_chunked_meta_grad_equals_direct_autodiff(tiny_vit, chunk):
    features, cfg, args, want = _grad_setup(tiny_vit, chunk_size=chunk)
    fn = functools.partial(lgm.meta_grad, features=features, feat_dim=32, cfg=cfg)
    _assert_grads_close(jax.jit(fn)(*args), want)


@pytest.mark.parametrize(
    "devices, chunk, state",
    [(8, None, "replicated"), (2, 1, "replicated"), (4, None, "class"), (2, 2, "class")],
)
def test_sharded_meta_grad_equals_single_device(tiny_vit, devices, chunk, state):
    assert jax.device_count() == 8, "tests expect 8 fake CPU devices (see conftest.py)"
    features, cfg, args, want = _grad_setup(tiny_vit, chunk_size=chunk, state_sharding=state)
    mesh = lgm.data_mesh(jax.devices()[:devices])
    P = jax.sharding.PartitionSpec
    lv = P("data") if state == "class" else P()
    fn = jax.shard_map(
        functools.partial(
            lgm.meta_grad,
            features=features,
            feat_dim=32,
            cfg=cfg,
            axis="data",
            num_devices=devices,
        ),
        mesh=mesh,
        in_specs=(lv, P(), P("data"), P("data"), P()),
        out_specs=(P(), lv),
    )
    _assert_grads_close(jax.jit(fn)(*args), want)


@pytest.mark.parametrize("state_sharding, devices", [("replicated", 8), ("class", 4)])
def test_sharded_step_equals_single_device_step(tiny_vit, state_sharding, devices):
    features, cfg, (levels, params, real, labels, _), _ = _grad_setup(tiny_vit, chunk_size=1)
    tx = lgm.optimizer()
    state = lgm.init_state(jax.random.key(0), cfg, tx, start_res=[1, 2])
    one = lgm.make_step(features, 32, tx, cfg)
    mesh = lgm.data_mesh(jax.devices()[:devices])
    split = dataclasses.replace(cfg, state_sharding=state_sharding)
    many = lgm.make_step(features, 32, tx, split, mesh=mesh)
    by_class = state_sharding == "class"
    # Copies: the steps donate their input state, and device_put may alias it.
    s8 = jax.device_put(
        jax.tree_util.tree_map(jnp.copy, state), lgm.state_sharding(state, mesh, by_class)
    )
    s1 = state
    for _ in range(2):
        s1, m1 = one(s1, params, real, labels)
        s8, m8 = many(s8, params, real, labels)
        assert float(m1["loss"]) == pytest.approx(float(m8["loss"]), rel=1e-5)
    for a, b in zip(s1.levels, s8.levels):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # The layout is kept from step to step: with "class", each device holds one image's rows.
    want = lgm.state_sharding(s8, mesh, by_class)
    for leaf, sharding in zip(jax.tree_util.tree_leaves(s8), jax.tree_util.tree_leaves(want)):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    if by_class:
        assert s8.levels[-1].addressable_shards[0].data.shape[0] == cfg.num_syn // devices


def test_cached_real_features_give_the_same_step(tiny_vit):
    features, cfg, (levels, params, real, labels, keys), want = _grad_setup(tiny_vit)
    aug = augment.sample_rows(keys[1], jnp.arange(cfg.num_real), cfg.augment)
    z_real = lgm.real_features(features, params, real, aug, cfg)
    cached = dataclasses.replace(cfg, real_input="features")
    fn = functools.partial(lgm.meta_grad, features=features, feat_dim=32, cfg=cached)
    _assert_grads_close(jax.jit(fn)(levels, params, z_real, labels, keys), want)


def test_batch_that_does_not_split_over_devices_is_refused(tiny_vit):
    features, cfg, *_ = _grad_setup(tiny_vit)
    with pytest.raises(ValueError, match="does not split"):
        lgm.make_step(features, 32, lgm.optimizer(), cfg, mesh=lgm.data_mesh(jax.devices()[:3]))
    # 8 rows split over 8 devices, but 4 synthetic images do not.
    split = dataclasses.replace(cfg, state_sharding="class")
    with pytest.raises(ValueError, match="state_sharding='class' needs the 4 synthetic images"):
        lgm.make_step(features, 32, lgm.optimizer(), split, mesh=lgm.data_mesh())
    with pytest.raises(ValueError, match="state_sharding must be one of"):
        dataclasses.replace(cfg, state_sharding="rows")
