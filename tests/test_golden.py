"""The package reproduces a recorded step of the reference PyTorch implementation."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lgm_jax import golden as golden_check


def test_golden_check_passes(golden_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "lgm_jax.golden", "--golden", str(golden_dir)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "26 of 26 quantities within tolerance" in proc.stdout


def test_golden_check_reports_a_wrong_result(golden_dir, tmp_path):
    # Corrupt one recorded quantity: the check must notice and fail.
    shutil.copytree(golden_dir, tmp_path / "g")
    arrays = dict(np.load(golden_dir / "step.npz"))
    arrays["g_syn"] = arrays["g_syn"] * 1.01
    np.savez(tmp_path / "g" / "step.npz", **arrays)
    assert golden_check.main(["--golden", str(tmp_path / "g")]) == 1


def test_golden_dir_with_missing_arrays_is_named(golden_dir, tmp_path, capsys):
    shutil.copytree(golden_dir, tmp_path / "g")
    arrays = dict(np.load(golden_dir / "step.npz"))
    del arrays["probe_W"], arrays["level3_grad"]
    np.savez(tmp_path / "g" / "step.npz", **arrays)
    assert golden_check.main(["--golden", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "probe_W" in err and "level3_grad" in err


def test_golden_dir_that_is_not_one(tmp_path, capsys):
    assert golden_check.main(["--golden", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing meta.json" in err and err.count("\n") == 1


def test_golden_meta_lacking_settings(golden_dir, tmp_path):
    shutil.copytree(golden_dir, tmp_path / "g")
    meta = json.loads((golden_dir / "meta.json").read_text())
    del meta["noise_std"]
    (tmp_path / "g" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(golden_check.GoldenError, match="noise_std"):
        golden_check.load_golden(str(tmp_path / "g"))
