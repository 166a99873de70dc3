"""Evaluate distilled images with the paper's linear-probe protocol; cross-model grids.

Example (the demo run's images, on the backbone they were distilled with):

    python -m lgm_jax.evaluate --distilled workdirs/demo --backbone dinov2_tiny \
        --weights lgm_jax/assets/demo_vit

Usage:
    python -m lgm_jax.evaluate --distilled WORKDIR_OR_NPZ --backbone NAME [--dataset NAME]
        [--weights DIR] [--seeds 5] [--epochs 1000] [--mode exact|fast] [--views 100] [--out DIR]
    python -m lgm_jax.evaluate grid --runs DIR1 DIR2 ... --backbones A B ... [--out DIR]

The maths lives in `lgm_jax.probe` (one jitted program: scan over steps, vmap over seeds); this
module loads and checks inputs (lgm_jax/distilled.py; the images' side is read from the data),
builds the backbone and the test stream, and writes eval.json.
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

from lgm_jax import config_base, distilled, errors, groups, probe
from lgm_jax.errors import InputError, command_parser, run_command


def load_sets(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray, dict]:
    """images, labels and metadata of one set, or of several with equal shapes stacked on a
    leading seed axis (one set per seed)."""
    sets = [distilled.load(p) for p in paths]
    if len(sets) == 1:
        return sets[0].images, sets[0].labels, sets[0].meta
    shapes = {s.images.shape for s in sets}
    if len(shapes) != 1:
        raise InputError(f"per-seed image sets must share one shape, got {sorted(shapes)}")
    meta = dict(sets[0].meta, path=[s.meta["path"] for s in sets])
    return np.stack([s.images for s in sets]), np.stack([s.labels for s in sets]), meta


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
    group_names: Sequence[str] | None = None,
    group_sets=(),
) -> dict:
    """Train `seeds` probes on images (uint8 [N, H, H, 3] or [S, N, H, H, 3]) and test them.

    Returns the eval.json fields: top1/top5 {mean, std, per_seed} in %, settings, timings (and
    the group fields of `protocol_result` when the test batches carry groups).
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
        cfg=cfg, test_batches=test_batches, seeds=seeds, seed=seed, group_names=group_names,
        group_sets=group_sets,
    )  # fmt: skip


def protocol_result(
    probes, losses, n: int, train_s: float, *, features, params, cfg, test_batches, seeds, seed,
    group_names=None, group_sets=(),
) -> dict:  # fmt: skip
    """Test trained probes; the eval.json fields: top1/top5 {mean, std, per_seed} in %,
    settings, timings. Test batches with "group" add lgm_jax.groups.metrics' fields
    (worst_group, average_group, groups, group_sets), the groups named by `group_names`
    (default: their ids) and pooled as in `group_sets` ((name, ids), ...)."""
    t1 = time.time()
    acc = probe.test_probes(features, params, probes, test_batches(), cfg)
    losses = np.asarray(losses)
    by_group = {}
    if "group_count" in acc:
        names = group_names or [str(g) for g in range(len(acc["group_count"]))]
        counts = acc["group_correct"], acc["group_count"]
        by_group = groups.metrics(*counts, names, group_sets, summarize=probe.summarize)
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
        **by_group,
    }


# ----------------------------------------------------------------------------------------------
# Test data and outputs (the data registry is imported lazily)


def test_stream(ds, input_res: int, batch_size: int) -> Callable[[], Iterable[dict]]:
    """Test images: shorter side to 256 (scaled with the backbone's input side), centre crop."""
    from lgm_jax import data

    resize = round(input_res * 256 / 224)
    return lambda: data.eval_iterator(ds, "test", batch_size, crop=input_res, resize=resize)


def group_options(ds) -> dict:
    """protocol_result's group_names and group_sets of a dataset (none for a dataset without
    groups, or a stand-in object that has only the class count)."""
    return {
        "group_names": getattr(ds, "group_names", None),
        "group_sets": getattr(ds, "group_sets", ()),
    }


def eval_dirname(backbone: str, mode: str) -> str:
    return backbone.replace("/", "_") + ("-fast" if mode == "fast" else "")


