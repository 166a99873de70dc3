"""The paper's linear-probe protocol as one compiled program: train, then test.

Training (SPEC "Evaluation protocol"): a new probe W [C, F] ~ N(0, 0.01^2), b = 0 on frozen
backbone features; batch B = min(100, N); every step flips and random-resized-crops each image
to the backbone resolution (augmentation mode "eval", no noise), normalises it and takes its
features; mean cross-entropy; Adam (PyTorch's: eps outside the square root) with
lr = 1e-3 * B / 256, no weight decay; a cosine schedule over the epochs stepped per epoch, so the
learning rate is constant within an epoch: lr_e = lr (1 + cos(pi e / E)) / 2 for e = 0..E-1.
Each epoch visits a fresh permutation of the N images in ceil(N / B) batches; the last batch is
padded to B and masked (PyTorch's DataLoader with drop_last=False), so every shape is static.

The whole run is one `jit`: a `lax.scan` over epochs holding a `lax.scan` over the batches of the
epoch, and `vmap` over seeds. Seed s derives every draw from `fold_in(rng, s)`: its probe init,
its shuffles (`fold_in(k_shuffle, epoch)`) and its augmentations (`fold_in(k_aug, step)`).
Backbone parameters are an argument of the compiled program, never a baked-in constant.

Two modes:
  * exact: the backbone runs inside the loop on freshly augmented images (the paper's protocol);
  * fast: features of V augmented views of every image are computed once (shared by all seeds),
    and each step draws a view index per example; the probe loop then touches features only.

Testing: test images (already the backbone's resolution, or larger and then centre-cropped)
come in fixed-size padded batches with a mask; one jitted function computes their features once
and scores the probes of every seed on them (top-1 and top-5 counts).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lgm_jax import augment, groups, lgm
from lgm_jax.prefetch import prefetch_map
from lgm_jax.preprocess import IMAGENET_MEAN, IMAGENET_STD, centre_crop, normalize, to_unit

log = logging.getLogger(__name__)

# features(backbone_params, normalised images [B, H, W, 3]) -> [B, F] float32
FeatureFn = Callable[[object, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """Static settings of probe training (hashable: part of the jit cache key)."""

    num_classes: int
    epochs: int = 1000
    batch_size: int = 100  # the batch is min(batch_size, N)
    lr: float | None = None  # None: 1e-3 * batch / 256 (the paper's rule)
    probe_std: float = 0.01
    augment: augment.AugmentConfig = augment.AugmentConfig(mode="eval")
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    views: int = 0  # 0: exact mode; V > 0: fast mode with V precomputed views per image

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(m) for m in self.std))
        if self.augment.mode == "train":
            raise ValueError("probe training must not add noise: use AugmentConfig(mode='eval')")
        if self.epochs < 1 or self.batch_size < 1 or self.views < 0:
            raise ValueError(f"epochs and batch_size must be >= 1 and views >= 0: {self}")

    @property
    def mode(self) -> str:
        return "fast" if self.views else "exact"

    def batch(self, n: int) -> int:
        return min(self.batch_size, n)

    def steps_per_epoch(self, n: int) -> int:
        return -(-n // self.batch(n))

    def base_lr(self, n: int) -> float:
        return self.lr if self.lr is not None else 1e-3 * self.batch(n) / 256

    def schedule(self, n: int):
        """Learning rate as a function of the epoch index."""
        return optax.cosine_decay_schedule(self.base_lr(n), self.epochs)

    def settings(self, n: int) -> dict:
        """Every setting, as written to eval.json."""
        return {
            "mode": self.mode,
            "epochs": self.epochs,
            "batch": self.batch(n),
            "steps_per_epoch": self.steps_per_epoch(n),
            "lr": self.base_lr(n),
            "schedule": "cosine over epochs, stepped per epoch",
            "optimizer": "adam(b1=0.9, b2=0.999, eps=1e-8), no weight decay",
            "probe_std": self.probe_std,
            "augment": dataclasses.asdict(self.augment),
            "mean": list(self.mean),
            "std": list(self.std),
            "views": self.views,
        }


Probe = tuple[jax.Array, jax.Array]  # W [C, F], b [C]


def seed_keys(rng: jax.Array, seed) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The keys of one seed: probe init, shuffles, augmentation (or view) draws."""
    k = jax.random.split(jax.random.fold_in(rng, seed), 3)
    return k[0], k[1], k[2]


