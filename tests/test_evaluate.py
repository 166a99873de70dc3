"""The jitted probe protocol against a plain eager reference loop, an easy problem it must solve,
seeds, the input checks, and the CLI end to end with stand-in data and backbone registries."""

import json
import math
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lgm_jax
from lgm_jax import augment, lgm, probe
from lgm_jax import evaluate as ev
from lgm_jax.models import registry
from lgm_jax.preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize, to_unit

RES = 28  # tiny backbone input side (2x2 patches of 14 px)
SRC = 32  # tiny "distilled" image side

# layer_scale off: with DINOv2's 1e-5 layer scale a random net's CLS token ignores the image.
BACKBONE, PARAMS = registry.build("dinov2_tiny", width=32, depth=1, mlp_dim=64, layer_scale=False)
features = BACKBONE.features


def tiny_cfg(num_classes, **kw):
    return probe.ProbeConfig(
        num_classes=num_classes, augment=augment.AugmentConfig(mode="eval", input_res=RES), **kw
    )


def colour_images(n, num_classes, rng, res=SRC):
    """Class c: a noisy solid colour; easy for any feature map that sees colour."""
    cols = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], np.float32)[:num_classes]
    labels = np.arange(n) % num_classes
    x = 0.15 + 0.7 * cols[labels][:, None, None] + 0.05 * rng.standard_normal((n, res, res, 3))
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8), labels.astype(np.int32)


def reference_fit(batch_feats, labels, rng, n, feat_dim, cfg):
    """One seed, eager and in NumPy: closed-form CE gradient, PyTorch Adam, cosine per epoch.
    Only the data order and the random draws come from the library (so the runs are comparable)."""
    k_init, k_shuffle, k_draw = probe.seed_keys(rng, 0)
    w, b = (np.asarray(a, np.float64) for a in lgm.sample_probe(k_init, cfg.num_classes, feat_dim))
    m = [np.zeros_like(w), np.zeros_like(b)]
    v = [np.zeros_like(w), np.zeros_like(b)]
    bs, spe, t = cfg.batch(n), cfg.steps_per_epoch(n), 0
    base = cfg.base_lr(n)
    for e in range(cfg.epochs):
        lr = base * 0.5 * (1 + math.cos(math.pi * e / cfg.epochs))
        idx, mask = (
            np.asarray(a) for a in probe.epoch_batches(jax.random.fold_in(k_shuffle, e), n, bs)
        )
        for j in range(spe):
            z = np.asarray(batch_feats(idx[j], jax.random.fold_in(k_draw, e * spe + j)), np.float64)
            keep = mask[j]
            z, y = z[keep], labels[idx[j][keep]]
            logits = z @ w.T + b
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            err = (p - np.eye(cfg.num_classes)[y]) / len(y)
            grads = [err.T @ z, err.sum(0)]
            t += 1
            for i, g in enumerate(grads):
                m[i] = 0.9 * m[i] + 0.1 * g
                v[i] = 0.999 * v[i] + 0.001 * g * g
                step = (m[i] / (1 - 0.9**t)) / (np.sqrt(v[i] / (1 - 0.999**t)) + 1e-8)
                if i == 0:
                    w = w - lr * step
                else:
                    b = b - lr * step
    return w, b


