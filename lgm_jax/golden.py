"""Check lgm_jax against a recorded step of the reference PyTorch implementation.

    python -m lgm_jax.golden --golden ../shared/golden/lgm_step

A golden directory holds `meta.json` (settings), `step.npz` (every input, random draw and
intermediate result) and `backbone/` (a transformers DINOv2 checkpoint). This command recomputes
each quantity with lgm_jax's own code, fed the recorded inputs and draws, prints the largest
relative error of each (max |ours - theirs| / max |theirs|), and exits 1 if any exceeds its
tolerance (2 if the directory is not a golden step). It works for any number of classes,
augmentation rounds, real images and levels. The recorded settings become a config
(`config_base.base()` with them set) translated by `config_base.step_config`, as a run's are.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from lgm_jax import errors
from lgm_jax.errors import command_parser

# Tolerances (float32 on the CPU): pixel-level quantities and probe gradients ~1e-5,
# pyramid gradients and the Adam step ~1e-4.
TOLERANCES = {
    "syn_decoded": 1e-5,
    "real_augmented": 1e-4,
    "syn_augmented": 1e-4,
    "feats_real": 1e-5,
    "feats_syn": 1e-5,
    "g_real": 1e-5,
    "g_syn": 1e-5,
    "meta_loss": 1e-5,
    "level_grad": 1e-4,
    "level_after_adam": 1e-4,
}
AUG_KEYS = ("flip_u", "crop_u", "noise_apply_u", "noise_z")
META_KEYS = (
    "num_classes",
    "augs_per_batch",
    "ipc",
    "lr",
    "noise_mean",
    "noise_std",
    "flip_p",
    "noise_p",
    "crop_scale",
    "crop_ratio",
    "syn_res",
    "crop_res",
    "mean",
    "std",
)
ARRAYS = (
    "real_images",
    "real_labels",
    "syn_labels",
    "probe_W",
    "probe_b",
    "g_real",
    "g_syn",
    "meta_loss",
    "syn_decoded",
    "feats_real",
    "feats_syn",
    "real_augmented",
    "syn_augmented",
)


class GoldenError(errors.InputError):
    """A directory that is not a golden step, or a recording lgm_jax cannot be compared with."""


def load_golden(path: str):
    """Read and validate a golden directory; returns (meta, arrays, backbone_dir, num_levels)."""
    files = {n: os.path.join(path, n) for n in ("meta.json", "step.npz", "backbone")}
    missing = [n for n, p in files.items() if not os.path.exists(p)]
    if missing:
        raise GoldenError(f"{path} is not a golden step directory: missing {', '.join(missing)}")
    meta = errors.read_json(files["meta.json"], "a golden step's meta.json")
    absent = [k for k in META_KEYS if k not in meta]
    if absent:
        raise GoldenError(f"{files['meta.json']} lacks settings: {', '.join(absent)}")
    arrays = dict(np.load(files["step.npz"]))
    num_levels = sum(1 for k in arrays if k.startswith("level") and k[5:].isdigit())
    need = list(ARRAYS)
    need += [f"{side}_{k}" for side in ("real", "syn") for k in AUG_KEYS]
    need += [f"level{i}{s}" for i in range(num_levels) for s in ("", "_grad", "_after_adam")]
    missing = [k for k in need if k not in arrays]
    if num_levels == 0:
        missing.append("level0 (no pyramid levels)")
    if missing:
        raise GoldenError(f"{files['step.npz']} lacks arrays: {', '.join(missing)}")
    return meta, arrays, files["backbone"], num_levels


def rel_err(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    if ours.shape != theirs.shape:
        raise GoldenError(f"shape {ours.shape} != recorded {theirs.shape}")
    scale = max(np.abs(theirs).max(), 1e-30)
    return float(np.abs(ours - theirs).max() / scale)


def step_config(meta: dict):
    """The recorded settings as a run's config, translated by config_base: the StepConfig (its
    `augment` is the AugmentConfig)."""
    from lgm_jax import config_base

    c = config_base.base()
    c.ipc = meta["ipc"]
    c.aug_rounds = meta["augs_per_batch"]
    c.syn_res = meta["syn_res"]
    c.input_res = meta["crop_res"]
    c.augment.mode = "train"
    c.augment.flip_p = meta["flip_p"]
    c.augment.crop_scale = tuple(meta["crop_scale"])
    c.augment.crop_ratio = tuple(meta["crop_ratio"])
    c.augment.noise_p = meta["noise_p"]
    c.augment.noise_std = meta["noise_std"]
    c.augment.noise_mean = meta["noise_mean"]
    c.mean = tuple(meta["mean"])
    c.std = tuple(meta["std"])
    return config_base.step_config(c, meta["num_classes"])


def load_backbone(backbone_dir: str, input_res: int):
    """(Backbone, params) of the recorded transformers DINOv2 directory."""
    from lgm_jax.models import dinov2, registry

    vit_config, params = dinov2.load(backbone_dir, input_res=input_res)
    return registry.Backbone("golden_dinov2", "dinov2", vit_config), params


def run(path: str) -> list[tuple[str, float, float]]:
    """Recompute the golden step; returns rows (quantity, relative error, tolerance)."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", False)
    from lgm_jax import lgm

    meta, a, backbone_dir, num_levels = load_golden(path)
    cfg = step_config(meta)
    backbone, params = load_backbone(backbone_dir, meta["crop_res"])

    # The golden file orders levels fine to coarse (level0 = full resolution); lgm_jax coarse
    # to fine.
    order = list(range(num_levels - 1, -1, -1))
    levels = tuple(jnp.asarray(a[f"level{i}"]) for i in order)
    draws = {side: {k: jnp.asarray(a[f"{side}_{k}"]) for k in AUG_KEYS} for side in ("real", "syn")}
    if not np.array_equal(np.asarray(lgm.syn_labels(cfg)), a["syn_labels"]):
        raise GoldenError(f"recorded syn_labels {a['syn_labels']} differ from lgm_jax's ordering")

    rows = []
    add = lambda name, ours, theirs, tol: rows.append((name, rel_err(ours, theirs), tol))
    probe = (jnp.asarray(a["probe_W"]), jnp.asarray(a["probe_b"]))
    syn_lab = check_pixels(add, a, levels, draws, cfg)
    g_real = check_features(add, a, levels, draws, cfg, backbone.features, params, probe, syn_lab)
    check_pyramid(add, a, levels, draws, cfg, (backbone.features, params, probe, g_real), order)
    tx = lgm.optimizer(meta["lr"])
    check_adam(add, a, levels, tx, order)
    return rows


