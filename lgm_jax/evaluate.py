"""Evaluate distilled images with the paper's linear-probe protocol; cross-model grids.

    python -m lgm_jax.evaluate --distilled WORKDIR_OR_NPZ --backbone NAME [--dataset NAME]
        [--weights DIR] [--seeds 5] [--epochs 1000] [--mode exact|fast] [--views 100] [--out DIR]
    python -m lgm_jax.evaluate grid --runs DIR1 DIR2 ... --backbones A B ... [--out DIR]

The maths lives in `lgm_jax.probe` (one jitted program: scan over steps, vmap over seeds); this
module loads and checks inputs, builds the backbone and the test stream, and writes eval.json.
Several --distilled paths with the same shapes give one image set per seed (the random-real
baseline). The data and backbone registries are imported lazily, inside the functions that
need them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence

import jax
import numpy as np

from lgm_jax import augment, probe

SYN_RES = 256  # side of distilled (and baseline) images


class InputError(ValueError):
    """Input that the protocol cannot evaluate; the message says what is wrong and the fix."""


# ----------------------------------------------------------------------------------------------
# Inputs


def check_images(images, res: int | None = SYN_RES, what: str = "distilled images") -> None:
    """uint8 [N, res, res, 3] (any square side when res is None), else InputError."""
    shape = getattr(images, "shape", None)
    if shape is None or len(shape) != 4:
        raise InputError(f"{what} must be a 4-D array [N, H, W, 3], got shape {shape}")
    if shape[-1] != 3:
        hint = "; they look NCHW: use x.transpose(0, 2, 3, 1)" if shape[1] == 3 else ""
        raise InputError(f"{what} must be NHWC with 3 channels, got shape {shape}{hint}")
    if shape[1] != shape[2] or (res is not None and shape[1] != res):
        want = f"{res}x{res}" if res is not None else "square"
        raise InputError(
            f"{what} must be {want} pixels, got {shape[1]}x{shape[2]}; distillation exports "
            f"{SYN_RES}x{SYN_RES} images (resize the shorter side to {SYN_RES} and centre-crop)"
        )
    if images.dtype != np.uint8:
        lo, hi = (float(np.min(images)), float(np.max(images))) if len(images) else (0.0, 0.0)
        fix = (
            "values in [0, 1]: save np.round(x * 255).astype(np.uint8)"
            if lo >= 0 and hi <= 1
            else "values outside [0, 1]: map them to [0, 255] and save as uint8"
        )
        raise InputError(
            f"{what} must be uint8 in [0, 255], got dtype {images.dtype} with values in "
            f"[{lo:.3g}, {hi:.3g}] ({fix})"
        )


def check_labels(
    labels,
    num_images: int,
    num_classes: int,
    dataset: str = "the dataset",
    require_all: bool = True,
) -> np.ndarray:
    """Integer labels [N] in [0, C), every class present (when require_all), else InputError."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != num_images:
        raise InputError(
            f"labels must have shape [{num_images}] (one per image), got {labels.shape}"
        )
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        if not np.all(labels == np.round(labels)):
            raise InputError(f"labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise InputError(
            f"labels must lie in [0, {num_classes}) for {dataset} ({num_classes} classes), got "
            f"{sorted(set(bad.tolist()))[:5]}; was the set distilled on another dataset? pass the "
            "matching --dataset"
        )
    present = np.unique(labels)
    if require_all and len(present) != num_classes:
        missing = sorted(set(range(num_classes)) - set(present.tolist()))
        raise InputError(
            f"the set has images of {len(present)} classes but {dataset} has {num_classes} "
            f"(missing {missing[:10]}{'...' if len(missing) > 10 else ''}); distil (or select) "
            "with the same dataset you evaluate on, or pass the matching --dataset"
        )
    return labels.astype(np.int32)


def npz_path(path: str) -> str:
    """A distillation workdir (holding synthetic.npz) or an npz file -> the npz path."""
    p = os.path.join(path, "synthetic.npz") if os.path.isdir(path) else path
    if not os.path.isfile(p):
        raise InputError(
            f"{p} not found: --distilled takes a distillation workdir holding synthetic.npz or "
            "an .npz file with 'images' (uint8 [N, 256, 256, 3]) and 'labels' ([N])"
        )
    return p


