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
    distilled.check_images(np.full((2, 256, 256, 3), 0.5, np.float32))  # float in [0, 1]
    distilled.check_images(np.full((2, 8, 8, 3), 1.0, np.float64))
    with pytest.raises(InputError, match=r"uint8 in \[0, 255\], got.*\[0, 1\].*\* 255"):
        distilled.check_images(np.full((2, 256, 256, 3), 0.5, np.float32), float_ok=False)
    with pytest.raises(InputError, match=r"or float32 in \[0, 1\].*outside"):
        distilled.check_images(np.full((2, 256, 256, 3), 3.0, np.float32))
    with pytest.raises(InputError, match="outside"):
        distilled.check_images(np.full((2, 8, 8, 3), np.nan, np.float32))
    with pytest.raises(InputError, match="int64"):
        distilled.check_images(np.zeros((2, 8, 8, 3), np.int64))
    with pytest.raises(InputError, match="images to save must be uint8"):  # npz holds uint8
        distilled.save("/nonexistent/x.npz", np.zeros((1, 4, 4, 3), np.float32), [0])


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


# ----------------------------------------------------------------------------------------------
# Exchange formats: each one back through distilled.load


def made_set():
    """4 classes x 1 image of 8 px, with names a file system would not take as they are."""
    images = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    names = ("cat", "dog", "a/b: c", "e f")
    meta = {"dataset": "pets", "method": "distilled", "step": 3}
    return distilled.ImageSet(images, np.arange(4, dtype=np.int32), names, meta)


def test_folder_round_trip(tmp_path):
    s = made_set()
    distilled.write_folder(str(tmp_path / "f"), s)
    dirs = sorted(p.name for p in (tmp_path / "f").iterdir() if p.is_dir())
    assert dirs == ["000_cat", "001_dog", "002_a_b_ c", "003_e f"]
    back = distilled.load(str(tmp_path / "f"))
    np.testing.assert_array_equal(back.images, s.images)
    assert back.labels.tolist() == s.labels.tolist() and back.class_names == s.class_names
    assert back.meta == {**s.meta, "path": str(tmp_path / "f")}
    # Without set.json the names come from the folders.
    (tmp_path / "f" / "set.json").unlink()
    assert distilled.load(str(tmp_path / "f")).class_names == ("cat", "dog", "a_b_ c", "e f")


def test_hf_round_trip(tmp_path):
    s = made_set()
    distilled.write_hf(str(tmp_path / "h"), s)
    back = distilled.load(str(tmp_path / "h"))
    np.testing.assert_array_equal(back.images, s.images)
    assert back.labels.tolist() == s.labels.tolist() and back.class_names == s.class_names
    assert back.meta["dataset"] == "pets" and back.meta["step"] == 3


def test_pth_round_trip_keeps_floats(tmp_path):
    s = made_set()
    path = distilled.write_pth(str(tmp_path / "p"), s.images, s.labels)
    assert path == str(tmp_path / "p" / "data.pth")
    back = distilled.load(path)
    assert back.images.dtype == np.float32 and back.side == 8
    np.testing.assert_allclose(back.images, s.images / 255.0, atol=1e-7)
    np.testing.assert_array_equal(distilled.uint8_images(back.images), s.images)
    assert back.labels.tolist() == [0, 1, 2, 3]


def test_writers_refuse_an_existing_out(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "x").write_text("")
    for write in (distilled.write_folder, distilled.write_hf):
        with pytest.raises(InputError, match="not empty"):
            write(str(tmp_path / "f"), made_set())
    with pytest.raises(InputError, match="not empty"):
        distilled.write_pth(str(tmp_path / "f"), made_set().images, [0, 1, 2, 3])


def test_malformed_exchange_files_give_one_line_errors(tmp_path):
    bad = tmp_path / "data.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(InputError, match=r"data.pth is not a readable data.pth"):
        distilled.load(str(bad))
    import torch

    torch.save({"images": torch.zeros(2, 3, 4, 4)}, bad)
    with pytest.raises(InputError, match="'images' and 'labels'"):
        distilled.load(str(bad))
    torch.save({"images": torch.zeros(2, 4, 4, 3), "labels": torch.zeros(2)}, bad)
    with pytest.raises(InputError, match=r"\[N, 3, H, W\]"):
        distilled.load(str(bad))
    torch.save({"images": torch.full((2, 3, 4, 4), 2.0), "labels": torch.zeros(2)}, bad)
    with pytest.raises(InputError, match="outside"):
        distilled.load(str(bad))

    distilled.write_folder(str(tmp_path / "f"), made_set())
    (tmp_path / "f" / "001_dog" / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match="notes.txt is not a PNG or JPEG"):
        distilled.load(str(tmp_path / "f"))
    (tmp_path / "f" / "001_dog" / "notes.txt").unlink()
    (tmp_path / "f" / "001_dog" / "9999.png").write_bytes(b"broken")
    with pytest.raises(InputError, match="9999.png is not a readable image"):
        distilled.load(str(tmp_path / "f"))

    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "0.png").write_bytes(b"")
    with pytest.raises(InputError, match="no class subfolders"):
        distilled.load(str(tmp_path / "flat"))
