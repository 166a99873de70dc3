"""Two processes of 4 CPU devices each, joined with `jax.distributed` over loopback, take the
same LGM steps as one process of 8 devices, and save and restore their state with orbax.

Each worker (tests/multiprocess_worker.py) puts its half of the real batch on its own devices
with `jax.make_array_from_process_local_data`, as `distill.run` does; the psums of the step then
cross the process boundary through gloo's TCP collectives.
"""

import importlib.util
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import lgm_jax

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")
NUM_PROCESSES = 2
TIMEOUT_S = 300  # generous: the two workers compile on a shared, possibly busy, CPU


def _load_worker():
    spec = importlib.util.spec_from_file_location("multiprocess_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gloo_available() -> bool:
    try:
        from jax._src.lib import _jax
    except ImportError:  # a different layout of jaxlib: let the run itself decide
        return True
    return hasattr(_jax, "make_gloo_tcp_collectives")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_workers(tmp_path, inputs_path, state_sharding):
    env = dict(os.environ)
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        # The workers import the same lgm_jax as this process (a checkout may shadow an install).
        PYTHONPATH=os.pathsep.join(
            [str(pathlib.Path(lgm_jax.__file__).resolve().parents[1])]
            + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        ),
    )
    port = _free_port()
    procs = []
    for i in range(NUM_PROCESSES):
        log = open(tmp_path / f"worker{i}.log", "w")
        cmd = [sys.executable, str(WORKER), str(port), str(i), str(NUM_PROCESSES)]
        cmd += [str(inputs_path), str(tmp_path / f"out{i}.npz"), state_sharding]
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    return procs


def _wait(procs, tmp_path):
    """Wait for all workers; on a failure or the timeout, kill the rest and fail with the logs."""
    deadline = time.monotonic() + TIMEOUT_S
    problem = None
    while problem is None:
        codes = [p.poll() for p, _ in procs]
        if any(c not in (None, 0) for c in codes):
            problem = f"a worker failed (exit codes {codes})"
        elif all(c == 0 for c in codes):
            break
        elif time.monotonic() > deadline:
            problem = f"the workers did not finish in {TIMEOUT_S} s"
        else:
            time.sleep(0.2)
    for p, log in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        log.close()
    if problem:
        logs = "\n".join(
            f"--- worker {i} ---\n{(tmp_path / f'worker{i}.log').read_text()[-6000:]}"
            for i in range(len(procs))
        )
        print(logs)
        pytest.fail(f"{problem}\n{logs}")


@pytest.mark.skipif(
    not _gloo_available(),
    reason="this jaxlib has no gloo TCP collectives, so CPU processes cannot run collectives "
    "with each other through jax.distributed",
)
@pytest.mark.parametrize("state_sharding", ["replicated", "class"])
def test_two_processes_equal_one_process(tmp_path, state_sharding):
    assert jax.device_count() == 8 and jax.process_count() == 1
    worker = _load_worker()
    inputs = worker.setup(state_sharding)
    initial = [np.asarray(level) for level in inputs[1].levels]  # before the state is donated
    worker.save_inputs(tmp_path / "inputs.npz", inputs)
    procs = _start_workers(tmp_path, tmp_path / "inputs.npz", state_sharding)
    try:
        # The one-process reference, over this process's 8 devices, while the workers run.
        want_levels, want_losses = worker.run_steps(inputs, state_sharding)
    finally:
        _wait(procs, tmp_path)

    outs = [np.load(tmp_path / f"out{i}.npz") for i in range(NUM_PROCESSES)]
    for out in outs:
        assert int(out["process_count"]) == NUM_PROCESSES
        assert int(out["device_count"]) == 8
    # Every process ends with the same state (class-sharded levels gathered from both).
    for key in outs[0].files:
        np.testing.assert_array_equal(outs[1][key], outs[0][key])

    got = outs[0]
    np.testing.assert_allclose(got["losses"], want_losses, rtol=1e-5)
    assert len(want_levels) == len(initial) + 1  # grown once
    assert len(want_levels) == len([k for k in got.files if k.startswith("level")])
    for i, want in enumerate(want_levels):
        scale = float(np.abs(want).max())
        # The steps moved the levels by far more than the tolerance, so the comparison has teeth.
        if i < len(initial):
            assert np.abs(want - initial[i]).max() > 100 * 1e-5 * scale
        np.testing.assert_allclose(got[f"level{i}"], want, rtol=0, atol=1e-5 * scale)
