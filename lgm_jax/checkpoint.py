"""A distillation run's checkpoints: the one owner of their format (orbax, in workdir/checkpoints).

A checkpoint at step s holds the state (pyramid levels, Adam moments, step, key) and a JSON
record: whose run it is (`identity`: the settings that define what the images are of), how many
pyramid levels the state has and how many non-finite steps were skipped. A checkpoint restores
onto any number of devices and either state layout: its shapes follow from the template state
grown to the recorded number of levels, and `place` lays them out for this run.

Each record also holds a sha256 of every array (from the host copy written), so a restore takes
the newest checkpoint whose arrays read back to the same bytes: bit flips, truncated files and
a write cut short are never taken for a good checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp

from lgm_jax import lgm
from lgm_jax.errors import InputError

# Settings that define what a checkpoint is of: a workdir holding a checkpoint that differs in
# any of these belongs to another run and is refused.
IDENTITY_KEYS = ("dataset", "backbone", "ipc", "syn_res", "input_res", "pyramid.pixels")


log = logging.getLogger("lgm_jax")


class RunMismatch(InputError):
    """The workdir holds a checkpoint of a different run."""


def _get(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


def identity(config, num_classes: int) -> dict:
    """The settings a checkpoint of this run records, and a resumed run must match."""
    out = {k: _get(config, k) for k in IDENTITY_KEYS}
    out["num_classes"] = num_classes
    return out


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """The orbax manager of workdir/checkpoints, keeping the newest `keep`."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"), options=options
    )


def record(state: lgm.State, ident: dict, nonfinite_steps: int = 0) -> dict:
    """What a checkpoint records beside the state: whose run it is and how far it got."""
    return {
        "identity": ident,
        "num_levels": len(state.levels),
        "step": int(state.step),
        "nonfinite_steps": nonfinite_steps,
    }


def _to_saveable(state: lgm.State) -> dict:
    return {
        "step": state.step,
        "levels": list(state.levels),
        "opt_state": state.opt_state,
        "rng": state.rng,
    }


def _from_saveable(tree: dict) -> lgm.State:
    return lgm.State(
        step=tree["step"],
        levels=tuple(tree["levels"]),
        opt_state=tree["opt_state"],
        rng=tree["rng"],
    )


