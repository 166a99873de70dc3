"""Write a miniature Oxford Flowers-102 download, to prepare offline with tfds' own builder.

    python -m lgm_jax.flowers_miniature --out /tmp/flowers_manual --per-class 2

writes the three files tfds' oxford_flowers102 builder downloads, under their own names:
102flowers.tgz (jpg/image_00001.jpg, ...), imagelabels.mat (`labels`, 1..102, one per image) and
setid.mat (`trnid`, `valid`, `tstid`: 1-based image ids). Every class gets --per-class train,
--per-class validation and 2 x --per-class test images (the real dataset's proportions: 10, 10
and at least 20 per class). Image k (1-based) is of class (k - 1) mod 102, so the ids of one
split are spread over the whole range, as in the real files. It checks the way a user prepares
Flowers-102 without the network (docs/data.md) and without the 330 MB download.

Every image is a 16x16 solid colour that encodes its class index (imagenet_miniature's
`class_colour`), so a reader can check each record's label against its pixels
(`imagenet_miniature.decode_class`).
"""

from __future__ import annotations

import io
import os
import sys
import tarfile

import numpy as np

from lgm_jax import errors
from lgm_jax.imagenet_miniature import add_file, jpeg

NUM_CLASSES = 102
FILES = ("102flowers.tgz", "imagelabels.mat", "setid.mat")


def split_ids(per_class: int) -> dict[str, np.ndarray]:
    """The 1-based image ids of each split, keyed by setid.mat's field names (sorted)."""
    ids = np.arange(1, 4 * per_class * NUM_CLASSES + 1)
    rounds = (ids - 1) // NUM_CLASSES  # image k is the round-th image of its class
    return {
        "trnid": ids[rounds < per_class],
        "valid": ids[(rounds >= per_class) & (rounds < 2 * per_class)],
        "tstid": ids[rounds >= 2 * per_class],
    }


def labels(count: int) -> np.ndarray:
    """imagelabels.mat's `labels`: the 1-based class of images 1..count."""
    return np.arange(count) % NUM_CLASSES + 1


def write_images(path: str, count: int) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for k in range(1, count + 1):
            add_file(tar, f"jpg/image_{k:05d}.jpg", jpeg((k - 1) % NUM_CLASSES))


def write(out: str, per_class: int = 2) -> None:
    """The three files into `out`."""
    from scipy import io as sio  # scipy comes with mlxtend; only this command needs it

    if per_class < 1:
        raise errors.InputError(f"--per-class must be >= 1, got {per_class}")
    count = 4 * per_class * NUM_CLASSES
    os.makedirs(out, exist_ok=True)
    write_images(os.path.join(out, FILES[0]), count)
    # The real files' dtypes: labels uint8, ids uint16, each a 1 x N row.
    sio.savemat(os.path.join(out, FILES[1]), {"labels": labels(count).astype(np.uint8)[None]})
    ids = {k: v.astype(np.uint16)[None] for k, v in split_ids(per_class).items()}
    sio.savemat(os.path.join(out, FILES[2]), ids)


def read_mat(path: str) -> dict[str, np.ndarray]:
    """A .mat file's arrays as 1-D rows (what the builder reads with scipy.io.loadmat)."""
    from scipy import io as sio

    with open(path, "rb") as f:
        return {k: v[0] for k, v in sio.loadmat(io.BytesIO(f.read())).items() if k[0] != "_"}


def main(argv=None) -> int:
    parser = errors.command_parser("flowers_miniature", __doc__)
    parser.add_argument("--out", required=True, help="the directory to write the three files to")
    parser.add_argument(
        "--per-class",
        type=errors.count,
        default=2,
        help="train (and validation) images per class; the test split gets twice as many",
    )
    args = parser.parse_args(argv)

    def body():
        write(args.out, args.per_class)
        print(f"wrote {', '.join(os.path.join(args.out, f) for f in FILES)}")

    return errors.run_command(body)


if __name__ == "__main__":
    sys.exit(main())
