"""The streamed probe (train split read a batch at a time) against the in-memory one, its saved
progress, corrupt images, and the `full` baseline end to end on a stand-in dataset."""

import json

import jax
import numpy as np
import pytest
from test_evaluate import BACKBONE, PARAMS, RES, SRC, colour_images, features, tiny_cfg

from lgm_jax import baselines as bl
from lgm_jax import data, distilled, probe
from lgm_jax.data import sources
from lgm_jax.models import registry


def loader(source, res=SRC):
    return lambda idx, mask, epoch: data.read_batch(source, idx, crop=res, resize=res, mask=mask)


def test_streamed_probe_equals_the_in_memory_probe():
    # 10 images in batches of 4: the last batch of every epoch is padded and masked.
    images, labels = colour_images(10, 3, np.random.default_rng(0))
    cfg = tiny_cfg(3, epochs=3, batch_size=4, lr=0.01)
    key = jax.random.key(3)
    (w, b), losses = probe.train_probes(
        features, PARAMS, images, labels, feat_dim=32, cfg=cfg, seeds=2, rng=key
    )
    src = sources.ArraySource(images, labels)
    (ws, bs), ls = probe.train_streamed(
        features, PARAMS, loader(src), 10, feat_dim=32, cfg=cfg, seeds=2, rng=key, workers=2
    )
    assert ws.shape == w.shape and ls.shape == losses.shape == (2, 3)
    np.testing.assert_allclose(ws, w, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(bs, b, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(ls, losses, rtol=1e-5)
    assert np.abs(np.asarray(ws[0] - ws[1])).max() > 1e-3  # the seeds differ


def test_streamed_probe_continues_from_its_saved_progress(tmp_path):
    images, labels = colour_images(10, 3, np.random.default_rng(1))
    src = sources.ArraySource(images, labels)
    cfg = tiny_cfg(3, epochs=4, batch_size=4, lr=0.01)
    kw = dict(feat_dim=32, cfg=cfg, seeds=1, rng=jax.random.key(0), workers=1, prefetch=2)
    (w_ref, _), l_ref = probe.train_streamed(features, PARAMS, loader(src), 10, **kw)

    calls = []

    def dies_in_epoch_2(idx, mask, epoch):  # 3 batches an epoch: the 8th read is epoch 2's second
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return loader(src)(idx, mask, epoch)

    prefix = str(tmp_path / "progress")
    with pytest.raises(KeyboardInterrupt):
        probe.train_streamed(
            features, PARAMS, dies_in_epoch_2, 10, progress=prefix, fingerprint="a", **kw
        )
    with np.load(prefix + ".seed0.npz") as f:
        assert int(f["epoch"]) == 1  # epochs 0 and 1 were finished and saved
    reads = []
    counting = lambda idx, mask, e: reads.append(e) or loader(src)(idx, mask, e)
    (w, _), losses = probe.train_streamed(
        features, PARAMS, counting, 10, progress=prefix, fingerprint="a", **kw
    )
    assert reads == [2, 2, 2, 3, 3, 3]  # only epochs 2 and 3 were read again
    np.testing.assert_allclose(w, w_ref, atol=1e-6)
    np.testing.assert_allclose(losses, l_ref, rtol=1e-6)
    with pytest.raises(ValueError, match="different probe run"):
        probe.train_streamed(
            features, PARAMS, loader(src), 10, progress=prefix, fingerprint="b", **kw
        )


class CorruptAt(sources.ArraySource):
    def __init__(self, images, labels, bad):
        super().__init__(images, labels)
        self.bad = set(bad)

    def __getitem__(self, i):
        if int(i) in self.bad:
            raise sources.CorruptImage(f"image {i} is corrupt")
        return super().__getitem__(i)


def test_streamed_probe_skips_corrupt_images():
    images, labels = colour_images(10, 3, np.random.default_rng(2))
    before = data.skipped_images()
    src = CorruptAt(images, labels, bad=[4, 7])
    cfg = tiny_cfg(3, epochs=2, batch_size=4, lr=0.01)
    (w, _), losses = probe.train_streamed(
        features, PARAMS, loader(src), 10, feat_dim=32, cfg=cfg, rng=jax.random.key(0)
    )
    assert data.skipped_images() == before + 2
    assert np.all(np.isfinite(np.asarray(w))) and np.all(np.isfinite(np.asarray(losses)))
    # The corrupt rows count for nothing: black stand-ins for them would change the probe.
    black = images.copy()
    black[[4, 7]] = 0
    (w_black, _), _ = probe.train_streamed(
        features,
        PARAMS,
        loader(sources.ArraySource(black, labels)),
        10,
        feat_dim=32,
        cfg=cfg,
        rng=jax.random.key(0),
    )
    assert np.abs(np.asarray(w - w_black)).max() > 1e-4


def test_full_baseline_end_to_end(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(3)
    train_x, train_y = colour_images(24, 4, rng)
    test_x, test_y = colour_images(20, 4, rng, res=RES)
    ds = sources.Dataset(
        "colours",
        4,
        ("r", "g", "b", "y"),
        ("train", "test"),
        lambda split: sources.ArraySource(
            *((train_x, train_y) if split == "train" else (test_x, test_y))
        ),
    )
    monkeypatch.setattr(data, "get_dataset", lambda name, data_dir=None: ds)
    monkeypatch.setattr(registry, "build", lambda name, weights=None: (BACKBONE, PARAMS))
    monkeypatch.setattr(distilled, "SYN_RES", SRC)  # train images kept at 32 px, cropped to 28
    out = tmp_path / "full"
    argv = ["full", "--dataset", "colours", "--backbone", "tiny", "--out", str(out)]
    argv += ["--epochs", "15", "--batch", "8", "--lr", "0.01", "--workers", "2"]
    assert bl.main(argv) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["method"] == "full" and result["num_images"] == 24
    assert result["num_test"] == 20 and result["top1"]["mean"] >= 90.0
    assert result["settings"]["streamed"] and result["settings"]["epochs"] == 15
    assert (out / "progress.seed0.npz").exists()
    # Rerun: every epoch is already done, nothing is read again, the same probe is tested.
    monkeypatch.setattr(
        data, "read_batch", lambda *a, **k: pytest.fail("a finished run read the data again")
    )
    assert bl.main(argv) == 0
    again = json.loads((out / "eval.json").read_text())
    assert again["top1"] == result["top1"]
    assert again["final_train_loss"] == result["final_train_loss"]
    # Other settings into the same --out: refused, naming the file; the finished run kept.
    capsys.readouterr()
    assert bl.main([*argv, "--epochs", "16"]) == 2  # the last --epochs counts
    err = capsys.readouterr().err
    assert "progress.seed0.npz" in err and "different probe run" in err
    assert json.loads((out / "eval.json").read_text()) == again


def test_random_crops_are_drawn_per_epoch_and_image():
    # 40 x 60 images (crop freedom along the width), resized to 32 on the shorter side.
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (3, 40, 60, 3), dtype=np.uint8)
    src = sources.ArraySource(images, np.arange(3))
    read = lambda idx, seed: data.read_batch(
        src, np.asarray(idx), crop=32, resize=32, crop_seed=seed
    )["image"]
    a, b = read([0, 1, 2], (0, 1)), read([0, 1, 2], (0, 2))
    np.testing.assert_array_equal(a, read([0, 1, 2], (0, 1)))  # reproducible
    assert any(not np.array_equal(a[k], b[k]) for k in range(3))  # another epoch, other crops
    np.testing.assert_array_equal(read([2, 0], (0, 1)), a[[2, 0]])  # per image, not per row
    centre = data.read_batch(src, np.arange(3), crop=32, resize=32)["image"]
    full = data.resize_shorter(images[0], 32)  # 32 x 48
    np.testing.assert_array_equal(centre[0], full[:, 8:40])
    offsets = {
        next(x for x in range(17) if np.array_equal(read([0], (0, e))[0], full[:, x : x + 32]))
        for e in range(8)
    }
    assert len(offsets) > 1  # the crops move