def write_result(result: dict, out: str) -> str:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "eval.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return path


def format_row(result: dict) -> str:
    """The result's table row (under TABLE_HEAD, or GROUP_HEAD when it has groups)."""
    pm = groups.plus_minus
    row = (
        f"| {result.get('method', 'distilled')} | {result.get('dataset', '?')} | "
        f"{result.get('backbone', '?')} | {result['num_images']} | {result['settings']['mode']} | "
        f"{pm(result['top1'])} | {pm(result['top5'])} |"
    )
    if "worst_group" in result:
        row += f" {pm(result['worst_group'])} | {pm(result['average_group'])} |"
    return row


def print_result(result: dict) -> None:
    """The table head, the row and, for a grouped dataset, its per-group lines."""
    grouped = "worst_group" in result
    print(GROUP_HEAD if grouped else TABLE_HEAD, format_row(result), sep="\n")
    if grouped:
        print(groups.format_lines(result))


TABLE_HEAD = (
    "| method | dataset | backbone | images | mode | top-1 % | top-5 % |\n"
    "|---|---|---|---|---|---|---|"
)
GROUP_HEAD = (
    "| method | dataset | backbone | images | mode | top-1 % | top-5 % | worst-group % | "
    "average-group % |\n|---|---|---|---|---|---|---|---|---|"
)


def evaluate(
    distilled_paths: Sequence[str],
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
    data_dir: str | None = None,
    devices: int | None = None,
) -> dict:
    """Load, check, train, test and write eval.json; returns the result.

    distilled_paths: one set (run directory or npz), or several with one shape: one per seed.
    data_dir: where the dataset lives (tfds data_dir or image-folder root), if not the default.
    devices: how many of this process's devices share the seeds (None: all).
    """
    from lgm_jax import data
    from lgm_jax.models import registry

    paths = [distilled_paths] if isinstance(distilled_paths, str) else list(distilled_paths)
    images, labels, meta = load_sets(paths)
    dataset = dataset or meta.get("dataset")
    if not dataset:
        raise InputError(f"{meta['path']} does not record its dataset; pass --dataset NAME")
    ds = data.get_dataset(dataset, data_dir or meta.get("data_dir") or None)
    seeds = len(paths) if images.ndim == 5 else seeds
    for lab in labels if images.ndim == 5 else [labels]:
        distilled.check_labels(lab, images.shape[-4], ds.num_classes, dataset)
    bb, params = registry.build(backbone, weights)
    cfg = config_base.probe_config(bb, ds.num_classes, epochs=epochs, mode=mode, views=views)
    result = run_protocol(
        images,
        labels.astype(np.int32),
        features=bb.features,
        params=params,
        feat_dim=bb.feature_dim,
        cfg=cfg,
        test_batches=test_stream(ds, bb.input_res, test_batch),
        seeds=seeds,
        seed=seed,
        devices=devices,
        **group_options(ds),
    )
    result = {
        "method": method or meta.get("method", "distilled"),
        "backbone": backbone,
        "distill_backbone": meta.get("backbone"),
        "dataset": dataset,
        "distilled": meta["path"],
        **result,
    }
    result["out"] = write_result(result, out or default_out(paths[0], backbone, mode))
    return result


def default_out(path: str, backbone: str, mode: str) -> str:
    """<run directory>/eval/<backbone>[-fast]: where an evaluation of a set is written."""
    base = path if os.path.isdir(path) else os.path.dirname(path)
    return os.path.join(base, "eval", eval_dirname(backbone, mode))


# ----------------------------------------------------------------------------------------------
# Cross-model grid


def run_name(run: str) -> tuple[str, str]:
    """'DIR=NAME' or 'DIR' -> (dir, distillation backbone name from config.json or the dir)."""
    if "=" in run:
        d, name = run.rsplit("=", 1)
        return d, name
    try:
        return run, distilled.load(run).meta.get("backbone") or os.path.basename(run.rstrip("/"))
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
    """Evaluate every run on every backbone (reusing existing eval.json), write grid.md, grid.json
    and grid.png (a heatmap of the same table)."""
    names, cells, entries = [], {}, []
    for run in runs:
        d, name = run_name(run)
        names.append(name)
        for bb in backbones:
            sub = os.path.join(d, "eval", eval_dirname(bb, kw.get("mode", "exact")))
            path = os.path.join(sub, "eval.json")
            if reuse and os.path.isfile(path):
                res = errors.read_json(path, "an eval.json", "delete it or pass --no-reuse")
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
    grid_heatmap(list(dict.fromkeys(names)), backbones, cells, os.path.join(out, "grid.png"))
    print(md)
    return {"markdown": md, "cells": entries}


