"""EVA-02 (timm `eva02_*_patch14_224` layout): config and checkpoint mapping.

Feature: the mean of the patch tokens (CLS excluded), then LayerNorm (timm's `global_pool='avg'`
+ `fc_norm`; no final norm on the tokens), 192 / 384 / 768 / 1024 wide. Rotary position
embedding on the patch tokens' queries and keys (timm `RotaryEmbeddingCat`, coordinates
rescaled to the 16x16 pre-training grid), plus a learned absolute table (16x16 + CLS) resized
with timm's antialiased bicubic at other resolutions. SwiGLU MLP of 8/3 the width: T/S pack the
gate and value in one `fc1` (timm GluMlp), B/L have `fc1_g`, `fc1_x` and a LayerNorm on the hidden
layer. Attention: fused `qkv` with `q_bias`/`v_bias` (T/S) or separate `q_proj` (bias),
`k_proj` (no bias), `v_proj` (bias) (B/L).
"""

from __future__ import annotations

from lgm_jax.models import weights
from lgm_jax.models.vit import ViTConfig, param_shapes

VARIANTS = {  # name: (width, depth, heads, fused qkv + packed SwiGLU)
    "T/14": (192, 12, 3, True),
    "S/14": (384, 12, 6, True),
    "B/14": (768, 12, 12, False),
    "L/14": (1024, 24, 16, False),
}

RULES = [
    (r"cls_token", "cls_token"),
    (r"pos_embed", "pos_embed"),
    (r"patch_embed\.proj\.(weight|bias)", "patch_embed/\\1"),
    (r"blocks\.(\d+)\.norm([12])\.(weight|bias)", "blocks_\\1/norm\\2/\\3"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", "blocks_\\1/attn/qkv/\\2"),
    (r"blocks\.(\d+)\.attn\.([qv])_bias", "blocks_\\1/attn/\\2_bias"),
    (r"blocks\.(\d+)\.attn\.q_proj\.(weight|bias)", "blocks_\\1/attn/query/\\2"),
    (r"blocks\.(\d+)\.attn\.k_proj\.(weight|bias)", "blocks_\\1/attn/key/\\2"),
    (r"blocks\.(\d+)\.attn\.v_proj\.(weight|bias)", "blocks_\\1/attn/value/\\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", "blocks_\\1/attn/out/\\2"),
    (r"blocks\.(\d+)\.mlp\.(fc1_g|fc1_x|fc1|fc2|norm)\.(weight|bias)", "blocks_\\1/mlp/\\2/\\3"),
    (r"blocks\.(\d+)\.gamma_([12])", "blocks_\\1/ls\\2/scale"),
    (r"fc_norm\.(weight|bias)", "fc_norm/\\1"),
    (r"norm\.(weight|bias)", "norm/\\1"),
]
# The classifier head (fine-tuned checkpoints) and non-persistent buffers are never read.
IGNORE = [r"head\..*", r"blocks\.\d+\.attn\.k_bias", r"rope\..*"]


def variant(name: str = "B/14", **kw) -> ViTConfig:
    """Config of an EVA-02 size variant at 224 px (trained at 224: 16x16 grid)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown EVA-02 variant {name!r}; choose from {sorted(VARIANTS)}")
    width, depth, heads, packed = VARIANTS[name]
    base = dict(
        patch_size=14,
        width=width,
        depth=depth,
        heads=heads,
        mlp_dim=int(width * 4 * 2 / 3),
        mlp="swiglu_packed" if packed else "swiglu",
        mlp_norm=not packed,
        qkv_fused=packed,
        k_bias=False,
        norm_eps=1e-6,
        pos_grid=16,
        pos_resize="antialias",
        rope=True,
        rope_ref_grid=16,
        final_norm=False,
        pool="avg",
        fc_norm=True,
    )
    base.update(kw)
    return ViTConfig(**base)


def to_flax(state: dict, cfg: ViTConfig, source: str = "checkpoint") -> dict:
    """Convert an EVA-02 state dict (NumPy arrays, timm key names) to Flax params."""
    return weights.convert(state, RULES, param_shapes(cfg), IGNORE, source)
