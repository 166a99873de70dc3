"""DINOv3 ViT (transformers `DINOv3ViTModel` layout): config and checkpoint mapping.

Feature: the CLS token after the final LayerNorm (transformers' `pooler_output`,
`norm(last_hidden_state)[:, 0]`). Tokens [CLS, 4 registers, patches], no absolute position
embedding: a rotary embedding on the patch tokens' queries and keys only, with patch centres
normalised to [-1, 1] and periods from rope_theta = 100 (vit.rope_tables, style "dinov3"; the
training-time shift, jitter and rescale of the coordinates are off in eval mode, so any grid is
handled exactly). Query and value projections biased, key projection without bias, layer scale
on both branches, LayerNorm eps 1e-5, patch 16. MLP: GELU (exact) of 4x the width for S/B/L;
the gated MLP (`use_gated_mlp`, SiLU gate: the S+/H+ releases) maps to the "swiglu" MLP.
Images are normalised with the ImageNet mean and std (DINOv3's image processor uses them too).

Key names: the checkpoint files (`layer.0.attention.q_proj.weight`, ...) and the in-memory state
dict of `DINOv3ViTModel` (`model.layer.0...`) are both accepted.
"""

from __future__ import annotations

import numpy as np

from lgm_jax.models import weights
from lgm_jax.models.vit import ViTConfig, param_shapes

VARIANTS = {  # name: (width, depth, heads); MLP 4x the width (GELU) for all three
    "S/16": (384, 12, 6),
    "B/16": (768, 12, 12),
    "L/16": (1024, 24, 16),
}

_LAYER = r"(?:model\.)?layer\.(\d+)"
RULES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.register_tokens", "reg_tokens"),
    (r"embeddings\.patch_embeddings\.(weight|bias)", "patch_embed/\\1"),
    (_LAYER + r"\.norm([12])\.(weight|bias)", "blocks_\\1/norm\\2/\\3"),
    (_LAYER + r"\.attention\.q_proj\.(weight|bias)", "blocks_\\1/attn/query/\\2"),
    (_LAYER + r"\.attention\.k_proj\.(weight|bias)", "blocks_\\1/attn/key/\\2"),
    (_LAYER + r"\.attention\.v_proj\.(weight|bias)", "blocks_\\1/attn/value/\\2"),
    (_LAYER + r"\.attention\.o_proj\.(weight|bias)", "blocks_\\1/attn/out/\\2"),
    (_LAYER + r"\.layer_scale([12])\.lambda1", "blocks_\\1/ls\\2/scale"),
    # Plain MLP: up -> GELU -> down; gated: down(act(gate) * up).
    (_LAYER + r"\.mlp\.gate_proj\.(weight|bias)", "blocks_\\1/mlp/fc1_g/\\2"),
    (_LAYER + r"\.mlp\.up_proj\.(weight|bias)", "blocks_\\1/mlp/{up}/\\2"),
    (_LAYER + r"\.mlp\.down_proj\.(weight|bias)", "blocks_\\1/mlp/fc2/\\2"),
    (r"norm\.(weight|bias)", "norm/\\1"),
]
# The mask token is only used for masked-image pre-training; the rope frequencies are recomputed.
IGNORE = [r"embeddings\.mask_token", r"rope_embeddings\..*"]


def variant(name: str = "B/16", **kw) -> ViTConfig:
    """Config of a DINOv3 size variant at 224 px (the LVD-1689M pre-trained S/16, B/16, L/16)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown DINOv3 variant {name!r}; choose from {sorted(VARIANTS)}")
    width, depth, heads = VARIANTS[name]
    base = dict(
        patch_size=16,
        width=width,
        depth=depth,
        heads=heads,
        mlp_dim=4 * width,
        k_bias=False,
        layer_scale=True,
        norm_eps=1e-5,
        reg_tokens=4,
        pos_embed="none",
        rope=True,
        rope_style="dinov3",
        rope_theta=100.0,
        input_res=224,
    )
    base.update(kw)
    return ViTConfig(**base)


def config_from_hf(hf: dict, **kw) -> ViTConfig:
    """ViTConfig from a transformers DINOv3ViTConfig dict (config.json)."""
    if hf.get("model_type") != "dinov3_vit":
        raise weights.CheckpointMismatch(
            f"expected a transformers DINOv3 ViT config (model_type 'dinov3_vit'), "
            f"got {hf.get('model_type')!r}"
        )
    gated, act = hf.get("use_gated_mlp", False), hf.get("hidden_act", "gelu")
    if (gated and act != "silu") or (not gated and act != "gelu"):
        kind = "gated" if gated else "plain"
        raise NotImplementedError(f"DINOv3 {kind} MLP with activation {act!r} is not supported")
    unsupported = [
        k for k in ("query_bias", "value_bias", "proj_bias", "mlp_bias") if not hf.get(k, True)
    ]
    if unsupported:
        raise NotImplementedError(f"DINOv3 without {', '.join(unsupported)} is not supported")
    patch, size = hf.get("patch_size", 16), hf.get("image_size", 224)
    if not isinstance(patch, int) or not isinstance(size, int):
        raise NotImplementedError("DINOv3 with non-square patches or images is not supported")
    base = dict(
        patch_size=patch,
        width=hf["hidden_size"],
        depth=hf["num_hidden_layers"],
        heads=hf["num_attention_heads"],
        mlp_dim=hf["intermediate_size"],
        mlp="swiglu" if gated else "gelu",
        k_bias=hf.get("key_bias", False),
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        reg_tokens=hf.get("num_register_tokens", 0),
        rope_theta=float(hf.get("rope_theta", 100.0)),
        input_res=size,
    )
    return variant("B/16", **{**base, **kw})


def to_flax(state: dict, cfg: ViTConfig, source: str = "checkpoint") -> dict:
    """Convert a DINOv3 state dict (NumPy arrays, transformers key names) to Flax params."""
    up = "fc1_x" if cfg.mlp == "swiglu" else "fc1"
    rules = [(p, t.replace("{up}", up)) for p, t in RULES]
    # Without registers the checkpoint still holds an empty [1, 0, D] register_tokens.
    state = {k: v for k, v in state.items() if k != "embeddings.register_tokens" or np.size(v)}
    return weights.convert(state, rules, param_shapes(cfg), IGNORE, source)
