"""Differentiable augmentation with explicit random parameters.

`sample(rng, n, cfg)` draws every random number for a batch of n images; `apply(images, params,
cfg)` is a pure, differentiable function of the images given those draws. Recorded draws (the
golden step) or draws replayed from `fold_in(rng, step)` therefore give the same images.

Pipeline, on images in [0, 1] before normalisation:
  1. horizontal flip where flip_u < flip_p;
  2. random resized crop to `input_res` by affine bilinear sampling with zero padding: scale
     s = lo + (hi - lo) u0, ratio r = exp(log r_lo + u1 (log r_hi - log r_lo)), crop width and
     height sw = sqrt(s r), sh = sqrt(s / r) as fractions of the side (not clipped, so a crop may
     reach past the border, where it reads zeros), top-left x1 = u2 (1 - sw), y1 = u3 (1 - sh);
  3. Gaussian noise where noise_u < noise_p: x + std z + mean.

The crop has no rotation, so it is separable: out = A_y @ img @ A_x^T with per-image [out, in]
bilinear matrices, and the flip folds into A_x by reversing its columns. On accelerators that
is two batched matmuls instead of a gather.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lgm_jax import resample


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """What the augmentation does. `mode`: "train" (flip, crop, noise), "eval" (flip and crop,
    no noise; the probe-training augmentation), or "off" (a centre crop to input_res, the view a
    test image gets)."""

    mode: str = "train"
    input_res: int = 224
    flip_p: float = 0.5
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    noise_p: float = 0.5
    noise_std: float = 0.2
    noise_mean: float = 0.0

    def __post_init__(self):
        if self.mode not in ("train", "eval", "off"):
            raise ValueError(
                f"augmentation mode must be 'train', 'eval' or 'off', got {self.mode!r}"
            )


def sample(rng: jax.Array, n: int, cfg: AugmentConfig) -> dict[str, jax.Array]:
    """Random draws for n images: flip_u [n], crop_u [n, 4], noise_apply_u [n],
    noise_z [n, input_res, input_res, 3] (the last two only in "train" mode)."""
    k_flip, k_crop, k_apply, k_z = jax.random.split(rng, 4)
    params = {
        "flip_u": jax.random.uniform(k_flip, (n,)),
        "crop_u": jax.random.uniform(k_crop, (n, 4)),
    }
    if cfg.mode == "train":
        params["noise_apply_u"] = jax.random.uniform(k_apply, (n,))
        params["noise_z"] = jax.random.normal(k_z, (n, cfg.input_res, cfg.input_res, 3))
    return params


def sample_rows(rng: jax.Array, rows: jax.Array, cfg: AugmentConfig) -> dict[str, jax.Array]:
    """Draws for the batch rows `rows` [n] (global indices): row r's draws come from
    fold_in(rng, r) alone, so they do not depend on how a batch is split over devices or
    chunks."""
    one = lambda r: jax.tree_util.tree_map(
        lambda x: x[0], sample(jax.random.fold_in(rng, r), 1, cfg)
    )
    return jax.vmap(one)(rows)


def identity_params(n: int, cfg: AugmentConfig) -> dict[str, jax.Array]:
    """Draws for which `apply` is the identity when in_res == input_res: no flip, a full-size
    centred crop (s = 1, r = 1), no noise."""
    ratio_u = -np.log(cfg.crop_ratio[0]) / (np.log(cfg.crop_ratio[1]) - np.log(cfg.crop_ratio[0]))
    scale_u = (1.0 - cfg.crop_scale[0]) / (cfg.crop_scale[1] - cfg.crop_scale[0])
    crop_u = jnp.tile(jnp.array([[scale_u, ratio_u, 0.5, 0.5]], jnp.float32), (n, 1))
    params = {"flip_u": jnp.ones((n,)), "crop_u": crop_u}
    if cfg.mode == "train":
        params["noise_apply_u"] = jnp.ones((n,))
        params["noise_z"] = jnp.zeros((n, cfg.input_res, cfg.input_res, 3))
    return params


def crop_matrices(crop_u: jax.Array, in_res: int, cfg: AugmentConfig):
    """Row and column sampling matrices [n, input_res, in_res] of the random resized crop."""
    u0, u1, u2, u3 = (crop_u[:, i] for i in range(4))
    lo, hi = cfg.crop_scale
    log_r0, log_r1 = np.log(cfg.crop_ratio[0]), np.log(cfg.crop_ratio[1])
    scale = lo + (hi - lo) * u0
    ratio = jnp.exp(log_r0 + u1 * (log_r1 - log_r0))
    sw, sh = jnp.sqrt(scale * ratio), jnp.sqrt(scale / ratio)
    x1, y1 = u2 * (1.0 - sw), u3 * (1.0 - sh)
    # Affine grid in normalised [-1, 1] coordinates (align_corners=False), then to input pixels.
    ox, oy = 2.0 * (x1 + sw / 2.0 - 0.5), 2.0 * (y1 + sh / 2.0 - 0.5)
    base = (2.0 * jnp.arange(cfg.input_res, dtype=jnp.float32) + 1.0) / cfg.input_res - 1.0
    xn = sw[:, None] * base + ox[:, None]
    yn = sh[:, None] * base + oy[:, None]
    to_pixel = lambda t: ((t + 1.0) * in_res - 1.0) / 2.0
    return (
        resample.sampling_matrix(to_pixel(yn), in_res),
        resample.sampling_matrix(to_pixel(xn), in_res),
    )


def apply(images: jax.Array, params: dict[str, jax.Array], cfg: AugmentConfig) -> jax.Array:
    """Augment images [n, H, H, 3] in [0, 1] -> [n, input_res, input_res, 3] (float32)."""
    check_images(images)
    in_res = images.shape[1]
    if cfg.mode == "off":  # the test-time view: centre crop
        if in_res < cfg.input_res:
            raise ValueError(f"cannot centre-crop {in_res} px images to {cfg.input_res} px")
        o = (in_res - cfg.input_res) // 2
        return images[:, o : o + cfg.input_res, o : o + cfg.input_res]
    a_rows, a_cols = crop_matrices(jax.lax.stop_gradient(params["crop_u"]), in_res, cfg)
    flip = params["flip_u"] < cfg.flip_p
    a_cols = jnp.where(flip[:, None, None], a_cols[:, :, ::-1], a_cols)
    x = jnp.einsum(
        "nph,nhwc->npwc", a_rows.astype(images.dtype), images, precision=resample.HIGHEST
    )
    x = jnp.einsum("nqw,npwc->npqc", a_cols.astype(images.dtype), x, precision=resample.HIGHEST)
    if cfg.mode == "train":
        noisy = params["noise_apply_u"] < cfg.noise_p
        noise = cfg.noise_std * params["noise_z"] + cfg.noise_mean
        x = x + jnp.where(noisy[:, None, None, None], noise, 0.0).astype(x.dtype)
    return x


def check_images(images) -> None:
    """Raise a clear error unless images is a [n, H, W, 3] float batch (values checked when
    concrete: they must lie in [0, 1])."""
    shape = getattr(images, "shape", None)
    if shape is None or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(
            f"images must be NHWC with 3 channels, got shape {shape}; "
            "convert NCHW with x.transpose(0, 2, 3, 1)"
        )
    if shape[1] != shape[2]:
        raise ValueError(f"images must be square, got {shape[1]}x{shape[2]}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(
            f"images must be floats in [0, 1], got dtype {images.dtype}; divide uint8 by 255"
        )
    if not isinstance(images, jax.core.Tracer):
        lo, hi = float(jnp.min(images)), float(jnp.max(images))
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(f"images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