def epoch_batches(key: jax.Array, n: int, b: int) -> tuple[jax.Array, jax.Array]:
    """A shuffled epoch: indices [S, b] into the N examples and a mask [S, b] of real entries
    (S = ceil(N / b); the last batch is padded with index 0 and mask False)."""
    s = -(-n // b)
    perm = jax.random.permutation(key, n)
    idx = jnp.concatenate([perm, jnp.zeros((s * b - n,), perm.dtype)]).reshape(s, b)
    mask = (jnp.arange(s * b) < n).reshape(s, b)
    return idx, mask


def masked_ce(probe: Probe, feats, labels, mask) -> jax.Array:
    """Mean cross-entropy of a linear probe over the unmasked rows. feats [B, F], labels [B]."""
    w, b = probe
    logits = jnp.dot(feats, w.T, precision="highest") + b
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    mask = mask.astype(ce.dtype)
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def adam():
    """Adam's direction (PyTorch defaults); the learning rate is applied by the loop."""
    return optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)


def fit(batch_feats, labels, keys, n: int, feat_dim: int, cfg: ProbeConfig):
    """Train one probe: (probe, mean training loss of every epoch [E]).
    batch_feats(idx [B], key) -> features [B, F] of those examples."""
    k_init, k_shuffle, k_draw = keys
    probe = lgm.sample_probe(k_init, cfg.num_classes, feat_dim, cfg.probe_std)
    tx, b, spe, lr_of = adam(), cfg.batch(n), cfg.steps_per_epoch(n), cfg.schedule(n)

    def epoch(carry, e):
        idx, mask = epoch_batches(jax.random.fold_in(k_shuffle, e), n, b)
        lr = lr_of(e)

        def step(carry, batch):
            probe, opt = carry
            j, idx_j, mask_j = batch
            feats = batch_feats(idx_j, jax.random.fold_in(k_draw, e * spe + j))
            loss, grads = jax.value_and_grad(masked_ce)(probe, feats, labels[idx_j], mask_j)
            updates, opt = tx.update(grads, opt)
            probe = jax.tree_util.tree_map(lambda p, u: p - lr * u, probe, updates)
            return (probe, opt), loss * jnp.sum(mask_j)

        carry, losses = jax.lax.scan(step, carry, (jnp.arange(spe), idx, mask))
        return carry, jnp.sum(losses) / n

    (probe, _), losses = jax.lax.scan(epoch, (probe, tx.init(probe)), jnp.arange(cfg.epochs))
    return probe, losses


def augmented_features(features: FeatureFn, params, images, key, cfg: ProbeConfig):
    """Features [B, F] of one fresh flip + random-resized-crop view of each image [B, H, H, 3]."""
    x = to_unit(images)
    x = augment.apply(x, augment.sample(key, x.shape[0], cfg.augment), cfg.augment)
    return features(params, normalize(x, cfg.mean, cfg.std)).astype(jnp.float32)


def _train_exact(params, images, labels, seeds, rng, *, features, feat_dim, cfg):
    per_seed = images.ndim == 5  # one image set per seed (e.g. the random-real baseline)

    def one(images, labels, seed):
        batch_feats = lambda idx, key: augmented_features(features, params, images[idx], key, cfg)
        return fit(batch_feats, labels, seed_keys(rng, seed), images.shape[0], feat_dim, cfg)

    axis = 0 if per_seed else None
    return jax.vmap(one, in_axes=(axis, axis, 0))(images, labels, seeds)


