"""Resampling as matrix products, matching PyTorch's `interpolate` and `grid_sample`.

Every resampling in lgm_jax is separable (rows and columns independently), so it is written as
`out = A_y @ img @ A_x^T`: one small interpolation matrix per axis. This is exact, differentiable,
runs on the matrix units of TPUs and GPUs, and lets us reproduce PyTorch's conventions
bit-for-bit instead of relying on `jax.image.resize`, whose kernels differ (its bicubic uses
a = -0.5 and renormalises weights at the border; PyTorch uses a = -0.75 and clamps indices).

Static matrices (pyramid upsampling, position-embedding resizing) are built in NumPy once; the
per-image crop matrices of the augmentation are built in `jnp` from traced coordinates.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Interpolation is part of the maths we must reproduce: never let a TPU/GPU drop it to bf16.
HIGHEST = jax.lax.Precision.HIGHEST


@functools.cache
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] matrix of `interpolate(mode="bilinear", align_corners=False)`.

    PyTorch maps output index o to source x = (o + 0.5) * in/out - 0.5, clamps x below at 0,
    and clamps the upper neighbour index at in_size - 1.
    """
    scale = in_size / out_size
    a = np.zeros((out_size, in_size), np.float64)
    for o in range(out_size):
        x = max((o + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(np.floor(x)), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        t = x - i0
        a[o, i0] += 1.0 - t
        a[o, i1] += t
    return a.astype(np.float32)


def _cubic_weights(t: float, a: float = -0.75) -> tuple[float, float, float, float]:
    """Keys' cubic convolution weights for taps at offsets -1, 0, 1, 2 (PyTorch's a = -0.75)."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


@functools.cache
def bicubic_matrix(in_size: int, out_size: int, scale: float | None = None) -> np.ndarray:
    """[out_size, in_size] matrix of `interpolate(mode="bicubic", align_corners=False)`.

    `scale` is the source step per output pixel; PyTorch uses in/out when called with `size=`
    and 1/scale_factor when called with `scale_factor=` (DINOv2's torch.hub model passes
    scale_factor = (16 + 0.1)/37, which shifts the grid slightly). Bicubic does not clamp the
    source coordinate; it clamps each tap index to the border.
    """
    scale = in_size / out_size if scale is None else scale
    a = np.zeros((out_size, in_size), np.float64)
    for o in range(out_size):
        x = (o + 0.5) * scale - 0.5
        i0 = int(np.floor(x))
        for k, w in zip(range(-1, 3), _cubic_weights(x - i0), strict=True):
            a[o, min(max(i0 + k, 0), in_size - 1)] += w
    return a.astype(np.float32)


def resize_separable(x: jax.Array, a_rows, a_cols) -> jax.Array:
    """Apply [H', H] and [W', W] matrices to x [..., H, W, C] -> [..., H', W', C]."""
    x = jnp.einsum("ph,...hwc->...pwc", a_rows, x, precision=HIGHEST)
    return jnp.einsum("qw,...pwc->...pqc", a_cols, x, precision=HIGHEST)


def sampling_matrix(coords: jax.Array, in_size: int) -> jax.Array:
    """Bilinear sampling weights with zero padding, as `grid_sample(padding_mode="zeros")`.

    coords: [..., out] continuous source pixel coordinates (pixel centres at integers).
    Returns [..., out, in_size]; a neighbour that falls outside [0, in_size) gets no weight,
    so samples near or past the border fade to zero exactly as in PyTorch.
    """
    i0 = jnp.floor(coords)
    t = coords - i0
    idx = jnp.arange(in_size, dtype=coords.dtype)
    lo = (idx == i0[..., None]) * (1.0 - t)[..., None]
    hi = (idx == (i0 + 1.0)[..., None]) * t[..., None]
    return lo + hi


@functools.cache
def bicubic_aa_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] matrix of `interpolate(mode="bicubic", antialias=True)`.

    timm's `resample_abs_pos_embed` and transformers' DINOv2-with-registers resize position
    embeddings this way. PyTorch's antialiased path is PIL's resampler, not the plain bicubic:
    a = -0.5 (not -0.75); when shrinking, the kernel is stretched by in/out; taps that fall
    outside the input are dropped (not clamped) and each row is renormalised to sum to one.
    """
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0

    def cubic(x, a=-0.5):
        x = abs(x)
        if x < 1.0:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        if x < 2.0:
            return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return 0.0

    m = np.zeros((out_size, in_size), np.float64)
    for o in range(out_size):
        center = scale * (o + 0.5)
        lo = max(int(center - support + 0.5), 0)  # C++ truncation toward zero, as PyTorch
        hi = min(int(center + support + 0.5), in_size)
        w = np.array([cubic((j - center + 0.5) * invscale) for j in range(lo, hi)])
        if w.sum() != 0.0:
            w = w / w.sum()
        m[o, lo:hi] = w
    return m.astype(np.float32)
