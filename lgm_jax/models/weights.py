"""PyTorch state dicts -> Flax parameter trees, with every key and shape checked.

A family's mapping is pure data: a list of (regex over the PyTorch key, Flax path template) and
a list of PyTorch keys that inference never reads (e.g. DINOv2's mask token). A PyTorch
`weight` lands on the Flax `kernel` or `scale` the model has there, and the layout follows from
the Flax leaf name: a 2-D `kernel` is a transposed Linear weight, a 4-D `kernel`
a Conv2d weight [O, I, kh, kw] -> [kh, kw, I, O]; everything else is copied, and may gain
or lose dimensions of size one (CLIP's class_embedding [D] is the model's cls_token [1, 1, D]).
No torch here: state dicts arrive as NumPy arrays (safetensors, or converted by
tools/convert_weights.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import traverse_util

from lgm_jax.errors import InputError

Rules = Sequence[tuple[str, str]]


class CheckpointMismatch(InputError):
    """A checkpoint does not fit the model: the message names each offending key."""


def convert(
    state: Mapping[str, np.ndarray],
    rules: Rules,
    expected,
    ignore: Sequence[str] = (),
    source: str = "checkpoint",
) -> dict:
    """Map a PyTorch state dict onto the Flax tree whose shapes are `expected`.

    Raises CheckpointMismatch naming every key that is unmapped (extra), missing, or of the
    wrong shape, so a wrong checkpoint fails before any compute.
    """
    flat_expected = traverse_util.flatten_dict(expected, sep="/")
    out, extra, bad_shape = {}, [], []
    ignore_res = [re.compile(p) for p in ignore]
    compiled = [(re.compile(p), t) for p, t in rules]
    for key, value in state.items():
        if any(r.fullmatch(key) for r in ignore_res):
            continue
        path = None
        for pattern, template in compiled:
            m = pattern.fullmatch(key)
            if m:
                path = m.expand(template)
                break
        if path is not None:
            path = _resolve_leaf(path, flat_expected)
        if path is None or path not in flat_expected:
            extra.append(key if path is None else f"{key} (-> {path}, not in the model)")
            continue
        value = _to_flax_layout(path, np.asarray(value))
        want = tuple(flat_expected[path].shape)
        if value.shape != want and _squeezed(value.shape) == _squeezed(want):
            value = value.reshape(want)  # e.g. CLIP's class_embedding [D] -> cls_token [1, 1, D]
        if value.shape != want:
            bad_shape.append(f"{key}: checkpoint {value.shape}, model expects {want} at {path}")
            continue
        out[path] = value.astype(np.float32)
    missing = sorted(set(flat_expected) - set(out) - _paths_of(bad_shape))
    problems = []
    if extra:
        problems.append("unexpected keys (not in the model): " + ", ".join(sorted(extra)))
    if missing:
        problems.append("missing parameters (not in the checkpoint): " + ", ".join(missing))
    if bad_shape:
        problems.append("shape mismatches: " + "; ".join(bad_shape))
    if problems:
        raise CheckpointMismatch(
            f"{source} does not match the model architecture:\n  - "
            + "\n  - ".join(problems)
            + "\nCheck that the checkpoint is of the family and size the config names."
        )
    return traverse_util.unflatten_dict(out, sep="/")


def _squeezed(shape) -> tuple:
    return tuple(s for s in shape if s != 1)


def _paths_of(bad_shape: list[str]) -> set[str]:
    return {s.rsplit(" at ", 1)[1] for s in bad_shape}


def _resolve_leaf(path: str, flat_expected) -> str:
    """A PyTorch `weight` is a Flax `kernel` (Linear, Conv) or `scale` (LayerNorm)."""
    if path.endswith("/weight"):
        for leaf in ("kernel", "scale"):
            candidate = path[: -len("weight")] + leaf
            if candidate in flat_expected:
                return candidate
    return path


def _to_flax_layout(path: str, value: np.ndarray) -> np.ndarray:
    leaf = path.rsplit("/", 1)[-1]
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as float32 NumPy arrays."""
    from safetensors.numpy import load_file

    try:
        state = load_file(path)
    except Exception as e:  # corrupt or truncated file
        raise CheckpointMismatch(f"cannot read {path}: {e}") from e
    return {k: np.asarray(v, np.float32) for k, v in state.items()}


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
