"""One markdown table and one bar chart from a set of eval.json files (the paper's Table 1).

    python -m lgm_jax.report results runs --out results/table1 --title ImageNet-100

Directories are searched recursively for eval.json. Rows: dataset x method (distilled, random,
centroids, neighbors, full); columns: evaluation backbone; cells: top-1 mean ± std over seeds.
A distilled set evaluated on another backbone than the one it was distilled with is a
cross-model result (see `python -m lgm_jax.evaluate grid`) and is left out of this table; when
several files fill one cell the later path wins (a warning says so). Writes OUT.md and OUT.png.
Arguments are eval.json files or directories holding them. tools/report.py is a shell for this
command.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

import numpy as np

from lgm_jax import errors
from lgm_jax.errors import command_parser

METHODS = ("distilled", "random", "centroids", "neighbors", "full")
LABELS = {
    "distilled": "Distilled (ours)",
    "random": "Random real",
    "centroids": "Centroids",
    "neighbors": "Neighbors",
    "full": "Full dataset",
}


def find(paths):
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(glob.glob(os.path.join(p, "**", "eval.json"), recursive=True))
        else:
            files.append(p)
    return files


def collect(files) -> dict:
    """{(dataset, method, backbone): top1 summary} from eval.json files."""
    cells = {}
    for path in files:
        r = errors.read_json(path, "an eval.json")
        method, bb = r.get("method", "distilled"), r["backbone"]
        src = r.get("distill_backbone")
        if method in ("distilled", "neighbors") and src and src != bb:
            continue  # cross-model
        key = (r.get("dataset", "?"), method, bb)
        if key in cells:
            print(f"warning: {path} replaces an earlier result for {key}", file=sys.stderr)
        cells[key] = r["top1"]
    return cells


def order(cells):
    datasets = sorted({k[0] for k in cells})
    methods = [m for m in METHODS if any(k[1] == m for k in cells)]
    methods += sorted({k[1] for k in cells} - set(methods))
    backbones = sorted({k[2] for k in cells})
    return datasets, methods, backbones


def markdown(cells, title=None) -> str:
    datasets, methods, backbones = order(cells)
    lines = [f"## {title}", ""] if title else []
    lines += [
        "| dataset | method | " + " | ".join(backbones) + " |",
        "|---|---|" + "---|" * len(backbones),
    ]
    for ds in datasets:
        for m in methods:
            row = [cells.get((ds, m, bb)) for bb in backbones]
            if not any(row):
                continue
            txt = ["—" if c is None else f"{c['mean']:.1f} ± {c['std']:.1f}" for c in row]
            lines.append(f"| {ds} | {LABELS.get(m, m)} | " + " | ".join(txt) + " |")
    lines += ["", "Top-1 accuracy (%) on the test split, mean ± std over probe seeds."]
    return "\n".join(lines) + "\n"


def bar_chart(cells, path, title=None):
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    datasets, methods, backbones = order(cells)
    fig, axes = plt.subplots(
        len(datasets), 1, figsize=(1.6 + 1.6 * len(backbones), 3.2 * len(datasets)), squeeze=False
    )
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(backbones))
    for ax, ds in zip(axes[:, 0], datasets, strict=True):
        for i, m in enumerate(methods):
            c = [cells.get((ds, m, bb)) for bb in backbones]
            mean = [np.nan if v is None else v["mean"] for v in c]
            std = [0 if v is None else v["std"] for v in c]
            ax.bar(
                x + (i - (len(methods) - 1) / 2) * width,
                mean,
                width,
                yerr=std,
                capsize=2,
                label=LABELS.get(m, m),
            )
        ax.set_xticks(x, backbones)
        ax.set_ylabel("top-1 %")
        ax.set_ylim(0, 100)
        ax.set_title(ds if not title else f"{title}: {ds}")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize="small", ncol=min(len(methods), 5), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv=None) -> argparse.Namespace:
    p = command_parser("report", __doc__)
    p.add_argument("inputs", nargs="+", help="eval.json files or directories holding them")
    p.add_argument("--out", default="report", help="writes OUT.md and OUT.png")
    p.add_argument("--title", default=None)
    return p.parse_args(argv)


def write(a: argparse.Namespace) -> None:
    cells = collect(find(a.inputs))
    if not cells:
        raise errors.InputError("no eval.json found in " + " ".join(a.inputs))
    md = markdown(cells, a.title)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".md", "w") as f:
        f.write(md)
    bar_chart(cells, a.out + ".png", a.title)
    print(md)
    print(f"wrote {a.out}.md and {a.out}.png")


def main(argv=None) -> int:
    return errors.run_command(lambda: write(parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
