r"""Representation alignment between backbones, and whether it predicts cross-model transfer.

Example (the bundled demo backbone against a random-init one, on 500 demo test digits):

    python -m lgm_jax.analysis alignment --dataset mnist_demo \
        --backbones dinov2_tiny=demo dinov2_tiny=random \
        --weights demo=lgm_jax/assets/demo_vit --limit 500 --out workdirs/alignment

Usage:
    python -m lgm_jax.analysis alignment --dataset D --backbones NAME[=LABEL] ... \
        [--weights LABEL=DIR ...] [--k 10] [--limit N] --out DIR
    python -m lgm_jax.analysis predict --grid GRID.json --alignment ALIGNMENT.json \
        [--names GRID_NAME=LABEL ...] --out DIR

`alignment` embeds the real test images of D (the test stream of `lgm_jax.evaluate`: shorter
side to round(256 * input_res / 224), centre crop, the backbone's normalisation; features as
`lgm_jax.baselines.embed` computes them) with every backbone, the same images in the same order
for all, and for every pair (A, B) computes
  * mutual k-nearest-neighbour alignment (Huh et al. 2024): each feature vector is L2-normalised
    (no centring); N_A(i) is the set of the k samples j != i with the largest cosine similarity
    <f_A(i), f_A(j)> (equivalently the smallest Euclidean distance between normalised vectors);
    m = mean_i |N_A(i) ∩ N_B(i)| / k. 1 when the neighbourhoods agree, about k / (N - 1) for
    independent features;
  * linear CKA (Kornblith et al. 2019) on column-centred features X [N, F_A], Y [N, F_B]:
    ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), invariant to orthogonal maps and isotropic
    scaling of either side.
It writes alignment.json (labels, backbone names and weights, both matrices, settings),
alignment.md and heatmaps mutual_knn.png and cka.png (values x 100). A backbone is a registry
name (docs/backbones.md, `factory:...` included) with an optional label after "=", so one
architecture can appear with several weights; --weights LABEL=DIR gives a label its converted
weights (a label without weights is randomly initialised, registry key 0).

`predict` joins a cross-model grid (`python -m lgm_jax.evaluate grid`: rows are the runs' names,
the distillation backbone A; columns the evaluation backbone B) with an alignment file over the
off-diagonal pairs A != B, mapping grid names onto alignment labels with --names, and reports
Spearman's rho between alignment and top-1 (scipy.stats.spearmanr, whose p-value is the
t-distribution approximation, plus a permutation p-value: exact over all n! orderings for
n <= 8, else (hits + 1) / 10,001 over 10,000 random ones) for both metrics, against raw top-1
and against top-1 relative to B's own-distilled (diagonal) top-1 where the grid has it. Writes
prediction.json, prediction.md, scatter.png and the heatmaps of both matrices and the grid.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lgm_jax import baselines, config_base, errors, evaluate
from lgm_jax.errors import InputError, command_parser, run_command

METRICS = ("mutual_knn", "cka")
TITLES = {"mutual_knn": "mutual kNN", "cka": "linear CKA"}

# ----------------------------------------------------------------------------------------------
# The measures (pure functions of feature arrays)


@functools.partial(jax.jit, static_argnames="k")
def _knn_block(feats, start, rows, k: int):
    """Indices [b, k] of the k nearest neighbours (largest inner product, self excluded) of the
    rows feats[start : start + b] (= `rows`) among all of `feats` [N, F]."""
    sim = jnp.matmul(rows, feats.T, precision="highest")
    self_col = start + jnp.arange(rows.shape[0])
    sim = jnp.where(jnp.arange(feats.shape[0])[None, :] == self_col[:, None], -jnp.inf, sim)
    return jax.lax.top_k(sim, k)[1]


def knn_indices(feats, k: int, block: int = 1024) -> np.ndarray:
    """int [N, k]: for each row of feats [N, F], its k nearest other rows by cosine similarity
    (rows L2-normalised first). Computed `block` rows at a time, so N x N never exists."""
    f = jnp.asarray(feats, jnp.float32)
    f = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
    n = f.shape[0]
    if not 1 <= k < n:
        raise InputError(f"k must be in [1, {n - 1}] for {n} samples, got {k}: lower --k")
    out = [_knn_block(f, s, f[s : s + block], k) for s in range(0, n, block)]
    return np.concatenate([np.asarray(o) for o in out])


def mutual_knn(feats_a, feats_b, k: int = 10) -> float:
    """Mutual k-NN alignment of two feature sets of the same N samples, [N, F_A] and [N, F_B]:
    mean over samples of |N_A(i) ∩ N_B(i)| / k (see the module docstring)."""
    if len(feats_a) != len(feats_b):
        raise InputError(f"the feature sets hold {len(feats_a)} and {len(feats_b)} samples")
    ia, ib = knn_indices(feats_a, k), knn_indices(feats_b, k)
    shared = (ia[:, :, None] == ib[:, None, :]).any(-1).sum(-1)  # indices within a row differ
    return float(shared.mean() / k)


def linear_cka(a, b) -> float:
    """Linear CKA of [N, F_A] and [N, F_B] (float64, column-centred):
    ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(x) != len(y):
        raise InputError(f"the feature sets hold {len(x)} and {len(y)} samples")
    x, y = x - x.mean(0), y - y.mean(0)
    den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(np.linalg.norm(y.T @ x) ** 2 / den) if den > 0 else float("nan")


