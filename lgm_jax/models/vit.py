"""One Vision Transformer for every backbone family, configured by `ViTConfig`.

The families of the paper (DINOv2, CLIP, EVA-02, MoCo-v3, DINO) and DINOv3 are the same
pre-norm transformer with small differences: how positions are encoded (learned table resized to
the input grid, fixed 2-D sine-cosine, EVA-02's or DINOv3's rotary), the MLP (GELU, quick-GELU,
SwiGLU with an optional inner LayerNorm), fused or separate q/k/v projections (EVA, DINOv3: no
key bias), layer scale, register tokens, a LayerNorm before the blocks, and how the feature is
pooled (CLS token or the mean of patch tokens, optionally normed and projected). Each family's
file maps its PyTorch checkpoint onto this module's parameter tree; see
`lgm_jax/models/weights.py`.

Parameter tree (flax.linen names; optional parts in brackets):
    patch_embed/{kernel [p, p, 3, D], [bias]}, cls_token [1, 1, D], [reg_tokens [1, R, D]],
    [pos_embed [1, 1 + G*G, D]], [pre_norm],
    blocks_{i}/{norm1, attn/{query, key, value | qkv, [q_bias, v_bias]}, attn/out, [ls1/scale],
    norm2, mlp/{fc1, fc2 | fc1_g, fc1_x, [norm], fc2}, [ls2/scale]},
    [norm], [fc_norm], [proj/kernel].

Token order: [CLS, registers, patches (row-major)]. Inside attention, queries, keys and values
may be padded to a multiple of `token_multiple` tokens (for fused attention kernels); the padding
keys are masked out and the padding queries dropped, so it does not change the features, and the
rest of the block (projections, MLP) runs on the real tokens only.

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
from jax.ad_checkpoint import checkpoint_name

from lgm_jax import resample

# LayerNorm whose backward recomputes its float32 statistics and normalised values from its
# input instead of keeping them (3 float32 [T, D] tensors a norm: 56 MiB per ViT-B/14 image);
# same parameters, same values.
LayerNorm = nn.remat(nn.LayerNorm)


def _recomputed(fn):
    """An elementwise activation whose backward keeps only its input (the exact GELU would keep
    three more [T, M] tensors)."""
    return jax.checkpoint(fn)


def _swiglu(gate, h):
    """SwiGLU of separate or packed gate and value projections alike, recomputed."""
    return _recomputed(lambda g, h: jax.nn.silu(g) * h)(gate, h)


# Residual names tagged in the blocks (see ViTConfig.remat_policy).
REMAT_POLICIES = {
    "block": None,
    "matmuls": jax.checkpoint_policies.save_only_these_names("qkv", "mlp_hidden"),
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    patch_size: int = 14
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    # "gelu" (erf), "quick_gelu" (CLIP), "swiglu" (separate fc1_g / fc1_x, EVA-02 B/L),
    # "swiglu_packed" (one fc1 whose first half is the gate, timm GluMlp, EVA-02 T/S).
    mlp: str = "gelu"
    mlp_norm: bool = False  # LayerNorm on the MLP's hidden activations (EVA-02 B/L)
    qkv_fused: bool = False  # one qkv Linear (timm) instead of query/key/value
    qkv_bias: bool = True
    k_bias: bool = True  # False: EVA's biased query and value, unbiased key
    layer_scale: bool = False
    norm_eps: float = 1e-6
    patch_bias: bool = True
    reg_tokens: int = 0  # DINOv2-with-registers
    # "learned": a table over a pos_grid x pos_grid grid (+ CLS), resized to the input grid;
    # "sincos": MoCo-v3's fixed 2-D sine-cosine, built for the input grid (CLS gets zero);
    # "none": no absolute position embedding.
    pos_embed: str = "learned"
    pos_grid: int = 37  # side of the learned position-embedding grid in the checkpoint
    # How a learned grid is resized: "size" (bicubic interpolate(size=...), transformers DINOv2
    # and CLIP), "antialias" (bicubic with antialias=True: timm, transformers DINOv2-registers),
    # "hub" (interpolate(scale_factor=(g + 0.1)/G), DINOv2's torch.hub model).
    pos_resize: str = "size"
    rope: bool = False  # rotary embedding on the patch tokens' queries and keys
    # "eva02": timm RotaryEmbeddingCat (integer patch indices, interleaved channel pairs);
    # "dinov3": patch centres in [-1, 1] times 2*pi, rotate-half channel layout (rope_tables).
    rope_style: str = "eva02"
    rope_ref_grid: int = 0  # EVA: coordinates rescaled so any grid spans this one (0: none)
    rope_theta: float = 10000.0
    pre_norm: bool = False  # LayerNorm before the blocks (CLIP's pre_layrnorm)
    final_norm: bool = True  # LayerNorm on every token after the blocks
    pool: str = "cls"  # "cls" token or "avg" of the patch tokens (CLS and registers excluded)
    fc_norm: bool = False  # LayerNorm after pooling (timm's fc_norm, EVA-02)
    proj_dim: int = 0  # > 0: a bias-free projection of the pooled feature (CLIP)
    input_res: int = 224
    # Compute options (not part of the checkpoint):
    dtype: str = "float32"  # "float32" or "bfloat16" activations and matmuls ("float64": tests)
    remat: bool = False  # rematerialise each block in the backward pass
    # What a rematerialised block keeps from its forward pass: "block" (only its input; the
    # whole block runs again) or "matmuls" (also the q/k/v and MLP-hidden projections, so
    # only norms, attention and activations run again).
    remat_policy: str = "block"
    attention: str = "xla"  # passed to jax.nn.dot_product_attention: "xla" or "cudnn"
    # Pad the attention sequence to a multiple of this (masked keys, dropped queries); 0: 64 for
    # cudnn, none for xla. The projections and MLP always run on the real tokens.
    token_multiple: int = 0

    @property
    def feature_dim(self) -> int:
        return self.proj_dim or self.width

    @property
    def grid(self) -> int:
        if self.input_res % self.patch_size:
            raise ValueError(
                f"input_res {self.input_res} is not a multiple of patch_size {self.patch_size}"
            )
        return self.input_res // self.patch_size

    @property
    def pad_multiple(self) -> int:
        if self.token_multiple:
            return self.token_multiple
        return 64 if self.attention == "cudnn" else 1

    def replace(self, **kw) -> ViTConfig:
        return dataclasses.replace(self, **kw)


def _dtype(cfg: ViTConfig):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}[cfg.dtype]


def _rotate_pairs(x):
    """timm's `rot`: [x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...]."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return jnp.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(x.shape)