def load_distilled(path: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """images, labels and metadata (dataset/backbone names when the run recorded them)."""
    p = npz_path(path)
    with np.load(p, allow_pickle=False) as z:
        for key in ("images", "labels"):
            if key not in z:
                raise InputError(f"{p} has no '{key}' array (it has {sorted(z.files)})")
        images, labels = z["images"], z["labels"]
        meta = {k: str(z[k]) for k in ("dataset", "backbone", "method") if k in z}
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(p)), "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
        for k in ("dataset", "backbone", "data_dir"):
            if isinstance(cfg.get(k), str):
                meta.setdefault(k, cfg[k])
    meta["path"] = p
    return images, labels, meta


def load_sets(paths: Sequence[str], res: int = SYN_RES) -> tuple[np.ndarray, np.ndarray, dict]:
    """One set, or several with equal shapes stacked on a leading seed axis."""
    sets = [load_distilled(p) for p in paths]
    for images, _, meta in sets:
        check_images(images, res, what=f"images in {meta['path']}")
    if len(sets) == 1:
        return sets[0]
    shapes = {s[0].shape for s in sets}
    if len(shapes) != 1:
        raise InputError(f"per-seed image sets must share one shape, got {sorted(shapes)}")
    meta = dict(sets[0][2], path=[s[2]["path"] for s in sets])
    return np.stack([s[0] for s in sets]), np.stack([s[1] for s in sets]), meta


# ----------------------------------------------------------------------------------------------
# The protocol on arrays


def run_protocol(
    images,
    labels,
    *,
    features: probe.FeatureFn,
    params,
    feat_dim: int,
    cfg: probe.ProbeConfig,
    test_batches: Callable[[], Iterable[dict]],
    seeds: int = 5,
    seed: int = 0,
    devices: int | None = None,
) -> dict:
    """Train `seeds` probes on images (uint8 [N, H, H, 3] or [S, N, H, H, 3]) and test them.

    Returns the eval.json fields: top1/top5 {mean, std, per_seed} in %, settings, timings.
    """
    t0 = time.time()
    probes, losses = probe.train_probes(
        features,
        params,
        images,
        labels,
        feat_dim=feat_dim,
        cfg=cfg,
        seeds=seeds,
        rng=jax.random.key(seed),
        devices=devices,
    )
    jax.block_until_ready(losses)
    train_s = time.time() - t0
    return protocol_result(
        probes, losses, int(images.shape[-4]), train_s, features=features, params=params,
        cfg=cfg, test_batches=test_batches, seeds=seeds, seed=seed,
    )  # fmt: skip


def protocol_result(
    probes, losses, n: int, train_s: float, *, features, params, cfg, test_batches, seeds, seed
) -> dict:
    """Test trained probes; the eval.json fields: top1/top5 {mean, std, per_seed} in %,
    settings, timings."""
    t1 = time.time()
    acc = probe.test_probes(features, params, probes, test_batches(), cfg)
    losses = np.asarray(losses)
    return {
        "top1": probe.summarize(acc["top1"]),
        "top5": probe.summarize(acc["top5"]),
        "seeds": seeds,
        "seed": seed,
        "num_images": n,
        "num_classes": cfg.num_classes,
        "num_test": acc["num_test"],
        "final_train_loss": [float(x) for x in losses[:, -1]],
        "settings": cfg.settings(n),
        "train_seconds": train_s,
        "test_seconds": time.time() - t1,
    }


# ----------------------------------------------------------------------------------------------
# Backbones and data (registries imported lazily)


def build_backbone(name: str, weights: str | None = None):
    """(features, params, feat_dim, resolution, mean, std) of a registered backbone."""
    from lgm_jax.models import registry

    backbone, params = registry.build(name, weights_dir=weights)
    res = getattr(backbone, "input_res", None) or getattr(
        getattr(backbone, "cfg", None), "input_res", 224
    )
    mean = tuple(getattr(backbone, "mean", probe.lgm.IMAGENET_MEAN))
    std = tuple(getattr(backbone, "std", probe.lgm.IMAGENET_STD))
    return registry.features_fn(backbone), params, int(backbone.feature_dim), int(res), mean, std


def test_split(ds) -> str:
    return getattr(ds, "test_split", "test")


def test_stream(ds, res: int, batch_size: int) -> Callable[[], Iterable[dict]]:
    """Test images: shorter side to 256 (scaled with the backbone resolution), centre crop."""
    from lgm_jax import data

    resize = round(res * 256 / 224)
    return lambda: data.eval_iterator(ds, test_split(ds), batch_size, res=res, resize=resize)


