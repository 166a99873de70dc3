"""Plain ViTs in timm's `VisionTransformer` layout: MoCo-v3 and DINO (v1).

Both are the original ViT (fused `qkv` with bias, GELU MLP, LayerNorm eps 1e-6, CLS token after
the final norm as the feature) and differ only in the position embedding:
  * MoCo-v3 (S/16, B/16, L/16): a fixed 2-D sine-cosine table (zero for CLS). It is a function,
    not a trained table, so the model builds it for the input grid (`pos_embed="sincos"`);
    the checkpoint's `pos_embed` is checked against it and otherwise unused. MoCo-v3's ViT-S
    has 12 heads (not timm's 6).
  * DINO (S/16, B/16): a learned 14x14 (+ CLS) table, resized at other resolutions with timm's
    `resample_abs_pos_embed` (antialiased bicubic); `pos_resize="hub"` gives the original
    DINO repository's `scale_factor=(g + 0.1)/14` bicubic instead.

Key names: timm's (`blocks.0.attn.qkv.weight`, ...), which are also those of the original DINO
checkpoints and of MoCo-v3's `vits.py`; the original MoCo-v3 `.pth.tar` files prefix them with
`module.base_encoder.` (and hold a momentum encoder and predictor, ignored here), linear-probe
checkpoints with `module.`.
"""

from __future__ import annotations

import numpy as np

from lgm_jax.models import weights
from lgm_jax.models.vit import ViTConfig, param_shapes, sincos_2d

VARIANTS = {  # family: {name: (width, depth, heads)}
    "mocov3": {"S/16": (384, 12, 12), "B/16": (768, 12, 12), "L/16": (1024, 24, 16)},
    "dino": {"S/16": (384, 12, 6), "B/16": (768, 12, 12)},
}

_P = r"(?:module\.(?:base_encoder\.)?)?"
RULES = [
    (_P + r"cls_token", "cls_token"),
    (_P + r"pos_embed", "pos_embed"),
    (_P + r"patch_embed\.proj\.(weight|bias)", "patch_embed/\\1"),
    (_P + r"blocks\.(\d+)\.norm([12])\.(weight|bias)", "blocks_\\1/norm\\2/\\3"),
    (_P + r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", "blocks_\\1/attn/qkv/\\2"),
    (_P + r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", "blocks_\\1/attn/out/\\2"),
    (_P + r"blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", "blocks_\\1/mlp/\\2/\\3"),
    (_P + r"blocks\.(\d+)\.ls([12])\.gamma", "blocks_\\1/ls\\2/scale"),
    (_P + r"norm\.(weight|bias)", "norm/\\1"),
]
# Heads (classifier, MoCo projector), MoCo's momentum encoder and predictor are never read.
IGNORE = [
    _P + r"head\..*",
    r"module\.momentum_encoder\..*",
    r"module\.predictor\..*",
    _P + r"fc_norm\..*",
]
SINCOS_IGNORE = [_P + r"pos_embed"]


def variant(name: str = "B/16", family: str = "mocov3", **kw) -> ViTConfig:
    """Config of a MoCo-v3 or DINO size variant at 224 px (trained at 224: 14x14 grid)."""
    if family not in VARIANTS:
        raise ValueError(f"unknown plain-ViT family {family!r}; choose from {sorted(VARIANTS)}")
    if name not in VARIANTS[family]:
        raise ValueError(
            f"unknown {family} variant {name!r}; choose from {sorted(VARIANTS[family])}"
        )
    width, depth, heads = VARIANTS[family][name]
    base = dict(
        patch_size=16,
        width=width,
        depth=depth,
        heads=heads,
        mlp_dim=4 * width,
        qkv_fused=True,
        norm_eps=1e-6,
        pos_grid=14,
        pos_resize="antialias",
    )
    if family == "mocov3":
        base.update(pos_embed="sincos")
    base.update(kw)
    return ViTConfig(**base)


def to_flax(state: dict, cfg: ViTConfig, source: str = "checkpoint") -> dict:
    """Convert a timm-layout ViT state dict (NumPy arrays) to Flax params.

    With `cfg.pos_embed == "sincos"` the checkpoint's position table must be the fixed 2-D
    sine-cosine one (a learned table here means the checkpoint is not MoCo-v3).
    """
    ignore = list(IGNORE)
    if cfg.pos_embed == "sincos":
        ignore += SINCOS_IGNORE
        for key, value in state.items():
            if key.endswith("pos_embed"):
                value = np.asarray(value, np.float32).reshape(-1, cfg.width)
                grid = int(round(np.sqrt(value.shape[0] - 1)))
                want = np.concatenate(
                    [np.zeros((1, cfg.width), np.float32), sincos_2d(grid, cfg.width)]
                )
                if value.shape != want.shape or not np.allclose(value, want, atol=1e-4):
                    raise weights.CheckpointMismatch(
                        f"{source}: {key} is not MoCo-v3's fixed 2-D sine-cosine embedding; "
                        "load a learned-position ViT with pos_embed='learned' (e.g. family 'dino')"
                    )
    return weights.convert(state, RULES, param_shapes(cfg), ignore, source)
