"""The dataset registry and the grain pipelines: layouts, crops, determinism, resumption,
process shards, corrupt files, tfds (mocked) and the bundled demo dataset."""

import logging
import os
import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from lgm_jax import data
from lgm_jax.data import pipeline, sources
from lgm_jax.preprocess import centre_crop

SIZES = [(40, 30), (25, 50), (33, 33), (60, 20)]  # (width, height): non-square on purpose


def _write_folder(root, classes=("ant", "bee", "cat"), per_class=(5, 4, 6), corrupt=True):
    """root/<class>/<i>.{jpg,png}: images whose pixels identify them (the class and the file)."""
    rng = np.random.default_rng(0)
    for c, (name, k) in enumerate(zip(classes, per_class, strict=True)):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(k):
            w, h = SIZES[(c + i) % len(SIZES)]
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(img).save(os.path.join(root, name, f"{i}.{ext}"))
    if corrupt:
        with open(os.path.join(root, classes[0], "broken.jpg"), "wb") as f:
            f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")


@pytest.fixture
def folder(tmp_path):
    _write_folder(tmp_path / "train")
    _write_folder(tmp_path / "test", per_class=(2, 3, 2), corrupt=False)
    return data.get_dataset(f"folder:{tmp_path}")


@pytest.fixture
def flat_folder(tmp_path):
    _write_folder(tmp_path / "flat", per_class=(8, 8, 12), corrupt=False)
    return data.image_folder(str(tmp_path / "flat"), test_fraction=0.25)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def test_folder_layout(folder, flat_folder):
    assert folder.num_classes == 3 and folder.class_names == ("ant", "bee", "cat")
    assert len(folder.source("train")) == 16 and len(folder.source("test")) == 7  # + broken.jpg
    ex = folder.source("test")[0]
    assert ex["image"].dtype == np.uint8 and ex["image"].ndim == 3 and ex["label"] == 0
    train, test = flat_folder.source("train"), flat_folder.source("test")
    assert len(train) + len(test) == 28 and len(test) == 2 + 2 + 3  # round(0.25 * k) per class
    assert not set(train.paths) & set(test.paths)
    again = data.image_folder(flat_folder.name[len("folder:") :], test_fraction=0.25)
    assert again.source("test").paths == test.paths  # the split is deterministic


def test_resize_shorter_antialiases():
    img = np.zeros((30, 40, 3), np.uint8)
    assert data.resize_shorter(img, 16).shape == (16, 21, 3)
    assert data.resize_shorter(img.transpose(1, 0, 2), 16).shape == (21, 16, 3)
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    small = data.resize_shorter(np.repeat(checker[..., None], 3, -1), 16)
    # An antialiased 4x reduction averages the 1-pixel checkerboard to mid-grey; point sampling
    # would keep 0s and 255s.
    assert np.all(np.abs(small[2:-2, 2:-2].astype(int) - 128) <= 2)


