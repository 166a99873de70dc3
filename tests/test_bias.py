"""The bias datasets on miniature replicas of their released layouts, the colour-MNIST demo's
statistics, the group tallies against a hand count, and a tiny grouped evaluation."""

import csv
import json
import os
import sys
import types

import numpy as np
import pytest
from PIL import Image

import lgm_jax
from lgm_jax import augment, data, groups, probe
from lgm_jax import evaluate as ev
from lgm_jax.data import bias
from lgm_jax.models import registry


def write_image(path, rng, side=8, ext="png"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG" if ext == "jpg" else "PNG")


def all_examples(ds, split):
    src = ds.source(split)
    return [src[i] for i in range(len(src))]


# ---------------------------------------------------------------- Waterbirds


def write_waterbirds(root, rng, side=8):
    """metadata.csv and images: split s, bird y, place p for every (s, y, p), twice for test."""
    folder = os.path.join(root, bias.WATERBIRDS_DIR)
    rows = []
    for split in (0, 1, 2):
        for y in (0, 1):
            for place in (0, 1):
                for k in range(2 if split == 2 else 1):
                    name = f"{y:03d}.Bird_{y}/img_{split}_{place}_{k}.jpg"
                    write_image(os.path.join(folder, name), rng, side, "jpg")
                    place_file = f"/{'ocean' if place else 'forest'}/x.jpg"
                    rows.append([len(rows) + 1, name, y, split, place, place_file])
    with open(os.path.join(folder, "metadata.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["img_id", "img_filename", "y", "split", "place", "place_filename"])
        w.writerows(rows)
    return folder


def test_waterbirds_reads_metadata_splits_and_groups(tmp_path):
    folder = write_waterbirds(str(tmp_path), np.random.default_rng(0))
    for data_dir in (str(tmp_path), folder):  # the parent or the release folder itself
        ds = data.get_dataset("waterbirds", data_dir)
        assert ds.class_names == ("landbird", "waterbird") and ds.splits == ("train", "val", "test")
        assert ds.group_names == ("landbird/land", "landbird/water", "waterbird/land",
                                  "waterbird/water")  # fmt: skip
    assert [len(ds.source(s)) for s in ds.splits] == [4, 4, 8]
    for split, code in bias.WATERBIRDS_SPLITS.items():
        for ex, path in zip(all_examples(ds, split), ds.source(split).paths, strict=True):
            s, place = os.path.basename(path)[len("img_") :].split("_")[:2]
            assert int(s) == code and ex["image"].shape == (8, 8, 3)
            assert ex["group"] == 2 * ex["label"] + int(place)
    assert sorted(ds.source("test").groups.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(data.DatasetNotPrepared, match="data_dir"):
        data.get_dataset("waterbirds")
    with pytest.raises(data.DatasetNotPrepared, match="metadata.csv"):
        data.get_dataset("waterbirds", str(tmp_path / "nowhere"))


def test_groups_go_through_sharded_eval_batches(tmp_path):
    write_waterbirds(str(tmp_path), np.random.default_rng(1))
    ds = data.get_dataset("waterbirds", str(tmp_path))
    seen = []
    for p in range(3):  # 8 test images over 3 processes: 3, 3, 2 (the last row padded)
        for b in data.eval_iterator(ds, "test", 2, crop=8, resize=8, process_index=p,
                                    process_count=3):  # fmt: skip
            assert b["group"].dtype == np.int32 and b["group"].shape == (2,)
            seen += [(int(g), int(y)) for g, y, m in zip(b["group"], b["label"], b["mask"]) if m]
    assert sorted(seen) == sorted((g, g // 2) for g in ds.source("test").groups.tolist())


# ---------------------------------------------------------------- Spawrious


def test_spawrious_o2o_hard_combinations(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / bias.SPAWRIOUS_DIR
    for half in (0, 1):
        for breed in bias.SPAWRIOUS_BREEDS:
            for bg in (bias.O2O_HARD_TRAIN[breed], bias.O2O_HARD_TEST[breed], "beach", "dirt"):
                n = 98 if (half, bg, breed) == (0, "beach", "bulldog") else 2
                for k in range(n):
                    write_image(str(root / str(half) / bg / breed / f"{k:03d}.png"), rng, 4)
    ds = data.get_dataset("spawrious_o2o_hard", str(tmp_path))
    assert ds.class_names == ("bulldog", "corgi", "dachshund", "labrador")
    assert ds.group_names == ("beach", "desert", "jungle", "mountain", "snow")
    train, test = ds.source("train"), ds.source("test")
    # Per breed and half: 2 of its background, 2 beach (bulldog, half 0: the first 96 of 98).
    assert len(train) == 4 * 2 * 4 + 94 and len(test) == 4 * 2 * 2
    beach0 = [p for p in train.paths if os.sep.join(["0", "beach", "bulldog"]) in p]
    assert [os.path.basename(p) for p in beach0] == [f"{k:03d}.png" for k in range(96)]
    for src, combos in ((train, bias.O2O_HARD_TRAIN), (test, bias.O2O_HARD_TEST)):
        for path, y, g in zip(src.paths, src.labels, src.groups, strict=True):
            half, bg, breed = path.split(os.sep)[-4:-1]
            assert ds.class_names[y] == breed and ds.group_names[g] == bg
            assert bg in (combos[breed], "beach") and bg != "dirt"
    assert not any("beach" in p for p in test.paths)
    assert {ds.group_names[g] for g in test.groups} == {"mountain", "snow", "desert", "jungle"}


# ---------------------------------------------------------------- ArtBench-10


def test_artbench_imagefolder_release(tmp_path):
    rng = np.random.default_rng(3)
    styles = ["art_nouveau", "baroque", "expressionism", "impressionism", "post_impressionism",
              "realism", "renaissance", "romanticism", "surrealism", "ukiyo_e"]  # fmt: skip
    root = tmp_path / bias.ARTBENCH_DIR
    for split, n in (("train", 2), ("test", 1)):
        for style in styles:
            for k in range(n):
                write_image(str(root / split / style / f"{k}.jpg"), rng, 6, "jpg")
    ds = data.get_dataset("artbench", str(tmp_path))
    assert ds.class_names == tuple(styles) and ds.group_names is None
    assert len(ds.source("train")) == 20 and len(ds.source("test")) == 10
    assert "group" not in next(data.eval_iterator(ds, "test", 4, crop=6, resize=6))
    os.rename(root / "train" / "baroque", tmp_path / "baroque")
    os.rename(root / "test" / "baroque", tmp_path / "baroque_test")
    with pytest.raises(data.DatasetNotPrepared, match="9 style folders"):
        data.get_dataset("artbench", str(root))


# ---------------------------------------------------------------- colour MNIST


def test_colour_demo_statistics():
    ds = data.get_dataset("mnist_colour_demo")
    grey = data.get_dataset("mnist_demo")
    assert len(ds.group_names) == 100 and ds.group_names[37] == "3/blue"
    for split in ("train", "test"):
        src, ref = ds.source(split), grey.source(split)
        np.testing.assert_array_equal(src.labels, ref.labels)
        colours = src.groups % 10
        np.testing.assert_array_equal(src.groups // 10, src.labels)
        again = bias.colour_draws(src.labels, split)
        np.testing.assert_array_equal(colours, again)  # deterministic
        # The strokes are the grey digit times the colour (so the hue is the colour's).
        i = 7
        expect = np.rint(ref.images[i][..., :1] / 255 * bias.COLOURS[colours[i]] * 255)
        np.testing.assert_array_equal(src[i]["image"], expect.astype(np.uint8))
        counts = np.bincount(colours, minlength=10)
        aligned = np.mean(colours == src.labels)
        if split == "train":  # 4000 digits: 0.95 +- 0.0034 (binomial sd)
            assert 0.94 < aligned < 0.96
            off = colours[colours != src.labels]
            assert np.all(np.bincount(off, minlength=10) > 0)  # every colour appears off-class
        else:  # 1000 digits, uniform colours: a chi-square test (9 dof, 0.1% level 27.9)
            assert 0.07 < aligned < 0.13
            assert np.sum((counts - len(colours) / 10) ** 2 / (len(colours) / 10)) < 27.9
    sets = dict(ds.group_sets)
    assert sets["colour = class colour"] == tuple(range(0, 100, 11))
    assert len(sets["other colour"]) == 90


def test_hues_are_36_degrees_apart():
    import colorsys

    hues = [colorsys.rgb_to_hsv(*c)[0] * 360 for c in bias.COLOURS]
    np.testing.assert_allclose(hues, np.arange(10) * 36.0, atol=1e-9)


# ---------------------------------------------------------------- group metrics


def test_group_metrics_against_a_hand_count():
    t = groups.Tally()
    # 2 seeds; groups 0, 0, 2, 2, 2 (group 1 has no test example), one padded row.
    t.add([0, 0, 2, 0], [[1, 0, 1, 1], [1, 1, 0, 0]], [True, True, True, False])
    t.add([2, 2], [[0, 1], [0, 1]], [True, True])
    c = t.counts()
    assert list(c) == ["group_correct", "group_count"]
    np.testing.assert_array_equal(c["group_count"], [2, 0, 3])
    np.testing.assert_array_equal(c["group_correct"], [[1, 0, 2], [2, 0, 1]])
    names = ("a", "b", "c", "d")
    sets = (("a+c", (0, 2)),)
    m = groups.metrics(*c.values(), names, sets, summarize=probe.summarize)
    # seed 0: a 50%, c 66.7%; seed 1: a 100%, c 33.3%
    np.testing.assert_allclose(m["worst_group"]["per_seed"], [50, 100 / 3])
    np.testing.assert_allclose(m["average_group"]["per_seed"], [(50 + 200 / 3) / 2, 200 / 3])
    assert m["groups"]["b"] == {"num_test": 0, "top1": None} and m["groups"]["d"]["top1"] is None
    np.testing.assert_allclose(m["groups"]["c"]["top1"]["per_seed"], [200 / 3, 100 / 3])
    np.testing.assert_allclose(m["group_sets"]["a+c"]["top1"]["per_seed"], [60, 60])
    assert "c (3 test): 50.00 ± 23.57" in groups.format_lines(m)


# ---------------------------------------------------------------- evaluation


@pytest.fixture
def tiny_backbone(monkeypatch):
    bb, params = registry.build("dinov2_tiny", width=32, depth=1, mlp_dim=64, layer_scale=False)
    fake = types.ModuleType("lgm_jax.models.registry")
    fake.build = lambda name, weights=None, **kw: (bb, params)
    monkeypatch.setitem(sys.modules, "lgm_jax.models.registry", fake)
    monkeypatch.setattr(lgm_jax.models, "registry", fake, raising=False)
    return bb, params


def test_grouped_evaluate_writes_group_accuracy(tmp_path, tiny_backbone, capsys):
    write_waterbirds(str(tmp_path / "data"), np.random.default_rng(4), side=40)
    images = np.random.default_rng(5).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    run = tmp_path / "run"
    os.makedirs(run)
    np.savez(run / "synthetic.npz", images=images, labels=np.arange(2))
    with open(run / "config.json", "w") as f:
        json.dump({"dataset": "waterbirds", "data_dir": str(tmp_path / "data")}, f)
    args = ["--distilled", str(run), "--backbone", "tiny", "--seeds", "2", "--epochs", "3",
            "--mode", "fast", "--views", "2", "--test-batch", "3"]  # fmt: skip
    assert ev.main(args) == 0
    res = json.loads((run / "eval" / "tiny-fast" / "eval.json").read_text())
    names = data.get_dataset("waterbirds", str(tmp_path / "data")).group_names
    assert list(res["groups"]) == list(names)
    assert [g["num_test"] for g in res["groups"].values()] == [2, 2, 2, 2]
    per_group = np.array([g["top1"]["per_seed"] for g in res["groups"].values()])  # [G, S]
    np.testing.assert_allclose(res["worst_group"]["per_seed"], per_group.min(0))
    np.testing.assert_allclose(res["average_group"]["per_seed"], per_group.mean(0))
    np.testing.assert_allclose(res["top1"]["per_seed"], per_group.mean(0))  # equal-size groups
    assert set(res["group_sets"]) == {"bird matches place", "bird differs from place"}
    out = capsys.readouterr().out
    assert "worst-group %" in out and "group waterbird/water (2 test)" in out


def test_ungrouped_test_pass_adds_no_keys(tiny_backbone):
    bb, params = tiny_backbone
    cfg = probe.ProbeConfig(num_classes=3, augment=augment.AugmentConfig(mode="eval", input_res=28))
    probes = (np.zeros((2, 3, bb.feature_dim), np.float32), np.zeros((2, 3), np.float32))
    batches = probe.array_batches(np.zeros((5, 28, 28, 3), np.uint8), np.arange(5) % 3, 4)
    acc = probe.test_probes(bb.features, params, probes, batches, cfg)
    assert set(acc) == {"top1", "top5", "num_test"}
