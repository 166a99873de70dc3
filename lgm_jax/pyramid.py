"""The synthetic images' parameterisation: multi-scale pyramids and plain pixels.

A pyramid is a tuple of levels ordered coarse to fine, each [N, r, r, 3] with r = 1, 2, 4, ...
The image is decoded as

    x = sigmoid(2 * decorrelate(sum_l upsample_bilinear(level_l -> res)))

where `decorrelate` maps each pixel's 3-vector through the normalised colour matrix M_n, so the
optimiser works in a decorrelated colour space. Training starts with the coarsest level only and
`extend` adds the next finer one every few hundred steps; a "pixels" parameterisation (one level
at full resolution, for the "no pyramid" ablation) is the same code with one level.

Levels are a tuple of arrays (a pytree), so adding one changes the pytree structure: it happens
between jitted steps, on the host, and the step re-traces for the new shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lgm_jax import resample

Levels = tuple[jax.Array, ...]

# Colour correlation matrix (rows: R, G, B output; columns: decorrelated components), divided by
# its largest column norm so that decorrelation does not change the overall scale.
COLOR_CORRELATION = np.array(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=np.float32
)
COLOR_CORRELATION_NORMALIZED = COLOR_CORRELATION / np.max(np.linalg.norm(COLOR_CORRELATION, axis=0))

INIT_MODES = ("noise", "zero")


def resolutions(start_res: int, final_res: int) -> list[int]:
    """All level resolutions from start_res doubling up to final_res (both powers-of-two apart)."""
    if start_res < 1 or final_res < start_res:
        raise ValueError(f"need 1 <= start_res <= final_res, got {start_res}, {final_res}")
    out = [start_res]
    while out[-1] < final_res:
        out.append(out[-1] * 2)
    if out[-1] != final_res:
        raise ValueError(f"final_res={final_res} is not start_res={start_res} times a power of two")
    return out


def init(rng: jax.Array, num_images: int, res: Sequence[int], mode: str = "noise") -> Levels:
    """Levels [num_images, r, r, 3] for each r in res (coarse to fine).

    "noise": each level N(0, 1) divided by the number of levels; "zero": all zeros.
    `res=[1]` is the usual start of a pyramid, `res=[256]` the plain-pixel parameterisation.
    """
    _check_mode(mode)
    res = list(res)
    if any(b != 2 * a for a, b in zip(res, res[1:])):
        raise ValueError(f"pyramid resolutions must double from level to level, got {res}")
    keys = jax.random.split(rng, len(res))
    levels = []
    for key, r in zip(keys, res):
        shape = (num_images, r, r, 3)
        if mode == "zero":
            levels.append(jnp.zeros(shape, jnp.float32))
        else:
            levels.append(jax.random.normal(key, shape, jnp.float32) / len(res))
    return tuple(levels)


def extend(rng: jax.Array, levels: Levels, mode: str = "noise") -> Levels:
    """Add a level at twice the finest resolution.

    With L levels, the old ones are scaled by L/(L+1). In "noise" mode the new level is
    N(0, 1)/(L+1); in "zero" mode it is the (rescaled) old pyramid decoded at the new resolution,
    divided by L, so the decoded pre-sigmoid image at that resolution is unchanged.
    """
    _check_mode(mode)
    num_levels = len(levels)
    n, r = levels[-1].shape[0], levels[-1].shape[1]
    scaled = tuple(lvl * (num_levels / (num_levels + 1)) for lvl in levels)
    if mode == "noise":
        new = jax.random.normal(rng, (n, 2 * r, 2 * r, 3), jnp.float32) / (num_levels + 1)
    else:
        new = upsampled_sum(scaled, 2 * r) / num_levels
    return (*scaled, new)


def upsampled_sum(levels: Levels, res: int) -> jax.Array:
    """Sum of every level bilinearly upsampled to res: [N, res, res, 3] (before colour and
    sigmoid)."""
    total = None
    for lvl in levels:
        r = lvl.shape[1]
        if r > res:
            raise ValueError(f"level of resolution {r} is finer than the output {res}")
        if r != res:
            a = resample.bilinear_matrix(r, res)
            lvl = resample.resize_separable(lvl, a, a)
        total = lvl if total is None else total + lvl
    return total


def decorrelate(x: jax.Array) -> jax.Array:
    """Per-pixel colour mixing rgb = M_n v, for x [..., 3]."""
    return jnp.einsum("...c,rc->...r", x, COLOR_CORRELATION_NORMALIZED, precision=resample.HIGHEST)


def decode(levels: Levels, res: int, decorrelate_colors: bool = True) -> jax.Array:
    """Decode levels into images [N, res, res, 3] in [0, 1]."""
    x = upsampled_sum(levels, res)
    if decorrelate_colors:
        x = decorrelate(x)
    return jax.nn.sigmoid(2.0 * x)


def _check_mode(mode: str) -> None:
    if mode not in INIT_MODES:
        raise ValueError(f"unknown pyramid init mode {mode!r}; use one of {INIT_MODES}")