def probe_config(
    num_classes, res, mean, std, *, epochs, batch_size=100, lr=None, mode="exact", views=100
) -> probe.ProbeConfig:
    if mode not in ("exact", "fast"):
        raise InputError(f"--mode must be 'exact' or 'fast', got {mode!r}")
    return probe.ProbeConfig(
        num_classes=num_classes,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        augment=augment.AugmentConfig(mode="eval", input_res=res),
        mean=mean,
        std=std,
        views=views if mode == "fast" else 0,
    )


def eval_dirname(backbone: str, mode: str) -> str:
    return backbone.replace("/", "_") + ("-fast" if mode == "fast" else "")


def write_result(result: dict, out: str) -> str:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "eval.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return path


def format_row(result: dict) -> str:
    t1, t5 = result["top1"], result["top5"]
    return (
        f"| {result.get('method', 'distilled')} | {result.get('dataset', '?')} | "
        f"{result.get('backbone', '?')} | {result['num_images']} | {result['settings']['mode']} | "
        f"{t1['mean']:.2f} ± {t1['std']:.2f} | {t5['mean']:.2f} ± {t5['std']:.2f} |"
    )


TABLE_HEAD = (
    "| method | dataset | backbone | images | mode | top-1 % | top-5 % |\n"
    "|---|---|---|---|---|---|---|"
)


def evaluate(
    distilled: Sequence[str],
    backbone: str,
    dataset: str | None = None,
    weights: str | None = None,
    seeds: int = 5,
    epochs: int = 1000,
    mode: str = "exact",
    views: int = 100,
    out: str | None = None,
    seed: int = 0,
    test_batch: int = 256,
    method: str | None = None,
    image_res: int = SYN_RES,
    data_dir: str | None = None,
    devices: int | None = None,
) -> dict:
    """Load, check, train, test and write eval.json; returns the result.

    data_dir: where the dataset lives (tfds data_dir or image-folder root), if not the default.
    devices: how many of this process's devices share the seeds (None: all).
    """
    from lgm_jax import data

    distilled = [distilled] if isinstance(distilled, str) else list(distilled)
    images, labels, meta = load_sets(distilled, image_res)
    dataset = dataset or meta.get("dataset")
    if not dataset:
        raise InputError(f"{meta['path']} does not record its dataset; pass --dataset NAME")
    ds = data.get_dataset(dataset, data_dir or meta.get("data_dir") or None)
    per_seed = images.ndim == 5
    if per_seed and len(distilled) != seeds:
        seeds = len(distilled)
    for lab in labels if per_seed else [labels]:
        check_labels(lab, images.shape[-4], ds.num_classes, dataset)
    features, params, feat_dim, res, mean, std = build_backbone(backbone, weights)
    cfg = probe_config(ds.num_classes, res, mean, std, epochs=epochs, mode=mode, views=views)
    result = run_protocol(
        images,
        labels.astype(np.int32),
        features=features,
        params=params,
        feat_dim=feat_dim,
        cfg=cfg,
        test_batches=test_stream(ds, res, test_batch),
        seeds=seeds,
        seed=seed,
        devices=devices,
    )
    result = {
        "method": method or meta.get("method", "distilled"),
        "backbone": backbone,
        "distill_backbone": meta.get("backbone"),
        "dataset": dataset,
        "distilled": meta["path"],
        **result,
    }
    if out is None:
        base = distilled[0] if os.path.isdir(distilled[0]) else os.path.dirname(distilled[0])
        out = os.path.join(base, "eval", eval_dirname(backbone, mode))
    result["out"] = write_result(result, out)
    return result


# ----------------------------------------------------------------------------------------------
# Cross-model grid


def run_name(run: str) -> tuple[str, str]:
    """'DIR=NAME' or 'DIR' -> (dir, distillation backbone name from config.json or the dir)."""
    if "=" in run:
        d, name = run.rsplit("=", 1)
        return d, name
    try:
        return run, load_distilled(run)[2].get("backbone") or os.path.basename(run.rstrip("/"))
    except InputError:
        return run, os.path.basename(run.rstrip("/"))


def grid_markdown(names: Sequence[str], backbones: Sequence[str], cells: dict) -> str:
    """Rows: distillation backbone; columns: evaluation backbone; diagonal in bold; plus the
    mean over same-model (diagonal) and other-model cells, as in the paper's ablation."""
    lines = [
        "| distilled with \\ evaluated on | " + " | ".join(backbones) + " |",
        "|---|" + "---|" * len(backbones),
    ]
    for name in names:
        row = []
        for bb in backbones:
            c = cells.get((name, bb))
            txt = "—" if c is None else f"{c['mean']:.1f} ± {c['std']:.1f}"
            row.append(f"**{txt}**" if name == bb and c is not None else txt)
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    same = [c["mean"] for (n, b), c in cells.items() if n == b]
    other = [c["mean"] for (n, b), c in cells.items() if n != b]
    if same or other:
        fmt = lambda v: f"{np.mean(v):.1f}" if v else "—"
        lines += ["", f"Mean top-1: same model {fmt(same)} / other models {fmt(other)}"]
    return "\n".join(lines) + "\n"


