"""grain pipelines over a `Dataset`: infinite shuffled training batches and finite eval passes.

Training (SPEC "Datasets", "Differentiable augmentation"): each image's shorter side is resized to
`crop` (bilinear, antialiased) and a random crop x crop window is taken; batches come from shuffled
epochs with the remainder dropped (uniform over the data, not class-balanced). Every batch is a
pure function of (seed, process, batch number), so a run is deterministic and a grain iterator
restored with `set_state` continues exactly where it stopped.

Evaluation: shorter side resized to `resize`, centre crop `crop`; every process yields the same
number of fixed-size batches, the last padded, with `mask` marking the real rows, so a jitted
evaluation never recompiles and all processes step together.

Processes read disjoint strided shards (`shard_indices`). A corrupt image is skipped: in training
its slot takes the next readable image of the epoch's order, in evaluation its row is masked out;
either way it is counted and logged once (`skipped_images()`).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading

import numpy as np
from PIL import Image

from lgm_jax.data.sources import CorruptImage, Dataset
from lgm_jax.preprocess import centre_crop

log = logging.getLogger(__name__)

_bad_lock = threading.Lock()
# id(source) -> (source, indices of its images found corrupt). The source is held so that its
# id cannot be reused by another source while the entry exists.
_bad: dict[int, tuple[object, set[int]]] = {}


def skipped_images() -> int:
    """How many distinct corrupt images the pipelines of this process have skipped."""
    with _bad_lock:
        return _count_bad()


def _count_bad() -> int:  # under _bad_lock
    return sum(len(indices) for _, indices in _bad.values())


def read_or_skip(source, i: int) -> dict | None:
    """source[i], or None (counted, logged once) if the image is corrupt."""
    if int(i) in _bad.get(id(source), (None, ()))[1]:
        return None
    try:
        return source[int(i)]
    except CorruptImage as e:
        with _bad_lock:
            _bad.setdefault(id(source), (source, set()))[1].add(int(i))
            n = _count_bad()
        log.warning("skipping a corrupt image (%d skipped so far): %s", n, e)
        return None


def resize_shorter(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 with the shorter side `size` (PIL bilinear; PIL widens the
    filter when it shrinks, i.e. antialiases)."""
    h, w = image.shape[:2]
    if min(h, w) == size:
        return image
    if h <= w:
        new_h, new_w = size, max(size, round(w * size / h))
    else:
        new_h, new_w = max(size, round(h * size / w)), size
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))


