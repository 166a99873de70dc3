"""ImageNet: the readable class names, the miniature writer, and (opt-in) the miniature prepared
by tfds' own builder, read, distilled from and evaluated on.

The opt-in test needs a tfds data_dir holding the prepared miniature (docs/data.md):
    python -m lgm_jax.imagenet_miniature --out /tmp/in_manual
    (in a TensorFlow venv) tfds.builder('imagenet2012', data_dir='/tmp/in_tfds')...
    LGM_IMAGENET_TFDS=/tmp/in_tfds python -m pytest -q tests/test_imagenet.py
"""

import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from lgm_jax import assets, data, imagenet_miniature
from lgm_jax.data import sources

SYNSETS = imagenet_miniature.synsets()


def table_lines():
    with open(assets.path("imagenet_names.txt")) as f:
        return [line.rstrip("\n").split(" ", 1) for line in f]


def test_names_table_follows_tfds_labels():
    rows = table_lines()
    assert len(rows) == 1000
    assert [s for s, _ in rows] == SYNSETS  # tfds' labels.txt order, 1000 unique synsets
    assert len(set(SYNSETS)) == 1000
    assert rows[0] == ["n01440764", "tench"]
    assert all(name and "," not in name for _, name in rows)


@pytest.fixture
def fake_imagenet(monkeypatch):
    """The tfds builder's label names without a prepared dataset: tfds names classes by synset."""
    real = sources._tfds_names
    monkeypatch.setattr(
        sources,
        "_tfds_names",
        lambda name, d: tuple(SYNSETS) if name == "imagenet2012" else real(name, d),
    )


def test_imagenet_class_names_are_readable(fake_imagenet):
    names = dict(table_lines())
    ds = data.get_dataset("imagenet1k")
    assert ds.class_names[:3] == ("tench", "goldfish", "great white shark")
    assert ds.class_ids == tuple(SYNSETS)
    ds = data.get_dataset("imagenet100")
    assert ds.num_classes == 100
    assert ds.class_ids == tuple(SYNSETS[c] for c in data.IMAGENET100)  # the CMC order
    assert ds.class_names == tuple(names[SYNSETS[c]] for c in data.IMAGENET100)
    assert ds.class_names[:3] == ("bonnet", "green mamba", "langur")
    ds = data.get_dataset("imagenet_imagenette")
    assert ds.class_names[:3] == ("tench", "English springer", "cassette player")


def test_miniature_writer(tmp_path):
    assert imagenet_miniature.main(["--out", str(tmp_path), "--per-class", "1", "--val", "5"]) == 0
    with tarfile.open(tmp_path / "ILSVRC2012_img_train.tar") as outer:
        members = outer.getmembers()
        assert [m.name for m in members] == [f"{s}.tar" for s in SYNSETS]
        for c in (0, 1, 999):
            with tarfile.open(fileobj=outer.extractfile(members[c])) as inner:
                (image,) = inner.getmembers()
                assert image.name == f"{SYNSETS[c]}_0.JPEG"
                assert decoded_class(inner.extractfile(image)) == c
    labels = imagenet_miniature.validation_labels()
    with tarfile.open(tmp_path / "ILSVRC2012_img_val.tar") as val:
        members = val.getmembers()
        assert [m.name for m in members] == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 6)]
        for i, m in enumerate(members):
            assert decoded_class(val.extractfile(m)) == SYNSETS.index(labels[i])


def decoded_class(fobj) -> int:
    from PIL import Image

    with Image.open(fobj) as im:
        return imagenet_miniature.decode_class(np.asarray(im.convert("RGB")))


def test_class_colours_round_trip():
    assert len({imagenet_miniature.class_colour(c) for c in range(1000)}) == 1000
    for c in range(1000):
        image = np.full((4, 4, 3), imagenet_miniature.class_colour(c), np.uint8)
        assert imagenet_miniature.decode_class(image) == c


# ---------------------------------------------------------------- opt-in: the prepared miniature

PREPARED = os.environ.get("LGM_IMAGENET_TFDS")
needs_prepared = pytest.mark.skipif(
    not PREPARED, reason="LGM_IMAGENET_TFDS is not set to a tfds data_dir with the miniature"
)


@needs_prepared
def test_prepared_imagenet1k_counts_and_labels():
    ds = data.get_dataset("imagenet1k", data_dir=PREPARED)
    assert ds.num_classes == 1000 and ds.class_ids == tuple(SYNSETS)
    train, test = ds.source("train"), ds.source("test")
    assert (len(train), len(test)) == (2000, 300)
    for i in range(len(train)):  # each image comes from the inner tar of its label's synset
        ex = train[i]
        assert imagenet_miniature.decode_class(ex["image"]) == ex["label"]
        assert train.data[i]["file_name"].decode().split("_")[0] == SYNSETS[ex["label"]]
    assert np.bincount([train[i]["label"] for i in range(2000)]).tolist() == [2] * 1000
    val_labels = imagenet_miniature.validation_labels()
    for i in range(len(test)):
        ex, name = test[i], test.data[i]["file_name"].decode()
        assert imagenet_miniature.decode_class(ex["image"]) == ex["label"]
        assert SYNSETS[ex["label"]] == val_labels[int(name[len("ILSVRC2012_val_") : -5]) - 1]


def expected_test_count(classes) -> int:
    val = [SYNSETS.index(s) for s in imagenet_miniature.validation_labels()[:300]]
    return sum(c in classes for c in val)


@needs_prepared
def test_prepared_imagenet100_and_subsets():
    ds = data.get_dataset("imagenet100", data_dir=PREPARED)
    assert ds.num_classes == 100
    assert ds.class_ids == tuple(SYNSETS[c] for c in data.IMAGENET100)
    assert ds.class_names[:3] == ("bonnet", "green mamba", "langur")
    train, test = ds.source("train"), ds.source("test")
    assert (len(train), len(test)) == (200, 36) == (200, expected_test_count(data.IMAGENET100))
    for i in range(len(train)):  # label = position in the CMC list
        ex = train[i]
        assert data.IMAGENET100[ex["label"]] == imagenet_miniature.decode_class(ex["image"])
    for subset, classes in data.IMAGENET_SUBSETS.items():
        ds = data.get_dataset(f"imagenet_{subset}", data_dir=PREPARED)
        assert ds.num_classes == 10 and len(ds.source("train")) == 20
        assert len(ds.source("test")) == expected_test_count(classes)
        ex = ds.source("train")[0]
        assert classes[ex["label"]] == imagenet_miniature.decode_class(ex["image"])


@needs_prepared
def test_prepared_imagenet100_smoke_distil_and_evaluate(tmp_path):
    work = str(tmp_path / "run")
    run = [sys.executable, "-m", "lgm_jax.main", "--config=configs/in100.py:smoke"]
    run += [f"--workdir={work}", f"--config.data_dir={PREPARED}", "--config.steps=1"]
    run += ["--config.eval.at_end=false"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # One CPU device, as a user's machine has (the smoke batch of 100 rows does not split over
    # the tests' 8 fake devices).
    env = {**os.environ, "XLA_FLAGS": ""}
    subprocess.run(run, check=True, cwd=root, env=env)
    evaluate = [sys.executable, "-m", "lgm_jax.evaluate", "--distilled", work]
    evaluate += ["--backbone", "dinov2_tiny", "--epochs", "1", "--seeds", "1"]
    evaluate += ["--data-dir", PREPARED]
    subprocess.run(evaluate, check=True, cwd=root, env=env)
