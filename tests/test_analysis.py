"""Alignment measures against direct computations and their invariances, the alignment command on
the demo data, and predict's rank correlation against scipy and a brute-force permutation test."""

import itertools
import json

import numpy as np
import pytest
from scipy import stats

from lgm_jax import analysis


def direct_mutual_knn(a, b, k):
    """Per sample, sorted Euclidean distances between L2-normalised rows, self dropped."""

    def neighbours(f, i):
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        order = [j for j in np.argsort(np.linalg.norm(f - f[i], axis=1)) if j != i]
        return set(order[:k])

    return np.mean([len(neighbours(a, i) & neighbours(b, i)) / k for i in range(len(a))])


def rotation(rng, f):
    q, _ = np.linalg.qr(rng.standard_normal((f, f)))
    return q


def test_mutual_knn_matches_a_direct_set_computation():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((60, 8))
    b = a + 0.7 * rng.standard_normal((60, 8))  # related, so the overlap is strictly between
    m = analysis.mutual_knn(a, b, k=5)
    assert 0.1 < m < 0.9
    assert m == pytest.approx(direct_mutual_knn(a, b, 5), abs=1e-12)
    # Different widths work too (A and B need only the same samples).
    c = np.concatenate([b, rng.standard_normal((60, 3))], axis=1)
    assert analysis.mutual_knn(a, c, k=7) == pytest.approx(direct_mutual_knn(a, c, 7), abs=1e-12)


def test_mutual_knn_is_one_for_identical_and_rotated_scaled_features():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((100, 16))
    assert analysis.mutual_knn(a, a, k=10) == 1.0
    assert analysis.mutual_knn(a, 3.7 * a @ rotation(rng, 16), k=10) == 1.0


def test_mutual_knn_of_independent_features_is_about_k_over_n():
    rng = np.random.default_rng(2)
    n, k = 400, 10
    m = analysis.mutual_knn(rng.standard_normal((n, 32)), rng.standard_normal((n, 32)), k=k)
    # Chance overlap is k / (N - 1) = 0.025; the mean of 400 samples has sd ~ 0.003.
    assert m == pytest.approx(k / (n - 1), abs=0.01)


def test_mutual_knn_rejects_k_past_the_samples():
    a = np.zeros((5, 3)) + np.arange(5)[:, None]
    with pytest.raises(analysis.InputError, match="k must be in"):
        analysis.mutual_knn(a, a, k=5)


def test_linear_cka_invariances_and_independence():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 20)) @ rng.standard_normal((20, 20))  # anisotropic
    assert analysis.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    y = 0.01 * x @ rotation(rng, 20) + 5.0  # orthogonal map, isotropic scale, a shift
    assert analysis.linear_cka(x, y) == pytest.approx(1.0, abs=1e-10)
    # Not invariant to an anisotropic rescaling (it is no similarity transform).
    assert analysis.linear_cka(x, x * np.linspace(0.1, 10, 20)) < 0.99
    # Independent features: linear CKA is about F / N (its small-sample bias), near 0 for N >> F.
    n, f = 3000, 20
    c = analysis.linear_cka(rng.standard_normal((n, f)), rng.standard_normal((n, f)))
    assert 0.5 * f / n < c < 2 * f / n


def test_alignment_matrices_are_symmetric_with_unit_diagonal():
    rng = np.random.default_rng(4)
    base = rng.standard_normal((50, 6))
    feats = [base, base + 0.5 * rng.standard_normal((50, 6)), rng.standard_normal((50, 9))]
    out = analysis.alignment_matrices(feats, k=5)
    for m in out.values():
        np.testing.assert_allclose(m, m.T)
        np.testing.assert_allclose(np.diag(m), 1.0)
    assert out["mutual_knn"][0, 1] > out["mutual_knn"][0, 2]
    assert out["cka"][0, 1] > out["cka"][0, 2]


def test_alignment_command_on_the_demo_data(tmp_path, capsys):
    out = tmp_path / "align"
    args = ["alignment", "--dataset", "mnist_demo", "--limit", "48", "--k", "5", "--out", str(out)]
    args += ["--batch-size", "16"]  # read only the 48 images used
    args += ["--backbones", "dinov2_tiny=demo", "dinov2_tiny=random", "mocov3_tiny"]
    args += ["--weights", "demo=lgm_jax/assets/demo_vit"]
    assert analysis.main(args) == 0
    res = json.loads((out / "alignment.json").read_text())
    assert res["backbones"] == ["demo", "random", "mocov3_tiny"]
    assert res["settings"]["num_samples"] == 48 and res["settings"]["k"] == 5
    assert [s["weights"] for s in res["specs"]] == ["lgm_jax/assets/demo_vit", None, None]
    for name in ("mutual_knn", "cka"):
        m = np.asarray(res[name])
        assert m.shape == (3, 3)
        np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-9)
        np.testing.assert_allclose(m, m.T)
        assert np.all((m > 0) & (m <= 1 + 1e-9))
        assert (out / f"{name}.png").stat().st_size > 0
    assert "### mutual kNN" in (out / "alignment.md").read_text()
    # A label without a backbone, and a repeated label, are input errors.
    bad = args[:-2] + ["--weights", "nosuch=lgm_jax/assets/demo_vit"]
    assert analysis.main(bad) == 2
    assert "LABEL=DIR" in capsys.readouterr().err
    assert analysis.main(args[:9] + ["--backbones", "dinov2_tiny", "dinov2_tiny"]) == 2
    assert "labels repeat" in capsys.readouterr().err


