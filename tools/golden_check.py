"""Check lgm_jax against a recorded step of the reference PyTorch implementation.

    python tools/golden_check.py --golden ../shared/golden/lgm_step

A golden directory holds `meta.json` (settings), `step.npz` (every input, random draw and
intermediate result) and `backbone/` (a transformers DINOv2 checkpoint). This script recomputes
each quantity with lgm_jax's own code, fed the recorded inputs and draws, prints the largest
relative error of each (max |ours - theirs| / max |theirs|), and exits 1 if any exceeds its
tolerance. It works for any number of classes, augmentation rounds, real images and levels.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

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


class GoldenError(ValueError):
    pass


def load_golden(path: str):
    """Read and validate a golden directory; returns (meta, arrays, backbone_dir, num_levels)."""
    files = {n: os.path.join(path, n) for n in ("meta.json", "step.npz", "backbone")}
    missing = [n for n, p in files.items() if not os.path.exists(p)]
    if missing:
        raise GoldenError(f"{path} is not a golden step directory: missing {', '.join(missing)}")
    with open(files["meta.json"]) as f:
        meta = json.load(f)
    absent = [k for k in META_KEYS if k not in meta]
    if absent:
        raise GoldenError(f"{files['meta.json']} lacks settings: {', '.join(absent)}")
    arrays = dict(np.load(files["step.npz"]))
    num_levels = sum(1 for k in arrays if k.startswith("level") and k[5:].isdigit())
    need = [
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
    ]
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


def run(path: str) -> list[tuple[str, float, float]]:
    """Recompute the golden step; returns rows (quantity, relative error, tolerance)."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", False)
    from lgm_jax import augment, lgm, pyramid
    from lgm_jax.models import dinov2, vit

    meta, a, backbone_dir, num_levels = load_golden(path)
    aug_cfg = augment.AugmentConfig(
        mode="train",
        input_res=meta["crop_res"],
        flip_p=meta["flip_p"],
        crop_scale=tuple(meta["crop_scale"]),
        crop_ratio=tuple(meta["crop_ratio"]),
        noise_p=meta["noise_p"],
        noise_std=meta["noise_std"],
        noise_mean=meta["noise_mean"],
    )
    cfg = lgm.StepConfig(
        num_classes=meta["num_classes"],
        ipc=meta["ipc"],
        aug_rounds=meta["augs_per_batch"],
        syn_res=meta["syn_res"],
        augment=aug_cfg,
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
    )
    model_cfg, params = dinov2.load(backbone_dir, input_res=meta["crop_res"])
    model = vit.ViT(model_cfg)
    features = lambda p, x: model.apply({"params": p}, x)

    # The golden file orders levels fine to coarse (level0 = full resolution); lgm_jax coarse
    # to fine.
    order = list(range(num_levels - 1, -1, -1))
    levels = tuple(jnp.asarray(a[f"level{i}"]) for i in order)
    probe = (jnp.asarray(a["probe_W"]), jnp.asarray(a["probe_b"]))
    draws = {side: {k: jnp.asarray(a[f"{side}_{k}"]) for k in AUG_KEYS} for side in ("real", "syn")}
    if not np.array_equal(np.asarray(lgm.syn_labels(cfg)), a["syn_labels"]):
        raise GoldenError(f"recorded syn_labels {a['syn_labels']} differ from lgm_jax's ordering")

    rows = []
    add = lambda name, ours, theirs, tol: rows.append((name, rel_err(ours, theirs), tol))
    t = TOLERANCES
    add("syn_decoded", pyramid.decode(levels, cfg.syn_res), a["syn_decoded"], t["syn_decoded"])
    real_aug = augment.apply(jnp.asarray(a["real_images"]), draws["real"], aug_cfg)
    add("real_augmented", real_aug, a["real_augmented"], t["real_augmented"])
    syn_images, syn_lab = lgm.syn_batch(levels, cfg)
    syn_aug = augment.apply(syn_images, draws["syn"], aug_cfg)
    add("syn_augmented", syn_aug, a["syn_augmented"], t["syn_augmented"])

    z_real = lgm.real_features(features, params, a["real_images"], draws["real"], cfg)
    add("feats_real", z_real, a["feats_real"], t["feats_real"])
    z_syn, _ = lgm.syn_features(features, params, levels, draws["syn"], cfg)
    add("feats_syn", z_syn, a["feats_syn"], t["feats_syn"])
    g_real = lgm.probe_grad(*probe, z_real, jnp.asarray(a["real_labels"]))
    add("g_real", g_real, a["g_real"], t["g_real"])
    add("g_syn", lgm.probe_grad(*probe, z_syn, syn_lab), a["g_syn"], t["g_syn"])

    loss, grads = jax.jit(jax.value_and_grad(lgm.meta_loss), static_argnums=(5, 6))(
        levels, params, probe, g_real, draws["syn"], features, cfg
    )
    add("meta_loss", loss, a["meta_loss"], t["meta_loss"])
    # Adam's first step is lr * g / (|g| + eps): for the many near-zero entries of g it turns
    # float32 rounding of g (1e-5 relative to max |g|) into O(lr) differences, so the optimizer
    # is checked on the recorded gradients; our gradients are checked above.
    tx = lgm.optimizer(meta["lr"])
    recorded = tuple(jnp.asarray(a[f"level{i}_grad"]) for i in order)
    updates, _ = tx.update(recorded, tx.init(levels), levels)
    after = jax.tree_util.tree_map(lambda p, u: p + u, levels, updates)
    for j, i in enumerate(order):
        add(
            f"level{i}_grad ({levels[j].shape[1]}px)",
            grads[j],
            a[f"level{i}_grad"],
            t["level_grad"],
        )
    for j, i in enumerate(order):
        add(f"level{i}_after_adam", after[j], a[f"level{i}_after_adam"], t["level_after_adam"])
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--golden", required=True, help="a golden step directory")
    args = parser.parse_args(argv)
    try:
        rows = run(args.golden)
    except (GoldenError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    width = max(len(r[0]) for r in rows)
    print(f"{'quantity':<{width}}  {'max rel err':>11}  {'tolerance':>9}  ok")
    failed = 0
    for name, err, tol in rows:
        ok = err <= tol
        failed += not ok
        print(f"{name:<{width}}  {err:11.2e}  {tol:9.0e}  {'yes' if ok else 'NO'}")
    print(f"{len(rows) - failed} of {len(rows)} quantities within tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
