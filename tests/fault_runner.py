"""`python tests/fault_runner.py ARGS...` runs `python -m lgm_jax.main ARGS...` with one fault
injected from outside the package (tests/test_faults.py). LGM_FAULT says which:

    kill:step:<s>        SIGKILL once step s has been computed (before its checkpoint, if any)
    kill:save:<s>:<k>    SIGKILL at the k-th file-system event (a directory made, a file
                         written, a rename) of the checkpoint write for step s, in whichever
                         thread orbax makes it; k = 0: as the save begins
    kill:export          SIGKILL with synthetic.npz written to its temporary file, before it
                         replaces the finished set
    full:save:<s>        the disk fills up (ENOSPC) at the first file written by the checkpoint
                         write for step s; every later write fails too
    fill:save:<s>        a file in the workdir grows until its file system is full, just before
                         the checkpoint write for step s (for a size-limited workdir)
    trace:save:<s>       no fault: print each event of that checkpoint write (to count them)

The file-system events are the methods of the path class orbax writes through (etils.epath);
the array data itself is written by tensorstore below Python and happens between them.
"""

from __future__ import annotations

import errno
import os
import runpy
import signal
import sys
import threading

FAULT = os.environ.get("LGM_FAULT", "")
_lock = threading.Lock()
_state = {"saving": None, "events": 0, "full": False}


def _kill(where: str) -> None:
    print(f"fault_runner: SIGKILL at {where}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _event(name: str, path) -> None:
    """One file-system event of orbax's; acts on it when a fault asks to."""
    if f"{os.sep}checkpoints{os.sep}" not in str(path):
        return  # not the run's checkpoints (e.g. the compilation cache)
    with _lock:
        step = _state["saving"]
        if step is None and not _state["full"]:
            return
        _state["events"] += 1
        k = _state["events"]
    kind, _, rest = FAULT.partition(":")
    if kind == "trace":
        print(f"fault_runner: save {step} event {k}: {name} {path}", flush=True)
    elif kind == "kill" and rest == f"save:{step}:{k}":
        _kill(f"event {k} ({name} {os.path.basename(str(path))}) of the save of step {step}")
    elif kind == "full" and (_state["full"] or rest == f"save:{step}") and "write" in name:
        _state["full"] = True
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _fill(folder: str) -> None:
    """Write folder/filler until the disk is full (what is left is not enough for a file)."""
    with open(os.path.join(folder, "filler"), "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
    print(f"fault_runner: {folder} is full", flush=True)


def _wrap_path_methods() -> None:
    from etils import epath

    cls = type(epath.Path("/"))
    for name in ("mkdir", "write_text", "write_bytes", "rename", "replace", "touch"):
        original = getattr(cls, name)

        def wrapped(self, *a, _original=original, _name=name, **kw):
            _event(_name, self)
            return _original(self, *a, **kw)

        setattr(cls, name, wrapped)


def _wrap_save() -> None:
    from lgm_jax import checkpoint

    original = checkpoint.save

    def save(mngr, state, meta):
        step = int(state.step)
        with _lock:
            _state["saving"], _state["events"] = step, 0
        if FAULT == f"kill:save:{step}:0":
            _kill(f"the start of the save of step {step}")
        if FAULT == f"fill:save:{step}":
            _fill(os.path.dirname(str(mngr.directory)))
        try:
            return original(mngr, state, meta)
        finally:
            with _lock:
                _state["saving"] = None

    checkpoint.save = save


def _wrap_step() -> None:
    from lgm_jax import distill

    original = distill._traced_step

    def traced_step(r, state, step, *a, **kw):
        out = original(r, state, step, *a, **kw)
        if FAULT == f"kill:step:{step}":
            import jax

            jax.block_until_ready(out)
            _kill(f"step {step}")
        return out

    distill._traced_step = traced_step


def _wrap_export() -> None:
    original = os.replace

    def replace(src, dst, *a, **kw):
        if FAULT == "kill:export" and str(dst).endswith("synthetic.npz"):
            _kill("the export of synthetic.npz")
        return original(src, dst, *a, **kw)

    os.replace = replace


def main() -> None:
    _wrap_path_methods()
    _wrap_save()
    _wrap_step()
    _wrap_export()
    sys.argv = ["lgm_jax.main", *sys.argv[1:]]
    runpy.run_module("lgm_jax.main", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
