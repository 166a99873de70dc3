"""Backbones by name: the one way to build one. `build(name, weights=None, **overrides)` returns
`(Backbone, params)`; the Backbone carries `features(params, images)`, its input side, feature
dimension, mean/std and name. Every command, the run, the benchmark and the tests build their
backbone here.

Names follow the reference implementation (`dinov2_vitb`, `clip_vitb`, `eva02_vitb`,
`mocov3_vitb`, ...; DINOv3, which the paper does not use, is `dinov3_vits/vitb/vitl`);
`<family>_tiny` are 2-block, 64-wide versions of each family for tests and demos (not
pre-trained models; `eva02_tiny` is not EVA-02 Ti, which is `eva02_vitt`).

Converted weights (written by tools/convert_weights.py, read by `build`) are a directory with
`params.safetensors` (the Flax tree, flat keys "blocks_0/attn/query/kernel", float32) and
`config.json` (the ViTConfig fields plus "family" and "name").

A user's own feature function plugs in as the name `factory:<module>:<function>[:<arg>]`: the
function (called with `arg` when given) returns `(Backbone, params)`, a Backbone subclass whose
`features`, `input_res` and `feature_dim` may be anything (docs/backbones.md).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lgm_jax.errors import InputError, read_json
from lgm_jax.models import clip, dinov2, dinov3, eva02, plain_vit
from lgm_jax.models import weights as weights_mod
from lgm_jax.models.vit import ViT, ViTConfig, param_shapes
from lgm_jax.preprocess import IMAGENET_MEAN, IMAGENET_STD

FAMILIES = ("dinov2", "clip", "eva02", "mocov3", "dino", "dinov3")
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
    "dinov3_vits": ("dinov3", lambda **kw: dinov3.variant("S/16", **kw)),
    "dinov3_vitb": ("dinov3", lambda **kw: dinov3.variant("B/16", **kw)),
    "dinov3_vitl": ("dinov3", lambda **kw: dinov3.variant("L/16", **kw)),
    # Tiny random backbones of each family (tests, demos): 28 px (patch 14) or 32 px (patch 16).
    "dinov2_tiny": (
        "dinov2",
        lambda **kw: dinov2.variant("B/14", **{**_TINY, "pos_grid": 4, "input_res": 28, **kw}),
    ),
    "dinov2_reg_tiny": (
        "dinov2",
        lambda **kw: dinov2.variant(
            "B/14", registers=4, **{**_TINY, "pos_grid": 4, "input_res": 28, **kw}
        ),
    ),
    "clip_tiny": (
        "clip",
        lambda **kw: clip.variant(
            "B/16",
            **{**_TINY, "patch_size": 14, "pos_grid": 2, "proj_dim": 32, "input_res": 28, **kw},
        ),
    ),
    "eva02_tiny": (
        "eva02",
        lambda **kw: eva02.variant(
            "B/14",
            **{**_TINY, "mlp_dim": 170, "pos_grid": 2, "rope_ref_grid": 2, "input_res": 28, **kw},
        ),
    ),
    "mocov3_tiny": (
        "mocov3",
        lambda **kw: plain_vit.variant(
            "B/16", "mocov3", **{**_TINY, "pos_grid": 2, "input_res": 32, **kw}
        ),
    ),
    "dino_tiny": (
        "dino",
        lambda **kw: plain_vit.variant(
            "B/16", "dino", **{**_TINY, "pos_grid": 2, "input_res": 32, **kw}
        ),
    ),
    "dinov3_tiny": (
        "dinov3",
        lambda **kw: dinov3.variant("B/16", **{**_TINY, "input_res": 32, **kw}),
    ),
}
NAMES = tuple(_NAMES)


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A frozen backbone: its architecture, the normalisation its inputs expect and its feature
    function. Hashable, so `features` can be a static argument of a jitted function."""

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
    def input_res(self) -> int:
        """The side of the (square) images `features` takes."""
        return self.config.input_res

    def features(self, params, images: jax.Array) -> jax.Array:
        """Normalised images [B, input_res, input_res, 3] -> features [B, feature_dim]."""
        return ViT(self.config).apply({"params": params}, images)


