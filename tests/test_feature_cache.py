"""The real-feature cache: cached features give the same probe gradients as the backbone run
online on the same augmented images; builds resume; mismatched caches are refused."""

import os

import jax
import numpy as np
import pytest

from lgm_jax import augment, lgm
from lgm_jax import feature_cache as fc
from lgm_jax.data import pipeline, sources
from lgm_jax.models import dinov2, vit

RES, INPUT_RES, VIEWS, SHARD = 32, 28, 3, 8
AUG = augment.AugmentConfig(mode="train", input_res=INPUT_RES)


def _toy(name="toy", n=20, classes=4):
    """n random non-square images (different sizes) with labels i % classes."""
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (30 + i % 3 * 7, 45 - i % 2 * 9, 3), np.uint8) for i in range(n)]
    labels = np.arange(n) % classes

    class Source(sources.ArraySource):
        def __getitem__(self, i):
            return {"image": images[i], "label": int(labels[i])}

    names = tuple(str(c) for c in range(classes))
    return sources.Dataset(name, classes, names, ("train",), lambda s: Source(None, labels))


def _backbone(seed=0):
    cfg = dinov2.variant("S/14").replace(
        width=32, depth=1, heads=2, mlp_dim=64, pos_grid=4, input_res=INPUT_RES
    )
    model = vit.ViT(cfg)
    params = model.init(jax.random.key(seed), np.zeros((1, INPUT_RES, INPUT_RES, 3), np.float32))
    return (lambda p, x: model.apply({"params": p}, x)), params["params"]


def _build(out, ds=None, params=None, name="tiny", **over):
    features, p = _backbone()
    kw = dict(views=VIEWS, res=RES, aug=AUG, shard_size=SHARD, seed=5, dtype="float32")
    kw.update(progress=False, **over)
    return fc.build(str(out), ds or _toy(), features, p if params is None else params, name, **kw)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    _build(out)
    return out


FEATURES, PARAMS = _backbone()
CFG = lgm.StepConfig(num_classes=4, augment=AUG)
REAL_FEATURES = jax.jit(lambda p, x, d: lgm.real_features(FEATURES, p, x, d, CFG))


def _online(ds, view, shard):
    """The features of one shard's view computed directly: crop, step augmentation, backbone."""
    src = ds.source("train")
    idx = np.arange(shard * SHARD, min(len(src), (shard + 1) * SHARD))
    crops = np.zeros((SHARD, RES, RES, 3), np.uint8)
    for row, i in enumerate(idx):
        crops[row] = fc.crop_view(pipeline.resize_shorter(src[i]["image"], RES), RES, 5, view, i)
    draws = augment.sample(fc.view_key(5, view, shard), SHARD, AUG)
    z = REAL_FEATURES(PARAMS, crops, draws)
    return np.asarray(z)[: len(idx)], src.labels[idx]


def test_cached_probe_gradients_match_online(cache_dir):
    ds = _toy()
    cache = fc.FeatureCache.open(
        str(cache_dir), expect=dict(dataset="toy", backbone="tiny", res=RES)
    )
    assert cache.num_images == 20 and cache.num_views == VIEWS and cache.feature_dim == 32
    w, b = lgm.sample_probe(jax.random.key(0), ds.num_classes, 32, std=1.0)
    for view, shard in [(0, 0), (2, 1), (1, 2)]:  # the last shard is short (20 = 8 + 8 + 4)
        z, labels = _online(ds, view, shard)
        rows = np.arange(len(z)) + shard * SHARD
        cached = cache.gather(np.full(len(z), view), rows)
        np.testing.assert_array_equal(cache.labels[rows], labels)
        np.testing.assert_allclose(cached, z, rtol=1e-4, atol=1e-5)
        g_online = lgm.probe_grad(w, b, z, labels)
        g_cached = lgm.probe_grad(w, b, cached, cache.labels[rows])
        np.testing.assert_allclose(g_cached, g_online, rtol=1e-4, atol=1e-6)
    # The views differ (different crops and augmentation draws).
    assert not np.allclose(cache.gather([0], [0]), cache.gather([1], [0]))


