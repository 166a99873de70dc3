"""Self-supervised pre-training of the demo's tiny ViT (`dinov2_tiny`) on mnist_demo, no labels.

    python -m lgm_jax.pretrain_demo --out weights/demo_vit --steps 600

The demo's random backbone carries almost no class information, so neither distilled nor real
images train a useful probe on it. This trains it with SimCLR (InfoNCE / NT-Xent) on the 4,000
mnist_demo *train* images, labels never read: two augmented views of every image in a batch
(random resized crop of the 32 px image to 28 px, which also translates, plus a flip, as
`lgm_jax.augment` does in "eval" mode), the backbone's CLS feature, a 2-layer MLP projection
head (discarded afterwards), cosine similarities / temperature, cross-entropy of each view
against its partner among the other 2B - 1 views. Adam with a linear warm-up and cosine decay,
batch 256. Seeded and deterministic (one jitted step, draws from `fold_in(key, step)`).

Writes `registry.save_converted(out, ...)`, which `registry.build("dinov2_tiny", out)` and
`--config.weights=out` / `--weights out` load, plus `pretrain.json` (settings, loss curve, time).
tools/pretrain_demo_backbone.py is a shell for this command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from lgm_jax import augment, errors
from lgm_jax.errors import command_parser
from lgm_jax.models import registry

BACKBONE = "dinov2_tiny"


class ProjectionHead(nn.Module):
    """SimCLR's projection g(h): Dense -> ReLU -> Dense (discarded after pre-training)."""

    hidden: int = 256
    out: int = 64

    @nn.compact
    def __call__(self, h):
        h = nn.relu(nn.Dense(self.hidden, name="fc1")(h))
        return nn.Dense(self.out, name="fc2")(h)


def aug_config(input_res: int) -> augment.AugmentConfig:
    # Crops no smaller than 25% of the digit's image: at 0.08 most views are an empty corner.
    return augment.AugmentConfig(mode="eval", input_res=input_res, crop_scale=(0.25, 1.0))


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float) -> jax.Array:
    """SimCLR's loss: each of the 2B views must pick its partner among the other 2B - 1."""
    z = jnp.concatenate([z1, z2], 0)
    z = z / jnp.linalg.norm(z, axis=-1, keepdims=True).clip(1e-8)
    n = z.shape[0]
    logits = (z @ z.T) / temperature
    logits = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, logits)
    partner = (jnp.arange(n) + n // 2) % n
    return optax.softmax_cross_entropy_with_integer_labels(logits, partner).mean()


def make_step(backbone, head, tx, images, batch: int, temperature: float):
    """One jitted SimCLR step on a random batch of `images` (float32 [N, H, H, 3] in [0, 1])."""
    features = backbone.features
    cfg = aug_config(backbone.input_res)
    mean, std = jnp.asarray(backbone.mean), jnp.asarray(backbone.std)
    n = images.shape[0]

    def loss_fn(params, idx, k1, k2):
        x = images[idx]
        views = [augment.apply(x, augment.sample(k, batch, cfg), cfg) for k in (k1, k2)]
        z = [
            head.apply({"params": params["head"]}, features(params["backbone"], (v - mean) / std))
            for v in views
        ]
        return nt_xent(z[0], z[1], temperature)

    @jax.jit
    def step(params, opt_state, key):
        k_idx, k1, k2 = jax.random.split(key, 3)
        idx = jax.random.choice(k_idx, n, (batch,), replace=False)
        loss, grads = jax.value_and_grad(loss_fn)(params, idx, k1, k2)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def pretrain(
    images: np.ndarray,
    steps: int = 600,
    batch: int = 256,
    lr: float = 1e-3,
    temperature: float = 0.2,
    warmup: int = 100,
    seed: int = 0,
    log_every: int = 100,
    log=print,
):
    """SimCLR on uint8 images [N, H, H, 3] (H >= 28): (backbone, backbone params, losses)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    batch = min(batch, len(images))
    key = jax.random.key(seed)
    k_backbone, k_head, k_steps = jax.random.split(key, 3)
    backbone, bparams = registry.build(BACKBONE, rng=k_backbone)
    head = ProjectionHead()
    hparams = head.init(k_head, jnp.zeros((1, backbone.feature_dim)))["params"]
    params = {"backbone": bparams, "head": hparams}
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, min(warmup, max(steps - 1, 1)), max(steps, 2)
    )
    tx = optax.adam(schedule)
    opt_state = tx.init(params)
    x = jnp.asarray(images, jnp.float32) / 255.0  # 4000 x 32 x 32 x 3 floats: 49 MB
    step = make_step(backbone, head, tx, x, batch, temperature)
    losses = []
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, jax.random.fold_in(k_steps, i))
        losses.append(float(loss))
        if log and (i % log_every == 0 or i == steps - 1):
            log(f"step {i:5d}  loss {losses[-1]:.4f}")
    return backbone, params["backbone"], losses


def parse(argv=None) -> argparse.Namespace:
    p = command_parser("pretrain_demo", __doc__)
    p.add_argument("--out", required=True, help="directory for the converted weights")
    p.add_argument("--steps", type=errors.count, default=600)
    p.add_argument("--batch", type=errors.count, default=256)
    p.add_argument("--lr", type=errors.positive, default=1e-3)
    p.add_argument("--temperature", type=errors.positive, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)  # the flag types refuse out-of-range values


def train_and_save(args) -> None:
    """Pre-train on mnist_demo's train images and write the weights and pretrain.json."""
    from lgm_jax.data import get_dataset, load_split_arrays

    t0 = time.time()
    # Labels are returned by the loader but never used.
    images, _ = load_split_arrays(get_dataset("mnist_demo"), "train", crop=32, resize=32)
    print(f"{len(images)} unlabelled train images {images.shape[1:]}", flush=True)
    t1 = time.time()
    backbone, params, losses = pretrain(
        images, args.steps, args.batch, args.lr, temperature=args.temperature, seed=args.seed
    )
    train_s = time.time() - t1
    registry.save_converted(args.out, backbone, params)
    meta = dict(
        backbone=BACKBONE,
        dataset="mnist_demo",
        split="train",
        labels_used=False,
        objective="SimCLR NT-Xent",
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        temperature=args.temperature,
        seed=args.seed,
        augmentation=dict(
            mode="eval", input_res=backbone.input_res, crop_scale=[0.25, 1.0], in_res=32
        ),
        train_seconds=round(train_s, 1),
        total_seconds=round(time.time() - t0, 1),
        loss_first=losses[0],
        loss_last=losses[-1],
        losses_every_100=losses[::100],
    )
    with open(os.path.join(args.out, "pretrain.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(
        f"wrote {args.out} ({train_s:.1f} s of training, loss {losses[0]:.3f} -> {losses[-1]:.3f})"
    )


def main(argv=None) -> int:
    return errors.run_command(lambda: train_and_save(parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