def alignment_matrices(feats: Sequence[np.ndarray], k: int = 10) -> dict[str, np.ndarray]:
    """{"mutual_knn", "cka"}: symmetric [M, M] matrices over M feature sets of the same samples."""
    m = len(feats)
    out = {name: np.eye(m) for name in METRICS}
    for i, j in itertools.combinations(range(m), 2):
        out["mutual_knn"][i, j] = out["mutual_knn"][j, i] = mutual_knn(feats[i], feats[j], k)
        out["cka"][i, j] = out["cka"][j, i] = linear_cka(feats[i], feats[j])
    return out


def spearman(x, y, permutations: int = 10_000, seed: int = 0) -> dict:
    """Spearman's rho of two samples, its p-value from scipy (t approximation) and a two-sided
    permutation p-value: exact over all n! orderings for n <= 8, else from `permutations`
    random orderings as (hits + 1) / (permutations + 1)."""
    from scipy import stats

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = len(x)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"n": n, "rho": float("nan"), "p_t": float("nan"), "p_permutation": float("nan")}
    res = stats.spearmanr(x, y)
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    exact = n <= 8
    if exact:
        orders = np.array(list(itertools.permutations(range(n))))
    else:
        rng = np.random.default_rng(seed)
        orders = np.stack([rng.permutation(n) for _ in range(permutations)])
    rx, ry = rx - rx.mean(), ry - ry.mean()
    rhos = ry[orders] @ rx / (np.linalg.norm(rx) * np.linalg.norm(ry))
    hits = int(np.sum(np.abs(rhos) >= abs(res.statistic) - 1e-12))
    # Random orderings: count the observed one too, so p is never 0 ((hits + 1) / (m + 1)).
    p_perm = hits / len(orders) if exact else (hits + 1) / (len(orders) + 1)
    return {"n": n, "rho": float(res.statistic), "p_t": float(res.pvalue), "p_permutation": p_perm}


# ----------------------------------------------------------------------------------------------
# Features of the real test images


def parse_backbones(entries: Sequence[str], weights: Sequence[str]) -> list[dict]:
    """'NAME[=LABEL]' entries and 'LABEL=DIR' weights -> [{label, backbone, weights}]."""
    specs = []
    for e in entries:
        name, _, label = e.partition("=")
        specs.append({"label": label or name, "backbone": name, "weights": None})
    labels = [s["label"] for s in specs]
    if len(set(labels)) != len(labels):
        raise InputError(f"backbone labels repeat in {labels}: give each one NAME=LABEL")
    if len(specs) < 2:
        raise InputError("alignment needs at least two --backbones")
    by_label = {s["label"]: s for s in specs}
    for w in weights:
        label, sep, path = w.partition("=")
        if not sep or label not in by_label:
            raise InputError(f"--weights {w!r}: write LABEL=DIR with LABEL one of {labels}")
        by_label[label]["weights"] = path or None
    return specs


