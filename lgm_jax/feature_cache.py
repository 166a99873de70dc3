"""The real-feature cache: frozen-backbone features of augmented real training images, built once
(`build`, the command below) and drawn from by a run with real_input="features" (`FeatureCache`).

The real side of an LGM step only needs features z = phi(augment(x)) of real images, and the
backbone is frozen, so they can be computed once: M views of every training image, each view a
random syn_res crop (the training pipeline's crop) followed by the step's own augmentation
(`augment.sample` / `augment.apply`, mode "train") and normalisation (`lgm.real_features`). A step
then draws (image, view) pairs from the cache instead of running the backbone on real images.
The augmentation and normalisation come from a run config through config_base's one translation
(`settings` below), so a cache's views are the views a run with those settings would compute.

Layout of a cache directory:
  meta.json             format, dataset, split, num_images, backbone name + parameter fingerprint,
                        syn_res, views, seed, augment (with input_res), mean/std, dtype,
                        shard_size, feature_dim
  labels_{s:06d}.npy    int32 [S] labels of shard s (-1 for a corrupt image, never sampled)
  feats_{s:06d}.npy     float16/32 [M, S, F] features of shard s (images s*S .. s*S + S - 1)
Shards are written atomically, feats last, so a restarted build skips finished shards. Shard s is
built by process s % process_count (several hosts: `--distributed`, the same command on each,
with --out on storage they share); within a process the batch is split over the local devices on
a 1-D ('data',) mesh.

Draws: view v of image i uses the crop offsets of np.random.default_rng([seed, v, i]) and the
augmentation draws `augment.sample(view_key(seed, v, s), S)[i - s*S]`, so a view can be rebuilt
exactly (the tests do, and compare probe gradients).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import os
import sys

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lgm_jax import augment, config_base, errors, lgm
from lgm_jax.data import pipeline, sources
from lgm_jax.models import registry

log = logging.getLogger(__name__)
COMMAND = "python -m lgm_jax.feature_cache"
FORMAT = 2  # 2: syn_res (was res); caches of format 1 must be rebuilt
# Settings a cache must share with the run that uses it (checked by `open(expect=...)`).
IDENTITY_KEYS = ("dataset", "split", "backbone", "fingerprint", "syn_res", "views")
DTYPES = ("float16", "float32")


class CacheMismatch(errors.InputError):
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


def settings(
    *, syn_res: int = 256, input_res: int = 224, noise_mean: float = 0.0, noise_std: float = 0.2
) -> ml_collections.ConfigDict:
    """The run config a cache's views follow: config_base.base() with the training augmentation
    and the command's sides and noise (everything else at the run's defaults)."""
    c = config_base.base()
    c.syn_res = syn_res
    c.input_res = input_res
    c.augment.mode = "train"
    c.augment.noise_mean = noise_mean
    c.augment.noise_std = noise_std
    return c


def view_key(seed: int, view: int, shard: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), view), shard)


def crop_view(image: np.ndarray, syn_res: int, seed: int, view: int, index: int) -> np.ndarray:
    """The random syn_res x syn_res crop of view `view` of image `index` (already resized so its
    shorter side is syn_res)."""
    return pipeline.random_crop(image, syn_res, np.random.default_rng([seed, view, int(index)]))


def shard_path(out: str, kind: str, shard: int) -> str:
    return os.path.join(out, f"{kind}_{shard:06d}.npy")


def _save(path: str, array: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def _read_resized(source, i, syn_res):
    ex = pipeline.read_or_skip(source, i)
    if ex is None:
        return None, -1
    return pipeline.resize_shorter(ex["image"], syn_res), ex["label"]


@dataclasses.dataclass(frozen=True)
class _Shards:
    """How a build lays out and draws its shards (the settings the shard loop needs)."""

    out: str
    syn_res: int
    views: int
    seed: int
    shard_size: int
    dtype: str


def build(
    out: str,
    ds: sources.Dataset,
    backbone: registry.Backbone,
    params,
    config: ml_collections.ConfigDict | None = None,
    *,
    name: str | None = None,
    views: int = 10,
    split: str = "train",
    shard_size: int = 512,
    seed: int = 0,
    dtype: str = "float16",
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 8,
    progress: bool = True,
) -> dict:
    """Compute (or finish computing) the cache in `out`; returns its metadata.

    `backbone.features(params, normalised images [B, input_res, input_res, 3]) -> [B, F]` is the
    frozen backbone. `config` (default `settings(input_res=backbone.input_res)`) gives syn_res,
    the augmentation and mean/std, read through config_base.step_config as a run reads them.
    `name` is the backbone name recorded for runs to check (their config.backbone; default
    backbone.name). `shard_size` must be a multiple of the number of local devices.
    """
    config = settings(input_res=backbone.input_res) if config is None else config
    step_cfg = config_base.step_config(config, ds.num_classes)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    devices = jax.local_devices()
    if shard_size % len(devices):
        raise errors.InputError(
            f"--shard-size {shard_size} is not a multiple of the {len(devices)} local devices"
        )
    if dtype not in DTYPES:
        raise errors.InputError(f"dtype must be float16 or float32, got {dtype!r}")
    layout = _Shards(out, config.syn_res, views, seed, shard_size, dtype)
    source = ds.source(split)
    meta = _metadata(ds, split, len(source), backbone, params, name, step_cfg, layout)
    _write_or_check_meta(out, meta, process_index)

    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    batch_sharding = NamedSharding(mesh, P("data"))
    compute = _compute_fn(backbone.features, step_cfg, batch_sharding)
    params = jax.device_put(params, NamedSharding(mesh, P()))
    num_shards = -(-len(source) // shard_size)
    mine = [s for s in range(num_shards) if s % process_count == process_index]
    todo = [s for s in mine if not os.path.exists(shard_path(out, "feats", s))]
    bar = _progress(len(mine), len(mine) - len(todo), progress, f"features of {ds.name}")
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        for s in todo:
            _build_shard(s, source, pool, compute, params, batch_sharding, layout)
            bar.update(1)
    bar.close()
    return meta


def _metadata(ds, split, n, backbone, params, name, step_cfg: lgm.StepConfig, layout: _Shards):
    """meta.json of a cache (as a reloaded meta.json has it: lists, not tuples)."""
    x = jax.ShapeDtypeStruct(
        (1, step_cfg.augment.input_res, step_cfg.augment.input_res, 3), np.float32
    )
    meta = {
        "format": FORMAT,
        "dataset": ds.name,
        "split": split,
        "num_images": n,
        "num_classes": ds.num_classes,
        "backbone": backbone.name if name is None else name,
        "fingerprint": fingerprint(params),
        "syn_res": layout.syn_res,
        "views": layout.views,
        "seed": layout.seed,
        "augment": dataclasses.asdict(step_cfg.augment),
        "mean": list(step_cfg.mean),
        "std": list(step_cfg.std),
        "dtype": layout.dtype,
        "shard_size": layout.shard_size,
        "feature_dim": int(jax.eval_shape(backbone.features, params, x).shape[-1]),
    }
    return json.loads(json.dumps(meta))


def _compute_fn(features: lgm.FeatureFn, step_cfg: lgm.StepConfig, batch_sharding):
    """The jitted features of one view of a shard: (params, uint8 crops [S, syn_res, syn_res, 3],
    key) -> [S, F], the step's own draws, augmentation and normalisation (lgm.real_features)."""

    @functools.partial(jax.jit, out_shardings=batch_sharding)
    def compute(params, images, key):
        draws = augment.sample(key, images.shape[0], step_cfg.augment)
        draws = jax.lax.with_sharding_constraint(draws, batch_sharding)
        return lgm.real_features(features, params, images, draws, step_cfg)

    return compute


