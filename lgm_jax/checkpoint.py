"""A distillation run's checkpoints: the one owner of their format (orbax, in workdir/checkpoints).

A checkpoint at step s holds the state (pyramid levels, Adam moments, step, key) and a JSON
record: whose run it is (`identity`: the settings that define what the images are of), how many
pyramid levels the state has and how many non-finite steps were skipped. A checkpoint restores
onto any number of devices and either state layout: its shapes follow from the template state
grown to the recorded number of levels, and `place` lays them out for this run.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from lgm_jax import lgm
from lgm_jax.errors import InputError

# Settings that define what a checkpoint is of: a workdir holding a checkpoint that differs in
# any of these belongs to another run and is refused.
IDENTITY_KEYS = ("dataset", "backbone", "ipc", "syn_res", "input_res", "pyramid.pixels")


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


def save(mngr, state: lgm.State, meta: dict) -> None:
    """Write the state at its step (once: a step already saved is left as it is) and wait."""
    step = int(state.step)
    if step in mngr.all_steps():
        return
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_to_saveable(state)), meta=ocp.args.JsonSave(meta)
        ),
    )
    mngr.wait_until_finished()


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
    """The latest checkpoint as (state, meta), or None when there is none; `place(shapes)`
    gives the shardings to restore into. Refuses another run's checkpoint."""
    step = mngr.latest_step()
    if step is None:
        return None
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    _check_identity(mngr, meta.get("identity", {}), ident)
    # The state's structure at that step (levels grown to meta["num_levels"]), laid out as this
    # run wants it: a checkpoint restores onto any number of devices and either layout.
    shaped = grown_shapes(template, tx, meta["num_levels"], init_mode)
    abstract = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        _to_saveable(shaped),
        _to_saveable(place(shaped)),
    )
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    return _from_saveable(mngr.restore(step, args=args)["state"]), meta
