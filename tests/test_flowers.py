"""Oxford Flowers-102: the miniature writer, and (opt-in) the miniature prepared offline by tfds'
own builder, read back as lgm_jax's `flowers` dataset, distilled from and evaluated on.

The opt-in test needs a tfds data_dir holding the prepared miniature (docs/data.md):
    python -m lgm_jax.flowers_miniature --out /tmp/fl_manual
    (in a TensorFlow venv) tfds.builder('oxford_flowers102', data_dir='/tmp/fl_tfds')...
    LGM_FLOWERS_TFDS=/tmp/fl_tfds python -m pytest -q tests/test_flowers.py
"""

import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from lgm_jax import data, flowers_miniature, imagenet_miniature

C = flowers_miniature.NUM_CLASSES


def decoded_class(fobj) -> int:
    from PIL import Image

    with Image.open(fobj) as im:
        return imagenet_miniature.decode_class(np.asarray(im.convert("RGB")))


def test_split_ids_partition_the_images_per_class():
    ids = flowers_miniature.split_ids(3)
    every = np.concatenate(list(ids.values()))
    assert sorted(every.tolist()) == list(range(1, 4 * 3 * C + 1))
    label = flowers_miniature.labels(len(every))
    for name, per_class in (("trnid", 3), ("valid", 3), ("tstid", 6)):
        assert np.bincount(label[ids[name] - 1], minlength=C + 1).tolist() == [0] + [per_class] * C


def test_miniature_writer(tmp_path):
    assert flowers_miniature.main(["--out", str(tmp_path), "--per-class", "1"]) == 0
    assert sorted(os.listdir(tmp_path)) == sorted(flowers_miniature.FILES)
    labels = flowers_miniature.read_mat(str(tmp_path / "imagelabels.mat"))["labels"]
    assert labels.dtype == np.uint8 and labels.tolist() == [k % C + 1 for k in range(4 * C)]
    setid = flowers_miniature.read_mat(str(tmp_path / "setid.mat"))
    assert sorted(setid) == ["trnid", "tstid", "valid"]
    for name, ids in flowers_miniature.split_ids(1).items():
        assert setid[name].dtype == np.uint16 and setid[name].tolist() == ids.tolist()
    with tarfile.open(tmp_path / "102flowers.tgz", "r:gz") as tar:  # gzip, as the real file
        members = tar.getmembers()
        assert [m.name for m in members] == [f"jpg/image_{k:05d}.jpg" for k in range(1, 4 * C + 1)]
        for k in (1, 2, 101, 102, 103, 4 * C):  # pixels follow imagelabels.mat (1-based)
            assert decoded_class(tar.extractfile(members[k - 1])) == labels[k - 1] - 1


def test_bad_per_class_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        flowers_miniature.main(["--out", str(tmp_path), "--per-class", "0"])
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------- opt-in: the prepared miniature

PREPARED = os.environ.get("LGM_FLOWERS_TFDS")
needs_prepared = pytest.mark.skipif(
    not PREPARED, reason="LGM_FLOWERS_TFDS is not set to a tfds data_dir with the miniature"
)


def check_split(source, ids: np.ndarray) -> None:
    """The split holds exactly the images `ids` and each record's label is its pixels' class."""
    names = sorted(source.data[i]["file_name"].decode() for i in range(len(source)))
    assert names == [f"image_{k:05d}.jpg" for k in ids]
    for i in range(len(source)):
        ex, k = source[i], int(source.data[i]["file_name"][len("image_") : -4])
        assert ex["label"] == imagenet_miniature.decode_class(ex["image"]) == (k - 1) % C


@needs_prepared
def test_prepared_flowers_counts_and_labels():
    ds = data.get_dataset("flowers", data_dir=PREPARED)
    assert ds.num_classes == C and len(ds.class_names) == C
    assert ds.class_names[:2] == ("pink primrose", "hard-leaved pocket orchid")
    train, test = ds.source("train"), ds.source("test")
    per_class, rest = divmod(len(train), C)  # whatever --per-class the miniature was written with
    assert per_class >= 1 and rest == 0 and len(test) == 2 * len(train)
    ids = flowers_miniature.split_ids(per_class)
    check_split(train, ids["trnid"])
    check_split(test, ids["tstid"])  # the test split is tstid, not the validation ids
    images, labels = data.load_split_arrays(ds, "test", crop=16, resize=16)  # the eval pipeline
    assert images.shape == (len(test), 16, 16, 3)
    assert [imagenet_miniature.decode_class(im) for im in images] == labels.tolist()


@needs_prepared
def test_prepared_flowers_smoke_distil_and_evaluate(tmp_path):
    work, root = str(tmp_path / "run"), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "XLA_FLAGS": ""}  # one CPU device, as a user's machine has
    run = [sys.executable, "-m", "lgm_jax.main", "--config=configs/flowers.py:smoke"]
    run += [f"--workdir={work}", f"--config.data_dir={PREPARED}", "--config.steps=1"]
    subprocess.run([*run, "--config.eval.at_end=false"], check=True, cwd=root, env=env)
    evaluate = [sys.executable, "-m", "lgm_jax.evaluate", "--distilled", work, "--seeds", "1"]
    evaluate += ["--backbone", "dinov2_tiny", "--epochs", "1", "--data-dir", PREPARED]
    subprocess.run(evaluate, check=True, cwd=root, env=env)
    assert os.path.exists(os.path.join(work, "eval", "dinov2_tiny", "eval.json"))