def test_train_batches_are_crops_of_resized_images(folder):
    res = 16
    batch = next(data.train_iterator(folder, 5, seed=0, crop=res))
    assert batch["image"].shape == (5, res, res, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (5,)
    src = folder.source("train")
    for img, label, i in zip(batch["image"], batch["label"], batch["index"], strict=True):
        ex = src[int(i)]
        assert ex["label"] == label
        full = data.resize_shorter(ex["image"], res)
        h, w = full.shape[:2]
        assert min(h, w) == res
        windows = [
            full[y : y + res, x : x + res] for y in range(h - res + 1) for x in range(w - res + 1)
        ]
        assert any(np.array_equal(img, win) for win in windows)


def test_train_iterator_deterministic_epochs(flat_folder):
    n, b = len(flat_folder.source("train")), 5
    a = _take(data.train_iterator(flat_folder, b, seed=3, crop=8), 8)
    again = _take(data.train_iterator(flat_folder, b, seed=3, crop=8), 8)
    other = _take(data.train_iterator(flat_folder, b, seed=4, crop=8), 8)
    assert _equal(a, again) and not _equal(a, other)
    per_epoch = n // b  # remainder dropped
    epochs = [
        np.concatenate([x["index"] for x in a[e * per_epoch : (e + 1) * per_epoch]]) for e in (0, 1)
    ]
    for e in epochs:
        assert len(set(e.tolist())) == per_epoch * b  # no image twice within an epoch
    assert not np.array_equal(epochs[0], epochs[1])  # each epoch reshuffled


def test_train_iterator_resumes_exactly(flat_folder):
    it = data.train_iterator(flat_folder, 4, seed=0, crop=8)
    _take(it, 3)
    state = it.get_state()
    rest = _take(it, 7)  # crosses an epoch boundary (21 train images -> 5 batches per epoch)
    resumed = data.train_iterator(flat_folder, 4, seed=0, crop=8)
    resumed.set_state(state)
    assert _equal(rest, _take(resumed, 7))


def test_process_shards_are_disjoint_and_cover(flat_folder):
    n = len(flat_folder.source("train"))
    shards = [data.shard_indices(n, p, 2) for p in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(np.concatenate(shards).tolist()) == list(range(n))
    for p in range(2):
        it = data.train_iterator(flat_folder, 3, seed=0, crop=8, process_index=p, process_count=2)
        seen = np.concatenate([x["index"] for x in _take(it, 6)])
        assert set(seen.tolist()) <= set(shards[p].tolist())
    with pytest.raises(ValueError, match="larger than"):
        data.train_iterator(flat_folder, 100, seed=0)


def test_corrupt_image_is_skipped_and_counted(folder, caplog):
    src = folder.source("train")
    bad = [i for i, p in enumerate(src.paths) if p.endswith("broken.jpg")]
    assert len(bad) == 1
    with pytest.raises(data.CorruptImage):
        src[bad[0]]
    before = data.skipped_images()
    with caplog.at_level(logging.WARNING, logger=pipeline.__name__):
        batches = _take(data.train_iterator(folder, 4, seed=1, crop=8), 8)  # 2 epochs
    seen = np.concatenate([x["index"] for x in batches])
    assert bad[0] not in seen and all(x["image"].shape == (4, 8, 8, 3) for x in batches)
    assert data.skipped_images() == before + 1
    assert "corrupt" in caplog.text and "broken.jpg" in caplog.text
    images, labels = data.load_split_arrays(folder, "train", crop=8, resize=8)
    assert len(images) == len(labels) == 15  # 16 files, one unreadable


def test_eval_iterator_pads_and_masks(folder):
    src = folder.source("test")
    batches = list(data.eval_iterator(folder, "test", 4, crop=12, resize=16))
    assert len(batches) == 2 and [b["mask"].sum() for b in batches] == [4, 3]
    last = batches[-1]
    assert last["image"].shape == (4, 12, 12, 3) and not last["mask"][-1]
    assert np.all(last["image"][~last["mask"]] == 0)
    want = centre_crop(data.resize_shorter(src[0]["image"], 16), 12)
    np.testing.assert_array_equal(batches[0]["image"][0], want)
    # Two processes: the same number of batches each, and every image once.
    per = [
        list(
            data.eval_iterator(
                folder, "test", 2, crop=12, resize=16, process_index=p, process_count=2
            )
        )
        for p in range(2)
    ]
    assert len(per[0]) == len(per[1]) == data.num_eval_batches(7, 2, 2) == 2
    assert sum(int(b["mask"].sum()) for bs in per for b in bs) == 7
    images, labels = data.load_split_arrays(folder, "test", crop=12, resize=16)
    assert images.shape == (7, 12, 12, 3) and labels.dtype == np.int32
    np.testing.assert_array_equal(labels, src.labels)


def test_mnist_demo_loads_without_network(monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("mnist_demo must not touch the network")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    ds = data.get_dataset("mnist_demo")
    train, test = ds.source("train"), ds.source("test")
    assert ds.num_classes == 10 and (len(train), len(test)) == (4000, 1000)
    ex = train[0]
    assert ex["image"].shape == (28, 28, 3) and ex["image"].dtype == np.uint8
    assert np.array_equal(ex["image"][..., 0], ex["image"][..., 2])
    assert set(np.unique(test.labels)) == set(range(10))
    assert np.array_equal(data.mnist_demo().source("test").labels, test.labels)
    batch = next(data.train_iterator(ds, 8, seed=0, crop=32))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].max() > 128


def test_tfds_source_with_mock_data():
    with tfds.testing.mock_data(num_examples=6):
        ds = data.get_dataset("flowers")
        assert ds.num_classes == 102 and ds.class_names[0] == "pink primrose"
        data.check_num_classes(ds, 102)
        src = ds.source("train")
        assert (
            len(src) == 6 and src[0]["image"].dtype == np.uint8 and src[0]["image"].shape[-1] == 3
        )
        batch = next(data.train_iterator(ds, 4, seed=0, crop=16))
        assert batch["image"].shape == (4, 16, 16, 3) and batch["label"].max() < 102
        test = next(data.eval_iterator(ds, "test", 4, crop=12, resize=14))
        assert test["image"].shape == (4, 12, 12, 3) and test["mask"].all()


def test_imagenet_subset_is_a_filtered_view():
    with tfds.testing.mock_data(num_examples=300):
        ds = data.get_dataset("imagenet100")
        assert ds.num_classes == 100 and ds.splits == ("train", "test")
        raw = tfds.data_source("imagenet2012", split="validation", download=False)
        src = ds.source("test")
        raw_labels = np.array([raw[i]["label"] for i in range(len(raw))])
        keep = np.flatnonzero(np.isin(raw_labels, data.IMAGENET100))
        assert 0 < len(src) == len(keep)
        for k in range(min(len(src), 5)):
            ex = src[k]
            assert data.IMAGENET100[ex["label"]] == raw_labels[keep[k]]
            np.testing.assert_array_equal(ex["image"], raw[int(keep[k])]["image"])
        cats = data.get_dataset("imagenet_cats")
    assert cats.num_classes == 10 and cats.class_ids[0] == "n02123045"  # label 281
    assert cats.class_names[0] == "tabby"  # the readable name, from the bundled table


def test_bad_input_errors(tmp_path):
    with pytest.raises(data.DatasetNotPrepared, match=r"download_and_prepare.*array_record"):
        data.get_dataset("food101", data_dir=str(tmp_path)).source("train")
    with pytest.raises(data.DatasetNotPrepared, match="manual_dir"):
        data.get_dataset("imagenet_birds", data_dir=str(tmp_path)).source("train")
    with pytest.raises(data.DatasetNotPrepared, match="<class>/<image>"):
        data.get_dataset(f"folder:{tmp_path}/missing")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.get_dataset("imagenet_dogs")
    ds = data.get_dataset("mnist_demo")
    data.check_num_classes(ds, 10)
    with pytest.raises(ValueError, match="10 classes but 100"):
        data.check_num_classes(ds, 100)
    with pytest.raises(ValueError, match="splits"):
        ds.source("validation")
    assert sources.to_rgb(np.zeros((4, 5), np.uint8)).shape == (4, 5, 3)


def test_train_batches_do_not_depend_on_the_decoding_threads(folder):
    src = folder.source("train")
    idx = data.shard_indices(len(src), 0, 1)
    one = pipeline.TrainBatches(src, idx, 4, seed=2, crop=8, threads=1)
    many = pipeline.TrainBatches(src, idx, 4, seed=2, crop=8, threads=4)
    # 15 readable of 16 over 3 epochs: the corrupt image's slot is refilled the same way.
    a, b = [one(k) for k in range(9)], [many(k) for k in range(9)]
    assert _equal(a, b)
    assert len({x["image"].tobytes() for x in a}) == 9  # real, varied batches
