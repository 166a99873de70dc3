"""Linear Gradient Matching: the probe, its gradients, the meta-loss and the jitted step.

One step (see SPEC "One distillation step"):
  1. draw a random linear probe W [C, F] ~ N(0, 0.01^2), b = 0;
  2. real side: augment R real images, features z = phi(x), probe gradient g_real (no gradient
     flows back into it);
  3. synthetic side: decode the pyramid into N = ipc*C images, K augmented copies (copy-major),
     features, probe gradient g_syn;
  4. meta-loss 1 - cos(g_real, g_syn) over the whole flattened gradient [W row-major, b];
  5. d meta-loss / d levels (through the closed-form probe gradient and the backbone) and Adam.

The probe gradient of the mean cross-entropy has a closed form: with P = softmax(z W^T + b),
Y one-hot and E = (P - Y)/N, dW = E^T z and db = sum_i E_i. Writing it out (instead of nesting
`jax.grad`) makes the meta-gradient plain first-order autodiff through softmax and the backbone.
Because g is a sum over examples, a batch split over devices gives partial gradients that add up
(the sharded step, `make_step` with a mesh, relies on this).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import optax

from lgm_jax import augment, pyramid
from lgm_jax.preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize, to_unit

STATE_SHARDINGS = ("replicated", "class")

# features(backbone_params, normalised images [B, H, W, 3]) -> [B, F] float32
FeatureFn = Callable[[object, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of a distillation step (hashable: it is part of the jit cache key)."""

    num_classes: int
    ipc: int = 1
    aug_rounds: int = 10  # K: augmented copies of every synthetic image per step
    syn_res: int = 256
    probe_std: float = 0.01
    decorrelate_colors: bool = True
    augment: augment.AugmentConfig = augment.AugmentConfig()
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    # Rows per backbone call on each device; None runs the whole per-device batch at once.
    # Peak memory scales with the chunk, not with the number of synthetic images.
    chunk_size: int | None = None
    real_input: str = "images"  # "images" (online) or "features" (from the real-feature cache)
    # "replicated": every device holds the whole pyramid and optimizer state; "class": each
    # holds N/D images' worth (for very large synthetic sets; N must divide over the devices).
    state_sharding: str = "replicated"

    def __post_init__(self):
        if self.real_input not in ("images", "features"):
            raise ValueError(f"real_input must be 'images' or 'features', got {self.real_input!r}")
        if self.state_sharding not in STATE_SHARDINGS:
            raise ValueError(
                f"state_sharding must be one of {STATE_SHARDINGS}, got {self.state_sharding!r}"
            )

    @property
    def num_syn(self) -> int:
        return self.num_classes * self.ipc

    @property
    def num_real(self) -> int:
        """Real images per step: ipc * K * C."""
        return self.ipc * self.aug_rounds * self.num_classes


@flax.struct.dataclass
class State:
    """Everything that changes during distillation (a pytree; checkpointed as a whole)."""

    step: jax.Array  # int32 []: the number of updates done
    levels: pyramid.Levels  # coarse to fine, each [N, r, r, 3]
    opt_state: optax.OptState
    # The run's key as raw uint32 data (jax.random.key_data), so the state is plain arrays that
    # device_put, shard and checkpoint like any other; step s draws from fold_in(key, s).
    rng: jax.Array


