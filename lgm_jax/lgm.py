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
(the distributed step in `distill.py` relies on this).
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

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

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
    rng: jax.Array  # base key; step s draws from fold_in(rng, s)


def optimizer(lr: float = 2e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """Adam as in PyTorch (eps added to sqrt(v_hat)), no weight decay."""
    return optax.adam(lr, b1=b1, b2=b2, eps=eps)


def syn_labels(cfg: StepConfig) -> jax.Array:
    """Class of each synthetic image [N]: ipc consecutive images per class."""
    return jnp.repeat(jnp.arange(cfg.num_classes, dtype=jnp.int32), cfg.ipc)


def init_state(rng, cfg: StepConfig, tx, start_res: Sequence[int] = (1,), mode="noise") -> State:
    k_init, k_run = jax.random.split(rng)
    levels = pyramid.init(k_init, cfg.num_syn, start_res, mode)
    return State(step=jnp.zeros((), jnp.int32), levels=levels, opt_state=tx.init(levels), rng=k_run)


def grow(state: State, tx, mode: str = "noise") -> State:
    """Add the next finer pyramid level and reset the optimizer state of every level."""
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1 << 20)
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


def normalize(x, cfg: StepConfig):
    mean = jnp.asarray(cfg.mean, x.dtype)
    std = jnp.asarray(cfg.std, x.dtype)
    return (x - mean) / std


def to_unit(images) -> jax.Array:
    """uint8 [0, 255] or float [0, 1] images -> float32 [0, 1]."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def real_features(features: FeatureFn, params, images, aug_params, cfg: StepConfig):
    """Features of augmented real images [R, F]; constants for the meta-gradient."""
    x = augment.apply(to_unit(images), aug_params, cfg.augment)
    return jax.lax.stop_gradient(features(params, normalize(x, cfg)))


def syn_batch(levels, cfg: StepConfig):
    """Decoded synthetic images tiled K times, copy-major: [K*N, res, res, 3] and labels [K*N]."""
    images = pyramid.decode(levels, cfg.syn_res, cfg.decorrelate_colors)
    reps = (cfg.aug_rounds, 1, 1, 1)
    return jnp.tile(images, reps), jnp.tile(syn_labels(cfg), cfg.aug_rounds)


def syn_features(features: FeatureFn, params, levels, aug_params, cfg: StepConfig):
    """Features of the K augmented copies of the synthetic images [K*N, F] and their labels."""
    images, labels = syn_batch(levels, cfg)
    x = augment.apply(images, aug_params, cfg.augment)
    return features(params, normalize(x, cfg)), labels


def meta_loss(levels, params, probe, g_real, aug_params, features: FeatureFn, cfg: StepConfig):
    """1 - cos(g_real, g_syn(levels)): the function whose gradient moves the pyramid."""
    feats, labels = syn_features(features, params, levels, aug_params, cfg)
    return match_loss(g_real, probe_grad(*probe, feats, labels))


def draws(rng, feat_dim: int, cfg: StepConfig):
    """Every random draw of one step, from one key: probe, real and synthetic augmentations."""
    k_probe, k_real, k_syn = jax.random.split(rng, 3)
    return (
        sample_probe(k_probe, cfg.num_classes, feat_dim, cfg.probe_std),
        augment.sample(k_real, cfg.num_real, cfg.augment),
        augment.sample(k_syn, cfg.aug_rounds * cfg.num_syn, cfg.augment),
    )


def train_step(
    state: State,
    params,
    real_images,
    real_labels,
    *,
    features: FeatureFn,
    feat_dim: int,
    tx,
    cfg: StepConfig,
):
    """One LGM update. real_images [R, H, H, 3] (uint8 or float in [0, 1]), real_labels [R].

    Returns the new state and metrics {"loss", "grad_norm"}. A non-finite loss leaves the
    state's levels and optimizer untouched (the step counter still advances) and is reported
    through metrics["finite"].
    """
    probe, real_aug, syn_aug = draws(jax.random.fold_in(state.rng, state.step), feat_dim, cfg)
    z_real = real_features(features, params, real_images, real_aug, cfg)
    g_real = probe_grad(*probe, z_real, real_labels)
    loss, grads = jax.value_and_grad(meta_loss)(
        state.levels, params, probe, g_real, syn_aug, features, cfg
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.levels)
    levels = optax.apply_updates(state.levels, updates)
    finite = jnp.isfinite(loss) & jnp.all(
        jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)])
    )
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(
        step=state.step + 1,
        levels=keep(levels, state.levels),
        opt_state=keep(opt_state, state.opt_state),
    )
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "finite": finite}
    return new_state, metrics


def jit_train_step(features: FeatureFn, feat_dim: int, tx, cfg: StepConfig):
    """`train_step` jitted, with the state's buffers donated."""
    fn = functools.partial(train_step, features=features, feat_dim=feat_dim, tx=tx, cfg=cfg)
    return jax.jit(fn, donate_argnums=(0,))