def _first(batches: Iterable[dict], limit: int | None) -> Iterator[dict]:
    """The padded batches up to the first `limit` valid rows (later rows masked out)."""
    seen = 0
    for b in batches:
        if limit is not None and seen >= limit:
            return
        mask = np.asarray(b["mask"], bool)
        if limit is not None:
            mask = mask & (np.cumsum(mask) + seen <= limit)
        seen += int(mask.sum())
        yield dict(b, mask=mask)


def real_features(ds, spec: dict, limit: int | None, batch_size: int = 256):
    """Features [N, F] and labels [N] of the first `limit` test images of `ds` (all when None)
    under one backbone spec, through evaluate's test stream and baselines.embed."""
    from lgm_jax.models import registry

    bb, params = registry.build(spec["backbone"], spec["weights"])
    cfg = config_base.probe_config(bb, ds.num_classes, epochs=1)
    stream = evaluate.test_stream(ds, bb.input_res, batch_size)
    return baselines.embed(bb.features, params, _first(stream(), limit), cfg)


def _matrix_md(title: str, labels: Sequence[str], matrix: np.ndarray) -> str:
    lines = [f"### {title}", "", "| A \\ B | " + " | ".join(labels) + " |"]
    lines.append("|---|" + "---|" * len(labels))
    lines += [
        f"| {a} | " + " | ".join(f"{v:.3f}" for v in row) + " |" for a, row in zip(labels, matrix)
    ]
    return "\n".join(lines) + "\n"


def _heatmaps(labels: Sequence[str], matrices: dict, out: str) -> None:
    """mutual_knn.png and cka.png: the matrices x 100 drawn as evaluate draws its grid."""
    for name in METRICS:
        m = np.asarray(matrices[name])
        cells = {
            (a, b): {"mean": 100 * m[i, j]}
            for i, a in enumerate(labels)
            for j, b in enumerate(labels)
        }
        path = os.path.join(out, f"{name}.png")
        evaluate.grid_heatmap(
            labels, labels, cells, path, axes=("B", "A"), label=f"{TITLES[name]} x 100"
        )


def alignment(
    dataset: str,
    backbones: Sequence[str],
    out: str,
    weights: Sequence[str] = (),
    k: int = 10,
    limit: int | None = None,
    batch_size: int = 256,
    data_dir: str | None = None,
) -> dict:
    """Embed the test images with every backbone; write alignment.json/.md and the heatmaps."""
    from lgm_jax import data

    if limit is not None and limit < 2:
        raise InputError(f"--limit must be at least 2 test images, got {limit}")
    specs = parse_backbones(backbones, weights)
    ds = data.get_dataset(dataset, data_dir)
    t0 = time.time()
    feats, labels = [], None
    for spec in specs:
        f, lab = real_features(ds, spec, limit, batch_size)
        if labels is not None and not np.array_equal(lab, labels):
            raise RuntimeError(f"{spec['label']} saw other test images than {specs[0]['label']}")
        feats.append(f)
        labels = lab
        spec["feature_dim"] = int(f.shape[1])
        print(f"{spec['label']}: features {f.shape}", flush=True)
    embed_s = time.time() - t0
    matrices = alignment_matrices(feats, k)
    names = [s["label"] for s in specs]
    result = {
        "dataset": dataset,
        "backbones": names,
        "specs": specs,
        **{name: matrices[name].tolist() for name in METRICS},
        "settings": {
            "split": "test",
            "num_samples": len(labels),
            "k": k,
            "limit": limit,
            "knn": "L2-normalised features, cosine similarity, self excluded",
            "cka": "linear, column-centred features",
        },
        "embed_seconds": embed_s,
        "measure_seconds": time.time() - t0 - embed_s,
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "alignment.json"), "w") as f:
        json.dump(result, f, indent=2)
    head = f"Alignment on {len(labels)} {dataset} test images (k = {k}).\n\n"
    md = head + "\n".join(_matrix_md(TITLES[n], names, matrices[n]) for n in METRICS)
    with open(os.path.join(out, "alignment.md"), "w") as f:
        f.write(md)
    _heatmaps(names, matrices, out)
    print(md)
    return result


# ----------------------------------------------------------------------------------------------
# Does alignment predict transfer?


