"""CLIP image towers (transformers `CLIPVisionModelWithProjection` layout): config, key mapping.

Feature: the projected image embedding, `visual_projection(post_layernorm(CLS))` (transformers'
`image_embeds`, 512 for B/32 and B/16, 768 for L/14). Quick-GELU MLP, a LayerNorm before the
blocks (`pre_layrnorm`), bias-free patch embedding, LayerNorm eps 1e-5. Learned position
embeddings are resized to the input grid with bicubic `interpolate(size=...)` without
antialiasing, as transformers' `interpolate_pos_encoding` does.

A full `CLIPModel` checkpoint (text tower included) loads too: the text keys are ignored.
"""

from __future__ import annotations

from lgm_jax.models import weights
from lgm_jax.models.vit import ViTConfig, param_shapes

VARIANTS = {  # name: (patch, width, depth, heads, projection dim)
    "B/32": (32, 768, 12, 12, 512),
    "B/16": (16, 768, 12, 12, 512),
    "L/14": (14, 1024, 24, 16, 768),
}

_V = r"(?:vision_model\.)?"
RULES = [
    (_V + r"embeddings\.class_embedding", "cls_token"),
    (_V + r"embeddings\.position_embedding\.weight", "pos_embed"),
    (_V + r"embeddings\.patch_embedding\.weight", "patch_embed/kernel"),
    (_V + r"pre_layrnorm\.(weight|bias)", "pre_norm/\\1"),
    (_V + r"encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", "blocks_\\1/norm\\2/\\3"),
    (_V + r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", "blocks_\\1/attn/query/\\2"),
    (_V + r"encoder\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", "blocks_\\1/attn/key/\\2"),
    (_V + r"encoder\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", "blocks_\\1/attn/value/\\2"),
    (_V + r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", "blocks_\\1/attn/out/\\2"),
    (_V + r"encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", "blocks_\\1/mlp/\\2/\\3"),
    (_V + r"post_layernorm\.(weight|bias)", "norm/\\1"),
    (r"visual_projection\.weight", "proj/kernel"),
]
# position_ids: a buffer in older checkpoints; the rest: the text tower of a full CLIPModel.
IGNORE = [
    _V + r"embeddings\.position_ids",
    r"text_model\..*",
    r"text_projection\.weight",
    r"logit_scale",
]


def variant(name: str = "B/16", **kw) -> ViTConfig:
    """Config of an OpenAI CLIP image tower at 224 px (trained at 224: no resizing there)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown CLIP variant {name!r}; choose from {sorted(VARIANTS)}")
    patch, width, depth, heads, proj = VARIANTS[name]
    base = dict(
        patch_size=patch,
        width=width,
        depth=depth,
        heads=heads,
        mlp_dim=4 * width,
        mlp="quick_gelu",
        norm_eps=1e-5,
        patch_bias=False,
        pos_grid=224 // patch,
        pos_resize="size",
        pre_norm=True,
        proj_dim=proj,
    )
    base.update(kw)
    return ViTConfig(**base)


def config_from_hf(hf: dict, **kw) -> ViTConfig:
    """ViTConfig from a transformers CLIP config.json dict (a CLIPConfig or a CLIPVisionConfig)."""
    kind = hf.get("model_type")
    if kind == "clip":
        vision = dict(hf["vision_config"])
        vision.setdefault("projection_dim", hf.get("projection_dim", 512))
    elif kind == "clip_vision_model":
        vision = hf
    else:
        raise weights.CheckpointMismatch(
            f"expected a transformers CLIP config (model_type 'clip' or 'clip_vision_model'), "
            f"got {kind!r}"
        )
    act = vision.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise NotImplementedError(f"CLIP activation {act!r} is not supported")
    patch = vision["patch_size"]
    base = dict(
        patch_size=patch,
        width=vision["hidden_size"],
        depth=vision["num_hidden_layers"],
        heads=vision["num_attention_heads"],
        mlp_dim=vision["intermediate_size"],
        mlp=act,
        norm_eps=vision.get("layer_norm_eps", 1e-5),
        patch_bias=False,
        pos_grid=vision["image_size"] // patch,
        pos_resize="size",
        pre_norm=True,
        proj_dim=vision.get("projection_dim", 512),
    )
    base.update(kw)
    return ViTConfig(**base)


def to_flax(state: dict, cfg: ViTConfig, source: str = "checkpoint") -> dict:
    """Convert a CLIP state dict (NumPy arrays, transformers key names) to Flax params."""
    return weights.convert(state, RULES, param_shapes(cfg), IGNORE, source)
