"""DINOv2 (transformers `Dinov2Model` / `Dinov2WithRegistersModel` layout): config, mapping, loader.

Feature: the CLS token after the final LayerNorm (transformers' `pooler_output`). The learned
position embeddings (37x37 for the 518 px checkpoints) are resized to the input grid with
PyTorch's bicubic kernel, as transformers does; `pos_resize="hub"` reproduces the torch.hub
model's slightly shifted grid instead. The with-registers model (4 register tokens after CLS,
without position embedding) resizes with `antialias=True`, as its transformers class does.

Key names: both the checkpoint files on the hub (`attention.attention.query`, ...) and the
in-memory state dict of transformers >= 5 (`attention.q_proj`, ...) are accepted.
"""

from __future__ import annotations

import os

from lgm_jax.errors import read_json
from lgm_jax.models import weights
from lgm_jax.models.vit import ViTConfig, param_shapes

VARIANTS = {  # name: (width, depth, heads)
    "S/14": (384, 12, 6),
    "B/14": (768, 12, 12),
    "L/14": (1024, 24, 16),
}

RULES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", "patch_embed/\\1"),
    (r"encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)", "blocks_\\1/norm\\2/\\3"),
    (
        r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)",
        "blocks_\\1/attn/\\2/\\3",
    ),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", "blocks_\\1/attn/out/\\2"),
    (r"encoder\.layer\.(\d+)\.attention\.q_proj\.(weight|bias)", "blocks_\\1/attn/query/\\2"),
    (r"encoder\.layer\.(\d+)\.attention\.k_proj\.(weight|bias)", "blocks_\\1/attn/key/\\2"),
    (r"encoder\.layer\.(\d+)\.attention\.v_proj\.(weight|bias)", "blocks_\\1/attn/value/\\2"),
    (r"encoder\.layer\.(\d+)\.attention\.o_proj\.(weight|bias)", "blocks_\\1/attn/out/\\2"),
    (r"embeddings\.register_tokens", "reg_tokens"),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", "blocks_\\1/ls\\2/scale"),
    (r"encoder\.layer\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", "blocks_\\1/mlp/\\2/\\3"),
    (r"layernorm\.(weight|bias)", "norm/\\1"),
]
IGNORE = [r"embeddings\.mask_token"]  # only used for masked-image pre-training


def variant(name: str = "B/14", registers: int = 0, **kw) -> ViTConfig:
    """Config of a DINOv2 size variant at 224 px (weights trained at 518 px: 37x37 grid)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown DINOv2 variant {name!r}; choose from {sorted(VARIANTS)}")
    width, depth, heads = VARIANTS[name]
    base = dict(
        patch_size=14,
        width=width,
        depth=depth,
        heads=heads,
        mlp_dim=4 * width,
        layer_scale=True,
        norm_eps=1e-6,
        pos_grid=37,
        reg_tokens=registers,
        pos_resize="antialias" if registers else "size",
    )
    base.update(kw)
    return ViTConfig(**base)


def config_from_hf(hf: dict, **kw) -> ViTConfig:
    """ViTConfig from a transformers DINOv2 config.json dict."""
    kind = hf.get("model_type")
    if kind not in ("dinov2", "dinov2_with_registers"):
        raise weights.CheckpointMismatch(
            "expected a transformers DINOv2 config (model_type 'dinov2' or "
            f"'dinov2_with_registers'), got {kind!r}"
        )
    registers = hf.get("num_register_tokens", 4) if kind == "dinov2_with_registers" else 0
    if hf.get("use_swiglu_ffn"):
        raise NotImplementedError("DINOv2 with a SwiGLU MLP (ViT-g) is not supported")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise NotImplementedError(f"DINOv2 activation {hf['hidden_act']!r} is not supported")
    patch = hf["patch_size"]
    base = dict(
        patch_size=patch,
        width=hf["hidden_size"],
        depth=hf["num_hidden_layers"],
        heads=hf["num_attention_heads"],
        mlp_dim=int(hf["hidden_size"] * hf.get("mlp_ratio", 4)),
        qkv_bias=hf.get("qkv_bias", True),
        layer_scale=True,
        norm_eps=hf.get("layer_norm_eps", 1e-6),
        pos_grid=hf["image_size"] // patch,
        reg_tokens=registers,
        pos_resize="antialias" if registers else "size",
    )
    base.update(kw)
    return ViTConfig(**base)


def to_flax(state: dict, cfg: ViTConfig, source: str = "checkpoint") -> dict:
    """Convert a DINOv2 state dict (NumPy arrays, transformers key names) to Flax params."""
    return weights.convert(state, RULES, param_shapes(cfg), IGNORE, source)


def load(path: str, **kw) -> tuple[ViTConfig, dict]:
    """Load a transformers DINOv2 directory (config.json + model.safetensors).

    Keyword arguments override ViTConfig fields (input_res, dtype, remat, pos_resize, ...).
    """
    cfg_path = os.path.join(path, "config.json")
    st_path = os.path.join(path, "model.safetensors")
    for p in (cfg_path, st_path):
        if not os.path.exists(p):
            raise FileNotFoundError(
                f"{p} not found: a DINOv2 backbone directory needs config.json and "
                "model.safetensors (save one with transformers' save_pretrained)"
            )
    cfg = config_from_hf(read_json(cfg_path, "a transformers config.json"), **kw)
    return cfg, to_flax(weights.read_safetensors(st_path), cfg, source=st_path)