def _view_features(params, images, rng, *, features, cfg):
    """Features [V, N, F] of V augmented views of every image; view v draws fold_in(rng, v)."""
    one = lambda v: augmented_features(features, params, images, jax.random.fold_in(rng, v), cfg)
    return jax.lax.map(one, jnp.arange(cfg.views))


def _train_fast(params, images, labels, seeds, rng, *, features, feat_dim, cfg):
    per_seed = images.ndim == 5
    view_rng = jax.random.fold_in(rng, 1 << 30)  # shared by the seeds
    views = functools.partial(_view_features, features=features, cfg=cfg)
    if per_seed:
        feats = jax.vmap(lambda x: views(params, x, view_rng))(images)
    else:
        feats = views(params, images, view_rng)
    return _fit_views(feats, labels, seeds, rng, feat_dim=feat_dim, cfg=cfg)


def _fit_views(feats, labels, seeds, rng, *, feat_dim, cfg):
    """Probes trained on precomputed view features [V, N, F] (or [S, V, N, F] per seed)."""
    per_seed = feats.ndim == 4

    def one(feats, labels, seed):
        v = feats.shape[0]
        batch_feats = lambda idx, key: feats[jax.random.randint(key, idx.shape, 0, v), idx]
        return fit(batch_feats, labels, seed_keys(rng, seed), feats.shape[1], feat_dim, cfg)

    axis = 0 if per_seed else None
    return jax.vmap(one, in_axes=(axis, axis, 0))(feats, labels, seeds)


train_exact = jax.jit(_train_exact, static_argnames=("features", "feat_dim", "cfg"))
train_fast = jax.jit(_train_fast, static_argnames=("features", "feat_dim", "cfg"))
fit_views = jax.jit(_fit_views, static_argnames=("feat_dim", "cfg"))


def seed_mesh(seeds: int, devices: int | None = None):
    """A ("seeds",) mesh over min(seeds, `devices`) of this process's devices (all of them when
    `devices` is None), or None when that is one device."""
    local = jax.local_devices()
    d = min(seeds, len(local) if devices is None else max(1, min(devices, len(local))))
    if d <= 1:
        return None
    return jax.sharding.Mesh(np.asarray(local[:d]), ("seeds",))


@functools.partial(
    jax.jit, static_argnames=("train", "mesh", "per_seed", "features", "feat_dim", "cfg")
)
def _train_sharded(
    params, images, labels, seeds, rng, *, train, mesh, per_seed, features, feat_dim, cfg
):
    """`train` (_train_exact or _train_fast) with the seeds split over the mesh: each device
    trains its own seeds' probes; the backbone and shared images are replicated."""
    P = jax.sharding.PartitionSpec
    by_seed, rep = P("seeds"), P()
    data = by_seed if per_seed else rep
    body = functools.partial(train, features=features, feat_dim=feat_dim, cfg=cfg)
    # No collectives: every value is one device's own. Without check_vma a value made inside
    # the body that does not depend on the seed (the probe's zero bias) is not typed as
    # replicated, whose gradient shard_map would sum over the devices, i.e. over other seeds.
    specs = dict(in_specs=(rep, data, data, by_seed, rep), out_specs=by_seed)
    sharded = jax.shard_map(body, mesh=mesh, check_vma=False, **specs)
    return sharded(params, images, labels, seeds, rng)


