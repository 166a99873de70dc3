"""Group-aware accuracy for datasets whose examples carry a group (bias datasets).

The test pass tallies each seed's top-1 hits per group (`Tally`, fed by probe.test_probes);
`metrics` turns the tallies into the eval.json fields: per-group accuracy, the worst and the
average group (accuracy computed per seed over the groups that have test examples, then mean and
std over seeds like top-1, by the caller's `summarize`), and the pooled accuracy of named sets
of groups; `format_lines` prints them. Pure NumPy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

SHOWN = 12  # print every group up to this many; more are in eval.json only


class Tally:
    """Top-1 hits per (seed, group) over padded test batches."""

    def __init__(self):
        self.groups, self.hits = [], []

    def add(self, groups, hits, mask) -> None:
        """groups int [B], hits [S, B] (1 where seed s's top-1 is right), mask bool [B]."""
        m = np.asarray(mask, bool)
        self.groups.append(np.asarray(groups, np.int64)[m])
        self.hits.append(np.asarray(hits)[:, m])

    def counts(self) -> dict:
        """{"group_correct": [S, G], "group_count": [G]} (G = largest group id + 1), or {}."""
        if not self.groups:
            return {}
        g, h = np.concatenate(self.groups), np.concatenate(self.hits, axis=1)
        count = np.bincount(g)
        correct = np.stack([np.bincount(g, x, len(count)) for x in h])
        return {"group_correct": correct, "group_count": count}


def metrics(correct, count, names: Sequence[str], sets=(), *, summarize: Callable) -> dict:
    """eval.json fields from top-1 hits correct [S, G'] and test counts [G'] (G' <= len(names));
    `summarize` (probe.summarize) turns per-seed fractions [S] into {mean, std, per_seed} in %.

    groups: {name: {"num_test", "top1": summary or None when the group has no test example}};
    worst_group / average_group: summaries over the groups with test examples; group_sets:
    {set name: {"groups", "num_test", "top1"}} pooling the hits of its groups.
    """
    g = len(names)
    count = np.pad(np.asarray(count, np.int64), (0, g - len(count)))
    correct = np.asarray(correct, np.float64)
    correct = np.pad(correct, ((0, 0), (0, g - correct.shape[1])))
    present = count > 0
    if not present.any():
        raise ValueError("no test example has a group")
    acc = correct[:, present] / count[present]  # [S, G with examples]
    out = {
        "worst_group": summarize(acc.min(axis=1)),
        "average_group": summarize(acc.mean(axis=1)),
        "groups": {},
    }
    for k, name in enumerate(names):
        top1 = summarize(correct[:, k] / count[k]) if count[k] else None
        out["groups"][name] = {"num_test": int(count[k]), "top1": top1}
    if sets:
        out["group_sets"] = {}
        for name, ids in sets:
            ids = list(ids)
            n = int(count[ids].sum())
            top1 = summarize(correct[:, ids].sum(1) / n) if n else None
            out["group_sets"][name] = {"groups": len(ids), "num_test": n, "top1": top1}
    return out


def plus_minus(s: dict | None) -> str:
    """'mean ± std' of a summary (2 decimals), '—' for None."""
    return "—" if s is None else f"{s['mean']:.2f} ± {s['std']:.2f}"


def format_lines(result: dict) -> str:
    """The group lines of a printed result: every group (up to SHOWN of them) and each set."""
    lines = []
    groups = result.get("groups", {})
    if len(groups) <= SHOWN:
        for name, g in groups.items():
            lines.append(f"  group {name} ({g['num_test']} test): {plus_minus(g['top1'])}")
    else:
        lines.append(f"  {len(groups)} groups: per-group top-1 in eval.json")
    for n, g in result.get("group_sets", {}).items():
        lines.append(f"  {n} ({g['groups']} groups, {g['num_test']} test): {plus_minus(g['top1'])}")
    return "\n".join(lines)
