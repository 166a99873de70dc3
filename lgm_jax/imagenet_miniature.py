"""Write a miniature ImageNet manual directory, to prepare with tfds' own imagenet2012 builder.

    python -m lgm_jax.imagenet_miniature --out /tmp/imagenet_manual --per-class 2 --val 300

writes ILSVRC2012_img_train.tar (one inner tar <synset>.tar per synset, all 1000 in tfds' label
order, each with --per-class JPEGs <synset>_<k>.JPEG) and ILSVRC2012_img_val.tar (the first --val
validation files ILSVRC2012_val_XXXXXXXX.JPEG, labelled by tfds' validation_labels.txt). It
checks the way a user builds ImageNet (docs/data.md) without the 150 GB download.

Every image is a 16x16 solid colour that encodes its class index c: channel k holds digit k of c
in base 10, times 25 (`class_colour`), so a reader can check each record's label against its
pixels (`decode_class`). The synset list and the validation labels are read from the installed
tensorflow_datasets package, the same files its builder uses.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile

import numpy as np

from lgm_jax import errors

SIDE = 16
STEP = 25  # colour levels 0, 25, ..., 225: far apart enough to survive JPEG


def _tfds_file(name: str) -> str:
    import tensorflow_datasets as tfds  # a core dependency; no TensorFlow needed for this

    return os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012", name)


def synsets() -> list[str]:
    """The 1000 synsets in tfds' label order (its labels.txt)."""
    with open(_tfds_file("labels.txt")) as f:
        return f.read().split()


def validation_labels() -> list[str]:
    """The synset of validation image i + 1 (tfds' validation_labels.txt)."""
    with open(_tfds_file("validation_labels.txt")) as f:
        return f.read().split()


def class_colour(c: int) -> tuple[int, int, int]:
    """Class index 0..999 -> an RGB colour (its three decimal digits, times STEP)."""
    return tuple(STEP * ((c // 10**k) % 10) for k in range(3))


def decode_class(image) -> int:
    """The class index a miniature image encodes (mean colour, rounded to the levels)."""
    mean = np.asarray(image, np.float64).reshape(-1, 3).mean(0)
    digits = np.clip(np.rint(mean / STEP), 0, 9).astype(int)
    return int(digits[0] + 10 * digits[1] + 100 * digits[2])


def jpeg(c: int) -> bytes:
    from PIL import Image

    image = np.broadcast_to(np.asarray(class_colour(c), np.uint8), (SIDE, SIDE, 3))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_train(path: str, per_class: int, classes: list[str]) -> None:
    with tarfile.open(path, "w") as outer:
        for c, synset in enumerate(classes):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for k in range(per_class):
                    add_file(inner, f"{synset}_{k}.JPEG", jpeg(c))
            add_file(outer, f"{synset}.tar", buf.getvalue())


def write_val(path: str, count: int, classes: list[str]) -> None:
    index = {s: c for c, s in enumerate(classes)}
    labels = validation_labels()
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            add_file(tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg(index[labels[i]]))


def write(out: str, per_class: int = 2, val: int = 300, num_classes: int = 1000) -> None:
    """Both tars into `out`; `num_classes` < 1000 keeps the first synsets only (for tests: tfds
    needs all 1000 to prepare it)."""
    if per_class < 1 or not 0 <= val <= 50000 or not 1 <= num_classes <= 1000:
        raise errors.InputError("need --per-class >= 1, 0 <= --val <= 50000")
    classes = synsets()[:num_classes]
    os.makedirs(out, exist_ok=True)
    write_train(os.path.join(out, "ILSVRC2012_img_train.tar"), per_class, classes)
    if num_classes < 1000:  # validation labels name any of the 1000 synsets
        classes = synsets()
    write_val(os.path.join(out, "ILSVRC2012_img_val.tar"), val, classes)


def main(argv=None) -> int:
    parser = errors.command_parser("imagenet_miniature", __doc__)
    parser.add_argument("--out", required=True, help="the manual directory to write")
    parser.add_argument("--per-class", type=errors.count, default=2, help="train images per synset")
    parser.add_argument(
        "--val", type=errors.natural, default=300, help="validation images (the first V)"
    )
    parser.add_argument(
        "--classes",
        type=errors.count,
        default=1000,
        help="first synsets only (tests; tfds needs 1000)",
    )
    args = parser.parse_args(argv)

    def body():
        write(args.out, args.per_class, args.val, args.classes)
        print(f"wrote {args.out}/ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar")

    return errors.run_command(body)


if __name__ == "__main__":
    sys.exit(main())