def train_probes(
    features: FeatureFn,
    params,
    images,
    labels,
    *,
    feat_dim: int,
    cfg: ProbeConfig,
    seeds: int = 5,
    rng: jax.Array | None = None,
    devices: int | None = None,
):
    """Train `seeds` probes in one compiled program.

    images: uint8 [N, H, H, 3] (or float in [0, 1]), shared by the seeds, or [S, N, H, H, 3]
    with one set per seed; labels [N] or [S, N]. Returns ((W [S, C, F], b [S, C]), loss [S, E]).
    With several local devices the seeds are split over up to `devices` of them (None: all);
    a seed's probe does not depend on where it is trained (beyond float rounding).
    """
    rng = jax.random.key(0) if rng is None else rng
    images, labels = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
    per_seed = images.ndim == 5
    if per_seed and images.shape[0] != seeds:
        raise ValueError(f"{images.shape[0]} per-seed image sets for {seeds} seeds")
    mesh = seed_mesh(seeds, devices)
    kw = dict(features=features, feat_dim=feat_dim, cfg=cfg)
    if mesh is None:
        fn = train_fast if cfg.views else train_exact
        return fn(params, images, labels, jnp.arange(seeds, dtype=jnp.uint32), rng, **kw)
    # Pad the seeds to a multiple of the devices (the extra probes are trained and dropped: the
    # time is that of ceil(S / D) seeds either way).
    padded = -(-seeds // mesh.size) * mesh.size
    seed_ids = jnp.arange(padded, dtype=jnp.uint32)
    if per_seed and padded > seeds:
        extra = np.arange(padded - seeds) % seeds
        images = jnp.concatenate([images, images[extra]])
        labels = jnp.concatenate([labels, labels[extra]])
    train = _train_fast if cfg.views else _train_exact
    out = _train_sharded(
        params, images, labels, seed_ids, rng, train=train, mesh=mesh, per_seed=per_seed, **kw
    )
    return jax.tree_util.tree_map(lambda x: x[:seeds], out)


# ----------------------------------------------------------------------------------------------
# Streamed training (datasets that do not fit in memory)


def _stream_step(probe, opt, params, images, labels, mask, key, lr, *, features, cfg):
    """One step of `fit`'s loop on a batch read from the host."""
    feats = augmented_features(features, params, images, key, cfg)
    loss, grads = jax.value_and_grad(masked_ce)(probe, feats, labels, mask)
    updates, opt = adam().update(grads, opt)
    probe = jax.tree_util.tree_map(lambda p, u: p - lr * u, probe, updates)
    return probe, opt, loss * jnp.sum(mask)


stream_step = jax.jit(
    _stream_step, static_argnames=("features", "cfg"), donate_argnames=("probe", "opt")
)


class ProgressMismatch(ValueError):
    """A saved progress file that belongs to another probe run."""


@dataclasses.dataclass(frozen=True)
class _Progress:
    """One seed's progress file: its probe and Adam state after an epoch, that epoch, the losses
    so far and the run's fingerprint. With path None nothing is kept."""

    path: str | None
    fingerprint: str

    def save(self, probe, opt, epoch: int, losses) -> None:
        if self.path is None:
            return
        leaves = jax.tree_util.tree_leaves((probe, opt))
        arrays = {f"leaf{i}": np.asarray(x) for i, x in enumerate(leaves)}
        tmp, fp = self.path + ".tmp.npz", self.fingerprint
        np.savez(tmp, epoch=epoch, losses=np.asarray(losses), fingerprint=fp, **arrays)
        os.replace(tmp, self.path)  # a kill during the write leaves the previous file whole

    def load(self, probe, opt):
        """(probe, opt, next epoch, losses), or None when there is nothing to resume."""
        if self.path is None or not os.path.exists(self.path):
            return None
        with np.load(self.path) as f:
            if str(f["fingerprint"]) != self.fingerprint:
                raise ProgressMismatch(
                    f"{self.path} holds the progress of a different probe run (other data, "
                    "backbone or settings); delete it or write to another --out"
                )
            treedef = jax.tree_util.tree_structure((probe, opt))
            leaves = [jnp.asarray(f[f"leaf{i}"]) for i in range(treedef.num_leaves)]
            probe, opt = jax.tree_util.tree_unflatten(treedef, leaves)
            return probe, opt, int(f["epoch"]) + 1, [float(x) for x in f["losses"]]


def _start_seed(s: int, k_init, progress: _Progress, *, feat_dim: int, cfg: ProbeConfig):
    """Seed s's (probe, Adam state, first epoch to run, losses so far): fresh or resumed."""
    probe = lgm.sample_probe(k_init, cfg.num_classes, feat_dim, cfg.probe_std)
    opt = adam().init(probe)
    resumed = progress.load(probe, opt)
    if resumed is None:
        return probe, opt, 0, []
    log.info("seed %d: resuming after epoch %d of %d", s, resumed[2] - 1, cfg.epochs)
    return resumed


def _read_epochs(load, n: int, k_shuffle, first: int, cfg: ProbeConfig, prefetch, workers):
    """(epoch, step, (images, labels, mask) on the device) for every batch of epochs first..E-1,
    read `prefetch` batches ahead by `workers` threads; rows `load` could not read are masked."""
    b, spe = cfg.batch(n), cfg.steps_per_epoch(n)

    def batches(e):
        idx, mask = jax.device_get(epoch_batches(jax.random.fold_in(k_shuffle, e), n, b))
        return [(e, j, idx[j], mask[j]) for j in range(spe)]

    def read(item):
        e, j, idx, mask = item
        got = load(idx, mask, e)
        ok = np.asarray(got["mask"], bool) & mask
        return e, j, jax.device_put((got["image"], np.asarray(got["label"], np.int32), ok))

    items = (item for e in range(first, cfg.epochs) for item in batches(e))
    return prefetch_map(read, items, prefetch, workers)


def _train_seed(features, params, load, n, s, progress, *, feat_dim, cfg, rng, prefetch, workers):
    """Seed s's probe and its losses [E]: `fit`'s loop on batches read from the host, the
    progress saved after every epoch."""
    k_init, k_shuffle, k_draw = seed_keys(rng, jnp.uint32(s))
    probe, opt, first, losses = _start_seed(s, k_init, progress, feat_dim=feat_dim, cfg=cfg)
    spe, lr_of = cfg.steps_per_epoch(n), cfg.schedule(n)
    step = functools.partial(stream_step, features=features, cfg=cfg)
    total, t0 = jnp.zeros((), jnp.float32), time.time()
    for e, j, batch in _read_epochs(load, n, k_shuffle, first, cfg, prefetch, workers):
        key = jax.random.fold_in(k_draw, e * spe + j)
        lr = jnp.float32(lr_of(e))
        probe, opt, loss = step(probe, opt, params, *batch, key, lr)  # batch: images, labels, mask
        total = total + loss
        if j == spe - 1:
            losses.append(float(total) / n)
            total = jnp.zeros((), jnp.float32)
            rate = n / max(time.time() - t0, 1e-9)
            msg = "seed %d epoch %d/%d: loss %.4f, %.0f images/s"
            log.info(msg, s, e + 1, cfg.epochs, losses[-1], rate)
            t0 = time.time()
            progress.save(probe, opt, e, losses)
    return probe, losses


def train_streamed(
    features: FeatureFn,
    params,
    load: Callable[[np.ndarray, np.ndarray, int], dict],
    n: int,
    *,
    feat_dim: int,
    cfg: ProbeConfig,
    seeds: int = 1,
    rng: jax.Array | None = None,
    workers: int = 4,
    prefetch: int = 8,
    progress: str | None = None,
    fingerprint: str = "",
):
    """`train_probes` in exact mode on N images that are read a batch at a time.

    load(indices [B], mask [B], epoch) -> {"image": uint8 [B, H, H, 3], "label" [B], "mask" [B]}
    reads the images of one batch of an epoch (rows with mask False need not be read; rows it
    cannot read come back with mask False and count for nothing). Seed s draws exactly what
    `train_probes` draws (its init, shuffles and augmentations), so on the same images both give
    the same probes; the difference is that only `prefetch` batches are in memory at a time,
    read by `workers` threads while the device runs. The seeds are trained one after the other
    (each reads the data E times). With `progress` (a file prefix), each seed's probe and Adam
    state are saved after every epoch and a later call with the same `fingerprint` continues
    from there.

    Returns ((W [S, C, F], b [S, C]), mean training loss of every epoch [S, E]).
    """
    rng = jax.random.key(0) if rng is None else rng
    kw = dict(feat_dim=feat_dim, cfg=cfg, rng=rng, prefetch=prefetch, workers=workers)
    probes, all_losses = [], []
    for s in range(seeds):
        path = None if progress is None else f"{progress}.seed{s}.npz"
        seed_progress = _Progress(path, fingerprint)
        probe, losses = _train_seed(features, params, load, n, s, seed_progress, **kw)
        probes.append(probe)
        all_losses.append(losses)
    stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *probes)
    return stacked, jnp.asarray(all_losses, jnp.float32)


