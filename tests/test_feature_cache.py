"""The real-feature cache: cached features give the same probe gradients as the backbone run
online on the same augmented images; builds resume; mismatched caches are refused."""

import functools
import json
import os

import jax
import numpy as np
import pytest

from lgm_jax import augment, config_base, errors, lgm
from lgm_jax import feature_cache as fc
from lgm_jax.data import pipeline, sources
from lgm_jax.models import dinov2, registry

SYN_RES, INPUT_RES, VIEWS, SHARD = 32, 28, 3, 8
CONFIG = fc.settings(syn_res=SYN_RES, input_res=INPUT_RES)
# The tiny registry DINOv2 with one block and no layer scale (whose 1e-5 initial value makes a
# random network's features nearly blind to the image).
TINY = dict(depth=1, layer_scale=False)


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


@functools.cache  # building compiles the initialisation: once per seed
def _backbone(seed=0):
    return registry.build("dinov2_tiny", rng=jax.random.key(seed), input_res=INPUT_RES, **TINY)


def _build(out, ds=None, params=None, name="tiny", **over):
    backbone, p = _backbone()
    kw = dict(name=name, views=VIEWS, shard_size=SHARD, seed=5, dtype="float32", progress=False)
    kw.update(over)
    p = p if params is None else params
    return fc.build(str(out), ds or _toy(), backbone, p, CONFIG, **kw)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    _build(out)
    return out


BACKBONE, PARAMS = _backbone()
CFG = config_base.step_config(CONFIG, 4)
REAL_FEATURES = jax.jit(lambda p, x, d: lgm.real_features(BACKBONE.features, p, x, d, CFG))


def _online(ds, view, shard):
    """The features of one shard's view computed directly: crop, step augmentation, backbone."""
    src = ds.source("train")
    idx = np.arange(shard * SHARD, min(len(src), (shard + 1) * SHARD))
    crops = np.zeros((SHARD, SYN_RES, SYN_RES, 3), np.uint8)
    for row, i in enumerate(idx):
        image = pipeline.resize_shorter(src[i]["image"], SYN_RES)
        crops[row] = fc.crop_view(image, SYN_RES, 5, view, i)
    draws = augment.sample(fc.view_key(5, view, shard), SHARD, CFG.augment)
    z = REAL_FEATURES(PARAMS, crops, draws)
    return np.asarray(z)[: len(idx)], src.labels[idx]


def test_cached_probe_gradients_match_online(cache_dir):
    ds = _toy()
    cache = fc.FeatureCache.open(
        str(cache_dir), expect=dict(dataset="toy", backbone="tiny", syn_res=SYN_RES)
    )
    assert cache.num_images == 20 and cache.num_views == VIEWS and cache.feature_dim == 64
    w, b = lgm.sample_probe(jax.random.key(0), ds.num_classes, 64, std=1.0)
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
    assert f1.shape == (10, 64) and f1.dtype == np.float32 and l1.dtype == np.int32
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
    for key, value in [("backbone", "other"), ("syn_res", 224), ("dataset", "imagenet100")]:
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


def test_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sources, "get_dataset", lambda name, data_dir=None: _toy(name, n=10))
    out = str(tmp_path / "cli")
    argv = ["--dataset", "toy10", "--backbone", "dinov2_tiny", "--views", "2", "--out", out]
    argv += ["--syn-res", str(SYN_RES), "--input-res", str(INPUT_RES)]
    assert fc.main([*argv, "--shard-size", "8"]) == 0
    expect = dict(dataset="toy10", backbone="dinov2_tiny", syn_res=SYN_RES, views=2)
    expect["fingerprint"] = fc.fingerprint(registry.build("dinov2_tiny", input_res=INPUT_RES)[1])
    cache = fc.FeatureCache.open(out, expect=expect)
    assert cache.load_all()[0].shape == (2, 10, 64)
    assert cache.meta["augment"]["input_res"] == INPUT_RES and cache.meta["format"] == fc.FORMAT
    # A user's mistake is one line and exit status 2; --help exits 0.
    capsys.readouterr()
    assert fc.main([*argv[:2], "--backbone", "dinov2_nope", *argv[4:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown backbone 'dinov2_nope'") and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        fc.main(["--help"])
    assert e.value.code == 0
    assert "python -m lgm_jax.feature_cache --dataset" in capsys.readouterr().out


def test_cache_of_another_format_is_refused(cache_dir, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    meta = json.loads((cache_dir / "meta.json").read_text())
    meta["format"], meta["res"] = 1, meta.pop("syn_res")  # a cache written before syn_res
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(fc.CacheMismatch, match="format 1") as e:
        fc.FeatureCache.open(str(old))
    assert isinstance(e.value, errors.InputError)


def golden_backbone(path):
    """A user's own backbone, as `factory:<module>:golden_backbone:<dir>` builds it: the
    transformers DINOv2 directory of the golden step."""
    cfg, params = dinov2.load(path)
    return registry.Backbone(name="dinov2_golden", family="dinov2", config=cfg), params


def test_factory_backbone_from_a_transformers_directory(golden_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "get_dataset", lambda name, data_dir=None: _toy(name, n=4))
    name = f"factory:{__name__}:golden_backbone:{golden_dir / 'backbone'}"
    out = str(tmp_path / "golden")
    argv = ["--dataset", "toy4", "--backbone", name, "--views", "1", "--out", out]
    assert fc.main([*argv, "--shard-size", "8"]) == 0  # 256 px crops, 224 px backbone input
    _, params = dinov2.load(str(golden_dir / "backbone"))
    # The run's config.backbone is the name the user passed, so the cache records that name.
    cache = fc.FeatureCache.open(
        out, expect=dict(backbone=name, fingerprint=fc.fingerprint(params))
    )
    assert cache.feature_dim == 64 and cache.load_all()[0].shape == (1, 4, 64)
    assert cache.meta["syn_res"] == 256 and cache.meta["augment"]["input_res"] == 224
