"""The tiny distillation run the end-to-end tests share (tests/test_distill.py,
tests/test_faults.py): the bundled digits at 4 px, levels 1, 2 and 4 (growth at steps 4 and 7),
steps 0..9, a checkpoint every 2 steps."""

import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = [
    "--config=configs/demo.py",
    "--config.syn_res=4",
    "--config.aug_rounds=1",
    "--config.steps=9",
    "--config.pyramid.grow_every=3",
    "--config.checkpoint_every=2",
    "--config.log_every=1",
    "--config.image_every=0",
    "--config.eval.at_end=false",
]


def run_env(cache_dir) -> dict:
    """The environment of a run: 2 devices, and a compilation cache shared by every run of the
    session, so that later runs reuse earlier ones' compiled steps."""
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    return env


def start(workdir, env, *extra, runner=None):
    """Start the tiny run (through `runner`, a script, instead of `-m lgm_jax.main` if given)."""
    entry = [str(runner)] if runner else ["-m", "lgm_jax.main"]
    cmd = [sys.executable, *entry, f"--workdir={workdir}", *TINY, *extra]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def run(workdir, env, *extra, runner=None):
    """(exit status, output) of the tiny run."""
    proc = start(workdir, env, *extra, runner=runner)
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def wait_for_checkpoint(workdir, step, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if (pathlib.Path(workdir) / "checkpoints" / str(step)).is_dir():
            return
        if proc.poll() is not None:
            pytest.fail("the run ended before it was interrupted:\n" + proc.stdout.read())
        time.sleep(0.05)
    pytest.fail(f"no checkpoint at step {step} after {timeout} s")


def checkpoint_steps(workdir) -> list[int]:
    """The finished checkpoints in a workdir, oldest first."""
    folder = pathlib.Path(workdir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
