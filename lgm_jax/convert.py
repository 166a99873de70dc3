"""Convert a pre-trained PyTorch ViT to lgm_jax's converted-weights format, optionally verified.

    python -m lgm_jax.convert --source facebook/dinov2-base --out w/dinov2_vitb --verify
    python -m lgm_jax.convert --source facebook/dinov3-vitb16-pretrain-lvd1689m --out w/dinov3_vitb
    python -m lgm_jax.convert --source openai/clip-vit-base-patch16 --out w/clip_vitb
    python -m lgm_jax.convert --source eva02_base_patch14_224.mim_in22k --out w/eva02_vitb
    python -m lgm_jax.convert --source vit-b-300ep.pth.tar --family mocov3 --out w/mocov3_vitb
    python -m lgm_jax.convert --source vit_base_patch16_224.dino --out w/dino_vitb

(docs/backbones.md lists every backbone.)

SRC is a transformers model directory or hub id (DINOv2, DINOv2 with registers, CLIP, DINOv3),
a timm model name or timm hub directory (EVA-02, DINO, MoCo-v3 mirrors in timm layout), or a
checkpoint file (.pth / .pth.tar / .safetensors: the original MoCo-v3 or DINO files; pass
--family and, for a timm architecture that cannot be inferred from the widths, --arch). Writes
OUT/params.safetensors and OUT/config.json, read by `lgm_jax.models.registry.build(name, OUT)`.
--input-res is the side of the images the converted backbone takes (ViTConfig.input_res).

--verify runs the PyTorch model and the Flax model on the same random batch (at the model's
resolution, and at --verify-size if given) and exits 1 if the features differ by more than
1e-4 relative (max |flax - torch| / max |torch|).

torch, transformers and timm (`pip install -e ".[convert]"`) are imported only inside the
functions that need them, and in the tests; checkpoints are read with safetensors or
torch.load(weights_only=True). tools/convert_weights.py is a shell for this command.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from lgm_jax import errors
from lgm_jax.errors import InputError, command_parser, read_json, run_command

TOLERANCE = 1e-4
FAMILIES = ("dinov2", "clip", "eva02", "mocov3", "dino", "dinov3")
# A --source ending so, or starting so, is a path (a hub or timm name is neither).
CHECKPOINT_SUFFIXES = (".pth", ".pth.tar", ".tar", ".pt", ".bin", ".safetensors")
PATH_PREFIXES = ("/", "./", "../", "~")


def check_source(source: str) -> None:
    """A --source that names a local file or directory which does not exist is an input error
    (rather than a failed download of a hub model of that name)."""
    looks_local = source.endswith(CHECKPOINT_SUFFIXES) or source.startswith(PATH_PREFIXES)
    if looks_local and not os.path.exists(os.path.expanduser(source)):
        raise InputError(
            f"--source {source}: no such file or directory (a local transformers or timm "
            "directory, a checkpoint file, a transformers hub id or a timm model name)"
        )


# ----------------------------------------------------------------------------- torch side
def load_torch(source: str, family: str | None = None, arch: str | None = None):
    """(family, torch model in eval mode, raw state dict of the source or None)."""
    check_source(source)
    family = family or detect_family(source)
    if family in ("dinov2", "clip", "dinov3"):
        import transformers

        clip = family == "clip"
        cls = transformers.CLIPVisionModelWithProjection if clip else transformers.AutoModel
        try:
            model = cls.from_pretrained(source)
        except OSError as e:  # neither a local directory nor a model on the hub
            raise InputError(f"--source {source}: {e}") from e
        return family, model.eval().float(), None
    if os.path.isdir(source):
        cfg = read_json(os.path.join(source, "config.json"), "a timm config.json")
        arch = arch or cfg["architecture"]
        source = os.path.join(source, "model.safetensors")
    if os.path.isfile(source):
        return load_timm_checkpoint(source, family, arch)
    import timm

    try:
        model = timm.create_model(source, pretrained=True, num_classes=0, dynamic_img_size=True)
    except RuntimeError as e:  # timm's "Unknown model"
        raise InputError(f"--source {source}: {e}") from e
    return family, model.eval().float(), None


def load_timm_checkpoint(path: str, family: str, arch: str | None):
    """(family, timm model holding the checkpoint file's weights, the state dict to convert)."""
    import timm
    import torch

    state = read_checkpoint(path)
    inner = {_strip(k): v for k, v in state.items() if _is_encoder_key(k)}
    arch = arch or _infer_arch(family, inner)
    heads = {"mocov3": {384: 12}}.get(family, {}).get(inner["cls_token"].shape[-1])
    kw = {"num_heads": heads} if heads else {}
    model = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True, **kw)
    tensors = {k: torch.as_tensor(v) for k, v in inner.items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise InputError(
            f"{path} does not fit timm {arch}: missing {missing}, unexpected {unexpected}"
        )
    # MoCo-v3's own key names are mapped by plain_vit.RULES; other files with their prefix
    # (DINO's "backbone.") stripped.
    return family, model.eval().float(), state if family == "mocov3" else inner


def detect_family(source: str) -> str:
    cfg_path = os.path.join(source, "config.json")
    if os.path.isdir(source) and os.path.exists(cfg_path):
        cfg = read_json(cfg_path, "a model's config.json")
        kind, arch = cfg.get("model_type", ""), cfg.get("architecture", "")
    elif os.path.isfile(source):
        raise InputError(f"{source} is a checkpoint file: pass --family ({', '.join(FAMILIES)})")
    elif "/" in source and not source.startswith(("timm/", "hf-hub:")):
        import transformers

        try:
            kind, arch = transformers.AutoConfig.from_pretrained(source).model_type, ""
        except OSError as e:  # neither a local directory nor a model on the hub
            raise InputError(f"--source {source}: {e}") from e
    else:
        kind, arch = "", source.split("/")[-1]
    if kind.startswith("dinov2"):
        return "dinov2"
    if kind.startswith("dinov3"):
        return "dinov3"
    if kind.startswith("clip"):
        return "clip"
    if arch.startswith("eva02"):
        return "eva02"
    if "dino" in arch:
        return "dino"
    if "moco" in arch or "moco" in source:
        return "mocov3"
    raise InputError(f"cannot tell the family of {source!r}: pass --family")


def read_checkpoint(path: str) -> dict:
    """A state dict as NumPy arrays, from .safetensors or a (zipped) torch pickle."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "teacher"):  # MoCo-v3: state_dict; DINO full: teacher
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    return {k: v.float().numpy() for k, v in obj.items() if hasattr(v, "numpy")}


def _strip(key: str) -> str:
    for prefix in ("module.base_encoder.", "module.", "backbone."):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _is_encoder_key(key: str) -> bool:
    return not key.startswith(("module.momentum_encoder.", "module.predictor."))


def _infer_arch(family: str, state: dict) -> str:
    width = state["cls_token"].shape[-1]
    size = {192: "tiny", 384: "small", 768: "base", 1024: "large"}[width]
    if family == "eva02":
        return f"eva02_{size}_patch14_224"
    return f"vit_{size}_patch16_224"


def state_numpy(model) -> dict:
    return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


def torch_features(family: str, model, x):
    """The feature LGM uses, from a torch model: x [B, 3, H, W] float32 -> [B, F]."""
    import torch

    with torch.no_grad():
        if family in ("dinov2", "dinov3"):
            return model(pixel_values=x).pooler_output
        if family == "clip":
            return model(pixel_values=x, interpolate_pos_encoding=True).image_embeds
        return model.forward_head(model.forward_features(x), pre_logits=True)


# ----------------------------------------------------------------------------- flax side
def config_from_torch(family: str, model, **overrides):
    """The ViTConfig of a torch model (transformers config or timm module attributes)."""
    from lgm_jax.models import clip, dinov2, dinov3, vit

    if family == "dinov2":
        return dinov2.config_from_hf(model.config.to_dict(), **overrides)
    if family == "dinov3":
        return dinov3.config_from_hf(model.config.to_dict(), **overrides)
    if family == "clip":
        hf = model.config.to_dict()
        return clip.config_from_hf(hf, **overrides)
    import torch.nn as nn

    blk = model.blocks[0]
    base = dict(
        patch_size=model.patch_embed.patch_size[0],
        width=model.embed_dim,
        depth=len(model.blocks),
        heads=blk.attn.num_heads,
        pos_grid=model.patch_embed.grid_size[0],
        pos_resize="antialias",
        norm_eps=blk.norm1.eps,
        qkv_fused=getattr(blk.attn, "qkv", None) is not None,
        pool="avg" if model.global_pool == "avg" else "cls",
        final_norm=not isinstance(model.norm, nn.Identity),
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
    )
    if model.global_pool not in ("avg", "token"):
        raise InputError(f"unsupported timm global_pool {model.global_pool!r}")
    if family == "eva02":
        mlp = blk.mlp
        packed = not hasattr(mlp, "fc1_g")
        base.update(
            mlp="swiglu_packed" if packed else "swiglu",
            mlp_dim=mlp.fc2.in_features,
            mlp_norm=not isinstance(mlp.norm, nn.Identity),
            k_bias=False,
            rope=model.rope is not None,
            rope_ref_grid=(model.rope.ref_feat_shape or (0,))[0] if model.rope is not None else 0,
        )
    else:
        base.update(
            mlp_dim=blk.mlp.fc1.out_features,
            qkv_bias=blk.attn.qkv.bias is not None,
            pos_embed="sincos" if family == "mocov3" else "learned",
        )
    base.update(overrides)
    return vit.ViTConfig(**base)


def to_flax(family: str, state: dict, cfg, source: str = "checkpoint"):
    from lgm_jax.models import clip, dinov2, dinov3, eva02, plain_vit

    module = {
        "dinov2": dinov2,
        "dinov3": dinov3,
        "clip": clip,
        "eva02": eva02,
        "mocov3": plain_vit,
        "dino": plain_vit,
    }[family]
    return module.to_flax(state, cfg, source)


def registry_name(family: str, cfg) -> str:
    from lgm_jax.models import registry

    for name in registry.NAMES:
        b = registry.get(name)
        same = (b.config.width, b.config.depth, b.config.patch_size, b.config.reg_tokens) == (
            cfg.width,
            cfg.depth,
            cfg.patch_size,
            cfg.reg_tokens,
        )
        if b.family == family and same:
            return name
    return f"{family}_custom"


def convert_module(
    family: str,
    model,
    state: dict | None = None,
    name: str | None = None,
    source: str = "checkpoint",
    **overrides,
):
    """(Backbone, params) of a torch model; `state` (the source file's keys) if given."""
    from lgm_jax.models import registry

    cfg = config_from_torch(family, model, **overrides)
    params = to_flax(family, state_numpy(model) if state is None else state, cfg, source)
    backbone = registry.Backbone(name=name or registry_name(family, cfg), family=family, config=cfg)
    return backbone, params


def compare(family: str, model, backbone, params, size: int, batch: int = 2, seed: int = 0):
    """(max abs diff, relative diff) of torch vs Flax features on one random batch."""
    import jax
    import torch

    x = np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)
    ref = torch_features(family, model, torch.from_numpy(x)).float().numpy()
    fn = jax.jit(backbone.features)
    ours = np.asarray(fn(params, x.transpose(0, 2, 3, 1)))
    diff = float(np.abs(ours - ref).max())
    return diff, diff / max(float(np.abs(ref).max()), 1e-30)


def parse(argv=None) -> argparse.Namespace:
    parser = command_parser("convert", __doc__)
    parser.add_argument("--source", required=True, help="a directory, hub id, timm name or file")
    parser.add_argument("--out", required=True, help="directory for the converted weights")
    parser.add_argument("--family", choices=FAMILIES)
    parser.add_argument("--arch", help="timm architecture for a checkpoint file")
    parser.add_argument("--name", help="registry name to record (default: inferred)")
    parser.add_argument(
        "--input-res", type=errors.count, default=224, help="side of the backbone's input images"
    )
    parser.add_argument("--verify", action="store_true")
    parser.add_argument(
        "--verify-size",
        type=errors.natural,
        default=0,
        help="also verify at this resolution (position embeddings resized)",
    )
    return parser.parse_args(argv)


def verify(args, family: str, model) -> int:
    """Compare what was written with the torch model; 1 if past the tolerance."""
    from lgm_jax.models import registry

    failed = False
    sizes = [args.input_res] + ([args.verify_size] if args.verify_size else [])
    backbone, params = registry.load_converted(args.out)  # check what was written
    for size in sizes:
        diff, rel = compare(family, model, backbone, params, size)
        ok = rel <= TOLERANCE
        failed |= not ok
        print(
            f"verify at {size} px: max abs diff {diff:.3e}, relative {rel:.3e} "
            f"({'ok' if ok else f'FAILED, tolerance {TOLERANCE:.0e}'})"
        )
    return 1 if failed else 0


def convert(args) -> int:
    from lgm_jax.models import registry, weights

    family, model, state = load_torch(args.source, args.family, args.arch)
    backbone, params = convert_module(
        family, model, state, args.name, args.source, input_res=args.input_res
    )
    registry.save_converted(args.out, backbone, params)
    print(
        f"{backbone.name} ({family}): {weights.count_params(params):,} parameters, "
        f"feature dim {backbone.feature_dim} -> {args.out}"
    )
    return verify(args, family, model) if args.verify else 0


def main(argv=None) -> int:
    return run_command(lambda: convert(parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