def _rotate_half(x):
    """transformers' `rotate_half` (DINOv3): [a, b] -> [-b, a], channel j pairs with j + hd/2."""
    a, b = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-b, a], axis=-1)


_ROTATIONS = {"eva02": _rotate_pairs, "dinov3": _rotate_half}


class Attention(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, x, rope=None):
        """x [B, N, D]; rope (sin, cos) [N, head_dim] or None."""
        cfg, dt = self.cfg, _dtype(self.cfg)
        b, n, d = x.shape
        hd = d // cfg.heads
        if cfg.qkv_fused:
            qkv = nn.Dense(3 * d, use_bias=cfg.qkv_bias and cfg.k_bias, dtype=dt, name="qkv")(x)
            qkv = checkpoint_name(qkv, "qkv")
            if cfg.qkv_bias and not cfg.k_bias:
                qb = self.param("q_bias", nn.initializers.zeros, (d,))
                vb = self.param("v_bias", nn.initializers.zeros, (d,))
                qkv = qkv + jnp.concatenate([qb, jnp.zeros_like(qb), vb]).astype(qkv.dtype)
            qkv = qkv.reshape(b, n, 3, cfg.heads, hd)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            bias = {
                "query": cfg.qkv_bias,
                "key": cfg.qkv_bias and cfg.k_bias,
                "value": cfg.qkv_bias,
            }
            q, k, v = (
                checkpoint_name(
                    nn.Dense(d, use_bias=bias[name], dtype=dt, name=name)(x), "qkv"
                ).reshape(b, n, cfg.heads, hd)
                for name in ("query", "key", "value")
            )
        if rope is not None:
            sin, cos = (t[None, :, None, :] for t in rope)
            rot = _ROTATIONS[cfg.rope_style]
            # At least float32, cast back: as timm, whose sin/cos stay float32 under autocast.
            q = (q * cos + rot(q) * sin).astype(dt)
            k = (k * cos + rot(k) * sin).astype(dt)
        num_valid, m = None, cfg.pad_multiple
        if n % m:  # pad the sequence for the kernel; the padding keys are masked below
            num_valid, pad = n, ((0, 0), (0, -n % m), (0, 0), (0, 0))
            q, k, v = (jnp.pad(t, pad) for t in (q, k, v))
        if cfg.attention == "xla":
            # Softmax in at least float32 (bf16 logits lose too much), at full width otherwise.
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hd).astype(q.dtype)
            logits = logits.astype(jnp.promote_types(dt, jnp.float32))
            if num_valid is not None:  # padding keys get no weight
                logits = jnp.where(jnp.arange(k.shape[1]) < num_valid, logits, -jnp.inf)
            probs = jax.nn.softmax(logits, axis=-1)
            o = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
        else:
            if cfg.attention == "cudnn" and dt != jnp.bfloat16:
                raise ValueError("attention='cudnn' needs dtype='bfloat16' (cuDNN's fused kernel)")
            lengths = None if num_valid is None else jnp.full((b,), num_valid, jnp.int32)
            o = jax.nn.dot_product_attention(
                q, k, v, key_value_seq_lengths=lengths, implementation=cfg.attention
            )
        return nn.Dense(d, dtype=dt, name="out")(o[:, :n].reshape(b, n, d))