def _host(x) -> np.ndarray:
    """A leaf as one host array on every process (gathered when it spans several processes:
    a collective, so every process must call this)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def digests(state: lgm.State) -> dict[str, str]:
    """sha256 of every array of the state (its host copy: the same for any device layout)."""
    leaves = jax.tree_util.tree_flatten_with_path(_to_saveable(state))[0]
    return {
        jax.tree_util.keystr(path): hashlib.sha256(
            np.ascontiguousarray(_host(x)).tobytes()
        ).hexdigest()
        for path, x in leaves
    }


def save(mngr, state: lgm.State, meta: dict) -> None:
    """Write the state at its step with a checksum of every array in its record, and wait. A
    step already saved is left as it is, unless it was found corrupt (then it is moved aside,
    never deleted, and written anew)."""
    step = int(state.step)
    if step in mngr.all_steps():
        return
    meta = dict(meta, digests=digests(state))
    with _storage_errors_untold():
        try:
            _write(mngr, step, state, meta)
        except Exception as e:  # noqa: BLE001 (the storage layer raises many types)
            cause = _os_error(e)
            if cause is None:
                raise
            message = _write_failed(mngr, step, cause)
            # Its writer threads may go on failing until the process exits: untold from now on.
            for name in _STORAGE_LOGGERS:
                logging.getLogger(name).addFilter(_StorageLogFilter())
            warnings.filterwarnings("ignore", message="coroutine .* was never awaited")
            _close_quietly(mngr)
            raise CheckpointWriteFailed(message) from e


def _close_quietly(mngr) -> None:
    try:
        mngr.close()
    except Exception:  # noqa: BLE001 (the same failure, already reported)
        pass


def _write(mngr, step: int, state: lgm.State, meta: dict) -> None:
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_to_saveable(state)), meta=ocp.args.JsonSave(meta)
        ),
    )
    mngr.wait_until_finished()


# Where the storage layer's errors are logged: orbax through absl, its event loops' unretrieved
# futures through asyncio (which lgm_jax itself does not use).
_STORAGE_LOGGERS = ("absl", "asyncio")


class _StorageLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        storage = record.name == "asyncio" or f"{os.sep}orbax{os.sep}" in record.pathname
        return record.levelno < logging.ERROR or not storage


@contextlib.contextmanager
def _storage_errors_untold():
    """While a checkpoint is written, the storage layer's own error logs (one traceback per
    background thread when the disk is full) are not printed: the failure is reported once,
    as one line, by `save`, and a write that succeeds logs no errors."""
    quiet = _StorageLogFilter()
    for name in _STORAGE_LOGGERS:
        logging.getLogger(name).addFilter(quiet)
    try:
        yield
    finally:
        for name in _STORAGE_LOGGERS:
            logging.getLogger(name).removeFilter(quiet)


class CheckpointWriteFailed(InputError):
    """A checkpoint could not be written (a full disk, no permission, storage gone). The
    storage layer's writer threads may still be failing: the command ends at once after its
    one line (the run's own files are closed by then)."""

    leave_at_once = True


def _os_error(e: BaseException) -> BaseException | None:
    """The operating-system error behind a failed write, if there is one (an OSError anywhere
    in the chain, or a tensorstore error that reports one), else None: a bug keeps its
    traceback."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) or any(t in str(e) for t in ("os_error_code", "[Errno")):
            return e
        e = e.__cause__ or e.__context__
    return None


def _write_failed(mngr, step: int, cause: BaseException) -> str:
    intact = sorted(s for s in mngr.all_steps() if s != step)
    where = str(mngr.directory)
    if intact:
        kept = f"the checkpoints before it ({', '.join(map(str, intact))}) are intact"
        then = f"rerun the same command to resume from step {intact[-1]}"
    else:
        kept, then = "no earlier checkpoint exists", "rerun the same command to start again"
    return (
        f"writing the checkpoint of step {step} in {where} failed ({_brief(cause)}); its "
        f"unfinished files are not a checkpoint and will not be restored; {kept}. Free space "
        f"(or fix the storage) and {then}."
    )


def read_levels(workdir: str, step: int) -> tuple[np.ndarray, ...]:
    """The pyramid levels of a run's checkpoint `step` as host arrays, restored onto one device
    from the checkpoint's own shapes (no template: any device count, any layout), each checked
    against its recorded checksum; an InputError when it cannot be read or does not verify."""
    folder = os.path.join(os.path.abspath(workdir), "checkpoints", str(step))
    _quiet_closed_loop()
    try:
        with open(os.path.join(folder, "meta", "metadata")) as f:
            recorded = json.load(f).get("digests", {})
        ckptr = ocp.StandardCheckpointer()
        state_dir = os.path.join(folder, "state")
        tree = ckptr.metadata(state_dir).item_metadata
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), tree
        )
        levels = tuple(np.asarray(lvl) for lvl in ckptr.restore(state_dir, abstract)["levels"])
    except Exception as e:  # noqa: BLE001 (unreadable: any error of the storage layer)
        raise InputError(f"checkpoint {folder} cannot be read ({_brief(e)})") from e
    for i, lvl in enumerate(levels):
        want = recorded.get(f"['levels'][{i}]")
        got = hashlib.sha256(np.ascontiguousarray(lvl).tobytes()).hexdigest()
        if want is not None and got != want:
            raise InputError(f"checkpoint {folder}: level {i} does not match its checksum")
    return levels


def grown_shapes(template: lgm.State, tx, num_levels: int, mode: str) -> lgm.State:
    """The shapes and dtypes of the state once its pyramid has `num_levels` levels."""

    def grown(state):
        while len(state.levels) < num_levels:
            state = lgm.grow(state, tx, mode)
        return state

    return jax.eval_shape(grown, template)


def _check_identity(mngr, saved: dict, ident: dict) -> None:
    diffs = {k: (saved.get(k), v) for k, v in ident.items() if saved.get(k) != v}
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diffs.items())
        raise RunMismatch(
            f"{mngr.directory} holds a checkpoint of a different run ({detail}). "
            "Use a new --workdir, or set the config back to match the checkpoint."
        )


def restore(mngr, template: lgm.State, tx, ident: dict, place, init_mode: str):
    """The newest checkpoint that verifies, as (state, meta), or None when there is none;
    `place(shapes)` gives the shardings to restore into. A checkpoint that cannot be read or
    whose arrays do not match their recorded checksums is skipped with a warning and moved
    aside to checkpoints/corrupt-<step> (never deleted); if every one is, an InputError says
    which and how to start afresh. Refuses another run's checkpoint."""
    steps = sorted(mngr.all_steps(), reverse=True)
    corrupt = []
    _quiet_closed_loop()
    for step in steps:
        try:
            meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = meta["meta"]
        except Exception as e:  # noqa: BLE001 (unreadable: any error of the storage layer)
            corrupt.append(_set_aside(mngr, step, f"its record cannot be read ({_brief(e)})"))
            continue
        _check_identity(mngr, meta.get("identity", {}), ident)
        try:
            state = _restore_state(mngr, step, meta, template, tx, place, init_mode)
        except Exception as e:  # noqa: BLE001
            corrupt.append(_set_aside(mngr, step, f"its arrays cannot be read ({_brief(e)})"))
            continue
        if "digests" in meta and digests(state) != meta["digests"]:
            corrupt.append(_set_aside(mngr, step, "its arrays do not match their checksums"))
            continue
        return state, meta
    if corrupt:
        raise InputError(
            f"no checkpoint in {mngr.directory} verifies: {'; '.join(corrupt)}. They were "
            "moved aside (corrupt-<step>), not deleted. Start afresh with a new --workdir, or "
            "rerun the same command to start this one from step 0."
        )
    return None


def _restore_state(mngr, step, meta, template, tx, place, init_mode) -> lgm.State:
    # The state's structure at that step (levels grown to meta["num_levels"]), laid out as this
    # run wants it: a checkpoint restores onto any number of devices and either layout.
    shaped = grown_shapes(template, tx, meta["num_levels"], init_mode)
    abstract = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        _to_saveable(shaped),
        _to_saveable(place(shaped)),
    )
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    return _from_saveable(mngr.restore(step, args=args)["state"])