def optimizer(lr: float = 2e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """Adam as in PyTorch (eps added to sqrt(v_hat)), no weight decay."""
    return optax.adam(lr, b1=b1, b2=b2, eps=eps)


def syn_labels(cfg: StepConfig) -> jax.Array:
    """Class of each synthetic image [N]: ipc consecutive images per class."""
    return jnp.repeat(jnp.arange(cfg.num_classes, dtype=jnp.int32), cfg.ipc)


def init_state(rng, cfg: StepConfig, tx, start_res: Sequence[int] = (1,), mode="noise") -> State:
    k_init, k_run = jax.random.split(rng)
    levels = pyramid.init(k_init, cfg.num_syn, start_res, mode)
    return State(
        step=jnp.zeros((), jnp.int32),
        levels=levels,
        opt_state=tx.init(levels),
        rng=jax.random.key_data(k_run),
    )


def grow(state: State, tx, mode: str = "noise") -> State:
    """Add the next finer pyramid level and reset the optimizer state of every level."""
    key = jax.random.fold_in(jax.random.fold_in(_key(state.rng), state.step), 1 << 20)
    levels = pyramid.extend(key, state.levels, mode)
    return state.replace(levels=levels, opt_state=tx.init(levels))


def sample_probe(rng, num_classes: int, feat_dim: int, std: float = 0.01):
    """A fresh random probe: W [C, F] ~ N(0, std^2), b = 0 [C]."""
    w = std * jax.random.normal(rng, (num_classes, feat_dim), jnp.float32)
    return w, jnp.zeros((num_classes,), jnp.float32)


def probe_grad(w, b, feats, labels, num_total: int | None = None) -> jax.Array:
    """Closed-form gradient of the mean cross-entropy of a linear probe.

    w [C, F], b [C], feats [B, F], labels [B] -> [C*F + C] = [dW row-major, db].
    `num_total` is the N of the mean (defaults to B); pass the global batch size when feats is
    one shard of it, so that the shards' results sum to the full gradient.
    """
    n = feats.shape[0] if num_total is None else num_total
    feats = feats.astype(jnp.promote_types(feats.dtype, jnp.float32))
    logits = jnp.dot(feats, w.T, precision="highest") + b
    e = (jax.nn.softmax(logits) - jax.nn.one_hot(labels, w.shape[0])) / n
    gw = jnp.dot(e.T, feats, precision="highest")
    return jnp.concatenate([gw.reshape(-1), e.sum(0)])


def probe_grad_autodiff(w, b, feats, labels) -> jax.Array:
    """The same gradient by `jax.grad` of the cross-entropy (a reference for tests)."""

    def ce(params):
        logits = feats @ params[0].T + params[1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    gw, gb = jax.grad(ce)((w, b))
    return jnp.concatenate([gw.reshape(-1), gb])


def match_loss(g_real, g_syn) -> jax.Array:
    """1 - cosine similarity of two flattened gradients."""
    dot = jnp.vdot(g_real, g_syn)
    norms = jnp.maximum(jnp.linalg.norm(g_real) * jnp.linalg.norm(g_syn), 1e-8)
    return 1.0 - dot / norms


def real_features(features: FeatureFn, params, images, aug_params, cfg: StepConfig):
    """Features of augmented real images [R, F]; constants for the meta-gradient."""
    with jax.named_scope("augment"):
        x = augment.apply(to_unit(images), aug_params, cfg.augment)
    return jax.lax.stop_gradient(features(params, normalize(x, cfg.mean, cfg.std)))


def syn_batch(levels, cfg: StepConfig):
    """Decoded synthetic images tiled K times, copy-major: [K*N, res, res, 3] and labels [K*N]."""
    images = pyramid.decode(levels, cfg.syn_res, cfg.decorrelate_colors)
    reps = (cfg.aug_rounds, 1, 1, 1)
    return jnp.tile(images, reps), jnp.tile(syn_labels(cfg), cfg.aug_rounds)


def syn_features(features: FeatureFn, params, levels, aug_params, cfg: StepConfig):
    """Features of the K augmented copies of the synthetic images [K*N, F] and their labels."""
    images, labels = syn_batch(levels, cfg)
    x = augment.apply(images, aug_params, cfg.augment)
    return features(params, normalize(x, cfg.mean, cfg.std)), labels


def meta_loss(levels, params, probe, g_real, aug_params, features: FeatureFn, cfg: StepConfig):
    """1 - cos(g_real, g_syn(levels)): the function whose gradient moves the pyramid."""
    feats, labels = syn_features(features, params, levels, aug_params, cfg)
    return match_loss(g_real, probe_grad(*probe, feats, labels))


def _key(rng):
    """A typed key from a typed key or raw key data."""
    return rng if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(rng)


def step_keys(rng, step):
    """The keys of one step, derived from the run's key and the step number alone (so a resumed
    run replays exactly the draws of an uninterrupted one): probe, real and synthetic draws."""
    k_probe, k_real, k_syn = jax.random.split(jax.random.fold_in(_key(rng), step), 3)
    return k_probe, k_real, k_syn


def reference_grad(
    levels, params, real, real_labels, keys, *, features: FeatureFn, feat_dim: int, cfg: StepConfig
):
    """(meta-loss, d loss / d levels) by plain `jax.grad` over the whole batch at once.

    The same function as `meta_grad`, written the direct way; tests check one against the other.
    """
    k_probe, k_real, k_syn = keys
    probe = sample_probe(k_probe, cfg.num_classes, feat_dim, cfg.probe_std)
    rows = jnp.arange(cfg.num_real)
    if cfg.real_input == "features":
        z_real = real.astype(jnp.float32)
    else:
        aug = augment.sample_rows(k_real, rows, cfg.augment)
        z_real = real_features(features, params, real, aug, cfg)
    g_real = probe_grad(*probe, z_real, real_labels)
    syn_aug = augment.sample_rows(k_syn, rows, cfg.augment)
    return jax.value_and_grad(meta_loss)(levels, params, probe, g_real, syn_aug, features, cfg)


def chunk_size(rows: int, requested: int | None) -> int:
    """The largest divisor of `rows` that is at most `requested` (all rows when None)."""
    if requested is None or requested >= rows:
        return rows
    if requested < 1:
        raise ValueError(f"chunk_size must be positive, got {requested}")
    return max(d for d in range(1, requested + 1) if rows % d == 0)


def _map_chunks(fn, xs, chunk: int):
    """fn over the leading axis of the pytree xs in chunks of `chunk` rows, concatenated."""
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    if chunk == n:
        return fn(*xs)
    split = lambda x: x.reshape(n // chunk, chunk, *x.shape[1:])
    out = jax.lax.map(lambda c: fn(*c), jax.tree_util.tree_map(split, xs))
    return out.reshape(n, *out.shape[2:])


def _device_rows(cfg: StepConfig, axis: str | None, num_devices: int):
    """This device's rows: (real row ids, synthetic row ids, index of its first image in the
    levels it holds). Row ids are global, so the random draws of a row do not depend on the
    split. With replicated state the synthetic rows are a contiguous block of the K*N copy-major
    rows (row r shows image r mod N); with class-sharded state they are the K copies of the
    device's own N/D images, which it can decode and differentiate without the others."""
    local = cfg.num_real // num_devices
    d = jax.lax.axis_index(axis) if axis else 0
    real_rows = d * local + jnp.arange(local)
    if cfg.state_sharding == "class":
        per = cfg.num_syn // num_devices
        own = d * per + jnp.arange(per)
        syn_rows = (jnp.arange(cfg.aug_rounds)[:, None] * cfg.num_syn + own).reshape(-1)
        return real_rows, syn_rows, d * per
    return real_rows, real_rows, 0


@dataclasses.dataclass(frozen=True, eq=False)
class _Share:
    """This device's share of one step, as every phase of `meta_grad` sees it."""

    cfg: StepConfig
    axis: str | None  # the mesh axis inside shard_map, else None
    real_rows: jax.Array  # global row ids (see _device_rows)
    syn_rows: jax.Array
    first: int | jax.Array  # index of the first image it holds in the whole set
    chunk: int  # rows per backbone call

    @property
    def n_chunks(self) -> int:
        return self.real_rows.shape[0] // self.chunk  # as many synthetic rows as real ones

    def psum(self, x):
        return jax.lax.psum(x, self.axis) if self.axis else x

    def vary(self, x):
        """Mark a replicated value as per-device (shard_map's type system) where it meets one."""
        return jax.lax.pcast(x, self.axis, to="varying") if self.axis else x

    def index(self, r):
        """Synthetic row -> its image within the held levels."""
        return r % self.cfg.num_syn - self.first

    def gather(self, levels, r):
        """The pyramid rows of the images of synthetic rows r (one per row)."""
        return tuple(level[self.index(r)] for level in levels)


def _check_shapes(levels, real, cfg: StepConfig, num_devices: int) -> None:
    """Refuse a device's share of the inputs that is not the one its rows are computed for."""
    local = cfg.num_real // num_devices
    if real.shape[0] != local:
        raise ValueError(f"expected {local} real rows per device, got {real.shape[0]}")
    held = cfg.num_syn // num_devices if cfg.state_sharding == "class" else cfg.num_syn
    if levels[0].shape[0] != held:
        raise ValueError(f"expected {held} synthetic images per device, got {levels[0].shape[0]}")


def _real_side(features: FeatureFn, params, real, real_labels, probe, key, share: _Share):
    """g_real: the probe gradient of the whole real batch (this device's rows joined by psum)."""
    cfg = share.cfg
    if cfg.real_input == "features":
        z_real = real.astype(jnp.float32)
    else:
        real_fn = lambda x, r: real_features(
            features, params, x, augment.sample_rows(key, r, cfg.augment), cfg
        )
        with jax.named_scope("real_features"):
            z_real = _map_chunks(real_fn, (real, share.real_rows), share.chunk)
    with jax.named_scope("probe"):
        return share.psum(probe_grad(*probe, z_real, real_labels, cfg.num_real))


def _syn_row_features(features: FeatureFn, params, key, cfg: StepConfig, rows_levels, r):
    """Features of synthetic rows r from their own pyramid rows (one per row)."""
    with jax.named_scope("decode"):
        imgs = pyramid.decode(rows_levels, cfg.syn_res, cfg.decorrelate_colors)
    with jax.named_scope("augment"):
        x = augment.apply(imgs, augment.sample_rows(key, r, cfg.augment), cfg.augment)
    return features(params, normalize(x, cfg.mean, cfg.std))


def _syn_forward(syn_fn, levels, own_levels, share: _Share):
    """(Z [rows, F] of this device's synthetic rows, pull). In one chunk, pull takes dL/dZ back
    to `own_levels` (the forward pass is kept for it); chunked, nothing is kept and pull is None."""
    rows = share.syn_rows
    with jax.named_scope("syn_features"):
        if share.n_chunks == 1:
            return jax.vjp(lambda lv: syn_fn(share.gather(lv, rows), rows), own_levels)
        return _map_chunks(lambda r: syn_fn(share.gather(levels, r), r), (rows,), share.chunk), None


def _loss_and_dz(probe, g_real, z_syn, labels, share: _Share):
    """(meta-loss, dL/dZ): g_syn sums per-row terms of Z, so its pull-back is closed-form."""
    partial_g = lambda z: probe_grad(*probe, z, labels, share.cfg.num_real)
    with jax.named_scope("probe"):
        g_syn = share.psum(partial_g(z_syn))
        loss, d_gsyn = jax.value_and_grad(match_loss, argnums=1)(g_real, g_syn)
        d_z = jax.vjp(partial_g, z_syn)[1](share.vary(d_gsyn))[0]
    return loss, d_z


def _syn_backward(syn_fn, pull, own_levels, d_z, share: _Share):
    """dL/dlevels: `pull` of the one chunk, or each chunk run again under `jax.vjp` and added
    into the rows of its images in place (one chunk's activations alive at a time)."""

    def backward(acc, xs):
        r, dz = xs
        (d_rows,) = jax.vjp(lambda rl: syn_fn(rl, r), share.gather(own_levels, r))[1](dz)
        return tuple(a.at[share.index(r)].add(g) for a, g in zip(acc, d_rows)), None

    with jax.named_scope("syn_backward"):
        if pull is not None:
            (grads,) = pull(d_z)
        else:
            n, chunk = share.n_chunks, share.chunk
            zeros = jax.tree_util.tree_map(jnp.zeros_like, own_levels)
            rows_dz = (share.syn_rows.reshape(n, chunk), d_z.reshape(n, chunk, -1))
            grads, _ = jax.lax.scan(backward, zeros, rows_dz)
        return grads if share.cfg.state_sharding == "class" else share.psum(grads)


def meta_grad(
    levels,
    params,
    real,
    real_labels,
    keys,
    *,
    features: FeatureFn,
    feat_dim: int,
    cfg: StepConfig,
    axis: str | None = None,
    num_devices: int = 1,
):
    """(meta-loss, d loss / d levels) for this device's share of the batch, in bounded memory.

    real: this device's real rows, images [R/D, H, H, 3] or cached features [R/D, F].
    levels: the whole pyramid, or with cfg.state_sharding == "class" this device's N/D images
    of it (and then the gradient returned is that shard's).
    With `axis`, runs inside `shard_map`: partial probe gradients are joined with `psum`.

    Memory does not grow with the number of synthetic images: the meta-loss depends on them only
    through their features Z, so
      1. Z is computed chunk by chunk (decode, augment, backbone) with no activations kept,
      2. dL/dZ follows in closed form from g_syn = sum of per-row terms,
      3. each chunk is run again under `jax.vjp` and pulls dL/dZ back to the pyramid rows of
         its images, which are added into the gradient in place; only one chunk's activations
         and decoded images are alive at a time.
    The cost is one extra backbone forward per synthetic image; without chunking (one chunk)
    the forward pass is kept for the backward one instead.
    """
    k_probe, k_real, k_syn = keys
    probe = sample_probe(k_probe, cfg.num_classes, feat_dim, cfg.probe_std)
    _check_shapes(levels, real, cfg, num_devices)
    chunk = chunk_size(cfg.num_real // num_devices, cfg.chunk_size)
    share = _Share(cfg, axis, *_device_rows(cfg, axis, num_devices), chunk)
    # The named scopes label the phases of the step in profiles (lgm_jax/profiling.py).
    g_real = _real_side(features, params, real, real_labels, probe, k_real, share)
    syn_fn = functools.partial(_syn_row_features, features, params, k_syn, cfg)
    # Differentiate with respect to a per-device copy of replicated levels: the cotangent of a
    # replicated input would already be summed over devices, and the psum in _syn_backward would
    # count it D times. Class-sharded levels are per-device already.
    own_levels = levels if cfg.state_sharding == "class" else share.vary(levels)
    labels = syn_labels(cfg)[share.syn_rows % cfg.num_syn]
    z_syn, pull = _syn_forward(syn_fn, levels, own_levels, share)
    loss, d_z = _loss_and_dz(probe, g_real, z_syn, labels, share)
    return loss, _syn_backward(syn_fn, pull, own_levels, d_z, share)


def apply_grads(state: State, loss, grads, tx) -> tuple[State, dict]:
    """Adam step on the levels. A non-finite loss or gradient skips the update (the step counter
    still advances) and is reported as metrics["finite"] = False."""
    updates, opt_state = tx.update(grads, state.opt_state, state.levels)
    levels = optax.apply_updates(state.levels, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(
        step=state.step + 1,
        levels=keep(levels, state.levels),
        opt_state=keep(opt_state, state.opt_state),
    )
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "finite": finite}


def state_sharding(state, mesh, by_class: bool = False):
    """Shardings of a State (or its shape tree) on `mesh`: everything replicated, or with
    `by_class` the pyramid levels and their optimizer moments ([N, r, r, 3] leaves) split over
    the images."""
    (axis,) = mesh.axis_names
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
    return jax.tree_util.tree_map(lambda x: split if by_class and x.ndim == 4 else rep, state)


def check_split(cfg: StepConfig, num_devices: int) -> None:
    """Refuse a batch or a class-sharded state that does not divide over the devices."""
    if cfg.num_real % num_devices:
        raise ValueError(
            f"the batch of {cfg.num_real} real / synthetic rows (ipc*K*C) does not split "
            f"over {num_devices} devices; choose aug_rounds or devices so that it divides"
        )
    if cfg.state_sharding == "class" and cfg.num_syn % num_devices:
        raise ValueError(
            f"state_sharding='class' needs the {cfg.num_syn} synthetic images (ipc*C) to split "
            f"over {num_devices} devices; use state_sharding='replicated' or a device count "
            "that divides them"
        )


def make_step(features: FeatureFn, feat_dim: int, tx, cfg: StepConfig, mesh=None):
    """The jitted update `step(state, backbone_params, real, real_labels) -> (state, metrics)`.

    real: images [R, H, H, 3] (uint8 or float in [0, 1]) or, with cfg.real_input ==
    "features", cached features [R, F]; R = cfg.num_real. With a mesh (one axis named "data"),
    `real` and the synthetic copies are split over its devices and joined by `psum`; the backbone
    parameters are replicated and the state is laid out by `state_sharding`. The state's buffers
    are donated.
    """
    kw = dict(features=features, feat_dim=feat_dim, cfg=cfg)
    by_class = cfg.state_sharding == "class"
    if mesh is None:
        grad_fn = functools.partial(meta_grad, **kw)
    else:
        (axis,) = mesh.axis_names
        check_split(cfg, mesh.size)
        spec, rep = jax.sharding.PartitionSpec(axis), jax.sharding.PartitionSpec()
        lv = spec if by_class else rep
        grad_fn = jax.shard_map(
            functools.partial(meta_grad, axis=axis, num_devices=mesh.size, **kw),
            mesh=mesh,
            in_specs=(lv, rep, spec, spec, rep),
            out_specs=(rep, lv),
        )

    def step(state: State, params, real, real_labels):
        keys = step_keys(state.rng, state.step)
        loss, grads = grad_fn(state.levels, params, real, real_labels, keys)
        with jax.named_scope("optimizer"):
            state, metrics = apply_grads(state, loss, grads, tx)
        if mesh is not None:  # keep the layout from step to step
            state = jax.lax.with_sharding_constraint(state, state_sharding(state, mesh, by_class))
        return state, metrics

    return jax.jit(step, donate_argnums=(0,))


def data_mesh(devices=None):
    """A one-axis ("data",) mesh over all devices of all processes."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh(
        (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )
