"""The paper's baselines: random real images, class centroids, nearest neighbours, full data.

    python -m lgm_jax.baselines random    --dataset D [--seeds 5] --out DIR [--backbone B]
    python -m lgm_jax.baselines centroids --dataset D --backbone B --out DIR [--evaluate]
    python -m lgm_jax.baselines neighbors --distilled RUN --backbone B --out DIR [--evaluate]
    python -m lgm_jax.baselines full      --dataset D --backbone B --out DIR [--epochs 100]

Example (one random real digit per class of the demo data, then its evaluation):

    python -m lgm_jax.baselines random --dataset mnist_demo --out workdirs/random \
        --backbone dinov2_tiny --weights lgm_jax/assets/demo_vit

Each selection baseline writes real training images as a distilled set (lgm_jax/distilled.py:
synthetic.npz, images uint8 [N, S, S, 3] with S = --syn-res, 256 by default, labels [N], plus
dataset/method/backbone names), which `lgm_jax.evaluate` reads:
  * random: one random train image per class (resize 256, centre crop 256), one set per seed
    (DIR/seed{k}/synthetic.npz); evaluating the S sets together trains seed k on set k;
  * centroids: per class, the train image whose embedding is nearest in L2 to the class-mean
    embedding;
  * neighbors: for each distilled image, the train image of its class with the highest cosine
    similarity of embeddings.
Embeddings are the backbone's features of the centre crop at its resolution (the test view).
`full` trains the probe on every train image (100 epochs, batch 128, lr 5e-4 = 1e-3 * 128 / 256,
the same augmentation and test) and writes eval.json directly. The train split is streamed (read
and decoded by --workers threads, a few batches ahead of the device), so any dataset size fits;
the run is bound by JPEG decoding (~200 images/s per core: ImageNet-1k's 100 epochs are ~128M
decodes) and saves its progress after every epoch, continuing from it when rerun.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lgm_jax import config_base, distilled, errors, evaluate, probe
from lgm_jax.errors import InputError, command_parser, run_command
from lgm_jax.preprocess import centre_crop, normalize, to_unit

# ----------------------------------------------------------------------------------------------
# Selection rules (pure NumPy)


def random_indices(labels, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """One uniformly random index per class [C]."""
    labels = np.asarray(labels)
    out = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if not idx.size:
            raise InputError(f"class {c} has no training images")
        out.append(rng.choice(idx))
    return np.asarray(out, np.int64)


def centroid_indices(feats, labels, num_classes: int) -> np.ndarray:
    """Per class, the index of the embedding nearest (L2) to the class-mean embedding [C]."""
    feats, labels = np.asarray(feats, np.float64), np.asarray(labels)
    out = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if not idx.size:
            raise InputError(f"class {c} has no training images")
        f = feats[idx]
        out.append(idx[np.argmin(np.sum((f - f.mean(0)) ** 2, axis=1))])
    return np.asarray(out, np.int64)


def neighbor_indices(query_feats, query_labels, feats, labels) -> np.ndarray:
    """For each query [N], the index of the same-class embedding with the highest cosine."""
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    q, f = unit(np.asarray(query_feats, np.float64)), unit(np.asarray(feats, np.float64))
    labels = np.asarray(labels)
    out = []
    for qi, c in zip(q, np.asarray(query_labels), strict=True):
        idx = np.flatnonzero(labels == c)
        if not idx.size:
            raise InputError(f"class {c} has no training images")
        out.append(idx[np.argmax(f[idx] @ qi)])
    return np.asarray(out, np.int64)


# ----------------------------------------------------------------------------------------------
# Embeddings and image gathering over padded batches


def _embed(params, images, *, features, cfg):
    x = centre_crop(to_unit(images), cfg.augment.input_res)
    return features(params, normalize(x, cfg.mean, cfg.std)).astype(jnp.float32)


embed_batch = jax.jit(_embed, static_argnames=("features", "cfg"))


def embed(features, params, batches: Iterable[dict], cfg) -> tuple[np.ndarray, np.ndarray]:
    """Features [N, F] of the centre crops of padded batches {"image", "label", "mask"}."""
    feats, labels = [], []
    for b in batches:
        m = np.asarray(b["mask"], bool)
        z = embed_batch(params, jnp.asarray(b["image"]), features=features, cfg=cfg)
        feats.append(np.asarray(z)[m])
        labels.append(np.asarray(b["label"])[m])
    return np.concatenate(feats), np.concatenate(labels)


def gather(batches: Iterable[dict], indices) -> np.ndarray:
    """The images at `indices` (order kept, repeats allowed) of a stream of padded batches."""
    indices = np.asarray(indices)
    want = set(indices.tolist())
    found, offset = {}, 0
    for b in batches:
        m = np.asarray(b["mask"], bool)
        imgs = np.asarray(b["image"])[m]
        for i in range(len(imgs)):
            if offset + i in want:
                found[offset + i] = imgs[i]
        offset += len(imgs)
    missing = want - set(found)
    if missing:
        raise InputError(f"indices {sorted(missing)[:5]} are past the {offset} images")
    return np.stack([found[i] for i in indices.tolist()])


# ----------------------------------------------------------------------------------------------
# CLI commands (data and backbone registries imported lazily)


def _train_stream(ds, batch_size: int, syn_res: int = distilled.SYN_RES):
    """Train images as the baselines keep them: shorter side resized to syn_res, centre crop."""
    from lgm_jax import data

    return lambda: data.eval_iterator(ds, "train", batch_size, crop=syn_res, resize=syn_res)


def _train_embeddings(ds, backbone: str, weights, batch_size: int, syn_res: int):
    """Embeddings [N, F] and labels of the train split's centre crops, and the stream and
    (backbone, params, probe config) that made them."""
    from lgm_jax.models import registry

    bb, params = registry.build(backbone, weights)
    cfg = config_base.probe_config(bb, ds.num_classes, epochs=1)
    stream = _train_stream(ds, batch_size, syn_res)
    feats, labels = embed(bb.features, params, stream(), cfg)
    return feats, labels, stream, (bb.features, params, cfg)


def run_random(
    dataset, out, seeds=5, seed=0, batch_size=256, syn_res=distilled.SYN_RES, data_dir=None
) -> list[str]:
    """One random train image per class, for each of `seeds` draws: out/seed<k>/synthetic.npz."""
    from lgm_jax import data

    ds = data.get_dataset(dataset, data_dir)
    stream = _train_stream(ds, batch_size, syn_res)
    labels = np.concatenate([np.asarray(b["label"])[np.asarray(b["mask"], bool)] for b in stream()])
    paths = []
    for k in range(seeds):
        idx = random_indices(labels, ds.num_classes, np.random.default_rng([seed, k]))
        images = gather(stream(), idx)
        path = os.path.join(out, f"seed{k}")
        paths.append(distilled.save(path, images, labels[idx], dataset=dataset, method="random"))
    return paths


def run_centroids(
    dataset, backbone, out, weights=None, batch_size=256, syn_res=distilled.SYN_RES, data_dir=None
) -> str:
    """Per class, the train image nearest its class's mean embedding: out/synthetic.npz."""
    from lgm_jax import data

    ds = data.get_dataset(dataset, data_dir)
    feats, labels, stream, _ = _train_embeddings(ds, backbone, weights, batch_size, syn_res)
    idx = centroid_indices(feats, labels, ds.num_classes)
    images = gather(stream(), idx)
    meta = dict(dataset=dataset, method="centroids", backbone=backbone)
    return distilled.save(out, images, labels[idx], **meta)


def run_neighbors(
    distilled_path,
    backbone,
    out,
    dataset=None,
    weights=None,
    batch_size=256,
    syn_res=None,
    data_dir=None,
) -> str:
    """The real train images nearest (in backbone features) to each distilled image, at the
    distilled images' side unless syn_res says otherwise."""
    from lgm_jax import data

    s = distilled.load(distilled_path)
    syn_res = syn_res or s.side
    distilled.check_images(s.images, syn_res)
    dataset = dataset or s.meta.get("dataset")
    if not dataset:
        raise InputError(f"{s.meta['path']} does not record its dataset; pass --dataset NAME")
    ds = data.get_dataset(dataset, data_dir)
    syn_labels = distilled.check_labels(s.labels, len(s.images), ds.num_classes, dataset)
    feats, labels, stream, (features, params, cfg) = _train_embeddings(
        ds, backbone, weights, batch_size, syn_res
    )
    q, _ = embed(features, params, probe.array_batches(s.images, syn_labels, batch_size), cfg)
    idx = neighbor_indices(q, syn_labels, feats, labels)
    images = gather(stream(), idx)
    meta = dict(dataset=dataset, method="neighbors", backbone=backbone)
    return distilled.save(out, images, labels[idx], **meta)


def _full_loader(data, source, seed: int):
    """load(indices, mask, epoch) of the full probe: SPEC's real images, shorter side 256 and a
    random 256 crop, fresh for every epoch and image (the same on a rerun); the probe then crops
    these to the backbone's input side."""

    def load(indices, mask, epoch):
        side = distilled.SYN_RES
        return data.read_batch(
            source, indices, crop=side, resize=side, mask=mask, crop_seed=(seed, epoch)
        )

    return load