def get(name: str, **overrides) -> Backbone:
    """The Backbone called `name` (no weights); keyword arguments override ViTConfig fields."""
    if name not in _NAMES:
        raise InputError(f"unknown backbone {name!r}; choose from {', '.join(NAMES)}")
    family, make = _NAMES[name]
    return Backbone(name=name, family=family, config=make(**overrides))


def build(name: str, weights: str | None = None, *, rng=None, **overrides):
    """(Backbone, params): random init when `weights` is None, else the converted weights in
    that directory (their own config wins over the registry's, except for the overrides).

    Keyword arguments override ViTConfig fields (input_res, dtype, remat, attention, ...).
    `name` may also be `factory:<module>:<function>[:<arg>]` (a user's own backbone).
    """
    if name.startswith("factory:"):
        return _from_factory(name)
    if name not in _NAMES:
        raise InputError(f"unknown backbone {name!r}; choose from {', '.join(NAMES)}")
    if weights is None:
        backbone = get(name, **overrides)
        s = backbone.input_res
        rng = jax.random.key(0) if rng is None else rng
        return backbone, _init(backbone.config)(rng, jnp.zeros((1, s, s, 3), jnp.float32))["params"]
    backbone, params = load_converted(weights, **overrides)
    if _NAMES[name][0] != backbone.family:
        raise weights_mod.CheckpointMismatch(
            f"{weights} holds {backbone.family} weights ({backbone.name}), not {name}"
        )
    return backbone, params


@functools.lru_cache(maxsize=32)
def _init(config: ViTConfig):
    """The jitted initialiser of one architecture, compiled once per process (tests and
    commands build the same tiny backbones many times)."""
    return jax.jit(ViT(config).init)


def _from_factory(name: str):
    """`factory:<module>:<function>[:<arg>]` -> what the function returns, (Backbone, params)."""
    module, _, rest = name[len("factory:") :].partition(":")
    fn, _, arg = rest.partition(":")
    try:
        make = getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise InputError(f"backbone {name!r}: cannot load {module}.{fn} ({e})") from e
    return make(arg) if arg else make()


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
    if os.path.isfile(path):
        raise InputError(
            f"{path} is a file: converted weights are a directory with config.json and "
            "params.safetensors (write one with tools/convert_weights.py)"
        )
    for p in (cfg_path, st_path):
        if not os.path.exists(p):
            raise FileNotFoundError(
                f"{p} not found: converted weights are a directory with config.json and "
                "params.safetensors (write one with tools/convert_weights.py)"
            )
    meta = read_json(cfg_path, "a converted-weights config.json", "convert the weights again")
    family, name = meta.pop("family", None), meta.pop("name", None)
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(meta) - fields)
    if unknown or family not in FAMILIES:
        raise weights_mod.CheckpointMismatch(
            f"{cfg_path} is not a converted-weights config (family {family!r}, "
            f"unknown fields {unknown})"
        )
    cfg = ViTConfig(**meta).replace(**overrides)
    flat = weights_mod.read_safetensors(st_path)
    expected = traverse_util.flatten_dict(param_shapes(cfg), sep="/")
    extra = sorted(set(flat) - set(expected))
    missing = sorted(set(expected) - set(flat))
    bad = sorted(k for k in set(flat) & set(expected) if flat[k].shape != expected[k].shape)
    if extra or missing or bad:
        raise weights_mod.CheckpointMismatch(
            f"{st_path} does not match its config: unexpected {extra}, missing {missing}, "
            + "shape mismatches "
            + str([f"{k}: {flat[k].shape} vs {tuple(expected[k].shape)}" for k in bad])
        )
    params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")
    return Backbone(name=name, family=family, config=cfg), params
