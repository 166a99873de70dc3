"""Datasets for the bias study, read from the layouts their authors distribute (no rearranging).

`data_dir` (`--config.data_dir`, `--data-dir`) is the folder holding the release folder, or the
release folder itself:
  * `waterbirds`: `waterbird_complete95_forest2water2/` with its `metadata.csv` (img_id,
    img_filename, y, split, place, place_filename; split 0/1/2 = train/val/test; y 0 landbird,
    1 waterbird; place 0 land, 1 water). Group = bird x place (4 groups).
  * `spawrious_o2o_hard`: `spawrious224/<0|1>/<background>/<breed>/*.png` (the Spawrious
    release). Classes: the 4 breeds; group = background.
  * `artbench`: `artbench-10-imagefolder-split/{train,test}/<style>/*.jpg` (10 styles), no groups.
  * `mnist_colour_demo`: no files; the bundled MNIST digits of `mnist_demo` (same split),
    each digit drawn in one of 10 colours: in train its class's colour 95% of the time (else a
    uniformly random other colour), in test a uniformly random colour. Group = (class, colour).
"""

from __future__ import annotations

import csv
import os

import numpy as np

from lgm_jax.data.sources import (
    ArraySource,
    Dataset,
    DatasetNotPrepared,
    FolderSource,
    _list_images,
    image_folder,
    mnist_demo,
)

WATERBIRDS_DIR = "waterbird_complete95_forest2water2"
WATERBIRDS_SPLITS = {"train": 0, "val": 1, "test": 2}
SPAWRIOUS_DIR = "spawrious224"
SPAWRIOUS_BREEDS = ("bulldog", "corgi", "dachshund", "labrador")  # the benchmark's class order
ARTBENCH_DIR = "artbench-10-imagefolder-split"

# Spawrious o2o_hard, as the benchmark code defines it (aengusl/spawrious, spawrious/torch.py:
# `_get_combinations("o2o_hard")` and `build_combination`): breed -> its training background;
# every breed's test images come from another background; "beach" fills the rest. Each train
# background is read from both release halves 0 and 1, the first 3072 (= int(0.97 * 3168))
# images of half 0 and the first 2756 (= int(0.87 * 3168)) of half 1, and the beach filler
# tops each half up to 3168 (96 and 412 images); test takes every image of both halves.
O2O_HARD_TRAIN = {"bulldog": "jungle", "dachshund": "mountain", "labrador": "snow",
                  "corgi": "desert"}  # fmt: skip
O2O_HARD_TEST = {"bulldog": "mountain", "dachshund": "snow", "labrador": "desert",
                 "corgi": "jungle"}  # fmt: skip
O2O_HARD_FILLER = "beach"
SPAWRIOUS_TOTAL = 3168
SPAWRIOUS_LIMITS = (int(0.97 * SPAWRIOUS_TOTAL), int(0.87 * SPAWRIOUS_TOTAL))  # halves 0, 1

# The colour demo's palette: 10 hues 36 degrees apart at full saturation and value, so that
# a measured mean hue says which colour an image leans to.
COLOUR_NAMES = ("red", "orange", "chartreuse", "green", "spring", "cyan", "azure", "blue",
                "violet", "rose")  # fmt: skip
BIAS_P = 0.95  # train: P(colour = the class's colour)


def hue_rgb(hue_deg: float) -> np.ndarray:
    """float [3] in [0, 1]: the fully saturated colour of a hue (HSV with s = v = 1)."""
    h = (hue_deg % 360) / 60
    x = 1 - abs(h % 2 - 1)
    rgb = [(1, x, 0), (x, 1, 0), (0, 1, x), (0, x, 1), (x, 0, 1), (1, 0, x)][int(h) % 6]
    return np.asarray(rgb, np.float64)


COLOURS = np.stack([hue_rgb(36 * k) for k in range(10)])  # [10, 3]


def release_root(data_dir: str | None, folder: str, marker: str, name: str) -> str:
    """The release folder `folder` (holding `marker`): data_dir/folder or data_dir itself."""
    if not data_dir:
        raise DatasetNotPrepared(
            f"{name} needs data_dir (--config.data_dir or --data-dir): the folder that holds "
            f"{folder}/ (see docs/data.md)"
        )
    data_dir = os.path.expanduser(data_dir)
    for root in (os.path.join(data_dir, folder), data_dir):
        if os.path.exists(os.path.join(root, marker)):
            return root
    raise DatasetNotPrepared(
        f"{name}: neither {os.path.join(data_dir, folder, marker)} nor "
        f"{os.path.join(data_dir, marker)} exists; point data_dir at the folder holding the "
        f"unpacked {folder}/ release (see docs/data.md)"
    )


# ---------------------------------------------------------------- Waterbirds