def test_feature_probe_matches_eager_reference():
    # Separable Gaussian blobs, 2 views; N=10, batch 4: 3 steps per epoch, the last one padded.
    rng = np.random.default_rng(0)
    c, f, n, views = 3, 8, 10, 2
    centres = 3 * rng.standard_normal((c, f))
    labels = (np.arange(n) % c).astype(np.int32)
    feats = (centres[labels] + rng.standard_normal((views, n, f))).astype(np.float32)
    cfg = probe.ProbeConfig(num_classes=c, epochs=12, batch_size=4, lr=0.05, views=views)
    key = jax.random.key(3)
    (w, b), losses = probe.fit_views(
        jnp.asarray(feats),
        jnp.asarray(labels),
        jnp.arange(1, dtype=jnp.uint32),
        key,
        feat_dim=f,
        cfg=cfg,
    )

    def batch_feats(idx, k):
        return feats[np.asarray(jax.random.randint(k, idx.shape, 0, views)), idx]

    w_ref, b_ref = reference_fit(batch_feats, labels, key, n, f, cfg)
    np.testing.assert_allclose(w[0], w_ref, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(b[0], b_ref, atol=2e-5, rtol=1e-4)
    assert losses[0, -1] < 0.5 * losses[0, 0]
    test = (centres[labels] + rng.standard_normal((n, f))).astype(np.float32)
    acc = lambda w, b: np.mean(np.argmax(test @ np.asarray(w).T + np.asarray(b), 1) == labels)
    assert acc(w[0], b[0]) == acc(w_ref, b_ref) >= 0.9


def test_exact_probe_with_backbone_matches_eager_reference():
    rng = np.random.default_rng(1)
    images, labels = colour_images(6, 3, rng)
    cfg = tiny_cfg(3, epochs=3, batch_size=4, lr=0.01)
    key = jax.random.key(5)
    (w, b), _ = probe.train_probes(
        features, PARAMS, images, labels, feat_dim=32, cfg=cfg, seeds=1, rng=key
    )

    # The view of one batch: augment, normalise, backbone. Jitted on its own only to keep the
    # test fast; the training loop around it is plain Python.
    @jax.jit
    def view(x, k):
        x = augment.apply(to_unit(x), augment.sample(k, x.shape[0], cfg.augment), cfg.augment)
        return features(PARAMS, normalize(x, cfg.mean, cfg.std))

    batch_feats = lambda idx, k: view(jnp.asarray(images[idx]), k)

    w_ref, b_ref = reference_fit(batch_feats, labels, key, 6, 32, cfg)
    np.testing.assert_allclose(w[0], w_ref, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(b[0], b_ref, atol=1e-5, rtol=1e-4)


def test_probe_solves_easy_problem_and_seeds_differ():
    rng = np.random.default_rng(2)
    train_x, train_y = colour_images(8, 4, rng)
    test_x, test_y = colour_images(36, 4, rng, res=RES)
    cfg = tiny_cfg(4, epochs=20, lr=0.01)
    res = ev.run_protocol(
        train_x,
        train_y,
        features=features,
        params=PARAMS,
        feat_dim=32,
        cfg=cfg,
        test_batches=lambda: probe.array_batches(test_x, test_y, 16),
        seeds=5,
    )
    assert res["num_test"] == 36  # 3 batches of 16, the last one padded and masked
    assert res["top1"]["mean"] >= 95.0, res["top1"]
    assert res["top5"]["mean"] == 100.0
    assert len(res["top1"]["per_seed"]) == 5

    (w, _), _ = probe.train_probes(
        features, PARAMS, train_x, train_y, feat_dim=32, cfg=cfg, seeds=5
    )
    w = np.asarray(w)
    for i in range(5):
        for j in range(i):
            assert np.abs(w[i] - w[j]).max() > 1e-3
    (w2, _), _ = probe.train_probes(
        features, PARAMS, train_x, train_y, feat_dim=32, cfg=cfg, seeds=5
    )
    np.testing.assert_array_equal(w, np.asarray(w2))  # deterministic given the key


def test_schedule_is_cosine_per_epoch():
    cfg = probe.ProbeConfig(num_classes=2, epochs=4)
    assert cfg.batch(250) == 100 and cfg.steps_per_epoch(250) == 3
    assert cfg.base_lr(250) == pytest.approx(1e-3 * 100 / 256)
    lr = cfg.schedule(250)
    assert [float(lr(e)) for e in range(4)] == pytest.approx(
        [cfg.base_lr(250) * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    )
    idx, mask = probe.epoch_batches(jax.random.key(0), 250, 100)
    assert idx.shape == (3, 100) and int(mask.sum()) == 250
    assert sorted(np.asarray(idx)[np.asarray(mask)].tolist()) == list(range(250))


# ----------------------------------------------------------------------------------------------
# The CLI with stand-in registries (the real ones live in lgm_jax.data / lgm_jax.models.registry)


@pytest.fixture
def fake_registries(monkeypatch):
    rng = np.random.default_rng(4)
    test_x, test_y = colour_images(20, 4, rng, res=RES)
    data = types.ModuleType("lgm_jax.data")
    data.get_dataset = lambda name, data_dir=None: types.SimpleNamespace(name=name, num_classes=4)
    data.eval_iterator = lambda ds, split, batch_size, crop, resize: probe.array_batches(
        test_x, test_y, batch_size
    )
    fake = types.ModuleType("lgm_jax.models.registry")
    backbone = types.SimpleNamespace(
        feature_dim=32, input_res=RES, mean=IMAGENET_MEAN, std=IMAGENET_STD, features=features
    )
    fake.build = lambda name, weights=None, **kw: (backbone, PARAMS)
    monkeypatch.setitem(sys.modules, "lgm_jax.data", data)
    monkeypatch.setitem(sys.modules, "lgm_jax.models.registry", fake)
    monkeypatch.setattr(lgm_jax, "data", data, raising=False)
    monkeypatch.setattr(lgm_jax.models, "registry", fake, raising=False)


def write_run(path, images, labels, **meta):
    os.makedirs(path, exist_ok=True)
    np.savez(os.path.join(path, "synthetic.npz"), images=images, labels=labels)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(meta, f)


def test_cli_end_to_end(tmp_path, fake_registries, capsys):
    rng = np.random.default_rng(5)
    images, labels = colour_images(8, 4, rng)
    write_run(tmp_path / "a", images, labels, dataset="colours", backbone="tiny")
    args = [
        "--backbone",
        "tiny",
        "--seeds",
        "2",
        "--epochs",
        "20",
        "--mode",
        "fast",
        "--views",
        "4",
    ]
    assert ev.main(["--distilled", str(tmp_path / "a"), *args]) == 0
    res = json.loads((tmp_path / "a" / "eval" / "tiny-fast" / "eval.json").read_text())
    assert res["dataset"] == "colours" and res["num_images"] == 8 and res["num_test"] == 20
    assert len(res["top1"]["per_seed"]) == 2 and res["settings"]["views"] == 4
    assert "| distilled | colours | tiny | 8 | fast |" in capsys.readouterr().out

    # A set distilled on a 3-class dataset: a clear error, exit status 2.
    write_run(tmp_path / "b", images[:6], labels[:6] % 3, dataset="colours")
    assert ev.main(["--distilled", str(tmp_path / "b"), *args]) == 2
    assert "3 classes but colours has 4" in capsys.readouterr().err

    # The grid reuses run a's evaluation and writes markdown + JSON.
    assert (
        ev.main(
            [
                "grid",
                "--runs",
                str(tmp_path / "a"),
                "--backbones",
                "tiny",
                "--out",
                str(tmp_path / "grid"),
                *args[2:],
            ]
        )
        == 0
    )
    md = (tmp_path / "grid" / "grid.md").read_text()
    from PIL import Image

    with Image.open(tmp_path / "grid" / "grid.png") as heatmap:  # the same table as a picture
        assert heatmap.size[0] > 100 and heatmap.size[1] > 100
        assert np.asarray(heatmap.convert("L")).std() > 10  # drawn, not blank
    assert f"**{res['top1']['mean']:.1f} ± {res['top1']['std']:.1f}**" in md
    assert (
        json.loads((tmp_path / "grid" / "grid.json").read_text())["cells"][0]["evaluated_on"]
        == "tiny"
    )


@pytest.mark.parametrize("views", [0, 3])
def test_seeds_split_over_devices_train_the_same_probes(views):
    # 8 fake devices: 5 seeds over 5 devices, and over 2 (padded to 6 seeds, one dropped).
    assert len(jax.local_devices()) >= 5
    images, labels = colour_images(10, 3, np.random.default_rng(0))
    cfg = tiny_cfg(3, epochs=3, batch_size=4, lr=0.01, views=views)
    kw = dict(feat_dim=32, cfg=cfg, seeds=5, rng=jax.random.key(2))
    (w1, b1), l1 = probe.train_probes(features, PARAMS, images, labels, devices=1, **kw)
    assert probe.seed_mesh(5, devices=1) is None
    for devices in (None, 2):
        (w, b), losses = probe.train_probes(features, PARAMS, images, labels, devices=devices, **kw)
        assert w.shape == w1.shape and losses.shape == l1.shape == (5, 3)
        assert len(w.sharding.device_set) == (5 if devices is None else 2)
        # Tight: a gradient summed over the devices (the bias, made inside shard_map) would be
        # off by ~1e-3 here.
        np.testing.assert_allclose(w, w1, atol=1e-6)
        np.testing.assert_allclose(b, b1, atol=1e-6)
        np.testing.assert_allclose(losses, l1, rtol=1e-5)


def test_per_seed_sets_split_over_devices():
    # One image set per seed (the random-real baseline), 5 seeds over 3 devices.
    rng = np.random.default_rng(1)
    sets = [colour_images(8, 4, rng) for _ in range(5)]
    images, labels = np.stack([s[0] for s in sets]), np.stack([s[1] for s in sets])
    cfg = tiny_cfg(4, epochs=2, batch_size=4, lr=0.01)
    kw = dict(feat_dim=32, cfg=cfg, seeds=5)
    (w1, _), _ = probe.train_probes(features, PARAMS, images, labels, devices=1, **kw)
    (w3, _), _ = probe.train_probes(features, PARAMS, images, labels, devices=3, **kw)
    np.testing.assert_allclose(w3, w1, atol=1e-6)
    # Each seed trains on its own set: the same set for every seed gives other probes.
    same = np.broadcast_to(images[:1], images.shape)
    (w_same, _), _ = probe.train_probes(features, PARAMS, same, labels, devices=3, **kw)
    assert np.abs(np.asarray(w_same[1:] - w1[1:])).max() > 1e-3
