"""Backbones by name: configs, preprocessing, random or converted weights, feature functions.

Names follow the reference implementation (`dinov2_vitb`, `clip_vitb`, `eva02_vitb`,
`mocov3_vitb`, ...); `<family>_tiny` are 2-block, 64-wide versions of each family for tests and
demos (not pre-trained models; `eva02_tiny` is not EVA-02 Ti, which is `eva02_vitt`).

Converted weights (written by tools/convert_weights.py, read by `build`) are a directory with
`params.safetensors` (the Flax tree, flat keys "blocks_0/attn/query/kernel", float32) and
`config.json` (the ViTConfig fields plus "family" and "name").
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lgm_jax.lgm import IMAGENET_MEAN, IMAGENET_STD
from lgm_jax.models import clip, dinov2, eva02, plain_vit, weights
from lgm_jax.models.vit import ViT, ViTConfig, param_shapes

FAMILIES = ("dinov2", "clip", "eva02", "mocov3", "dino")
_TINY = dict(width=64, depth=2, heads=2, mlp_dim=256)

_NAMES: dict[str, tuple[str, Callable[..., ViTConfig]]] = {
    "dinov2_vits": ("dinov2", lambda **kw: dinov2.variant("S/14", **kw)),
    "dinov2_vitb": ("dinov2", lambda **kw: dinov2.variant("B/14", **kw)),
    "dinov2_vitl": ("dinov2", lambda **kw: dinov2.variant("L/14", **kw)),
    "dinov2_vitb_reg": ("dinov2", lambda **kw: dinov2.variant("B/14", registers=4, **kw)),
    "clip_vitb32": ("clip", lambda **kw: clip.variant("B/32", **kw)),
    "clip_vitb": ("clip", lambda **kw: clip.variant("B/16", **kw)),
    "clip_vitl": ("clip", lambda **kw: clip.variant("L/14", **kw)),
    "eva02_vitt": ("eva02", lambda **kw: eva02.variant("T/14", **kw)),
    "eva02_vits": ("eva02", lambda **kw: eva02.variant("S/14", **kw)),
    "eva02_vitb": ("eva02", lambda **kw: eva02.variant("B/14", **kw)),
    "eva02_vitl": ("eva02", lambda **kw: eva02.variant("L/14", **kw)),
    "mocov3_vits": ("mocov3", lambda **kw: plain_vit.variant("S/16", "mocov3", **kw)),
    "mocov3_vitb": ("mocov3", lambda **kw: plain_vit.variant("B/16", "mocov3", **kw)),
    "mocov3_vitl": ("mocov3", lambda **kw: plain_vit.variant("L/16", "mocov3", **kw)),
    "dino_vits": ("dino", lambda **kw: plain_vit.variant("S/16", "dino", **kw)),
    "dino_vitb": ("dino", lambda **kw: plain_vit.variant("B/16", "dino", **kw)),
    # Tiny random backbones of each family (tests, demos): 28 px (patch 14) or 32 px (patch 16).
    "dinov2_tiny": (
        "dinov2",
        lambda **kw: dinov2.variant("B/14", **{**_TINY, "pos_grid": 4, "image_size": 28, **kw}),
    ),
    "dinov2_reg_tiny": (
        "dinov2",
        lambda **kw: dinov2.variant(
            "B/14", registers=4, **{**_TINY, "pos_grid": 4, "image_size": 28, **kw}
        ),
    ),
    "clip_tiny": (
        "clip",
        lambda **kw: clip.variant(
            "B/16",
            **{**_TINY, "patch_size": 14, "pos_grid": 2, "proj_dim": 32, "image_size": 28, **kw},
        ),
    ),
    "eva02_tiny": (
        "eva02",
        lambda **kw: eva02.variant(
            "B/14",
            **{**_TINY, "mlp_dim": 170, "pos_grid": 2, "rope_ref_grid": 2, "image_size": 28, **kw},
        ),
    ),
    "mocov3_tiny": (
        "mocov3",
        lambda **kw: plain_vit.variant(
            "B/16", "mocov3", **{**_TINY, "pos_grid": 2, "image_size": 32, **kw}
        ),
    ),
    "dino_tiny": (
        "dino",
        lambda **kw: plain_vit.variant(
            "B/16", "dino", **{**_TINY, "pos_grid": 2, "image_size": 32, **kw}
        ),
    ),
}
NAMES = tuple(_NAMES)


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A frozen backbone: its architecture and the normalisation its inputs expect."""

    name: str
    family: str
    config: ViTConfig
    # The reference normalises with ImageNet statistics for every backbone, CLIP included.
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    @property
    def image_size(self) -> int:
        return self.config.image_size


