"""A distilled image set on disk: the one owner of its format (save, load, validate, pictures).

A set is `synthetic.npz` in a run directory (or any .npz path) holding
    images       uint8 [N, S, S, 3]   (S: the set's side; distillation writes syn_res)
    labels       int32 [N]
    class_names  str [C]              (optional) the dataset's class names, in label order
    dataset, backbone, method, step   (optional) where it came from
A run directory's `config.json` fills in the dataset, backbone and data_dir when the npz lacks
them. The distillation run, the baselines and evaluation all read and write sets through here;
the side is read from the data, so no command needs a resolution flag to read one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zipfile

import numpy as np

from lgm_jax.errors import InputError

FILENAME = "synthetic.npz"
SYN_RES = 256  # the side of distilled (and baseline) images in real runs
META_KEYS = ("dataset", "backbone", "method", "step")


@dataclasses.dataclass
class ImageSet:
    """images uint8 [N, S, S, 3], labels int32 [N], class names (or None) and where it came
    from (meta: dataset, backbone, method, step, data_dir, path; whichever are known)."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...] | None = None
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def side(self) -> int:
        return int(self.images.shape[1])


def check_images(images, side: int | None = None, what: str = "distilled images") -> None:
    """uint8 [N, S, S, 3] (with S = side when given), else InputError saying how to fix it."""
    shape = getattr(images, "shape", None)
    if shape is None or len(shape) != 4:
        raise InputError(f"{what} must be a 4-D array [N, H, W, 3], got shape {shape}")
    if shape[-1] != 3:
        hint = "; they look NCHW: use x.transpose(0, 2, 3, 1)" if shape[1] == 3 else ""
        raise InputError(f"{what} must be NHWC with 3 channels, got shape {shape}{hint}")
    if shape[1] != shape[2] or (side is not None and shape[1] != side):
        want = f"{side}x{side}" if side is not None else "square"
        raise InputError(
            f"{what} must be {want} pixels, got {shape[1]}x{shape[2]} (resize the shorter side "
            "and centre-crop to a square)"
        )
    if images.dtype != np.uint8:
        lo, hi = (float(np.min(images)), float(np.max(images))) if len(images) else (0.0, 0.0)
        fix = (
            "values in [0, 1]: save np.round(x * 255).astype(np.uint8)"
            if lo >= 0 and hi <= 1
            else "values outside [0, 1]: map them to [0, 255] and save as uint8"
        )
        raise InputError(
            f"{what} must be uint8 in [0, 255], got dtype {images.dtype} with values in "
            f"[{lo:.3g}, {hi:.3g}] ({fix})"
        )


def check_labels(
    labels,
    num_images: int,
    num_classes: int,
    dataset: str = "the dataset",
    require_all: bool = True,
) -> np.ndarray:
    """Integer labels [N] in [0, C), every class present (when require_all), as int32; else
    InputError."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != num_images:
        raise InputError(
            f"labels must have shape [{num_images}] (one per image), got {labels.shape}"
        )
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        if not np.all(labels == np.round(labels)):
            raise InputError(f"labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise InputError(
            f"labels must lie in [0, {num_classes}) for {dataset} ({num_classes} classes), got "
            f"{sorted(set(bad.tolist()))[:5]}; was the set distilled on another dataset? pass the "
            "matching --dataset"
        )
    present = np.unique(labels)
    if require_all and len(present) != num_classes:
        missing = sorted(set(range(num_classes)) - set(present.tolist()))
        raise InputError(
            f"the set has images of {len(present)} classes but {dataset} has {num_classes} "
            f"(missing {missing[:10]}{'...' if len(missing) > 10 else ''}); distil (or select) "
            "with the same dataset you evaluate on, or pass the matching --dataset"
        )
    return labels.astype(np.int32)


def npz_path(path: str) -> str:
    """A run directory (holding synthetic.npz) or an npz file -> the npz path."""
    p = os.path.join(path, FILENAME) if os.path.isdir(path) else path
    if not os.path.isfile(p):
        raise InputError(
            f"{p} not found: a distilled set is a run directory holding {FILENAME} or an .npz "
            "file with 'images' (uint8 [N, S, S, 3]) and 'labels' ([N])"
        )
    return p


def save(out: str, images, labels, class_names=None, **meta) -> str:
    """Write a set to `out` (a directory, which gets synthetic.npz, or an .npz path), atomically;
    meta: any of dataset, backbone, method, step. Returns the path written."""
    check_images(images, what="images to save")
    path = out if out.endswith(".npz") else os.path.join(out, FILENAME)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arrays = {"images": np.asarray(images), "labels": np.asarray(labels, np.int32)}
    if class_names is not None:
        arrays["class_names"] = np.asarray(list(class_names), dtype=str)
    unknown = sorted(set(meta) - set(META_KEYS))
    if unknown:
        raise ValueError(f"unknown set metadata {unknown}; known: {META_KEYS}")
    arrays.update({k: v for k, v in meta.items() if v is not None})
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # a kill during the write leaves the previous set whole
    return path


def load(path: str) -> ImageSet:
    """The set at `path` (a run directory or an .npz), its images checked; meta["path"] is the
    npz read."""
    p = npz_path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            for key in ("images", "labels"):
                if key not in z:
                    raise InputError(f"{p} has no '{key}' array (it has {sorted(z.files)})")
            images, labels = z["images"], z["labels"]
            names = tuple(str(n) for n in z["class_names"]) if "class_names" in z else None
            meta = {k: z[k].item() for k in META_KEYS if k in z}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{p} is not a readable .npz file ({e})") from e
    meta = {k: (str(v) if k != "step" else int(v)) for k, v in meta.items()}
    meta.update({k: v for k, v in _run_config(p).items() if k not in meta})
    meta["path"] = p
    check_images(images, what=f"images in {p}")
    return ImageSet(images, labels, names, meta)


def _run_config(npz: str) -> dict:
    """dataset, backbone and data_dir from the config.json of the run directory holding npz."""
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(npz)), "config.json")
    if not os.path.isfile(cfg_path):
        return {}
    with open(cfg_path) as f:
        cfg = json.load(f)
    return {k: cfg[k] for k in ("dataset", "backbone", "data_dir") if isinstance(cfg.get(k), str)}


def to_uint8(x) -> np.ndarray:
    """Float images in [0, 1] (clipped) -> uint8, rounded to the nearest level."""
    import jax.numpy as jnp

    return np.asarray(jnp.round(jnp.clip(x, 0, 1) * 255), np.uint8)


def save_grid(images: np.ndarray, path: str, cols: int | None = None) -> None:
    """One PNG of uint8 images [N, H, W, 3] in a grid (ceil(sqrt(N)) columns), atomically."""
    from PIL import Image

    n, h, w, _ = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    tmp = path + ".tmp.png"
    Image.fromarray(canvas).save(tmp)
    os.replace(tmp, path)


def save_pictures(s: ImageSet, folder: str) -> None:
    """folder/class_<c>.png (the images of each class) and folder/final.png (all of them)."""
    os.makedirs(folder, exist_ok=True)
    for c in np.unique(s.labels):
        save_grid(s.images[s.labels == c], os.path.join(folder, f"class_{c}.png"))
    save_grid(s.images, os.path.join(folder, "final.png"))