LABELS = ["a", "b", "c"]
TOP1 = {("a", "b"): 40.0, ("a", "c"): 22.0, ("b", "a"): 35.0, ("b", "c"): 30.0,
        ("c", "a"): 12.0, ("c", "b"): 28.0, ("a", "a"): 50.0, ("b", "b"): 45.0,
        ("c", "c"): 33.0}  # fmt: skip
MKNN = [[1.0, 0.6, 0.2], [0.6, 1.0, 0.4], [0.2, 0.4, 1.0]]
CKA = [[1.0, 0.9, 0.3], [0.9, 1.0, 0.5], [0.3, 0.5, 1.0]]


def write_inputs(tmp_path, grid_names=LABELS):
    rename = dict(zip(LABELS, grid_names))
    cells = [
        {"distilled_with": rename[a], "evaluated_on": rename[b],
         "top1": {"mean": v, "std": 1.0}, "top5": {"mean": 90.0, "std": 1.0}}
        for (a, b), v in TOP1.items()
    ]  # fmt: skip
    grid = {"backbones": list(grid_names), "runs": list(grid_names), "cells": cells}
    (tmp_path / "grid.json").write_text(json.dumps(grid))
    align = {"backbones": LABELS, "mutual_knn": MKNN, "cka": CKA}
    (tmp_path / "alignment.json").write_text(json.dumps(align))
    return str(tmp_path / "grid.json"), str(tmp_path / "alignment.json")


def brute_permutation_p(x, y):
    rho = stats.spearmanr(x, y).statistic
    rhos = [stats.spearmanr(x, np.asarray(y)[list(p)]).statistic
            for p in itertools.permutations(range(len(y)))]  # fmt: skip
    return np.mean(np.abs(rhos) >= abs(rho) - 1e-12)


def test_predict_gives_spearman_of_the_off_diagonal_pairs(tmp_path):
    grid, align = write_inputs(tmp_path, ["A", "B", "C"])
    out = tmp_path / "pred"
    names = ["--names", "A=a", "B=b", "C=c"]
    args = ["predict", "--grid", grid, "--alignment", align, "--out", str(out), *names]
    assert analysis.main(args) == 0
    res = json.loads((out / "prediction.json").read_text())
    pairs = [(a, b) for a in LABELS for b in LABELS if a != b]
    assert len(res["pairs"]) == 6
    for metric, matrix in (("mutual_knn", MKNN), ("cka", CKA)):
        x = [matrix[LABELS.index(a)][LABELS.index(b)] for a, b in pairs]
        y = [TOP1[p] for p in pairs]
        rel = [TOP1[(a, b)] / TOP1[(b, b)] for a, b in pairs]
        for target, values in (("top1", y), ("relative", rel)):
            got = next(
                s for s in res["correlations"] if s["metric"] == metric and s["target"] == target
            )
            ref = stats.spearmanr(x, values)
            assert got["n"] == 6
            assert got["rho"] == pytest.approx(ref.statistic, abs=1e-12)
            assert got["p_t"] == pytest.approx(ref.pvalue, abs=1e-12)
            assert got["p_permutation"] == pytest.approx(brute_permutation_p(x, values))
    # By hand for the first: Pearson of the (tie-averaged) ranks; each alignment value appears
    # twice over the pairs (A, B) and (B, A).
    got = res["correlations"][0]
    x = stats.rankdata([0.6, 0.2, 0.6, 0.4, 0.2, 0.4])
    y = stats.rankdata([40.0, 22.0, 35.0, 30.0, 12.0, 28.0])
    assert got["rho"] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    for f in ("prediction.md", "scatter.png", "mutual_knn.png", "cka.png", "grid.png"):
        assert (out / f).stat().st_size > 0


def test_predict_bad_inputs_are_one_line_errors(tmp_path, capsys):
    grid, align = write_inputs(tmp_path, ["A", "B", "C"])
    out = str(tmp_path / "pred")
    base = ["predict", "--out", out]
    assert analysis.main([*base, "--grid", str(tmp_path / "no.json"), "--alignment", align]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no.json not found" in err
    # Grid names that are not alignment labels (no --names given).
    assert analysis.main([*base, "--grid", grid, "--alignment", align]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "['A', 'B', 'C'] are not in the alignment" in err
    (tmp_path / "junk.json").write_text("{not json")
    assert analysis.main([*base, "--grid", str(tmp_path / "junk.json"), "--alignment", align]) == 2
    assert "not a JSON grid file" in capsys.readouterr().err
    assert analysis.main([*base, "--grid", align, "--alignment", align]) == 2
    assert "not a grid file" in capsys.readouterr().err


def test_spearman_random_permutations_agree_with_scipys_permutation_test():
    rng = np.random.default_rng(5)
    x = rng.standard_normal(12)
    y = 0.6 * x + rng.standard_normal(12)
    got = analysis.spearman(x, y)

    def rho(a, b, axis):  # Pearson of the ranks, batched over scipy's resamples
        ra, rb = (stats.rankdata(v, axis=axis) for v in (a, b))
        ra, rb = (r - r.mean(axis, keepdims=True) for r in (ra, rb))
        return (ra * rb).sum(axis) / np.sqrt((ra**2).sum(axis) * (rb**2).sum(axis))

    ref = stats.permutation_test(
        (x, y), rho, permutation_type="pairings", vectorized=True, n_resamples=20_000,
        random_state=0,
    )  # fmt: skip
    assert 0.005 < ref.pvalue < 0.5  # a p-value the two estimates can be compared at
    assert got["p_permutation"] == pytest.approx(ref.pvalue, abs=0.02)
    assert got["rho"] == pytest.approx(ref.statistic, abs=1e-12)