def _read_json(path: str, what: str, keys: Sequence[str]) -> dict:
    if not os.path.isfile(path):
        raise InputError(f"{what} file {path} not found: {_MAKERS[what]}")
    obj = errors.read_json(path, f"a JSON {what} file", _MAKERS[what])
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise InputError(f"{path} is not a {what} file (no {', '.join(missing)}): {_MAKERS[what]}")
    return obj


_MAKERS = {
    "grid": "write one with python -m lgm_jax.evaluate grid",
    "alignment": "write one with python -m lgm_jax.analysis alignment",
}


def pair_rows(grid: dict, align: dict, names: dict[str, str]) -> list[dict]:
    """The off-diagonal cells of a grid with the alignment of their two backbones and their
    top-1 relative to the evaluation backbone's own (diagonal) top-1 where it is in the grid."""
    rename = lambda n: names.get(n, n)
    labels = align["backbones"]
    cells = [(rename(c["distilled_with"]), rename(c["evaluated_on"]), c) for c in grid["cells"]]
    unknown = sorted({n for a, b, _ in cells for n in (a, b)} - set(labels))
    if unknown:
        raise InputError(
            f"grid backbones {unknown} are not in the alignment's {labels}: map them with "
            "--names GRID_NAME=LABEL or measure them with python -m lgm_jax.analysis alignment"
        )
    own = {a: c["top1"]["mean"] for a, b, c in cells if a == b}
    rows = []
    for a, b, c in cells:
        if a == b:
            continue
        i, j = labels.index(a), labels.index(b)
        top1 = c["top1"]["mean"]
        rel = top1 / own[b] if own.get(b) else None
        rows.append(
            {
                "distilled_with": a,
                "evaluated_on": b,
                "top1": top1,
                "top1_std": c["top1"].get("std"),
                "relative": rel,
                **{m: align[m][i][j] for m in METRICS},
            }
        )
    if len(rows) < 3:
        raise InputError(
            f"the grid has {len(rows)} off-diagonal cells; a rank correlation "
            "needs at least 3 (distil with more backbones)"
        )
    return rows


def correlations(rows: Sequence[dict]) -> list[dict]:
    """Spearman of each alignment metric against top-1 and (if known everywhere) relative top-1."""
    targets = ["top1"] + (["relative"] if all(r["relative"] is not None for r in rows) else [])
    return [
        {"metric": m, "target": t, **spearman([r[m] for r in rows], [r[t] for r in rows])}
        for m in METRICS
        for t in targets
    ]


def _prediction_md(rows, stats, grid_path, align_path) -> str:
    fmt = lambda v, f: "—" if v is None else format(v, f)
    lines = [
        f"Cross-model grid {grid_path} against alignment {align_path}: "
        f"{len(rows)} off-diagonal pairs (A distils, B evaluates).",
        "",
        "| distilled with (A) | evaluated on (B) | top-1 % | / B's own top-1 | mutual kNN | CKA |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['distilled_with']} | {r['evaluated_on']} | {r['top1']:.1f} | "
        f"{fmt(r['relative'], '.2f')} | {r['mutual_knn']:.3f} | {r['cka']:.3f} |"
        for r in rows
    ]
    lines += [
        "",
        "| alignment | accuracy | n | Spearman rho | p (t approx.) | p (permutation) |",
        "|---|---|---|---|---|---|",
    ]
    target = {"top1": "top-1", "relative": "top-1 / B's own"}
    lines += [
        f"| {TITLES[s['metric']]} | {target[s['target']]} | {s['n']} | {s['rho']:.3f} | "
        f"{s['p_t']:.3f} | {s['p_permutation']:.3f} |"
        for s in stats
    ]
    return "\n".join(lines) + "\n"