def check_pixels(add, a, levels, draws, cfg):
    """The decoded synthetic images and both augmented batches; returns the synthetic labels."""
    import jax.numpy as jnp

    from lgm_jax import augment, lgm, pyramid

    t = TOLERANCES
    add("syn_decoded", pyramid.decode(levels, cfg.syn_res), a["syn_decoded"], t["syn_decoded"])
    real_aug = augment.apply(jnp.asarray(a["real_images"]), draws["real"], cfg.augment)
    add("real_augmented", real_aug, a["real_augmented"], t["real_augmented"])
    syn_images, syn_lab = lgm.syn_batch(levels, cfg)
    syn_aug = augment.apply(syn_images, draws["syn"], cfg.augment)
    add("syn_augmented", syn_aug, a["syn_augmented"], t["syn_augmented"])
    return syn_lab


def check_features(add, a, levels, draws, cfg, features, params, probe, syn_lab):
    """Both sides' backbone features and probe gradients; returns ours of the real side."""
    import jax.numpy as jnp

    from lgm_jax import lgm

    t = TOLERANCES
    z_real = lgm.real_features(features, params, a["real_images"], draws["real"], cfg)
    add("feats_real", z_real, a["feats_real"], t["feats_real"])
    z_syn, _ = lgm.syn_features(features, params, levels, draws["syn"], cfg)
    add("feats_syn", z_syn, a["feats_syn"], t["feats_syn"])
    g_real = lgm.probe_grad(*probe, z_real, jnp.asarray(a["real_labels"]))
    add("g_real", g_real, a["g_real"], t["g_real"])
    add("g_syn", lgm.probe_grad(*probe, z_syn, syn_lab), a["g_syn"], t["g_syn"])
    return g_real


def check_pyramid(add, a, levels, draws, cfg, model, order) -> None:
    """The meta-loss and the gradient of every pyramid level; `model` is (features, params,
    probe, our real probe gradient)."""
    import jax

    from lgm_jax import lgm

    t = TOLERANCES
    features, params, probe, g_real = model
    loss, grads = jax.jit(jax.value_and_grad(lgm.meta_loss), static_argnums=(5, 6))(
        levels, params, probe, g_real, draws["syn"], features, cfg
    )
    add("meta_loss", loss, a["meta_loss"], t["meta_loss"])
    for j, i in enumerate(order):
        name = f"level{i}_grad ({levels[j].shape[1]}px)"
        add(name, grads[j], a[f"level{i}_grad"], t["level_grad"])


def check_adam(add, a, levels, tx, order) -> None:
    """The optimizer's first step on every level.

    Adam's first step is lr * g / (|g| + eps): for the many near-zero entries of g it turns
    float32 rounding of g (1e-5 relative to max |g|) into O(lr) differences, so the optimizer
    is checked on the recorded gradients; ours are checked by check_pyramid."""
    import jax
    import jax.numpy as jnp

    recorded = tuple(jnp.asarray(a[f"level{i}_grad"]) for i in order)
    updates, _ = tx.update(recorded, tx.init(levels), levels)
    after = jax.tree_util.tree_map(lambda p, u: p + u, levels, updates)
    tol = TOLERANCES["level_after_adam"]
    for j, i in enumerate(order):
        add(f"level{i}_after_adam", after[j], a[f"level{i}_after_adam"], tol)


def print_table(rows) -> int:
    """Print the comparison; the number of quantities past their tolerance."""
    width = max(len(r[0]) for r in rows)
    print(f"{'quantity':<{width}}  {'max rel err':>11}  {'tolerance':>9}  ok")
    failed = 0
    for name, err, tol in rows:
        ok = err <= tol
        failed += not ok
        print(f"{name:<{width}}  {err:11.2e}  {tol:9.0e}  {'yes' if ok else 'NO'}")
    print(f"{len(rows) - failed} of {len(rows)} quantities within tolerance")
    return failed


def main(argv=None) -> int:
    parser = command_parser("golden", __doc__)
    parser.add_argument("--golden", required=True, help="a golden step directory")
    args = parser.parse_args(argv)
    return errors.run_command(lambda: 1 if print_table(run(args.golden)) else 0)


if __name__ == "__main__":
    sys.exit(main())
