"""One Vision Transformer for every backbone family, configured by `ViTConfig`.

The families of the paper (DINOv2, CLIP, EVA-02, MoCo-v3, DINO) are the same pre-norm
transformer with small differences: how positions are encoded (learned table resized to the
input grid, fixed 2-D sine-cosine, rotary), the MLP (GELU, quick-GELU, SwiGLU), layer scale,
register tokens, a LayerNorm before the blocks, and how the feature is pooled (CLS token or the
mean of patch tokens, optionally projected). Each family's file maps its PyTorch checkpoint
onto this module's parameter tree; see `lgm_jax/models/weights.py`.

Parameter tree (flax.linen names):
    patch_embed/{kernel [p, p, 3, D], bias}, cls_token [1, 1, D], pos_embed [1, 1 + g*g, D],
    pre_norm, blocks_{i}/{norm1, attn/{query, key, value, out}, ls1/scale, norm2,
    mlp/{fc1, fc2}, ls2/scale}, norm, proj/kernel.

Input: images [B, H, W, 3], already normalised. Output: features [B, feature_dim] in float32
(float64 when dtype is "float64", which the finite-difference tests use under jax_enable_x64).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lgm_jax import resample


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    patch_size: int = 14
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    mlp: str = "gelu"  # "gelu" (erf), "quick_gelu"
    qkv_bias: bool = True
    layer_scale: bool = False
    norm_eps: float = 1e-6
    pos_embed: str = "learned"  # "learned" (resized to the input grid)
    pos_grid: int = 37  # side of the learned position-embedding grid in the checkpoint
    # How a learned grid is resized: "size" (interpolate(size=...), as transformers does) or
    # "hub" (interpolate(scale_factor=(g + 0.1)/G), as DINOv2's torch.hub model does).
    pos_resize: str = "size"
    pool: str = "cls"  # "cls": final-normed CLS token
    image_size: int = 224
    # Compute options (not part of the checkpoint):
    dtype: str = "float32"  # "float32" or "bfloat16" activations and matmuls ("float64": tests)
    remat: bool = False  # rematerialise each block in the backward pass
    attention: str = "xla"  # passed to jax.nn.dot_product_attention: "xla" or "cudnn"

    @property
    def feature_dim(self) -> int:
        return self.width

    @property
    def grid(self) -> int:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        return self.image_size // self.patch_size

    def replace(self, **kw) -> ViTConfig:
        return dataclasses.replace(self, **kw)


def _dtype(cfg: ViTConfig):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}[cfg.dtype]


class Attention(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, _dtype(self.cfg)
        b, n, d = x.shape
        hd = d // cfg.heads
        dense = lambda name: nn.Dense(d, use_bias=cfg.qkv_bias, dtype=dt, name=name)
        q, k, v = (
            dense(name)(x).reshape(b, n, cfg.heads, hd) for name in ("query", "key", "value")
        )
        if cfg.attention == "xla":
            # Softmax in at least float32 (bf16 logits lose too much), at full width otherwise.
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hd).astype(q.dtype)
            probs = jax.nn.softmax(logits.astype(jnp.promote_types(dt, jnp.float32)), axis=-1)
            o = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
        else:
            o = jax.nn.dot_product_attention(q, k, v, implementation=cfg.attention)
        return nn.Dense(d, dtype=dt, name="out")(o.reshape(b, n, d))


class Mlp(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, _dtype(self.cfg)
        h = nn.Dense(cfg.mlp_dim, dtype=dt, name="fc1")(x)
        if cfg.mlp == "gelu":
            h = jax.nn.gelu(h, approximate=False)
        elif cfg.mlp == "quick_gelu":
            h = h * jax.nn.sigmoid(1.702 * h)
        else:
            raise ValueError(f"unknown mlp type {cfg.mlp!r}")
        return nn.Dense(cfg.width, dtype=dt, name="fc2")(h)


class LayerScale(nn.Module):
    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.constant(1e-5), (x.shape[-1],))
        return x * scale.astype(x.dtype)


class Block(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, _dtype(self.cfg)
        norm = lambda name: nn.LayerNorm(epsilon=cfg.norm_eps, dtype=dt, name=name)
        scale = (lambda name: LayerScale(name=name)) if cfg.layer_scale else (lambda name: None)
        h = Attention(cfg, name="attn")(norm("norm1")(x))
        ls1 = scale("ls1")
        x = x + (ls1(h) if ls1 else h)
        h = Mlp(cfg, name="mlp")(norm("norm2")(x))
        ls2 = scale("ls2")
        return x + (ls2(h) if ls2 else h)


def resize_pos_grid(table: jax.Array, grid: int, mode: str = "size") -> jax.Array:
    """Resize a [G*G, D] position-embedding grid to [grid*grid, D] with PyTorch's bicubic."""
    src = int(round(np.sqrt(table.shape[0])))
    if src * src != table.shape[0]:
        raise ValueError(f"position embedding of {table.shape[0]} entries is not a square grid")
    if src == grid:
        return table
    if mode == "size":
        a = resample.bicubic_matrix(src, grid)
    elif mode == "hub":
        a = resample.bicubic_matrix(src, grid, scale=src / (grid + 0.1))
    else:
        raise ValueError(f"unknown position-embedding resize mode {mode!r}; use 'size' or 'hub'")
    t = table.astype(jnp.float32).reshape(src, src, -1)
    t = jnp.einsum("ph,hwd->pwd", a, t, precision=resample.HIGHEST)
    t = jnp.einsum("qw,pwd->pqd", a, t, precision=resample.HIGHEST)
    return t.reshape(grid * grid, -1).astype(table.dtype)


class ViT(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, images):
        cfg, dt = self.cfg, _dtype(self.cfg)
        b, h, w, _ = images.shape
        p = cfg.patch_size
        if h != w or h % p:
            raise ValueError(f"images must be square multiples of {p} px, got {h}x{w}")
        g = h // p
        x = nn.Conv(
            cfg.width, (p, p), strides=(p, p), padding="VALID", dtype=dt, name="patch_embed"
        )(images.astype(dt)).reshape(b, g * g, cfg.width)
        cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, cfg.width))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dt), (b, 1, cfg.width)), x], axis=1)
        if cfg.pos_embed == "learned":
            pos = self.param(
                "pos_embed", nn.initializers.normal(0.02), (1, 1 + cfg.pos_grid**2, cfg.width)
            )
            patch_pos = resize_pos_grid(pos[0, 1:], g, cfg.pos_resize)
            x = x + jnp.concatenate([pos[0, :1], patch_pos], axis=0).astype(dt)[None]
        else:
            raise ValueError(f"unknown position embedding {cfg.pos_embed!r}")
        block = nn.remat(Block) if cfg.remat else Block
        for i in range(cfg.depth):
            x = block(cfg, name=f"blocks_{i}")(x)
        x = nn.LayerNorm(epsilon=cfg.norm_eps, dtype=dt, name="norm")(x)
        if cfg.pool == "cls":
            feat = x[:, 0]
        else:
            raise ValueError(f"unknown pooling {cfg.pool!r}")
        return feat.astype(jnp.promote_types(dt, jnp.float32))


def param_shapes(cfg: ViTConfig) -> Any:
    """The parameter tree's shapes (jax.ShapeDtypeStruct leaves), without allocating."""
    model = ViT(cfg)
    x = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]
