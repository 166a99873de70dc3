"""The paper's baselines: random real images, class centroids, nearest neighbours, full data.

    python -m lgm_jax.baselines random    --dataset D [--seeds 5] --out DIR [--backbone B]
    python -m lgm_jax.baselines centroids --dataset D --backbone B --out DIR [--evaluate]
    python -m lgm_jax.baselines neighbors --distilled RUN --backbone B --out DIR [--evaluate]
    python -m lgm_jax.baselines full      --dataset D --backbone B --out DIR [--epochs 100]

Each selection baseline writes real training images in the format `lgm_jax.evaluate` reads
(synthetic.npz: images uint8 [N, 256, 256, 3], labels [N], plus dataset/method/backbone names):
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

from lgm_jax import evaluate as ev
from lgm_jax import lgm, probe

# ----------------------------------------------------------------------------------------------
# Selection rules (pure NumPy)


def random_indices(labels, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """One uniformly random index per class [C]."""
    labels = np.asarray(labels)
    out = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if not idx.size:
            raise ev.InputError(f"class {c} has no training images")
        out.append(rng.choice(idx))
    return np.asarray(out, np.int64)


def centroid_indices(feats, labels, num_classes: int) -> np.ndarray:
    """Per class, the index of the embedding nearest (L2) to the class-mean embedding [C]."""
    feats, labels = np.asarray(feats, np.float64), np.asarray(labels)
    out = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if not idx.size:
            raise ev.InputError(f"class {c} has no training images")
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
            raise ev.InputError(f"class {c} has no training images")
        out.append(idx[np.argmax(f[idx] @ qi)])
    return np.asarray(out, np.int64)


# ----------------------------------------------------------------------------------------------
# Embeddings and image gathering over padded batches


def _embed(params, images, *, features, cfg):
    x = probe.centre_crop(lgm.to_unit(images), cfg.augment.input_res)
    return features(params, lgm.normalize(x, cfg)).astype(jnp.float32)


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
        raise ev.InputError(f"indices {sorted(missing)[:5]} are past the {offset} images")
    return np.stack([found[i] for i in indices.tolist()])


def save_set(out: str, images, labels, **meta) -> str:
    ev.check_images(images, res=None, what="selected images")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "synthetic.npz")
    np.savez(path, images=images, labels=np.asarray(labels, np.int32), **meta)
    return path


# ----------------------------------------------------------------------------------------------
# CLI commands (data and backbone registries imported lazily)


def _train_stream(ds, batch_size: int, image_res: int | None = None):
    """Train images as the baselines keep them: shorter side resized to image_res (256), centre
    crop image_res."""
    from lgm_jax import data

    res = image_res or ev.SYN_RES
    return lambda: data.eval_iterator(ds, "train", batch_size, res=res, resize=res)


def _train_embeddings(ds, backbone: str, weights, batch_size: int, image_res: int | None = None):
    features, params, _, res, mean, std = ev.build_backbone(backbone, weights)
    cfg = ev.probe_config(ds.num_classes, res, mean, std, epochs=1)
    stream = _train_stream(ds, batch_size, image_res)
    feats, labels = embed(features, params, stream(), cfg)
    return feats, labels, stream, (features, params, cfg)


def run_random(
    dataset, out, seeds=5, seed=0, batch_size=256, image_res=None, data_dir=None
) -> list[str]:
    from lgm_jax import data

    ds = data.get_dataset(dataset, data_dir)
    stream = _train_stream(ds, batch_size, image_res)
    labels = np.concatenate([np.asarray(b["label"])[np.asarray(b["mask"], bool)] for b in stream()])
    paths = []
    for k in range(seeds):
        idx = random_indices(labels, ds.num_classes, np.random.default_rng([seed, k]))
        paths.append(
            save_set(
                os.path.join(out, f"seed{k}"),
                gather(stream(), idx),
                labels[idx],
                dataset=dataset,
                method="random",
            )
        )
    return paths


def run_centroids(
    dataset, backbone, out, weights=None, batch_size=256, image_res=None, data_dir=None
) -> str:
    from lgm_jax import data

    ds = data.get_dataset(dataset, data_dir)
    feats, labels, stream, _ = _train_embeddings(ds, backbone, weights, batch_size, image_res)
    idx = centroid_indices(feats, labels, ds.num_classes)
    return save_set(
        out,
        gather(stream(), idx),
        labels[idx],
        dataset=dataset,
        method="centroids",
        backbone=backbone,
    )


def run_neighbors(
    distilled,
    backbone,
    out,
    dataset=None,
    weights=None,
    batch_size=256,
    image_res=None,
    data_dir=None,
) -> str:
    """The real train images nearest (in backbone features) to each distilled image, at the
    distilled images' resolution unless image_res says otherwise."""
    from lgm_jax import data

    images, syn_labels, meta = ev.load_distilled(distilled)
    image_res = image_res or images.shape[1]
    ev.check_images(images, image_res)
    dataset = dataset or meta.get("dataset")
    if not dataset:
        raise ev.InputError(f"{meta['path']} does not record its dataset; pass --dataset NAME")
    ds = data.get_dataset(dataset, data_dir)
    syn_labels = ev.check_labels(syn_labels, len(images), ds.num_classes, dataset)
    feats, labels, stream, (features, params, cfg) = _train_embeddings(
        ds, backbone, weights, batch_size, image_res
    )
    q, _ = embed(features, params, probe.array_batches(images, syn_labels, batch_size), cfg)
    idx = neighbor_indices(q, syn_labels, feats, labels)
    return save_set(
        out,
        gather(stream(), idx),
        labels[idx],
        dataset=dataset,
        method="neighbors",
        backbone=backbone,
    )


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

    ds = data.get_dataset(dataset, data_dir)
    source = ds.source("train")
    n = len(source)
    if n == 0:
        raise ev.InputError(f"the train split of {dataset!r} is empty")
    features, params, feat_dim, res, mean, std = ev.build_backbone(backbone, weights)
    cfg = ev.probe_config(
        ds.num_classes, res, mean, std, epochs=epochs, batch_size=batch_size, lr=lr
    )

    def load(indices, mask, epoch):  # SPEC's real images: shorter side 256, random 256 crop
        crop = (seed, epoch)  # a fresh crop of each image every epoch, the same on a rerun
        side = ev.SYN_RES  # (res is the backbone's: the probe's crops and the test images)
        return data.read_batch(source, indices, res=side, resize=side, mask=mask, crop_seed=crop)

    os.makedirs(out, exist_ok=True)
    # What the saved progress must agree with to be continued (the probe's settings included).
    fingerprint = json.dumps(
        [dataset, n, backbone, weights, seed, ev.SYN_RES, cfg.settings(n)], sort_keys=True
    )
    t0 = time.time()
    try:
        probes, losses = probe.train_streamed(
            features,
            params,
            load,
            n,
            feat_dim=feat_dim,
            cfg=cfg,
            seeds=seeds,
            rng=jax.random.key(seed),
            workers=workers,
            progress=os.path.join(out, "progress"),
            fingerprint=fingerprint,
        )
    except probe.ProgressMismatch as e:
        raise ev.InputError(str(e)) from e
    jax.block_until_ready(losses)
    result = ev.protocol_result(
        probes, losses, n, time.time() - t0, features=features, params=params, cfg=cfg,
        test_batches=ev.test_stream(ds, res, test_batch), seeds=seeds, seed=seed,
    )  # fmt: skip
    result = {"method": "full", "backbone": backbone, "dataset": dataset, **result}
    result["settings"]["streamed"] = True
    result["skipped_images"] = data.skipped_images()
    result["out"] = ev.write_result(result, out)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lgm_jax.baselines",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
        c.add_argument("--weights", default=None)
        c.add_argument("--data-dir", default=None, help="dataset directory, if not the default")
        c.add_argument("--batch-size", type=int, default=256, help="embedding batch")
        c.add_argument("--seed", type=int, default=0)
        if name != "full":
            c.add_argument(
                "--image-res",
                type=int,
                default=None,
                help=f"side of the saved images (default {ev.SYN_RES}; neighbors: that of the "
                "distilled images)",
            )
    cmds["random"].add_argument("--seeds", type=int, default=5)
    cmds["neighbors"].add_argument("--distilled", required=True)
    for name in ("centroids", "neighbors"):
        cmds[name].add_argument(
            "--evaluate", action="store_true", help="then run the probe protocol on --backbone"
        )
    cmds["full"].add_argument("--seeds", type=int, default=1)
    cmds["full"].add_argument("--epochs", type=int, default=100)
    cmds["full"].add_argument("--batch", type=int, default=128)
    cmds["full"].add_argument("--lr", type=float, default=5e-4)
    cmds["full"].add_argument(
        "--workers", type=int, default=8, help="threads reading and decoding train batches"
    )
    a = p.parse_args(argv)
    # Progress (the full probe's epochs, skipped images) to stderr.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        if a.cmd == "random":
            res_out = a.image_res or ev.SYN_RES
            paths = run_random(a.dataset, a.out, a.seeds, a.seed, a.batch_size, res_out, a.data_dir)
            print("wrote", *paths, sep="\n  ")
            if a.backbone:
                res = ev.evaluate(
                    paths,
                    a.backbone,
                    weights=a.weights,
                    seeds=len(paths),
                    image_res=res_out,
                    data_dir=a.data_dir,
                    out=os.path.join(a.out, "eval", a.backbone.replace("/", "_")),
                )
                print(ev.TABLE_HEAD, ev.format_row(res), sep="\n")
        elif a.cmd in ("centroids", "neighbors"):
            if a.cmd == "centroids":
                path = run_centroids(
                    a.dataset,
                    a.backbone,
                    a.out,
                    a.weights,
                    a.batch_size,
                    a.image_res or ev.SYN_RES,
                    a.data_dir,
                )
            else:
                path = run_neighbors(
                    a.distilled,
                    a.backbone,
                    a.out,
                    a.dataset,
                    a.weights,
                    a.batch_size,
                    a.image_res,
                    a.data_dir,
                )
            print("wrote", path)
            if a.evaluate:
                saved = np.load(os.path.join(a.out, "synthetic.npz"))["images"].shape[1]
                res = ev.evaluate(
                    a.out,
                    a.backbone,
                    weights=a.weights,
                    seed=a.seed,
                    image_res=saved,
                    data_dir=a.data_dir,
                )
                print(ev.TABLE_HEAD, ev.format_row(res), sep="\n")
        else:
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
            print(ev.TABLE_HEAD, ev.format_row(res), sep="\n")
            print(json.dumps({"eval": res["out"]}))
    except ev.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