def random_crop(image: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    y, x = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
    return image[y : y + crop, x : x + crop]


def shard_indices(n: int, process_index: int, process_count: int) -> np.ndarray:
    """The indices process `process_index` reads: i = process_index mod process_count."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return np.arange(process_index, n, process_count)


class TrainBatches:
    """Batch k -> {"image": uint8 [B, crop, crop, 3], "label": int32 [B], "index": int32 [B]}.

    Epoch e = k // batches_per_epoch is a permutation of this process's shard seeded by
    (seed, process, e); batch j of it takes positions [jB, (j+1)B) and the rest is dropped.
    A crop's offsets are drawn from (seed, process, k, row). The images of a batch are read,
    decoded and cropped by `threads` threads (PIL and the record readers release the GIL);
    the batch does not depend on how many.
    """

    def __init__(self, source, indices, batch_size, seed, crop, process_index=0, threads=0):
        self.source, self.indices = source, np.asarray(indices)
        self.batch_size, self.seed, self.crop = batch_size, seed, crop
        self.process_index = process_index
        self.threads = threads or min(32, os.cpu_count() or 1)
        self.per_epoch = len(self.indices) // batch_size
        if self.per_epoch == 0:
            raise ValueError(
                f"batch_size {batch_size} is larger than this process's {len(self.indices)} "
                "training images"
            )
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self):  # picklable for grain's worker processes (num_workers > 0)
        state = dict(self.__dict__)
        del state["_lock"], state["_perms"]
        state.pop("_pool", None)
        state.pop("_pool_pid", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, _perms={}, _lock=threading.Lock())

    def _map(self, fn, items):
        if self.threads <= 1 or len(items) <= 1:
            return [fn(x) for x in items]
        with self._lock:
            # One pool per process: a forked worker (grain's mp_prefetch) must not reuse the
            # parent's, whose threads it does not have.
            if getattr(self, "_pool_pid", None) != os.getpid():
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.threads, thread_name_prefix="decode"
                )
                self._pool_pid = os.getpid()
        return list(self._pool.map(fn, items))

    def permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch not in self._perms:
                if len(self._perms) > 4:
                    self._perms.pop(min(self._perms))
                rng = np.random.default_rng([self.seed, self.process_index, epoch])
                self._perms[epoch] = self.indices[rng.permutation(len(self.indices))]
            return self._perms[epoch]

    def __call__(self, k: int) -> dict:
        epoch, j = divmod(int(k), self.per_epoch)
        order = self.permutation(epoch)
        b = self.batch_size
        # Replacements for corrupt images: the epoch's dropped tail first, then the rest.
        spare = iter(np.concatenate([order[(j + 1) * b :], order[: j * b]]))

        def load(row_and_index):
            row, i = row_and_index
            ex = read_or_skip(self.source, i)
            if ex is None:
                return None
            rng = np.random.default_rng([self.seed, self.process_index, 1 << 30, int(k), row])
            return random_crop(resize_shorter(ex["image"], self.crop), self.crop, rng), ex, i

        loaded = self._map(load, list(enumerate(order[j * b : (j + 1) * b])))
        images, labels, index = [], [], []
        for row, got in enumerate(loaded):
            while got is None:  # rare: fill the slot in order, from the spares
                i = next(spare, None)
                if i is None:
                    raise RuntimeError("every image of this process's shard is corrupt")
                got = load((row, i))
            image, ex, i = got
            images.append(image)
            labels.append(ex["label"])
            index.append(i)
        return {
            "image": np.stack(images),
            "label": np.asarray(labels, np.int32),
            "index": np.asarray(index, np.int32),
        }


def train_iterator(
    ds: Dataset,
    batch_size: int,
    *,
    seed: int,
    crop: int = 256,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    num_threads: int = 4,
    decode_threads: int = 0,
    split: str = "train",
):
    """An infinite grain iterator of this process's training batches.

    Yields {"image": uint8 [B, crop, crop, 3], "label": int32 [B], "index": int32 [B]} with
    B = batch_size (per process) and "index" the image's position in the split. Supports
    `get_state()` / `set_state(state)` (a small dict) for checkpointing. `num_workers` > 0 decodes
    in that many worker processes (grain mp_prefetch); `decode_threads` decode one batch's
    images (0: min(32, CPUs)).
    """
    source = ds.source(split)
    batches = TrainBatches(
        source,
        shard_indices(len(source), process_index, process_count),
        batch_size,
        seed,
        crop,
        process_index,
        threads=decode_threads,
    )
    import grain  # here, so that TrainBatches alone works without it

    mds = grain.MapDataset.range(batches.per_epoch).repeat(None)
    mds = mds.map_with_index(lambda k, _: batches(k))
    ids = mds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=8))
    if num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; a library caller
            flags.FLAGS.mark_as_parsed()  # (no absl.app.run) has not parsed them
        ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(ids)


def read_batch(source, indices, *, crop: int, resize: int, mask=None, crop_seed=None) -> dict:
    """{"image": uint8 [B, crop, crop, 3], "label": int32 [B], "mask": bool [B]} of source[i] for
    the B given indices: shorter side resized to `resize`, then a centre crop `crop`, or with
    `crop_seed` (a tuple of ints) a random one drawn from (*crop_seed, i). Rows whose `mask` is
    False are not read; they and corrupt images are zero with mask False. A source with groups
    (`source.groups`, int [N]) adds "group": int32 [B] (0 where mask is False)."""
    b = len(indices)
    images = np.zeros((b, crop, crop, 3), np.uint8)
    labels = np.zeros((b,), np.int32)
    ok = np.zeros((b,), bool)
    for row, i in enumerate(indices):
        if mask is not None and not mask[row]:
            continue
        ex = read_or_skip(source, i)
        if ex is not None:
            image = resize_shorter(ex["image"], resize)
            if crop_seed is None:
                images[row] = centre_crop(image, crop)
            else:
                rng = np.random.default_rng([*crop_seed, int(i)])
                images[row] = random_crop(image, crop, rng)
            labels[row], ok[row] = ex["label"], True
    batch = {"image": images, "label": labels, "mask": ok}
    groups = getattr(source, "groups", None)
    if groups is not None:
        batch["group"] = np.where(ok, groups[np.asarray(indices, np.int64)], 0).astype(np.int32)
    return batch


class EvalBatches:
    """Batch k -> {"image": uint8 [B, crop, crop, 3], "label": int32 [B], "mask": bool [B]}
    (and "group": int32 [B] when the source has groups; see `read_batch`)."""

    def __init__(self, source, indices, batch_size, crop, resize):
        self.source, self.indices = source, np.asarray(indices)
        self.batch_size, self.crop, self.resize = batch_size, crop, resize

    def __call__(self, k: int) -> dict:
        b = self.batch_size
        idx = self.indices[k * b : (k + 1) * b]
        idx = np.concatenate([idx, np.zeros((b - len(idx),), idx.dtype)])
        mask = np.arange(b) < len(self.indices) - k * b
        return read_batch(self.source, idx, crop=self.crop, resize=self.resize, mask=mask)


def num_eval_batches(n: int, batch_size: int, process_count: int = 1) -> int:
    """Batches per process of an eval pass: the same on every process."""
    per_process = -(-n // process_count)
    return -(-per_process // batch_size)


def eval_iterator(
    ds: Dataset,
    split: str = "test",
    batch_size: int = 256,
    *,
    crop: int = 224,
    resize: int = 256,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 4,
):
    """One pass over this process's shard of `split` in fixed-size batches (see `EvalBatches`);
    padded rows have mask False (and zero image and label)."""
    if resize < crop:
        raise ValueError(f"resize ({resize}) must be at least the crop ({crop})")
    source = ds.source(split)
    batches = EvalBatches(
        source, shard_indices(len(source), process_index, process_count), batch_size, crop, resize
    )
    n = num_eval_batches(len(source), batch_size, process_count)
    import grain

    mds = grain.MapDataset.range(n).map(batches)
    return iter(mds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads)))


def load_split_arrays(ds: Dataset, split: str, crop: int = 224, resize: int = 256, batch_size=256):
    """A whole split in memory (small datasets): uint8 [N, crop, crop, 3] and int32 [N] (corrupt
    images left out)."""
    images, labels = [], []
    for batch in eval_iterator(ds, split, batch_size, crop=crop, resize=resize):
        images.append(batch["image"][batch["mask"]])
        labels.append(batch["label"][batch["mask"]])
    return np.concatenate(images), np.concatenate(labels)
