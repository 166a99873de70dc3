"""Tiny randomly initialised PyTorch backbones of each family (offline), for parity tests."""

from __future__ import annotations

import numpy as np
import torch

from lgm_jax import convert

W, D, H = 64, 2, 2  # width, depth, heads


def randomize(model, seed: int = 0):
    """Every parameter random (biases, q/v biases and layer scales included), norms near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm = "norm" in name or "layer_norm" in name or "layrnorm" in name
            if is_norm and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif "lambda1" in name or "gamma" in name:
                p.copy_(0.5 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model.eval()


def dinov2(input_res: int = 56, registers: bool = False):
    import transformers

    kw = dict(
        hidden_size=W,
        intermediate_size=4 * W,
        num_hidden_layers=D,
        num_attention_heads=H,
        image_size=input_res,
        patch_size=14,
    )
    if registers:
        return "dinov2", randomize(
            transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**kw))
        )
    return "dinov2", randomize(transformers.Dinov2Model(transformers.Dinov2Config(**kw)))


def clip(input_res: int = 28):
    import transformers

    cfg = transformers.CLIPVisionConfig(
        hidden_size=W,
        intermediate_size=4 * W,
        num_hidden_layers=D,
        num_attention_heads=H,
        image_size=input_res,
        patch_size=14,
        projection_dim=32,
    )
    return "clip", randomize(transformers.CLIPVisionModelWithProjection(cfg))


def eva02(input_res: int = 28, packed: bool = False):
    import timm

    arch = "eva02_tiny_patch14_224" if packed else "eva02_base_patch14_224"
    m = timm.create_model(
        arch,
        pretrained=False,
        embed_dim=W,
        depth=D,
        num_heads=H,
        img_size=input_res,
        num_classes=0,
        dynamic_img_size=True,
    )
    return "eva02", randomize(m)


def plain(family: str, input_res: int = 32):
    import timm

    from lgm_jax.models.vit import sincos_2d

    m = randomize(
        timm.create_model(
            "vit_base_patch16_224",
            pretrained=False,
            embed_dim=W,
            depth=D,
            num_heads=H,
            img_size=input_res,
            num_classes=0,
            dynamic_img_size=True,
        )
    )
    if family == "mocov3":  # MoCo-v3 freezes a 2-D sine-cosine table into pos_embed
        g = input_res // 16
        table = np.concatenate([np.zeros((1, W), np.float32), sincos_2d(g, W)])
        with torch.no_grad():
            m.pos_embed.copy_(torch.from_numpy(table)[None])
    return family, m


def mocov3_original_state(model) -> dict:
    """The keys of an original MoCo-v3 .pth.tar: module.base_encoder.*, momentum encoder, head."""
    state = convert.state_numpy(model)
    out = {f"module.base_encoder.{k}": v for k, v in state.items()}
    out.update({f"module.momentum_encoder.{k}": v for k, v in state.items()})
    out["module.base_encoder.head.0.weight"] = np.zeros((8, W), np.float32)
    out["module.predictor.0.weight"] = np.zeros((8, 8), np.float32)
    return out