def test_sample_is_deterministic_epochs_and_views(cache_dir):
    cache = fc.FeatureCache.open(str(cache_dir))
    f1, l1 = cache.sample(7, 3, 10)
    f2, l2 = cache.sample(7, 3, 10)
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(l1, l2)
    assert f1.shape == (10, 32) and f1.dtype == np.float32 and l1.dtype == np.int32
    assert not np.array_equal(cache.sample(7, 4, 10)[0], f1)
    fk, _ = cache.sample(jax.random.key(7), 3, 10)  # a jax key works too
    np.testing.assert_array_equal(fk, cache.sample(jax.random.key(7), 3, 10)[0])
    # Two steps of 10 cover the 20 images once (an epoch): each row is one of the image's views.
    all_feats, labels = cache.load_all()
    seen = []
    for step in (0, 1):
        f, lab = cache.sample(7, step, 10)
        for row, label in zip(f, lab, strict=True):
            hits = np.argwhere(np.all(all_feats == row, axis=-1))  # (view, image) pairs
            assert len(hits) >= 1 and labels[hits[0, 1]] == label
            seen.append(int(hits[0, 1]))
    assert sorted(seen) == list(range(20))


def test_mismatched_cache_is_refused(cache_dir, tmp_path):
    for key, value in [("backbone", "other"), ("res", 224), ("dataset", "imagenet100")]:
        with pytest.raises(fc.CacheMismatch, match=f"{key}="):
            fc.FeatureCache.open(str(cache_dir), expect={key: value})
    _, p = _backbone()
    with pytest.raises(fc.CacheMismatch, match="fingerprint"):
        fc.FeatureCache.open(
            str(cache_dir), expect=dict(fingerprint=fc.fingerprint(_backbone(1)[1]))
        )
    assert fc.fingerprint(p) == fc.FeatureCache.open(str(cache_dir)).meta["fingerprint"]
    # Building into a directory that holds another backbone's cache is refused too.
    with pytest.raises(fc.CacheMismatch, match="fingerprint"):
        _build(cache_dir, params=_backbone(1)[1])
    with pytest.raises(FileNotFoundError, match="no feature cache"):
        fc.FeatureCache.open(str(tmp_path / "nothing"))


def test_build_resumes_and_skips_finished_shards(tmp_path):
    out = tmp_path / "c"
    _build(out, dtype="float16", views=1)
    done = fc.shard_path(str(out), "feats", 0)
    lost = fc.shard_path(str(out), "feats", 1)
    first, kept = np.load(lost), os.stat(done).st_mtime_ns
    os.remove(lost)  # as if the build had been killed before shard 1 was written
    with pytest.raises(FileNotFoundError, match="incomplete"):
        fc.FeatureCache.open(str(out))
    _build(out, dtype="float16", views=1)
    assert os.stat(done).st_mtime_ns == kept  # not recomputed
    np.testing.assert_array_equal(np.load(lost), first)  # recomputed identically
    cache = fc.FeatureCache.open(str(out), expect=dict(dtype="float16"))
    assert cache.feats[1].dtype == np.float16


def test_command_line(tmp_path, monkeypatch):
    features, params = _backbone()
    monkeypatch.setattr(
        fc, "load_backbone", lambda spec, weights=None, input_res=224: (features, params, spec)
    )
    monkeypatch.setattr(sources, "get_dataset", lambda name, data_dir=None: _toy(name, n=10))
    out = str(tmp_path / "cli")
    argv = ["--dataset", "toy10", "--backbone", "b", "--views", "2", "--out", out]
    fc.main([*argv, "--res", str(RES), "--input_res", str(INPUT_RES), "--shard_size", "8"])
    cache = fc.FeatureCache.open(out, expect=dict(dataset="toy10", backbone="b", views=2))
    assert cache.load_all()[0].shape == (2, 10, 32)


GOLDEN = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "golden", "lgm_step")


@pytest.mark.skipif(not os.path.isdir(GOLDEN), reason="needs ../shared/golden")
def test_load_dinov2_backbone_spec():
    features, params, name = fc.load_backbone(f"dinov2:{GOLDEN}/backbone")
    assert name == "dinov2:backbone"
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), np.float32)
    assert jax.eval_shape(features, params, x).shape == (2, 64)