def waterbirds(data_dir: str | None) -> Dataset:
    root = release_root(data_dir, WATERBIRDS_DIR, "metadata.csv", "waterbirds")
    with open(os.path.join(root, "metadata.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    splits = {}
    for split, code in WATERBIRDS_SPLITS.items():
        chosen = [r for r in rows if int(r["split"]) == code]
        labels = [int(r["y"]) for r in chosen]
        groups = [2 * int(r["y"]) + int(r["place"]) for r in chosen]
        paths = [os.path.join(root, r["img_filename"]) for r in chosen]
        splits[split] = (paths, labels, groups)
    birds, places = ("landbird", "waterbird"), ("land", "water")
    names = tuple(f"{b}/{p}" for b in birds for p in places)
    sets = (("bird matches place", (0, 3)), ("bird differs from place", (1, 2)))
    return Dataset(
        "waterbirds", 2, birds, tuple(splits), lambda s: FolderSource(*splits[s]),
        group_names=names, group_sets=sets,
    )  # fmt: skip


# ---------------------------------------------------------------- Spawrious


def _spawrious_files(root, half: int, background: str, breed: str, limit=None) -> list[str]:
    folder = os.path.join(root, str(half), background, breed)
    if not os.path.isdir(folder):
        raise DatasetNotPrepared(f"spawrious_o2o_hard: {folder} is missing (see docs/data.md)")
    # The benchmark takes the first `limit` files in os.listdir order, which the file system
    # decides; sorted names make the choice reproducible.
    return _list_images(folder)[:limit]


def spawrious_o2o_hard(data_dir: str | None) -> Dataset:
    root = release_root(data_dir, SPAWRIOUS_DIR, "0", "spawrious_o2o_hard")
    backgrounds = tuple(sorted({*O2O_HARD_TRAIN.values(), *O2O_HARD_TEST.values(),
                                O2O_HARD_FILLER}))  # fmt: skip
    parts = {"train": [], "test": []}  # (files, breed, background)
    for breed in SPAWRIOUS_BREEDS:
        for half, limit in enumerate(SPAWRIOUS_LIMITS):
            bg = O2O_HARD_TRAIN[breed]
            parts["train"].append((_spawrious_files(root, half, bg, breed, limit), breed, bg))
            fill = SPAWRIOUS_TOTAL - limit
            files = _spawrious_files(root, half, O2O_HARD_FILLER, breed, fill)
            parts["train"].append((files, breed, O2O_HARD_FILLER))
            bg = O2O_HARD_TEST[breed]
            parts["test"].append((_spawrious_files(root, half, bg, breed), breed, bg))
    splits = {}
    for split, items in parts.items():
        paths, labels, groups = [], [], []
        for files, breed, bg in items:
            paths += files
            labels += [SPAWRIOUS_BREEDS.index(breed)] * len(files)
            groups += [backgrounds.index(bg)] * len(files)
        splits[split] = (paths, labels, groups)
    return Dataset(
        "spawrious_o2o_hard", 4, SPAWRIOUS_BREEDS, ("train", "test"),
        lambda s: FolderSource(*splits[s]), group_names=backgrounds,
    )  # fmt: skip


# ---------------------------------------------------------------- ArtBench-10


def artbench(data_dir: str | None) -> Dataset:
    root = release_root(data_dir, ARTBENCH_DIR, "train", "artbench")
    ds = image_folder(root, name="artbench")
    if ds.num_classes != 10:
        raise DatasetNotPrepared(
            f"artbench: {root}/train has {ds.num_classes} style folders, not ArtBench-10's 10"
        )
    return ds


# ---------------------------------------------------------------- the colour-MNIST demo


def colour_draws(labels, split: str, seed: int = 0) -> np.ndarray:
    """The colour [N] of every digit: train keeps the class's colour with p = 0.95 (else one
    of the 9 others, uniformly), test draws uniformly; a fixed function of (seed, split)."""
    labels = np.asarray(labels, np.int64)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    if split != "train":
        return rng.integers(0, len(COLOURS), len(labels))
    keep = rng.random(len(labels)) < BIAS_P
    other = (labels + rng.integers(1, len(COLOURS), len(labels))) % len(COLOURS)
    return np.where(keep, labels, other)


def colourize(grey: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] grey digits (white on black) -> the strokes in COLOURS[colours]."""
    ink = grey[..., :1].astype(np.float64) / 255
    return np.rint(ink * COLOURS[colours][:, None, None, :] * 255).astype(np.uint8)


def mnist_colour_demo(data_dir: str | None = None) -> Dataset:
    del data_dir  # bundled data
    grey = mnist_demo()

    def opener(split):
        src = grey.source(split)
        colours = colour_draws(src.labels, split)
        groups = src.labels * len(COLOURS) + colours
        return ArraySource(colourize(src.images, colours), src.labels, groups)

    names = tuple(f"{c}/{COLOUR_NAMES[k]}" for c in range(10) for k in range(len(COLOURS)))
    aligned = tuple(c * len(COLOURS) + c for c in range(10))
    other = tuple(g for g in range(len(names)) if g not in aligned)
    sets = (("colour = class colour", aligned), ("other colour", other))
    return Dataset(
        "mnist_colour_demo", 10, grey.class_names, ("train", "test"), opener,
        group_names=names, group_sets=sets,
    )  # fmt: skip


DATASETS = {
    "waterbirds": waterbirds,
    "spawrious_o2o_hard": spawrious_o2o_hard,
    "artbench": artbench,
    "mnist_colour_demo": mnist_colour_demo,
}