def _scatter(rows: Sequence[dict], stats: Sequence[dict], path: str) -> None:
    """Top-1 of each off-diagonal pair against each alignment metric, points labelled A>B."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
    for ax, m in zip(axes, METRICS):
        x, y = [r[m] for r in rows], [r["top1"] for r in rows]
        ax.scatter(x, y)
        for r, xi, yi in zip(rows, x, y):
            ax.annotate(f"{r['distilled_with']}>{r['evaluated_on']}", (xi, yi), fontsize=7)
        s = next(s for s in stats if s["metric"] == m and s["target"] == "top1")
        ax.set_title(f"Spearman rho {s['rho']:.2f} (p {s['p_permutation']:.2f}, n {s['n']})")
        ax.set_xlabel(f"{TITLES[m]} of A and B")
        ax.set_ylabel("top-1 % (distilled with A, evaluated on B)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def predict(grid_path: str, align_path: str, out: str, names: Sequence[str] = ()) -> dict:
    """Join grid and alignment, write prediction.json/.md, scatter.png and the heatmaps."""
    mapping = {}
    for n in names:
        g, sep, label = n.partition("=")
        if not sep or not label:
            raise InputError(f"--names {n!r}: write GRID_NAME=LABEL")
        mapping[g] = label
    grid = _read_json(grid_path, "grid", ("backbones", "runs", "cells"))
    align = _read_json(align_path, "alignment", ("backbones", *METRICS))
    rows = pair_rows(grid, align, mapping)
    stats = correlations(rows)
    os.makedirs(out, exist_ok=True)
    md = _prediction_md(rows, stats, grid_path, align_path)
    result = {
        "grid": grid_path,
        "alignment": align_path,
        "names": mapping,
        "pairs": rows,
        "correlations": stats,
    }
    with open(os.path.join(out, "prediction.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out, "prediction.md"), "w") as f:
        f.write(md)
    _scatter(rows, stats, os.path.join(out, "scatter.png"))
    _heatmaps(align["backbones"], align, out)
    rename = lambda n: mapping.get(n, n)
    cells = {
        (rename(c["distilled_with"]), rename(c["evaluated_on"])): c["top1"] for c in grid["cells"]
    }
    rows_names = list(dict.fromkeys(rename(n) for n in grid["runs"]))
    cols = [rename(b) for b in grid["backbones"]]
    evaluate.grid_heatmap(rows_names, cols, cells, os.path.join(out, "grid.png"))
    print(md)
    return result


# ----------------------------------------------------------------------------------------------
# CLI


def _alignment_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "analysis alignment",
        "Mutual k-NN and linear CKA between backbones on a dataset's test images.\n\n"
        "  python -m lgm_jax.analysis alignment --dataset mnist_demo --backbones "
        "dinov2_tiny=demo dinov2_tiny=random --weights demo=lgm_jax/assets/demo_vit "
        "--limit 500 --out workdirs/alignment",
    )
    p.add_argument("--dataset", required=True)
    p.add_argument("--backbones", nargs="+", required=True, help="NAME[=LABEL] ...")
    p.add_argument("--weights", nargs="*", default=[], help="LABEL=DIR ... (none: random init)")
    p.add_argument("--k", type=errors.count, default=10, help="neighbours of mutual k-NN")
    p.add_argument(
        "--limit", type=errors.count, default=None, help="first N test images (default: all)"
    )
    p.add_argument("--batch-size", type=errors.count, default=256)
    p.add_argument("--data-dir", default=None, help="dataset directory, if not the default")
    p.add_argument("--out", required=True)
    return p


def _predict_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "analysis predict",
        "Rank correlation of cross-model top-1 with alignment over the off-diagonal pairs.\n\n"
        "  python -m lgm_jax.analysis predict --grid cross_model/grid.json "
        "--alignment workdirs/alignment/alignment.json --out workdirs/prediction",
    )
    p.add_argument("--grid", required=True, help="grid.json of python -m lgm_jax.evaluate grid")
    p.add_argument("--alignment", required=True, help="alignment.json of the alignment command")
    p.add_argument("--names", nargs="*", default=[], help="GRID_NAME=LABEL ...")
    p.add_argument("--out", required=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "alignment":
        a = _alignment_parser().parse_args(argv[1:])
        kw = dict(
            weights=a.weights, k=a.k, limit=a.limit, batch_size=a.batch_size, data_dir=a.data_dir
        )
        return run_command(lambda: alignment(a.dataset, a.backbones, a.out, **kw))
    if argv and argv[0] == "predict":
        a = _predict_parser().parse_args(argv[1:])
        return run_command(lambda: predict(a.grid, a.alignment, a.out, a.names))
    p = command_parser("analysis", __doc__)
    p.add_argument("command", choices=("alignment", "predict"))
    p.parse_args(argv)  # --help, or an unknown command (exit 2)
    return 2


if __name__ == "__main__":
    sys.exit(main())