def run_full(
    dataset,
    backbone,
    out,
    weights=None,
    seeds=1,
    epochs=100,
    batch_size=128,
    lr=5e-4,
    seed=0,
    test_batch=256,
    workers=8,
    data_dir=None,
) -> dict:
    """The full-dataset probe, the train split streamed from its source a batch at a time
    (shorter side 256, a random 256 crop drawn per epoch and image, then the protocol's flip +
    random resized crop); progress is saved after every epoch in DIR/progress.seed<k>.npz and
    an interrupted run given the same command continues from its last finished epoch."""
    from lgm_jax import data
    from lgm_jax.models import registry

    ds = data.get_dataset(dataset, data_dir)
    source = ds.source("train")
    n = len(source)
    if n == 0:
        raise InputError(f"the train split of {dataset!r} is empty")
    bb, params = registry.build(backbone, weights)
    cfg = config_base.probe_config(bb, ds.num_classes, epochs=epochs, batch_size=batch_size, lr=lr)

    load = _full_loader(data, source, seed)
    os.makedirs(out, exist_ok=True)
    # What the saved progress must agree with to be continued (the probe's settings included).
    fingerprint = json.dumps(
        [dataset, n, backbone, weights, seed, distilled.SYN_RES, cfg.settings(n)], sort_keys=True
    )
    t0 = time.time()
    try:
        probes, losses = probe.train_streamed(
            bb.features,
            params,
            load,
            n,
            feat_dim=bb.feature_dim,
            cfg=cfg,
            seeds=seeds,
            rng=jax.random.key(seed),
            workers=workers,
            progress=os.path.join(out, "progress"),
            fingerprint=fingerprint,
        )
    except probe.ProgressMismatch as e:
        raise InputError(str(e)) from e
    jax.block_until_ready(losses)
    result = evaluate.protocol_result(
        probes, losses, n, time.time() - t0, features=bb.features, params=params, cfg=cfg,
        test_batches=evaluate.test_stream(ds, bb.input_res, test_batch), seeds=seeds, seed=seed,
        **evaluate.group_options(ds),
    )  # fmt: skip
    result = {"method": "full", "backbone": backbone, "dataset": dataset, **result}
    result["settings"]["streamed"] = True
    result["skipped_images"] = data.skipped_images()
    result["out"] = evaluate.write_result(result, out)
    return result


# ----------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    p = command_parser("baselines", __doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    cmds = {name: sub.add_parser(name) for name in ("random", "centroids", "neighbors", "full")}
    for name, c in cmds.items():
        c.add_argument("--out", required=True)
        c.add_argument("--dataset", required=name != "neighbors", default=None)
        c.add_argument(
            "--backbone",
            required=name != "random",
            default=None,
            help="embedding / probe backbone"
            + (" (random: evaluate on it)" if name == "random" else ""),
        )
        c.add_argument("--weights", default=None, help="converted backbone weights (a directory)")
        c.add_argument("--data-dir", default=None, help="dataset directory, if not the default")
        c.add_argument("--batch-size", type=errors.count, default=256, help="embedding batch")
        c.add_argument("--seed", type=int, default=0)
    for name in ("random", "centroids", "neighbors"):
        default = "that of the distilled images" if name == "neighbors" else distilled.SYN_RES
        cmds[name].add_argument(
            "--syn-res", type=int, default=None, help=f"side of the saved images ({default})"
        )
    cmds["random"].add_argument("--seeds", type=errors.count, default=5)
    cmds["neighbors"].add_argument("--distilled", required=True)
    for name in ("centroids", "neighbors"):
        cmds[name].add_argument(
            "--evaluate", action="store_true", help="then run the probe protocol on --backbone"
        )
    cmds["full"].add_argument("--seeds", type=errors.count, default=1)
    cmds["full"].add_argument("--epochs", type=errors.count, default=100)
    cmds["full"].add_argument("--batch", type=errors.count, default=128)
    cmds["full"].add_argument("--lr", type=errors.positive, default=5e-4)
    cmds["full"].add_argument(
        "--workers", type=int, default=8, help="threads reading and decoding train batches"
    )
    return p


def _print_row(res: dict) -> None:
    evaluate.print_result(res)


def _random(a) -> None:
    syn_res = a.syn_res or distilled.SYN_RES
    paths = run_random(a.dataset, a.out, a.seeds, a.seed, a.batch_size, syn_res, a.data_dir)
    print("wrote", *paths, sep="\n  ")
    if a.backbone:
        out = os.path.join(a.out, "eval", a.backbone.replace("/", "_"))
        kw = dict(weights=a.weights, seeds=len(paths), data_dir=a.data_dir, out=out)
        _print_row(evaluate.evaluate(paths, a.backbone, **kw))


def _selection(a) -> None:
    if a.cmd == "centroids":
        syn_res = a.syn_res or distilled.SYN_RES
        args = (a.dataset, a.backbone, a.out, a.weights, a.batch_size, syn_res, a.data_dir)
        path = run_centroids(*args)
    else:
        args = (a.distilled, a.backbone, a.out, a.dataset, a.weights, a.batch_size, a.syn_res)
        path = run_neighbors(*args, a.data_dir)
    print("wrote", path)
    if a.evaluate:
        kw = dict(weights=a.weights, seed=a.seed, data_dir=a.data_dir)
        _print_row(evaluate.evaluate(a.out, a.backbone, **kw))


def _full(a) -> None:
    res = run_full(
        a.dataset,
        a.backbone,
        a.out,
        a.weights,
        a.seeds,
        a.epochs,
        a.batch,
        a.lr,
        a.seed,
        workers=a.workers,
        data_dir=a.data_dir,
    )
    _print_row(res)
    print(json.dumps({"eval": res["out"]}))


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    # Progress (the full probe's epochs, skipped images) to stderr.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    commands = {"random": _random, "centroids": _selection, "neighbors": _selection}
    return run_command(lambda: commands.get(a.cmd, _full)(a))


if __name__ == "__main__":
    sys.exit(main())