def _build_shard(s, source, pool, compute, params, batch_sharding, layout: _Shards) -> None:
    """Read, crop and run the backbone on every view of shard s; write its labels and feats."""
    size = layout.shard_size
    idx = np.arange(s * size, min(len(source), (s + 1) * size))
    decoded = list(pool.map(lambda i: _read_resized(source, i, layout.syn_res), idx))
    labels = np.asarray([label for _, label in decoded], np.int32)
    pending = []
    for v in range(layout.views):
        images = np.zeros((size, layout.syn_res, layout.syn_res, 3), np.uint8)
        for row, (image, _) in enumerate(decoded):
            if image is not None:
                images[row] = crop_view(image, layout.syn_res, layout.seed, v, idx[row])
        images = jax.device_put(images, batch_sharding)
        pending.append(compute(params, images, view_key(layout.seed, v, s)))  # async dispatch
    feats = np.stack([np.asarray(f)[: len(idx)] for f in pending]).astype(layout.dtype)
    _save(shard_path(layout.out, "labels", s), labels)
    _save(shard_path(layout.out, "feats", s), feats)


def _write_or_check_meta(out: str, meta: dict, process_index: int) -> None:
    path = os.path.join(out, "meta.json")
    if os.path.exists(path):
        old = errors.read_json(path, "a feature cache's meta.json", "choose another --out")
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


