"""Hugging Face `datasets` as a source: `get_dataset("hf:<path or name>", data_dir)`.

`<path>` is a directory written by `save_to_disk` (a DatasetDict, or one Dataset taken as the
train split), opened with `datasets.load_from_disk`; anything else goes to
`datasets.load_dataset(<name>, cache_dir=data_dir)`: a Hub name already in that cache (offline
with HF_HUB_OFFLINE=1), or a local directory of data files (parquet, imagefolder, ...).

Splits are read by random access (`split[i]`); the image column is decoded with PIL per item (the
`datasets.Image` feature decodes on access), the label must be a ClassLabel, whose names are the
class names. lgm_jax's "train" and "test" map to the dataset's splits as for tfds ("test" falls
back to "validation" or "val"). `datasets` is an optional extra, imported only here.
"""

from __future__ import annotations

import os

import numpy as np

from lgm_jax.data.sources import CorruptImage, Dataset, to_rgb
from lgm_jax.errors import InputError

PREFIX = "hf:"
# our split -> the dataset's split names, in order of preference
SPLITS = {"train": ("train",), "test": ("test", "validation", "val")}
IMAGE_NAMES = ("image", "img")
LABEL_NAMES = ("label", "labels")


def _import_datasets():
    try:
        import datasets
    except ImportError as e:
        raise InputError(
            'hf: datasets need the Hugging Face datasets package: pip install -e ".[hf]"'
        ) from e
    return datasets


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def load_splits(target: str, data_dir: str | None = None) -> dict:
    """{split name: datasets.Dataset} of a saved directory or a cached name."""
    datasets = _import_datasets()
    path = os.path.expanduser(target)
    saved = any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))
    try:
        if saved:
            loaded = datasets.load_from_disk(path)
        else:
            loaded = datasets.load_dataset(path, cache_dir=data_dir)
    except Exception as e:  # noqa: BLE001 - datasets raises many types for "not found"
        cache = data_dir or datasets.config.HF_DATASETS_CACHE
        raise InputError(
            f"{PREFIX}{target}: neither a dataset saved with save_to_disk nor a dataset found "
            f"by load_dataset in the cache {cache} (offline: HF_HUB_OFFLINE=1) ({_one_line(e)})"
        ) from e
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    return dict(loaded)


def split_name(found, split: str, name: str) -> str:
    """The dataset's split for lgm_jax's `split` ("train", "test")."""
    for candidate in SPLITS.get(split, (split,)):
        if candidate in found:
            return candidate
    raise InputError(
        f"{name} has no {' / '.join(SPLITS.get(split, (split,)))} split for lgm_jax's "
        f"{split!r}; splits found: {', '.join(found) or 'none'}"
    )


def columns(features, name: str) -> tuple[str, str]:
    """(image column, label column) of a split's features; the label must be a ClassLabel."""
    datasets = _import_datasets()
    cols = list(features)
    image = next((c for c in cols if isinstance(features[c], datasets.Image)), None)
    image = image or next((c for c in cols if c in IMAGE_NAMES), None)
    if image is None:
        raise InputError(f"{name} has no image column (a datasets.Image feature, or "
                         f"'image'/'img'); columns found: {', '.join(cols)}")  # fmt: skip
    label = next((c for c in cols if c in LABEL_NAMES), None)
    label = label or next((c for c in cols if isinstance(features[c], datasets.ClassLabel)), None)
    if label is None:
        raise InputError(f"{name} has no label column ('label'/'labels' or a ClassLabel); "
                         f"columns found: {', '.join(cols)}")  # fmt: skip
    if not isinstance(features[label], datasets.ClassLabel):
        raise InputError(
            f"{name}: column {label!r} is {features[label]!r}, not a ClassLabel; cast it first, "
            f'e.g. ds = ds.cast_column("{label}", ClassLabel(names=[...])) and save_to_disk again'
        )
    return image, label


class HfSource:
    """A split of a `datasets.Dataset`: source[i] -> {"image": uint8 [H, W, 3], "label": int}.
    Picklable (a datasets.Dataset pickles as references to its memory-mapped files)."""

    def __init__(self, data, image_column: str, label_column: str, where: str):
        self.data, self.image_column, self.label_column = data, image_column, label_column
        self.where = where

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        try:
            ex = self.data[int(i)]  # the Image feature decodes here, with PIL
            image = ex[self.image_column]
            if image is None:
                raise ValueError("no image")
            if hasattr(image, "convert"):  # a PIL image (any mode)
                image = np.asarray(image.convert("RGB"))
            image = to_rgb(image)
        except (OSError, ValueError, SyntaxError, CorruptImage) as e:
            raise CorruptImage(f"{self.where}[{int(i)}]: {e}") from e
        return {"image": image, "label": int(ex[self.label_column])}


def hf_dataset(name: str, data_dir: str | None = None) -> Dataset:
    """The `Dataset` for `hf:<path or name>` (see the module docstring); named `name`."""
    target = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    splits = load_splits(target, data_dir)
    first = splits[split_name(splits, "train", name)] if "train" in splits else None
    first = first if first is not None else next(iter(splits.values()), None)
    if first is None:
        raise InputError(f"{name} has no splits")
    image_column, label_column = columns(first.features, name)
    class_names = tuple(first.features[label_column].names)

    def opener(split):
        found = split_name(splits, split, name)
        data = splits[found]
        image, label = columns(data.features, f"{name} ({found})")
        return HfSource(data, image, label, f"{name}/{found}")

    return Dataset(name, len(class_names), class_names, ("train", "test"), opener)
