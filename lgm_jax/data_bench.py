"""How fast the host prepares real batches: read, decode, resize to 256 and crop, per thread count.

    python -m lgm_jax.data_bench --threads 1 2 4 [--folder DIR] [--images 300] [--batch 100]

Without --folder it writes `--images` JPEGs of ImageNet's typical size (500 x 375, quality 90,
smooth random content) to a temporary folder first. It times `TrainBatches` (what a distillation
run calls for each step's real batch) over a few batches per thread count and prints images per
second. A run keeps up when images/s >= real images per step / step time (for ImageNet-100 at
K = 10: 1000 images per step, so 3,333 images/s for a 0.3 s step).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from lgm_jax import errors
from lgm_jax.errors import command_parser


def write_jpegs(root: str, n: int, classes: int = 4, size=(500, 375), seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        d = os.path.join(root, f"class_{i % classes}")
        os.makedirs(d, exist_ok=True)
        coarse = rng.uniform(0, 255, (h // 25 + 1, w // 25 + 1, 3)).astype(np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        noise = rng.normal(0, 12, (h, w, 3))
        arr = np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(d, f"{i:05d}.jpg"), quality=90)


def parse(argv=None) -> argparse.Namespace:
    p = command_parser("data_bench", __doc__)
    p.add_argument("--folder", help="an image folder (root/<class>/<image>); default: generated")
    p.add_argument("--images", type=errors.count, default=300, help="JPEGs to generate")
    p.add_argument("--batch", type=errors.count, default=100)
    p.add_argument("--batches", type=errors.count, default=3, help="timed batches per thread count")
    p.add_argument(
        "--syn-res", type=int, default=256, help="side the images are cropped to (a run's syn_res)"
    )
    p.add_argument("--threads", type=errors.count, nargs="+", default=[1, 2, 4])
    return p.parse_args(argv)


def bench(a: argparse.Namespace) -> None:
    """Print images per second of `TrainBatches` for every thread count of `a.threads`."""
    from lgm_jax.data import pipeline, sources

    if a.folder is not None and not os.path.isdir(a.folder):
        raise errors.InputError(f"--folder {a.folder}: not a directory")
    with tempfile.TemporaryDirectory() as tmp:
        root = a.folder
        if root is None:
            root = tmp
            t0 = time.perf_counter()
            write_jpegs(root, a.images)
            print(f"wrote {a.images} JPEGs (500 x 375) in {time.perf_counter() - t0:.1f} s")
        src = sources.image_folder(root, test_fraction=0.0).source("train")
        idx = pipeline.shard_indices(len(src), 0, 1)
        print(f"{len(src)} images, batch {a.batch}, crop {a.syn_res}; CPUs: {os.cpu_count()}")
        print(f"{'threads':>8s} {'s/batch':>9s} {'images/s':>9s}")
        for threads in a.threads:
            batches = pipeline.TrainBatches(src, idx, a.batch, 0, a.syn_res, threads=threads)
            batches(0)  # warm-up (thread pool, file cache)
            t0 = time.perf_counter()
            for k in range(1, a.batches + 1):
                batches(k)
            dt = (time.perf_counter() - t0) / a.batches
            print(f"{threads:8d} {dt:9.3f} {a.batch / dt:9.0f}")


def main(argv=None) -> int:
    return errors.run_command(lambda: bench(parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