def grid(
    runs: Sequence[str],
    backbones: Sequence[str],
    out: str = "cross_model",
    reuse: bool = True,
    **kw,
) -> dict:
    """Evaluate every run on every backbone (reusing existing eval.json), write grid.md/.json."""
    names, cells, entries = [], {}, []
    for run in runs:
        d, name = run_name(run)
        names.append(name)
        for bb in backbones:
            sub = os.path.join(d, "eval", eval_dirname(bb, kw.get("mode", "exact")))
            path = os.path.join(sub, "eval.json")
            if reuse and os.path.isfile(path):
                with open(path) as f:
                    res = json.load(f)
            else:
                res = evaluate(d, bb, out=sub, **kw)
            cells[(name, bb)] = res["top1"]
            entries.append(
                {
                    "distilled_with": name,
                    "evaluated_on": bb,
                    "run": d,
                    "top1": res["top1"],
                    "top5": res["top5"],
                    "eval_json": path,
                }
            )
            print(f"{name} -> {bb}: {res['top1']['mean']:.2f} ± {res['top1']['std']:.2f}")
    os.makedirs(out, exist_ok=True)
    md = grid_markdown(list(dict.fromkeys(names)), backbones, cells)
    with open(os.path.join(out, "grid.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "grid.json"), "w") as f:
        json.dump({"backbones": list(backbones), "runs": names, "cells": entries}, f, indent=2)
    print(md)
    return {"markdown": md, "cells": entries}


# ----------------------------------------------------------------------------------------------
# CLI


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=None, help="dataset name (default: recorded by the run)")
    p.add_argument("--weights", default=None, help="backbone weights directory")
    p.add_argument("--data-dir", default=None, help="dataset directory (default: the run's)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="base random seed")
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--mode", choices=("exact", "fast"), default="exact")
    p.add_argument("--views", type=int, default=100, help="augmented views per image (fast mode)")
    p.add_argument("--test-batch", type=int, default=256)
    p.add_argument("--image-res", type=int, default=SYN_RES, help="side of the distilled images")
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="local devices that share the seeds' probes (default: all, at most one per seed)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "grid":
            p = argparse.ArgumentParser(prog="python -m lgm_jax.evaluate grid")
            p.add_argument("--runs", nargs="+", required=True, help="run dirs, optionally DIR=NAME")
            p.add_argument("--backbones", nargs="+", required=True)
            p.add_argument("--out", default="cross_model")
            p.add_argument("--no-reuse", action="store_true", help="re-run existing evaluations")
            _common(p)
            a = p.parse_args(argv[1:])
            grid(
                a.runs,
                a.backbones,
                out=a.out,
                reuse=not a.no_reuse,
                dataset=a.dataset,
                weights=a.weights,
                seeds=a.seeds,
                epochs=a.epochs,
                mode=a.mode,
                views=a.views,
                seed=a.seed,
                test_batch=a.test_batch,
                image_res=a.image_res,
                data_dir=a.data_dir,
                devices=a.devices,
            )
            return 0
        p = argparse.ArgumentParser(
            prog="python -m lgm_jax.evaluate",
            description=__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument(
            "--distilled",
            nargs="+",
            required=True,
            help="workdir or npz; several paths = one image set per seed",
        )
        p.add_argument("--backbone", required=True)
        p.add_argument("--out", default=None, help="default: <distilled>/eval/<backbone>")
        p.add_argument("--method", default=None, help="label in eval.json (default: distilled)")
        _common(p)
        a = p.parse_args(argv)
        res = evaluate(
            a.distilled,
            a.backbone,
            dataset=a.dataset,
            weights=a.weights,
            seeds=a.seeds,
            epochs=a.epochs,
            mode=a.mode,
            views=a.views,
            out=a.out,
            seed=a.seed,
            test_batch=a.test_batch,
            image_res=a.image_res,
            method=a.method,
            data_dir=a.data_dir,
            devices=a.devices,
        )
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(TABLE_HEAD)
    print(format_row(res))
    print(f"wrote {res['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