def _brief(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:160] + ("..." if len(text) > 160 else "")


def _closed_loop(value) -> bool:
    return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


def _quiet_closed_loop() -> None:
    """After a failed read, the storage layer's pending callbacks into orbax's closed event loop
    each print a 'RuntimeError: Event loop is closed' traceback: noise (the failure itself is
    reported as a skipped checkpoint), so those, and only those, are not printed. Installed
    once, before the first restore."""
    import threading

    if getattr(sys.excepthook, "_lgm_quiet", False):
        return
    old_except, old_unraisable = sys.excepthook, sys.unraisablehook
    old_thread = threading.excepthook

    def excepthook(kind, value, tb):
        if not _closed_loop(value):
            old_except(kind, value, tb)

    excepthook._lgm_quiet = True
    sys.excepthook = excepthook
    sys.unraisablehook = lambda u: None if _closed_loop(u.exc_value) else old_unraisable(u)
    threading.excepthook = lambda a: None if _closed_loop(a.exc_value) else old_thread(a)


def _set_aside(mngr, step: int, why: str) -> str:
    """Move checkpoint `step` to checkpoints/corrupt-<step>[-k], warn, and say what was done."""
    folder = os.path.join(str(mngr.directory), str(step))
    target, k = os.path.join(str(mngr.directory), f"corrupt-{step}"), 1
    while os.path.exists(target):
        target, k = os.path.join(str(mngr.directory), f"corrupt-{step}-{k}"), k + 1
    if jax.process_index() == 0 and os.path.isdir(folder):
        os.rename(folder, target)
    mngr.reload()
    log.warning("checkpoint %d skipped: %s; moved to %s", step, why, target)
    return f"step {step} ({why})"