# ----------------------------------------------------------------------------------------------
# Testing


def array_batches(images, labels, batch_size: int) -> Iterator[dict]:
    """Fixed-size batches {"image", "label", "mask"} of in-memory arrays; the last is padded."""
    n = len(labels)
    for start in range(0, n, batch_size):
        img, lab = images[start : start + batch_size], labels[start : start + batch_size]
        pad = batch_size - len(lab)
        mask = np.arange(batch_size) < len(lab)
        if pad:
            img = np.concatenate([img, np.zeros((pad, *img.shape[1:]), img.dtype)])
            lab = np.concatenate([lab, np.zeros((pad,), lab.dtype)])
        yield {"image": img, "label": lab, "mask": mask}


def _test_counts(params, probes, images, labels, mask, *, features, cfg):
    x = normalize(centre_crop(to_unit(images), cfg.augment.input_res), cfg.mean, cfg.std)
    z = features(params, x).astype(jnp.float32)  # [B, F]
    w, b = probes  # [S, C, F], [S, C]
    logits = jnp.einsum("bf,scf->sbc", z, w, precision="highest") + b[:, None]
    k = min(5, w.shape[1])
    top1 = jnp.argmax(logits, -1) == labels
    top5 = jnp.any(jax.lax.top_k(logits, k)[1] == labels[None, :, None], -1)
    m = mask.astype(jnp.int32)
    return jnp.sum(top1 * m, -1), jnp.sum(top5 * m, -1), top1 * m  # hits [S, B]: per group