def _read_meta(path: str) -> dict:
    """A cache's meta.json, refusing a directory without one or a cache of another format."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(
            f"no feature cache in {path} (no meta.json); build one with "
            f"{COMMAND} --dataset ... --backbone ... --out {path}"
        )
    meta = errors.read_json(meta_path, "a feature cache's meta.json", f"rebuild it with {COMMAND}")
    if meta.get("format") != FORMAT:
        raise CacheMismatch(
            f"feature cache {path} has format {meta.get('format')!r}, this lgm_jax reads format "
            f"{FORMAT}; rebuild it with {COMMAND} (same flags, a new --out)"
        )
    return meta


class FeatureCache:
    """A finished cache, memory-mapped: `feats[s]` [M, S, F] per shard, `labels` int32 [N]."""

    def __init__(self, path: str, meta: dict, feats: list[np.ndarray], labels: np.ndarray):
        self.path, self.meta, self.feats, self.labels = path, meta, feats, labels
        self.valid = np.flatnonzero(labels >= 0)  # corrupt images are never sampled
        self._perms: dict[int, np.ndarray] = {}

    @classmethod
    def open(cls, path: str, expect: dict | None = None) -> FeatureCache:
        """Open a cache, refusing one whose settings differ from `expect` (any meta.json keys,
        e.g. dataset=, backbone=, fingerprint=, syn_res=, views=) or of another format."""
        meta = _read_meta(path)
        for key, want in (expect or {}).items():
            have = meta.get(key)
            if isinstance(want, (tuple, list)):
                want = list(want)
            if have != want:
                raise CacheMismatch(
                    f"feature cache {path} was built with {key}={have!r} but this run needs "
                    f"{key}={want!r}; build a cache for these settings ({COMMAND}) or point to "
                    "the right one"
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

DESCRIPTION = f"""\
Build (or finish building) a real-feature cache: M augmented views of every training image run
through a frozen backbone, for a distillation run with --config.real_input=features
--config.feature_cache=DIR. Rerunning the same command resumes; on several hosts run it on every
host with a shared --out.

example:
  {COMMAND} --dataset imagenet100 --data-dir ~/tensorflow_datasets \\
      --backbone dinov2_vitb --weights /ckpt/dinov2_vitb --views 10 --out /caches/in100_dinov2b
"""


def _parser() -> argparse.ArgumentParser:
    p = errors.command_parser("feature_cache", DESCRIPTION)
    p.add_argument("--dataset", required=True, help="a lgm_jax.data.get_dataset name")
    p.add_argument("--data-dir", default=None, help="tfds data directory or image-folder root")
    p.add_argument(
        "--backbone",
        required=True,
        help=f"a registry name ({', '.join(registry.NAMES)}) or factory:<module>:<function>[:<arg>]"
        " (the run's config.backbone: the cache records this name)",
    )
    p.add_argument("--weights", default=None, help="converted weights (random weights without)")
    p.add_argument("--views", type=errors.count, default=10, help="augmented views M per image")
    p.add_argument("--out", required=True, help="cache directory (resumable)")
    p.add_argument("--split", default="train")
    p.add_argument(
        "--syn-res", type=errors.count, default=256, help="crop side before augmentation"
    )
    p.add_argument("--input-res", type=errors.count, default=224, help="backbone input side")
    p.add_argument("--shard-size", type=errors.count, default=512, help="images per shard file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float16", choices=DTYPES, help="stored features")
    p.add_argument("--noise-mean", type=errors.finite, default=0.0)
    p.add_argument("--noise-std", type=errors.non_negative, default=0.2)
    p.add_argument("--threads", type=errors.count, default=8, help="image decoding threads")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="several hosts: jax.distributed.initialize() first, then each builds its shards",
    )
    return p


def _run(a: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO)
    if a.distributed:  # the coordinator from the cluster's environment, as the run's
        jax.distributed.initialize()
    config = settings(
        syn_res=a.syn_res, input_res=a.input_res, noise_mean=a.noise_mean, noise_std=a.noise_std
    )
    ds = sources.get_dataset(a.dataset, a.data_dir)  # before the backbone: a typo fails fast
    backbone, params = registry.build(a.backbone, a.weights or None, input_res=a.input_res)
    meta = build(
        a.out,
        ds,
        backbone,
        params,
        config,
        name=a.backbone,
        views=a.views,
        split=a.split,
        shard_size=a.shard_size,
        seed=a.seed,
        dtype=a.dtype,
        num_threads=a.threads,
    )
    log.info(
        "cache %s: %d images x %d views, backbone %s (%s), %d corrupt images skipped",
        a.out,
        meta["num_images"],
        meta["views"],
        meta["backbone"],
        meta["fingerprint"],
        pipeline.skipped_images(),
    )


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    return errors.run_command(lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
