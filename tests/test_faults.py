"""The fault-injection suite: the tiny run (tests/tiny_run.py) killed at a seeded list of
moments, with corrupt checkpoints and with a full disk. Every fault must end, after a rerun of
the same command, with images identical to the uninterrupted run's, and lose nothing."""

import contextlib
import os
import pathlib
import random
import shutil
import signal
import subprocess

import numpy as np
import pytest
from tiny_run import checkpoint_steps, run

RUNNER = pathlib.Path(__file__).with_name("fault_runner.py")
SEED = 0
# The checkpoint writes of the tiny run (steps 2, 4, 6, 8 and the final 10) each make 16
# file-system events in orbax (directories, metadata files, commit markers, renames): the kill
# points inside a write are events 0 (as it begins) to 15 (just before the final rename).
SAVES, EVENTS = (2, 4, 6, 8, 10), 16


def kill_points(seed: int = SEED) -> list[str]:
    """Ten moments to kill the run at, in the order a run reaches them: four after a step, five
    inside checkpoint writes, and the export of synthetic.npz."""
    rng = random.Random(seed)
    steps = [f"kill:step:{s}" for s in range(10)]
    writes = [f"kill:save:{d}:{k}" for d in SAVES for k in range(EVENTS)]
    return sorted(rng.sample(steps, 4) + rng.sample(writes, 5) + ["kill:export"], key=_progress)


def _progress(point: str) -> tuple:
    kind, *rest = point.split(":")[1:]
    if kind == "step":
        return (int(rest[0]), 0)
    if kind == "save":  # the checkpoint of step d is written after step d - 1
        return (int(rest[0]) - 1, 1 + int(rest[1]))
    return (float("inf"), 0)


def _faulty(workdir, env, fault, *extra):
    return run(workdir, dict(env, LGM_FAULT=fault), *extra, runner=RUNNER)


def _same_images(reference, workdir):
    want = np.load(reference / "synthetic.npz")["images"]
    np.testing.assert_array_equal(np.load(workdir / "synthetic.npz")["images"], want)


def test_the_kill_points_cover_steps_checkpoint_writes_and_the_export():
    points = kill_points()
    assert len(set(points)) == 10 and points == sorted(points, key=_progress)
    assert sum(p.startswith("kill:save:") for p in points) == 5 and points[-1] == "kill:export"


def test_killed_at_ten_points_each_resume_ends_with_the_same_images(reference, run_env, tmp_path):
    """One workdir, killed at each point in turn: each rerun resumes from the newest finished
    checkpoint (never from a half-written one, never skipping a corrupt one) and is killed at
    the next point; the last rerun finishes."""
    resumed = []
    for point in kill_points():
        newest = (checkpoint_steps(tmp_path) or [0])[-1]
        rc, out = _faulty(tmp_path, run_env, point)
        assert rc == -signal.SIGKILL and "fault_runner: SIGKILL at" in out, (point, out[-3000:])
        if newest:
            assert f"resumed from step {newest} " in out, (point, out[-3000:])
        assert " skipped: " not in out and "Traceback" not in out, (point, out[-3000:])
        resumed.append(newest)
    assert not (tmp_path / "synthetic.npz").exists()  # killed before it replaced anything
    rc, out = run(tmp_path, run_env)
    assert rc == 0 and "resumed from step 10 " in out, out[-3000:]
    _same_images(reference, tmp_path)
    assert resumed == sorted(resumed), resumed  # never back to an older checkpoint


@contextlib.contextmanager
def _small_disk(path: pathlib.Path, size: str):
    """A size-limited file system at `path` (a tmpfs: needs root), or a skip."""
    path.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("no size-limited directory here (mounting a tmpfs needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize("disk", ["write error", "tmpfs"])
def test_a_disk_that_fills_during_a_save_keeps_the_checkpoints_before_it(
    reference, run_env, tmp_path, disk
):
    """`write error`: every file write from the checkpoint of step 6 on raises ENOSPC, through
    the path layer orbax writes with. `tmpfs`: a real 4 MB file system, filled up just before
    that write. Either way: one line, exit status 2, checkpoints 2 and 4 intact, and the rerun
    after freeing space ends with the uninterrupted run's images."""
    with contextlib.ExitStack() as stack:
        if disk == "tmpfs":
            workdir = stack.enter_context(_small_disk(tmp_path / "disk", "4m")) / "w"
            rc, out = _faulty(workdir, run_env, "fill:save:6")
        else:
            workdir = tmp_path / "w"
            rc, out = _faulty(workdir, run_env, "full:save:6")
        assert rc == 2, out[-3000:]
        last = out.strip().splitlines()[-1]
        assert last.startswith("error: writing the checkpoint of step 6 in"), out[-3000:]
        assert "No space left on device" in last and "(2, 4) are intact" in last, last
        assert "resume from step 4" in last and "Traceback" not in out, out[-3000:]
        assert checkpoint_steps(workdir) == [2, 4]
        (workdir / "filler").unlink(missing_ok=True)
        rc, out = run(workdir, run_env)
        assert rc == 0 and "resumed from step 4 " in out and " skipped: " not in out, out[-3000:]
        _same_images(reference, workdir)


def _data_files(checkpoint):
    """The files holding a checkpoint's array data (orbax's OCDBT stores: the merged one and the
    per-process ones)."""
    files = [p for p in checkpoint.glob("state/**/d/*") if p.is_file()]
    assert files, list(checkpoint.rglob("*"))
    return files


@pytest.mark.parametrize("damage", ["bit flips", "truncation"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(
    reference, run_env, tmp_path, damage
):
    shutil.copytree(reference, tmp_path / "w")
    (tmp_path / "w" / "synthetic.npz").unlink()
    newest = tmp_path / "w" / "checkpoints" / "10"
    for data in _data_files(newest):
        raw = bytearray(data.read_bytes())
        if damage == "bit flips":
            for i in range(len(raw) // 3, len(raw) // 3 + 16):
                raw[i] ^= 0xFF
        else:
            raw = raw[: len(raw) // 2]
        data.write_bytes(bytes(raw))
    rc, out = run(tmp_path / "w", run_env)
    assert rc == 0, out
    assert "checkpoint 10 skipped" in out and "resumed from step 8" in out, out
    assert "Traceback" not in out, out
    assert (tmp_path / "w" / "checkpoints" / "corrupt-10").is_dir()  # kept, not deleted
    want = np.load(reference / "synthetic.npz")["images"]
    np.testing.assert_array_equal(np.load(tmp_path / "w" / "synthetic.npz")["images"], want)


def test_no_checkpoint_that_verifies_is_one_line_and_none_is_deleted(reference, run_env, tmp_path):
    shutil.copytree(reference, tmp_path / "w")
    steps = [p for p in (tmp_path / "w" / "checkpoints").iterdir() if p.name.isdigit()]
    for step in steps:
        for data in _data_files(step):
            data.write_bytes(data.read_bytes()[:10])
    rc, out = run(tmp_path / "w", run_env)
    assert rc == 2, out
    assert "no checkpoint in" in out and "verifies" in out and "new --workdir" in out
    kept = sorted(p.name for p in (tmp_path / "w" / "checkpoints").iterdir())
    assert kept == sorted(f"corrupt-{p.name}" for p in steps), kept
