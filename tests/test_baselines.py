"""Baseline selection rules on constructed examples, and the selection commands end to end with
stand-in registries (see test_evaluate.fake_registries)."""

import numpy as np
import pytest
from test_evaluate import SRC, colour_images, fake_registries, write_run  # noqa: F401

from lgm_jax import baselines as bl
from lgm_jax import config_base, distilled, probe
from lgm_jax.errors import InputError


def test_centroid_picks_the_image_nearest_the_class_mean():
    # Class 0: mean (1, 1); the point (1.1, 0.9) is nearest it although (0, 0) is nearest the
    # origin and (3, 3) has the largest norm. Class 1: points on a line, the middle one wins.
    feats = np.array([[0, 0], [3, 3], [1.1, 0.9], [0.9, 0.2], [10, 0], [12, 0], [14.5, 0]])
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    # class-0 mean = (1.25, 1.025); class-1 mean = (12.1667, 0)
    np.testing.assert_array_equal(bl.centroid_indices(feats, labels, 2), [2, 5])


def test_neighbour_is_max_cosine_within_the_class():
    feats = np.array([[1.0, 0.0], [10.0, 1.0], [0.0, 1.0], [1.0, 1.0], [0.9, 0.1]])
    labels = np.array([0, 0, 0, 1, 1])
    # Query (5, 0.6): the L2-nearest class-0 point is (1, 0); the max-cosine one is (10, 1).
    # Query 2 belongs to class 1: (0.9, 0.1) beats (1, 1) and the class-0 point (1, 0) is barred.
    queries = np.array([[5.0, 0.6], [1.0, 0.0]])
    np.testing.assert_array_equal(bl.neighbor_indices(queries, [0, 1], feats, labels), [1, 4])


def test_random_is_one_per_class_and_changes_with_the_seed():
    labels = np.repeat(np.arange(3), 50)
    picks = [bl.random_indices(labels, 3, np.random.default_rng([0, k])) for k in range(5)]
    for idx in picks:
        np.testing.assert_array_equal(labels[idx], [0, 1, 2])
    assert len({tuple(i) for i in picks}) > 1
    with pytest.raises(InputError, match="class 3 has no training images"):
        bl.random_indices(labels, 4, np.random.default_rng(0))


def test_gather_keeps_order_across_padded_batches():
    images = np.arange(7)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    batches = lambda: probe.array_batches(images.astype(np.uint8), np.zeros(7, np.int32), 3)
    out = bl.gather(batches(), [6, 0, 3, 3])
    np.testing.assert_array_equal(out[:, 0, 0, 0], [6, 0, 3, 3])
    with pytest.raises(InputError, match="past the 7 images"):
        bl.gather(batches(), [7])


def test_selection_commands_end_to_end(tmp_path, fake_registries, monkeypatch):  # noqa: F811
    # Train split: noisy solid colours at SRC px, 4 classes; stand-in eval_iterator streams it.
    import lgm_jax.data as data

    rng = np.random.default_rng(7)
    train_x, train_y = colour_images(24, 4, rng)
    sizes = []  # the image sizes the commands ask the train stream for
    monkeypatch.setattr(
        data,
        "eval_iterator",
        lambda ds, split, bs, crop, resize: (
            sizes.append((crop, resize)),
            probe.array_batches(train_x, train_y, bs),
        )[1],
    )
    paths = bl.run_random("colours", str(tmp_path / "random"), seeds=2, batch_size=5, syn_res=SRC)
    for path in paths:
        s = distilled.load(path)
        assert s.images.shape == (4, SRC, SRC, 3) and sorted(s.labels) == [0, 1, 2, 3]
        assert s.meta["method"] == "random" and s.meta["dataset"] == "colours"

    path = bl.main(
        [
            "centroids",
            "--dataset",
            "colours",
            "--backbone",
            "tiny",
            "--out",
            str(tmp_path / "cent"),
            "--batch-size",
            "5",
            "--syn-res",
            str(SRC),
        ]
    )
    assert path == 0
    cent = distilled.load(str(tmp_path / "cent"))
    np.testing.assert_array_equal(cent.labels, [0, 1, 2, 3])
    from lgm_jax.models import registry  # the stand-in of fake_registries

    backbone, params = registry.build("tiny")
    feats, _ = bl.embed(
        backbone.features,
        params,
        probe.array_batches(train_x, train_y, 5),
        config_base.probe_config(backbone, 4, epochs=1),
    )
    want = bl.centroid_indices(feats, train_y, 4)
    np.testing.assert_array_equal(cent.images, train_x[want])

    # Neighbours of a "distilled" set made of train images are those very images.
    write_run(tmp_path / "run", train_x[[5, 2]], train_y[[5, 2]], dataset="colours")
    with pytest.raises(InputError, match="2 classes but colours has 4"):
        bl.run_neighbors(str(tmp_path / "run"), "tiny", str(tmp_path / "nb"))
    write_run(tmp_path / "run", train_x[[5, 2, 0, 3]], train_y[[5, 2, 0, 3]], dataset="colours")
    bl.run_neighbors(str(tmp_path / "run"), "tiny", str(tmp_path / "nb"), batch_size=5)
    np.testing.assert_array_equal(
        distilled.load(str(tmp_path / "nb")).images, train_x[[5, 2, 0, 3]]
    )
    assert sizes[-1] == (SRC, SRC)  # neighbours at the distilled images' size
    bl.run_random("colours", str(tmp_path / "r7"), seeds=1, batch_size=5, syn_res=7)
    assert sizes[-1] == (7, 7)


def test_report_table_and_chart(tmp_path):
    import json

    from lgm_jax import report

    rows = [
        ("distilled", "dinov2", "dinov2", 91.5),
        ("random", "dinov2", None, 74.8),
        ("distilled", "clip", "clip", 84.9),
        ("distilled", "clip", "dinov2", 60.0),
        ("full", "clip", None, 92.5),
    ]
    for i, (method, bb, src, top1) in enumerate(rows):
        d = tmp_path / str(i)
        d.mkdir()
        (d / "eval.json").write_text(
            json.dumps(
                {
                    "method": method,
                    "backbone": bb,
                    "distill_backbone": src,
                    "dataset": "in100",
                    "top1": {"mean": top1, "std": 0.5, "per_seed": [top1]},
                }
            )
        )
    assert report.main([str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r.md").read_text()
    assert "| dataset | method | clip | dinov2 |" in md
    assert "| in100 | Distilled (ours) | 84.9 ± 0.5 | 91.5 ± 0.5 |" in md  # cross-model left out
    assert "| in100 | Random real | — | 74.8 ± 0.5 |" in md
    assert md.index("Distilled") < md.index("Random") < md.index("Full dataset")
    assert (tmp_path / "r.png").stat().st_size > 1000
