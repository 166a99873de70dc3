"""A cache of frozen-backbone features of augmented real training images.

The real side of an LGM step only needs features z = phi(augment(x)) of real images, and the
backbone is frozen, so they can be computed once: M views of every training image, each view a
random 256 px crop (the training pipeline's crop) followed by the step's own augmentation
(`augment.sample` / `augment.apply`, mode "train") and normalisation (`lgm.real_features`). A step
then draws (image, view) pairs from the cache instead of running the backbone on real images.

Layout of a cache directory:
  meta.json             dataset, split, num_images, backbone name + parameter fingerprint, res,
                        views, seed, augmentation, mean/std, dtype, shard_size, feature_dim
  labels_{s:06d}.npy    int32 [S] labels of shard s (-1 for a corrupt image, never sampled)
  feats_{s:06d}.npy     float16/32 [M, S, F] features of shard s (images s*S .. s*S + S - 1)
Shards are written atomically, feats last, so a restarted build skips finished shards. Shard s is
built by process s % process_count; within a process the batch is split over the local devices on
a 1-D ('data',) mesh.

Draws: view v of image i uses the crop offsets of np.random.default_rng([seed, v, i]) and the
augmentation draws `augment.sample(view_key(seed, v, s), S)[i - s*S]`, so a view can be rebuilt
exactly (the tests do, and compare probe gradients).

Command:
  python -m lgm_jax.feature_cache --dataset imagenet100 --data_dir ~/tensorflow_datasets \
      --backbone dinov2:/ckpt/dinov2-base --views 10 --out /caches/in100_dinov2b
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import hashlib
import importlib
import json
import logging
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lgm_jax import augment, lgm
from lgm_jax.data import pipeline, sources

log = logging.getLogger(__name__)
FORMAT = 1
# Settings a cache must share with the run that uses it (checked by `open(expect=...)`).
IDENTITY_KEYS = ("dataset", "split", "backbone", "fingerprint", "res", "views")


class CacheMismatch(ValueError):
    """A cache built with other settings than the ones asked for."""


def fingerprint(params) -> str:
    """A short hash of a parameter tree's key paths, shapes, dtypes and values."""
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}:{a.shape}:{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def view_key(seed: int, view: int, shard: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), view), shard)


def crop_view(image: np.ndarray, res: int, seed: int, view: int, index: int) -> np.ndarray:
    """The random res x res crop of view `view` of image `index` (already resized to res)."""
    return pipeline.random_crop(image, res, np.random.default_rng([seed, view, int(index)]))


def shard_path(out: str, kind: str, shard: int) -> str:
    return os.path.join(out, f"{kind}_{shard:06d}.npy")