class Mlp(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, _dtype(self.cfg)
        dense = lambda features, name: nn.Dense(features, dtype=dt, name=name)
        hidden = lambda features, name: checkpoint_name(dense(features, name)(x), "mlp_hidden")
        if cfg.mlp == "gelu":
            h = _recomputed(lambda h: jax.nn.gelu(h, approximate=False))(hidden(cfg.mlp_dim, "fc1"))
        elif cfg.mlp == "quick_gelu":
            h = _recomputed(lambda h: h * jax.nn.sigmoid(1.702 * h))(hidden(cfg.mlp_dim, "fc1"))
        elif cfg.mlp == "swiglu":
            h = _swiglu(hidden(cfg.mlp_dim, "fc1_g"), hidden(cfg.mlp_dim, "fc1_x"))
        elif cfg.mlp == "swiglu_packed":
            gate, h = jnp.split(hidden(2 * cfg.mlp_dim, "fc1"), 2, axis=-1)
            h = _swiglu(gate, h)
        else:
            raise ValueError(f"unknown mlp type {cfg.mlp!r}")
        if cfg.mlp_norm:
            h = LayerNorm(epsilon=cfg.norm_eps, dtype=dt, name="norm")(h)
        return dense(cfg.width, "fc2")(h)


class LayerScale(nn.Module):
    @nn.compact
    def __call__(self, x):
        # Checkpoints overwrite this; a random network (tests, demos, benchmarks) starts at 1 so
        # that its features depend on the image (at DINOv2's 1e-5 they barely do).
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        return x * scale.astype(x.dtype)


class Block(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, x, rope=None):
        cfg, dt = self.cfg, _dtype(self.cfg)
        norm = lambda name: LayerNorm(epsilon=cfg.norm_eps, dtype=dt, name=name)
        scale = (lambda name: LayerScale(name=name)) if cfg.layer_scale else (lambda name: None)
        h = Attention(cfg, name="attn")(norm("norm1")(x), rope)
        ls1 = scale("ls1")
        x = x + (ls1(h) if ls1 else h)
        h = Mlp(cfg, name="mlp")(norm("norm2")(x))
        ls2 = scale("ls2")
        return x + (ls2(h) if ls2 else h)


def resize_pos_grid(table: jax.Array, grid: int, mode: str = "size") -> jax.Array:
    """Resize a [G*G, D] position-embedding grid to [grid*grid, D] as PyTorch's bicubic does."""
    src = int(round(np.sqrt(table.shape[0])))
    if src * src != table.shape[0]:
        raise ValueError(f"position embedding of {table.shape[0]} entries is not a square grid")
    if src == grid:
        return table
    if mode == "size":
        a = resample.bicubic_matrix(src, grid)
    elif mode == "hub":
        a = resample.bicubic_matrix(src, grid, scale=src / (grid + 0.1))
    elif mode == "antialias":
        a = resample.bicubic_aa_matrix(src, grid)
    else:
        raise ValueError(
            f"unknown position-embedding resize mode {mode!r}; use 'size', 'antialias' or 'hub'"
        )
    t = table.astype(jnp.float32).reshape(src, src, -1)
    t = jnp.einsum("ph,hwd->pwd", a, t, precision=resample.HIGHEST)
    t = jnp.einsum("qw,pwd->pqd", a, t, precision=resample.HIGHEST)
    return t.reshape(grid * grid, -1).astype(table.dtype)


def sincos_2d(grid: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """MoCo-v3's fixed position embedding of a grid x grid patch grid: [grid*grid, dim].

    As `build_2d_sincos_position_embedding` in MoCo-v3's vits.py, including its meshgrid quirk:
    the first half of the channels encodes the row index, the second half the column index.
    """
    if dim % 4:
        raise ValueError(f"a 2-D sine-cosine embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / temperature ** (np.arange(dim // 4, dtype=np.float32) / np.float32(dim // 4))
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    out_r = rows.reshape(-1, 1).astype(np.float32) * omega.astype(np.float32)
    out_c = cols.reshape(-1, 1).astype(np.float32) * omega.astype(np.float32)
    return np.concatenate([np.sin(out_r), np.cos(out_r), np.sin(out_c), np.cos(out_c)], 1).astype(
        np.float32
    )


def rope_tables(cfg: ViTConfig, grid: int, num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """The rotary embedding of a grid x grid patch grid as (sin, cos), each [num_tokens, hd].

    Both styles rotate a quarter of the head's channel pairs with the row coordinate and a
    quarter with the column, at frequencies theta^(-k/(hd/4)); they differ in the coordinates
    and in which channels form a pair, so a checkpoint works only with its own style:
    - "eva02" (timm `RotaryEmbeddingCat`, in_pixels=False): coordinates are patch indices
      i * ref/grid (so any grid spans the pre-training one), channels pair as (2m, 2m+1);
    - "dinov3" (transformers `DINOv3ViTRopePositionEmbedding` in eval mode, no shift, jitter
      or rescale): coordinates are patch centres 2(i + 0.5)/grid - 1 in [-1, 1], angles
      2*pi*coordinate*frequency, channels pair as (m, m + hd/2) (rotate-half).
    Prefix tokens (CLS, registers) and padding get the identity rotation (sin 0, cos 1), as
    both leave prefix tokens unrotated.
    """
    hd = cfg.width // cfg.heads
    nb = hd // 4
    if nb * 4 != hd:
        raise ValueError(f"a 2-D rotary embedding needs a head dim divisible by 4, got {hd}")
    if cfg.rope_style not in _ROTATIONS:
        raise ValueError(f"unknown rope_style {cfg.rope_style!r}; use one of {sorted(_ROTATIONS)}")
    bands = (1.0 / cfg.rope_theta ** (np.arange(nb, dtype=np.float32) / np.float32(nb))).astype(
        np.float32
    )
    if cfg.rope_style == "dinov3":
        t = (np.arange(0.5, grid, dtype=np.float32) / np.float32(grid)) * 2 - 1
        t = (np.float32(2 * np.pi) * t).astype(np.float32)
    else:
        t = np.arange(grid, dtype=np.float32)
        if cfg.rope_ref_grid:
            t = (t / np.float32(grid) * np.float32(cfg.rope_ref_grid)).astype(np.float32)
    rows, cols = np.meshgrid(t, t, indexing="ij")
    pos = (np.stack([rows, cols], -1)[..., None] * bands).reshape(grid * grid, 2 * nb)
    if cfg.rope_style == "dinov3":
        pos = np.concatenate([pos, pos], axis=-1)  # [rows, cols, rows, cols] quarters
    else:
        pos = np.repeat(pos, 2, axis=-1)  # interleaved pairs
    start = 1 + cfg.reg_tokens
    sin = np.zeros((num_tokens, hd), np.float32)
    cos = np.ones((num_tokens, hd), np.float32)
    sin[start : start + grid * grid] = np.sin(pos)
    cos[start : start + grid * grid] = np.cos(pos)
    return sin, cos


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> width, row-major: [B, H, W, C] -> [B, H/p * W/p, width].

    The stride-p convolution written as one matmul over each patch flattened in (row, column,
    channel) order, so that XLA runs it and its input gradient as GEMMs; as a convolution the
    input gradient is a transposed convolution (on XLA:CPU twice as slow as this, forward 1.4x;
    ViT-S/14, 10 images). Parameters and their initialisation are nn.Conv's: kernel [p, p, C,
    width], bias [width]."""

    width: int
    patch: int
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images):
        b, h, w, c = images.shape
        p = self.patch
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, self.width))
        patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, (h // p) * (w // p), p * p * c).astype(self.dtype)
        x = patches @ kernel.reshape(p * p * c, self.width).astype(self.dtype)
        if self.use_bias:
            x = x + self.param("bias", nn.initializers.zeros_init(), (self.width,)).astype(x.dtype)
        return x


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
        x = PatchEmbed(cfg.width, p, cfg.patch_bias, dt, name="patch_embed")(images.astype(dt))
        cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, cfg.width))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dt), (b, 1, cfg.width)), x], axis=1)
        if cfg.pos_embed == "learned":
            pos = self.param(
                "pos_embed", nn.initializers.normal(0.02), (1, 1 + cfg.pos_grid**2, cfg.width)
            )
            patch_pos = resize_pos_grid(pos[0, 1:], g, cfg.pos_resize)
            x = x + jnp.concatenate([pos[0, :1], patch_pos], axis=0).astype(dt)[None]
        elif cfg.pos_embed == "sincos":
            table = np.concatenate([np.zeros((1, cfg.width), np.float32), sincos_2d(g, cfg.width)])
            x = x + jnp.asarray(table, dt)[None]
        elif cfg.pos_embed != "none":
            raise ValueError(f"unknown position embedding {cfg.pos_embed!r}")
        if cfg.reg_tokens:  # registers go after CLS and carry no position embedding
            reg = self.param(
                "reg_tokens", nn.initializers.normal(0.02), (1, cfg.reg_tokens, cfg.width)
            )
            reg = jnp.broadcast_to(reg.astype(dt), (b, cfg.reg_tokens, cfg.width))
            x = jnp.concatenate([x[:, :1], reg, x[:, 1:]], axis=1)
        if cfg.pre_norm:
            x = LayerNorm(epsilon=cfg.norm_eps, dtype=dt, name="pre_norm")(x)
        rope = None
        if cfg.rope:
            rope = tuple(jnp.asarray(t) for t in rope_tables(cfg, g, x.shape[1]))
        if cfg.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"unknown remat_policy {cfg.remat_policy!r}; use one of {sorted(REMAT_POLICIES)}"
            )
        block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy]) if cfg.remat else Block
        for i in range(cfg.depth):
            x = block(cfg, name=f"blocks_{i}")(x, rope)
        if cfg.final_norm:
            x = LayerNorm(epsilon=cfg.norm_eps, dtype=dt, name="norm")(x)
        if cfg.pool == "cls":
            feat = x[:, 0]
        elif cfg.pool == "avg":
            start = 1 + cfg.reg_tokens
            patches = x[:, start : start + g * g]
            feat = patches.astype(jnp.promote_types(dt, jnp.float32)).mean(axis=1).astype(dt)
        else:
            raise ValueError(f"unknown pooling {cfg.pool!r}")
        if cfg.fc_norm:
            feat = LayerNorm(epsilon=cfg.norm_eps, dtype=dt, name="fc_norm")(feat)
        if cfg.proj_dim:
            feat = nn.Dense(cfg.proj_dim, use_bias=False, dtype=dt, name="proj")(feat)
        return feat.astype(jnp.promote_types(dt, jnp.float32))


def param_shapes(cfg: ViTConfig) -> Any:
    """The parameter tree's shapes (jax.ShapeDtypeStruct leaves), without allocating."""
    model = ViT(cfg)
    x = jax.ShapeDtypeStruct((1, cfg.input_res, cfg.input_res, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]
