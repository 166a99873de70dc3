"""python -m lgm_jax.export: each format read by the tool it is for (torch, torchvision's
ImageFolder) and back through distilled.load; a real run directory's pth from its checkpoint."""

import os
import subprocess
import sys

import numpy as np
import pytest

from lgm_jax import distilled, export
from lgm_jax.errors import InputError


@pytest.fixture
def npz(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    return distilled.save(
        str(tmp_path / "set.npz"), images, np.arange(4), ["w", "x", "y", "z"], dataset="d"
    )


def test_folder_reads_in_imagefolder_with_the_same_labels(tmp_path, npz):
    from torchvision.datasets import ImageFolder

    assert (
        export.main(["--distilled", npz, "--format", "folder", "--out", str(tmp_path / "f")]) == 0
    )
    s = distilled.load(npz)
    folder = ImageFolder(str(tmp_path / "f"))
    assert folder.classes == ["000_w", "001_x", "002_y", "003_z"]
    assert [label for _, label in folder.samples] == s.labels.tolist()
    for (path, _), img in zip(folder.samples, s.images):
        np.testing.assert_array_equal(np.asarray(folder.loader(path)), img)
    back = distilled.load(str(tmp_path / "f"))
    assert back.class_names == s.class_names and back.meta["dataset"] == "d"


def test_pth_loads_with_torch_weights_only(tmp_path, npz):
    import torch

    assert export.main(["--distilled", npz, "--format", "pth", "--out", str(tmp_path / "p")]) == 0
    data = torch.load(tmp_path / "p" / "data.pth", weights_only=True)
    assert sorted(data) == ["images", "labels"]
    assert data["images"].dtype == torch.float32 and tuple(data["images"].shape) == (4, 3, 8, 8)
    assert data["labels"].dtype == torch.int64 and data["labels"].tolist() == [0, 1, 2, 3]
    x = data["images"].permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(x, distilled.load(npz).images / 255.0, atol=1e-7)


def test_hf_export_reads_back(tmp_path, npz):
    import datasets

    assert export.main(["--distilled", npz, "--format", "hf", "--out", str(tmp_path / "h")]) == 0
    ds = datasets.load_from_disk(str(tmp_path / "h"))
    assert ds.features["label"].names == ["w", "x", "y", "z"]
    np.testing.assert_array_equal(
        distilled.load(str(tmp_path / "h")).images, distilled.load(npz).images
    )


def test_cli_bad_input_exits_2(tmp_path, npz, capsys):
    (tmp_path / "junk.pth").write_bytes(b"junk")
    args = ["--format", "folder", "--out", str(tmp_path / "o")]
    assert export.main(["--distilled", str(tmp_path / "junk.pth"), *args]) == 2
    assert "junk.pth is not a readable data.pth" in capsys.readouterr().err
    assert export.main(["--distilled", str(tmp_path / "missing"), *args]) == 2
    os.makedirs(tmp_path / "full")
    (tmp_path / "full" / "x").write_text("")
    assert export.main(["--distilled", npz, "--format", "hf", "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_a_missing_extra_says_what_to_install(tmp_path, npz, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(InputError, match=r'pip install -e "\.\[pth\]"'):
        export.export(npz, "pth", str(tmp_path / "p"))
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(InputError, match=r'pip install -e "\.\[hf\]"'):
        export.export(npz, "hf", str(tmp_path / "h"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real (tiny) distillation run with checkpoints: about 30 s."""
    workdir = tmp_path_factory.mktemp("run") / "run"
    flags = [
        "--config=configs/demo.py",
        f"--workdir={workdir}",
        "--config.syn_res=4",
        "--config.aug_rounds=1",
        "--config.steps=3",
        "--config.pyramid.grow_every=2",
        "--config.checkpoint_every=2",
        "--config.image_every=0",
        "--config.eval.at_end=false",
    ]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device: 10 rows
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "lgm_jax.main", *flags],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(workdir)


def test_run_directory_pth_is_the_checkpoint_decoded(run_dir, tmp_path):
    from lgm_jax import evaluate

    out = str(tmp_path / "p")
    assert export.main(["--distilled", run_dir, "--format", "pth", "--out", out]) == 0
    s, back = distilled.load(run_dir), distilled.load(os.path.join(out, "data.pth"))
    assert back.images.dtype == np.float32 and back.images.shape == s.images.shape
    assert np.abs(np.round(back.images * 255) - s.images).max() == 0
    assert np.abs(back.images * 255 - s.images).max() > 0  # full precision, not uint8 / 255
    assert back.labels.tolist() == s.labels.tolist()
    images, labels, _ = evaluate.load_sets([os.path.join(out, "data.pth")])  # float sets go in
    assert images.dtype == np.float32 and labels.tolist() == s.labels.tolist()