def grid_heatmap(
    names: Sequence[str],
    backbones: Sequence[str],
    cells: dict,
    path: str,
    *,
    axes: tuple[str, str] = ("evaluated on", "distilled with"),
    label: str = "top-1 %",
) -> None:
    """The cross-model table as a heatmap PNG: rows distilled with, columns evaluated on, each
    cell's mean top-1 written in it (blank where not evaluated). `axes` (x, y) and `label` (the
    colour bar's) name other tables of values in [0, 100] drawn the same way."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from matplotlib import pyplot as plt

    values = np.full((len(names), len(backbones)), np.nan)
    for i, name in enumerate(names):
        for j, bb in enumerate(backbones):
            if (name, bb) in cells:
                values[i, j] = cells[(name, bb)]["mean"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(backbones), 1.2 + 0.6 * len(names)))
    im = ax.imshow(values, cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(len(backbones)), backbones, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="w" if v < 60 else "k")
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# CLI


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=None, help="dataset name (default: recorded by the run)")
    p.add_argument("--weights", default=None, help="converted backbone weights (a directory)")
    p.add_argument("--data-dir", default=None, help="dataset directory (default: the run's)")
    p.add_argument("--seeds", type=errors.count, default=5, help="probes trained, one per seed")
    p.add_argument("--seed", type=int, default=0, help="base random seed")
    p.add_argument("--epochs", type=errors.count, default=1000)
    p.add_argument("--mode", choices=("exact", "fast"), default="exact")
    p.add_argument(
        "--views", type=errors.count, default=100, help="augmented views per image (fast mode)"
    )
    p.add_argument("--test-batch", type=errors.count, default=256)
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="local devices that share the seeds' probes (default: all, at most one per seed)",
    )


def _options(a: argparse.Namespace) -> dict:
    """The keyword arguments of `evaluate` that both subcommands take from _common's flags."""
    keys = ("dataset", "weights", "seeds", "epochs", "mode", "views", "seed", "test_batch",
            "data_dir", "devices")  # fmt: skip
    return {k: getattr(a, k) for k in keys}


def _parser() -> argparse.ArgumentParser:
    p = command_parser("evaluate", __doc__)
    p.add_argument(
        "--distilled",
        nargs="+",
        required=True,
        help="run directory or npz; several paths = one image set per seed",
    )
    p.add_argument("--backbone", required=True, help="registry name (docs/backbones.md)")
    p.add_argument("--out", default=None, help="default: <distilled>/eval/<backbone>")
    p.add_argument("--method", default=None, help="label in eval.json (default: distilled)")
    _common(p)
    return p


def _grid_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "evaluate grid",
        "Evaluate every run on every backbone; write grid.md and grid.json.\n\n"
        "  python -m lgm_jax.evaluate grid --runs workdirs/a workdirs/b "
        "--backbones dinov2_vitb clip_vitb",
    )
    p.add_argument("--runs", nargs="+", required=True, help="run dirs, optionally DIR=NAME")
    p.add_argument("--backbones", nargs="+", required=True)
    p.add_argument("--out", default="cross_model")
    p.add_argument("--no-reuse", action="store_true", help="re-run existing evaluations")
    _common(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "grid":
        a = _grid_parser().parse_args(argv[1:])
        return run_command(
            lambda: grid(a.runs, a.backbones, out=a.out, reuse=not a.no_reuse, **_options(a))
        )
    a = _parser().parse_args(argv)

    def body():
        res = evaluate(a.distilled, a.backbone, out=a.out, method=a.method, **_options(a))
        print_result(res)
        print(f"wrote {res['out']}")

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
