"""The distilled set on disk: round trip, metadata from the run directory, and bad input."""

import json

import numpy as np
import pytest

from lgm_jax import distilled
from lgm_jax.errors import InputError


def test_save_and_load_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 0, 1, 1])
    path = distilled.save(
        str(tmp_path), images, labels, ["cat", "dog"], dataset="pets", method="random", step=7
    )
    assert path == str(tmp_path / "synthetic.npz")
    s = distilled.load(str(tmp_path))
    np.testing.assert_array_equal(s.images, images)
    assert s.labels.tolist() == [0, 0, 1, 1] and s.labels.dtype == np.int32
    assert s.class_names == ("cat", "dog") and s.side == 8
    assert s.meta == {"dataset": "pets", "method": "random", "step": 7, "path": path}
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically


def test_run_config_fills_in_what_the_npz_lacks(tmp_path):
    distilled.save(str(tmp_path), np.zeros((1, 4, 4, 3), np.uint8), [0], dataset="mine")
    (tmp_path / "config.json").write_text(
        json.dumps({"dataset": "other", "backbone": "clip_vitb", "data_dir": "/d"})
    )
    meta = distilled.load(str(tmp_path)).meta
    assert meta["dataset"] == "mine"  # the set's own record wins
    assert meta["backbone"] == "clip_vitb" and meta["data_dir"] == "/d"


def test_bad_images_give_clear_errors():
    ok = np.zeros((2, 256, 256, 3), np.uint8)
    distilled.check_images(ok, 256)
    with pytest.raises(InputError, match=r"256x256.*got 128x128"):
        distilled.check_images(np.zeros((2, 128, 128, 3), np.uint8), 256)
    with pytest.raises(InputError, match="square"):
        distilled.check_images(np.zeros((2, 128, 96, 3), np.uint8))
    with pytest.raises(InputError, match="NCHW"):
        distilled.check_images(np.zeros((2, 3, 256, 256), np.uint8))
    with pytest.raises(InputError, match=r"uint8.*\[0, 1\].*\* 255"):
        distilled.check_images(np.full((2, 256, 256, 3), 0.5, np.float32))
    with pytest.raises(InputError, match="outside"):
        distilled.check_images(np.full((2, 256, 256, 3), 3.0, np.float32))


def test_bad_labels_give_clear_errors():
    assert distilled.check_labels([0, 1, 2], 3, 3).dtype == np.int32
    with pytest.raises(InputError, match=r"\[0, 3\).*\[7\]"):
        distilled.check_labels([0, 1, 7], 3, 3)
    with pytest.raises(InputError, match=r"2 classes but .* has 3"):
        distilled.check_labels([0, 1, 1], 3, 3)
    with pytest.raises(InputError, match="shape"):
        distilled.check_labels([0, 1], 3, 3)
    with pytest.raises(InputError, match="integers"):
        distilled.check_labels([0.5, 1, 2], 3, 3)


def test_missing_files_keys_and_broken_files(tmp_path):
    with pytest.raises(InputError, match="synthetic.npz"):
        distilled.load(str(tmp_path))
    np.savez(tmp_path / "synthetic.npz", images=np.zeros((1, 4, 4, 3), np.uint8))
    with pytest.raises(InputError, match="no 'labels'"):
        distilled.load(str(tmp_path))
    (tmp_path / "synthetic.npz").write_bytes(b"not a zip file")
    with pytest.raises(InputError, match="not a readable .npz"):
        distilled.load(str(tmp_path))


def test_pictures_one_per_class_and_all(tmp_path):
    images = np.zeros((4, 2, 2, 3), np.uint8)
    distilled.save_pictures(distilled.ImageSet(images, np.array([0, 0, 1, 1])), str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["class_0.png", "class_1.png", "final.png"]
