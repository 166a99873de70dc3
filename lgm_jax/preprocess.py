"""Image preprocessing shared by every layer: backbone statistics, normalisation, uint8 to float,
centre crops. A leaf module: it imports nothing from lgm_jax.

Images are channels-last everywhere ([..., H, W, 3]); a crop acts on the last three axes, so the
same function serves one host image (numpy [H, W, 3]) and a device batch (jax [B, H, W, 3]).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

# The reference normalises with ImageNet statistics for every backbone, CLIP included.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(x, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """(x - mean) / std per channel, in x's dtype; x [..., 3] in [0, 1]."""
    return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


def to_unit(images) -> jax.Array:
    """uint8 [0, 255] or float [0, 1] images -> float32 [0, 1]."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def centre_crop(images, side: int):
    """The central side x side window of [..., H, W, 3] images (identity when H = W = side)."""
    h, w = images.shape[-3], images.shape[-2]
    if h < side or w < side:
        raise ValueError(f"images of {h}x{w} px are smaller than the {side} px crop")
    y, x = (h - side) // 2, (w - side) // 2
    return images[..., y : y + side, x : x + side, :]