def _save(path: str, array: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def _read_resized(source, i, res):
    ex = pipeline.read_or_skip(source, i)
    if ex is None:
        return None, -1
    return pipeline.resize_shorter(ex["image"], res), ex["label"]


def build(
    out: str,
    ds: sources.Dataset,
    features: lgm.FeatureFn,
    params,
    backbone: str,
    *,
    views: int = 10,
    res: int = 256,
    split: str = "train",
    aug: augment.AugmentConfig | None = None,
    mean: Sequence[float] = lgm.IMAGENET_MEAN,
    std: Sequence[float] = lgm.IMAGENET_STD,
    shard_size: int = 512,
    seed: int = 0,
    dtype: str = "float16",
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 8,
    progress: bool = True,
) -> dict:
    """Compute (or finish computing) the cache in `out`; returns its metadata.

    `features(params, images [B, 224, 224, 3] normalised) -> [B, F]` is the frozen backbone.
    `aug` defaults to the step's training augmentation, AugmentConfig(mode="train").
    `shard_size` must be a multiple of the number of local devices.
    """
    aug = augment.AugmentConfig(mode="train") if aug is None else aug
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    devices = jax.local_devices()
    if shard_size % len(devices):
        raise ValueError(f"shard_size {shard_size} is not a multiple of {len(devices)} devices")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    source = ds.source(split)
    n = len(source)
    x = jax.ShapeDtypeStruct((1, aug.input_res, aug.input_res, 3), np.float32)
    feature_dim = int(jax.eval_shape(features, params, x).shape[-1])
    meta = {
        "format": FORMAT,
        "dataset": ds.name,
        "split": split,
        "num_images": n,
        "num_classes": ds.num_classes,
        "backbone": backbone,
        "fingerprint": fingerprint(params),
        "res": res,
        "views": views,
        "seed": seed,
        "augment": dataclasses.asdict(aug),
        "mean": list(mean),
        "std": list(std),
        "dtype": dtype,
        "shard_size": shard_size,
        "feature_dim": feature_dim,
    }
    meta = json.loads(json.dumps(meta))  # tuples -> lists, as a reloaded meta.json has them
    _write_or_check_meta(out, meta, process_index)

    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    batch_sharding = NamedSharding(mesh, P("data"))
    cfg = lgm.StepConfig(num_classes=ds.num_classes, augment=aug, mean=tuple(mean), std=tuple(std))

    @functools.partial(jax.jit, out_shardings=batch_sharding)
    def compute(params, images, key):
        draws = augment.sample(key, images.shape[0], aug)
        draws = jax.lax.with_sharding_constraint(draws, batch_sharding)
        return lgm.real_features(features, params, images, draws, cfg)

    params = jax.device_put(params, NamedSharding(mesh, P()))
    num_shards = -(-n // shard_size)
    mine = [s for s in range(num_shards) if s % process_count == process_index]
    todo = [s for s in mine if not os.path.exists(shard_path(out, "feats", s))]
    bar = _progress(len(mine), len(mine) - len(todo), progress, f"features of {ds.name}")
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        for s in todo:
            idx = np.arange(s * shard_size, min(n, (s + 1) * shard_size))
            decoded = list(pool.map(lambda i: _read_resized(source, i, res), idx))
            labels = np.asarray([label for _, label in decoded], np.int32)
            pending = []
            for v in range(views):
                images = np.zeros((shard_size, res, res, 3), np.uint8)
                for row, (image, _) in enumerate(decoded):
                    if image is not None:
                        images[row] = crop_view(image, res, seed, v, idx[row])
                images = jax.device_put(images, batch_sharding)
                pending.append(compute(params, images, view_key(seed, v, s)))  # async dispatch
            feats = np.stack([np.asarray(f)[: len(idx)] for f in pending]).astype(dtype)
            _save(shard_path(out, "labels", s), labels)
            _save(shard_path(out, "feats", s), feats)
            bar.update(1)
    bar.close()
    return meta


def _write_or_check_meta(out: str, meta: dict, process_index: int) -> None:
    path = os.path.join(out, "meta.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        if diff:
            raise CacheMismatch(
                f"{out} holds a feature cache built with other settings (cache, now): {diff}; "
                "delete it or choose another --out"
            )
        return
    os.makedirs(out, exist_ok=True)
    if process_index == 0:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, path)


def _progress(total, initial, enabled, desc):
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        return _NoBar()
    return tqdm(total=total, initial=initial, desc=desc, unit="shard")


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


class FeatureCache:
    """A finished cache, memory-mapped: `feats[s]` [M, S, F] per shard, `labels` int32 [N]."""

    def __init__(self, path: str, meta: dict, feats: list[np.ndarray], labels: np.ndarray):
        self.path, self.meta, self.feats, self.labels = path, meta, feats, labels
        self.valid = np.flatnonzero(labels >= 0)  # corrupt images are never sampled
        self._perms: dict[int, np.ndarray] = {}

    @classmethod
    def open(cls, path: str, expect: dict | None = None) -> FeatureCache:
        """Open a cache, refusing one whose settings differ from `expect` (any meta.json keys,
        e.g. dataset=, backbone=, fingerprint=, res=, views=)."""
        meta_path = os.path.join(path, "meta.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(
                f"no feature cache in {path} (no meta.json); build one with "
                "python -m lgm_jax.feature_cache --dataset ... --backbone ... --out " + path
            )
        with open(meta_path) as f:
            meta = json.load(f)
        for key, want in (expect or {}).items():
            have = meta.get(key)
            if isinstance(want, (tuple, list)):
                want = list(want)
            if have != want:
                raise CacheMismatch(
                    f"feature cache {path} was built with {key}={have!r} but this run needs "
                    f"{key}={want!r}; build a cache for these settings "
                    "(python -m lgm_jax.feature_cache) or point to the right one"
                )
        num_shards = -(-meta["num_images"] // meta["shard_size"])
        missing = [s for s in range(num_shards) if not os.path.exists(shard_path(path, "feats", s))]
        if missing:
            raise FileNotFoundError(
                f"feature cache {path} is incomplete: {len(missing)} of {num_shards} shards "
                f"missing (first: {missing[0]}); rerun the same build command to finish it"
            )
        feats = [np.load(shard_path(path, "feats", s), mmap_mode="r") for s in range(num_shards)]
        labels = np.concatenate([np.load(shard_path(path, "labels", s)) for s in range(num_shards)])
        return cls(path, meta, feats, labels)

    @property
    def num_images(self) -> int:
        return len(self.labels)

    @property
    def num_views(self) -> int:
        return self.meta["views"]

    @property
    def feature_dim(self) -> int:
        return self.meta["feature_dim"]

    def gather(self, views, images) -> np.ndarray:
        """float32 [n, F] features of (view, image) pairs."""
        views, images = np.asarray(views), np.asarray(images)
        s = self.meta["shard_size"]
        out = np.empty((len(images), self.feature_dim), np.float32)
        shard, row = np.divmod(images, s)
        for k in np.unique(shard):
            sel = np.flatnonzero(shard == k)
            out[sel] = self.feats[k][views[sel], row[sel]]
        return out

    def load_all(self) -> tuple[np.ndarray, np.ndarray]:
        """Everything in memory: features [M, N, F] (stored dtype) and labels int32 [N]."""
        return np.concatenate([np.asarray(f) for f in self.feats], axis=1), self.labels

    def _permutation(self, seed: int, epoch: int) -> np.ndarray:
        key = (seed, epoch)
        if key not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(next(iter(self._perms)))
            rng = np.random.default_rng([seed, epoch])
            self._perms[key] = self.valid[rng.permutation(len(self.valid))]
        return self._perms[key]

    def sample(self, rng_or_seed, step: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The real side of step `step`: features float32 [n, F] and labels int32 [n].

        Images come from shuffled epochs over the valid images (draw k of step t is position
        t*n + k of the concatenated epoch permutations), each with a uniformly random view; all
        a function of (seed, step). `rng_or_seed` is an int or a jax PRNG key.
        """
        seed = _as_seed(rng_or_seed)
        pos = int(step) * n + np.arange(n)
        epoch, k = np.divmod(pos, len(self.valid))
        images = np.empty(n, np.int64)
        for e in np.unique(epoch):
            sel = epoch == e
            images[sel] = self._permutation(seed, int(e))[k[sel]]
        views = np.random.default_rng([seed, 1 << 30, int(step)]).integers(0, self.num_views, n)
        return self.gather(views, images), self.labels[images]


def _as_seed(rng_or_seed) -> int:
    if isinstance(rng_or_seed, (int, np.integer)):
        return int(rng_or_seed)
    key = rng_or_seed
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    return int(np.asarray(jax.random.bits(key, (), np.uint32)))


# ---------------------------------------------------------------- command line


def load_backbone(spec: str, weights: str | None = None, input_res: int = 224):
    """(features, params, name) from a spec: a registry name such as "dinov2_vitb" (with
    `weights`, a directory of converted weights; random weights without), "dinov2:<dir>" (a
    transformers DINOv2 directory), "tiny-random" (a 1-block random ViT for smoke runs), or
    "factory:<module>:<function>[:arg]" (a function returning (features, params, name))."""
    from lgm_jax.models import dinov2, registry, vit

    if spec in registry.NAMES:
        backbone, params = registry.build(spec, weights or None, input_res=input_res)
        return registry.features_fn(backbone), params, spec
    kind, _, rest = spec.partition(":")
    if kind == "dinov2":
        cfg, params = dinov2.load(rest)
        model = vit.ViT(cfg)
        name = "dinov2:" + os.path.basename(os.path.normpath(rest))
        return (lambda p, x: model.apply({"params": p}, x)), params, name
    if kind == "tiny-random":
        cfg = dinov2.variant("S/14").replace(
            width=32, depth=1, heads=2, mlp_dim=64, pos_grid=4, input_res=224
        )
        model = vit.ViT(cfg)
        params = model.init(jax.random.key(0), np.zeros((1, 224, 224, 3), np.float32))["params"]
        return (lambda p, x: model.apply({"params": p}, x)), params, "tiny-random"
    if kind == "factory":
        module, _, fn = rest.partition(":")
        fn, _, arg = fn.partition(":")
        f = getattr(importlib.import_module(module), fn)
        return f(arg) if arg else f()
    raise ValueError(
        f"unknown backbone spec {spec!r}: use a registry name ({', '.join(registry.NAMES)}), "
        "dinov2:<dir>, tiny-random or factory:..."
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", required=True, help="a lgm_jax.data.get_dataset name")
    p.add_argument("--data_dir", default=None, help="tfds data directory")
    p.add_argument(
        "--backbone", required=True, help="registry name | dinov2:<dir> | tiny-random | factory:..."
    )
    p.add_argument("--weights", default=None, help="converted weights for a registry name")
    p.add_argument("--views", type=int, default=10, help="augmented views M per image")
    p.add_argument("--out", required=True, help="cache directory (resumable)")
    p.add_argument("--split", default="train")
    p.add_argument("--res", type=int, default=256, help="crop size before augmentation")
    p.add_argument("--input_res", type=int, default=224, help="backbone input size")
    p.add_argument("--shard_size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--noise_mean", type=float, default=0.0)
    p.add_argument("--noise_std", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=8, help="image decoding threads")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    features, params, name = load_backbone(a.backbone, a.weights, a.input_res)
    aug = augment.AugmentConfig(
        mode="train", input_res=a.input_res, noise_mean=a.noise_mean, noise_std=a.noise_std
    )
    meta = build(
        a.out,
        sources.get_dataset(a.dataset, a.data_dir),
        features,
        params,
        name,
        views=a.views,
        res=a.res,
        split=a.split,
        aug=aug,
        shard_size=a.shard_size,
        seed=a.seed,
        dtype=a.dtype,
        num_threads=a.threads,
    )
    skipped = pipeline.skipped_images()
    log.info(
        "cache %s: %d images x %d views, backbone %s (%s), %d corrupt images skipped",
        a.out,
        meta["num_images"],
        meta["views"],
        name,
        meta["fingerprint"],
        skipped,
    )


if __name__ == "__main__":
    main()