def get(name: str, **overrides) -> Backbone:
    """The Backbone called `name`; keyword arguments override ViTConfig fields."""
    if name not in _NAMES:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(NAMES)}")
    family, make = _NAMES[name]
    return Backbone(name=name, family=family, config=make(**overrides))


def build(name: str, weights_dir: str | None = None, rng=None, **overrides):
    """(Backbone, params): random init when weights_dir is None, else the converted weights.

    Keyword arguments override ViTConfig fields (image_size, dtype, remat, attention, ...).
    A converted directory's own config wins over the registry's, except for the overrides.
    """
    if name not in _NAMES:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(NAMES)}")
    if weights_dir is None:
        backbone = get(name, **overrides)
        model = ViT(backbone.config)
        s = backbone.config.image_size
        rng = jax.random.key(0) if rng is None else rng
        params = jax.jit(model.init)(rng, jnp.zeros((1, s, s, 3), jnp.float32))["params"]
        return backbone, params
    backbone, params = load_converted(weights_dir, **overrides)
    if _NAMES[name][0] != backbone.family:
        raise weights.CheckpointMismatch(
            f"{weights_dir} holds {backbone.family} weights ({backbone.name}), not {name}"
        )
    return backbone, params


def features_fn(backbone: Backbone) -> Callable[[object, jax.Array], jax.Array]:
    """features(params, normalised images [B, H, W, 3]) -> [B, feature_dim] float32."""
    model = ViT(backbone.config)
    return lambda params, images: model.apply({"params": params}, images)


def save_converted(out_dir: str, backbone: Backbone, params) -> None:
    """Write params.safetensors (flat 'a/b/c' keys) and config.json to out_dir."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    save_file(
        {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()},
        os.path.join(out_dir, "params.safetensors"),
    )
    meta = dict(dataclasses.asdict(backbone.config), family=backbone.family, name=backbone.name)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(meta, f, indent=2)


def load_converted(path: str, **overrides) -> tuple[Backbone, dict]:
    """Read a directory written by `save_converted`; every key and shape is checked."""
    cfg_path = os.path.join(path, "config.json")
    st_path = os.path.join(path, "params.safetensors")
    for p in (cfg_path, st_path):
        if not os.path.exists(p):
            raise FileNotFoundError(
                f"{p} not found: converted weights are a directory with config.json and "
                "params.safetensors (write one with tools/convert_weights.py)"
            )
    with open(cfg_path) as f:
        meta = json.load(f)
    family, name = meta.pop("family", None), meta.pop("name", None)
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(meta) - fields)
    if unknown or family not in FAMILIES:
        raise weights.CheckpointMismatch(
            f"{cfg_path} is not a converted-weights config (family {family!r}, "
            f"unknown fields {unknown})"
        )
    cfg = ViTConfig(**meta).replace(**overrides)
    flat = weights.read_safetensors(st_path)
    expected = traverse_util.flatten_dict(param_shapes(cfg), sep="/")
    extra = sorted(set(flat) - set(expected))
    missing = sorted(set(expected) - set(flat))
    bad = sorted(k for k in set(flat) & set(expected) if flat[k].shape != expected[k].shape)
    if extra or missing or bad:
        raise weights.CheckpointMismatch(
            f"{st_path} does not match its config: unexpected {extra}, missing {missing}, "
            + "shape mismatches "
            + str([f"{k}: {flat[k].shape} vs {tuple(expected[k].shape)}" for k in bad])
        )
    params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")
    return Backbone(name=name, family=family, config=cfg), params