test_counts = jax.jit(_test_counts, static_argnames=("features", "cfg"))


def test_probes(
    features: FeatureFn, params, probes: Probe, batches: Iterable[dict], cfg: ProbeConfig
) -> dict[str, np.ndarray]:
    """Top-1 and top-5 accuracy [S] (fractions) of every seed's probe on padded test batches;
    batches with "group" [B] add groups.Tally's per-group counts (group_count, group_correct)."""
    top1 = top5 = total = 0
    tally = groups.Tally()
    for batch in batches:
        x, y = jnp.asarray(batch["image"]), jnp.asarray(batch["label"], jnp.int32)
        mask = jnp.asarray(batch["mask"])
        c1, c5, hits = test_counts(params, probes, x, y, mask, features=features, cfg=cfg)
        top1, top5 = top1 + np.asarray(c1), top5 + np.asarray(c5)
        total += int(np.sum(batch["mask"]))
        if "group" in batch:
            tally.add(batch["group"], hits, batch["mask"])
    if total == 0:
        raise ValueError("the test set is empty")
    acc = {"top1": np.asarray(top1) / total, "top5": np.asarray(top5) / total, "num_test": total}
    return {**acc, **tally.counts()}


def summarize(values) -> dict:
    """Mean, standard deviation (ddof=1, as torch.std; 0 for one seed) and per-seed values, in %."""
    v = 100.0 * np.asarray(values, np.float64)
    std = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
    return {"mean": float(np.mean(v)), "std": std, "per_seed": [float(x) for x in v]}
