"""A distilled image set on disk: the one owner of its format (save, load, validate, pictures).

A set is `synthetic.npz` in a run directory (or any .npz path) holding
    images       uint8 [N, S, S, 3]   (S: the set's side; distillation writes syn_res)
    labels       int32 [N]
    class_names  str [C]              (optional) the dataset's class names, in label order
    dataset, backbone, method, step   (optional) where it came from
A run directory's `config.json` fills in the dataset, backbone and data_dir when the npz lacks
them. The distillation run, the baselines and evaluation all read and write sets through here;
the side is read from the data, so no command needs a resolution flag to read one.

Exchange formats (read by `load`, written by `write_folder`, `write_pth`, `write_hf`):
    an image folder   one subfolder per class, `000_<name>` (sorted = label order), PNG/JPEG
                      files; torchvision's ImageFolder reads the same labels. set.json at the
                      root (ignored by ImageFolder) keeps the exact class names and metadata.
    data.pth          the original implementation's {"images": float32 [N, 3, H, W] in [0, 1],
                      "labels": int64 [N]}, read with torch.load(weights_only=True) (extra: pth)
    a saved HF set    datasets.Dataset with an `image` column and a `label` ClassLabel column,
                      saved with save_to_disk (extra: hf)
Sets read from data.pth keep float32 images in [0, 1]; every other format holds uint8.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import zipfile

import numpy as np

from lgm_jax.errors import InputError, read_json

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


def check_images(
    images, side: int | None = None, what: str = "distilled images", float_ok: bool = True
) -> None:
    """[N, S, S, 3] (with S = side when given), uint8 or (when float_ok) float32/float64 in
    [0, 1], else InputError saying how to fix it."""
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
    if images.dtype == np.uint8:
        return
    lo, hi = (float(np.min(images)), float(np.max(images))) if len(images) else (0.0, 0.0)
    in_unit = lo >= 0 and hi <= 1  # False for NaN too
    if float_ok and images.dtype in (np.float32, np.float64) and in_unit:
        return
    want = "uint8 in [0, 255] or float32 in [0, 1]" if float_ok else "uint8 in [0, 255]"
    fix = (
        "values in [0, 1]: save np.round(x * 255).astype(np.uint8)"
        if in_unit
        else "values outside [0, 1]: map them to [0, 255] and save as uint8"
    )
    raise InputError(
        f"{what} must be {want}, got dtype {images.dtype} with values in "
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
            f"{p} not found: a distilled set is a run directory holding {FILENAME}, an .npz "
            "file with 'images' (uint8 [N, S, S, 3]) and 'labels' ([N]), a data.pth, an image "
            "folder (000_<name>/ subfolders) or a saved Hugging Face dataset"
        )
    return p


def save(out: str, images, labels, class_names=None, **meta) -> str:
    """Write a set to `out` (a directory, which gets synthetic.npz, or an .npz path), atomically;
    meta: any of dataset, backbone, method, step. Returns the path written."""
    check_images(images, what="images to save", float_ok=False)
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
    """The set at `path`, its images checked; meta["path"] is the file or folder read. `path`:
    a run directory or an .npz, a data.pth, an image folder or a saved HF dataset."""
    kind = _kind(path)
    if kind == "npz":
        return _load_npz(npz_path(path))
    s = {"pth": _load_pth, "folder": _load_folder, "hf": _load_hf}[kind](path)
    check_images(s.images, what=f"images in {path}")
    s.labels = check_labels(s.labels, len(s.images), int(s.labels.max(initial=-1)) + 1, path, False)
    return s


def _kind(path: str) -> str:
    """npz, pth, folder or hf: what the path holds."""
    if os.path.isfile(path):
        return "pth" if path.endswith((".pth", ".pt")) else "npz"
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, FILENAME)):
        return "npz"  # npz_path says what is missing
    names = os.listdir(path)
    if {"dataset_info.json", "state.json"} & set(names) or "dataset_dict.json" in names:
        return "hf"
    if any(os.path.isdir(os.path.join(path, n)) and not n.startswith(".") for n in names):
        return "folder"
    raise InputError(
        f"{path} is not a distilled set: no {FILENAME}, no class subfolders (000_<name>/ with "
        "PNG files) and no saved Hugging Face dataset (dataset_info.json)"
    )


def _load_npz(p: str) -> ImageSet:
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
    cfg = read_json(cfg_path, "a run's config.json")
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


# ----------------------------------------------------------------------------------------------
# Exchange formats: an image folder, the original implementation's data.pth, a saved HF dataset

SET_JSON = "set.json"  # beside an image folder's class subfolders: exact names and metadata
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _extra(name: str, extra: str):
    """Import an optional dependency, or say which extra to install."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise InputError(f'{name} is needed for this format: pip install -e ".[{extra}]"') from e


def check_fresh(out: str) -> None:
    """Refuse to write into an existing file or a non-empty folder."""
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out)):
        raise InputError(f"{out} already exists and is not empty; pass a new --out")


def unit_images(images) -> np.ndarray:
    """uint8 or float [0, 1] images -> float32 in [0, 1]."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255
    return images.astype(np.float32)


def uint8_images(images) -> np.ndarray:
    """uint8 or float [0, 1] images -> uint8 (floats rounded to the nearest level)."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)


def _names(s: ImageSet) -> tuple[str, ...]:
    if s.class_names is not None:
        return tuple(s.class_names)
    return tuple(f"class_{c}" for c in range(int(s.labels.max(initial=-1)) + 1))


def _meta_record(s: ImageSet) -> dict:
    return {k: s.meta[k] for k in (*META_KEYS, "data_dir") if s.meta.get(k) is not None}


def _load_pth(path: str) -> ImageSet:
    torch = _extra("torch", "pth")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickling, zip or EOF error: the file is not a data.pth
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path} is not a readable data.pth ({msg})") from e
    if not isinstance(obj, dict) or not {"images", "labels"} <= set(obj):
        found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise InputError(f"{path} must hold a dict with 'images' and 'labels', got {found}")
    images, labels = obj["images"], obj["labels"]
    if not (torch.is_tensor(images) and torch.is_tensor(labels)):
        raise InputError(f"{path}: 'images' and 'labels' must be tensors")
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"{path}: 'images' must be [N, 3, H, W], got {tuple(images.shape)}")
    x = images.permute(0, 2, 3, 1).contiguous().numpy()
    if x.dtype != np.uint8:
        x = x.astype(np.float32)
    names = obj.get("class_names")
    names = tuple(str(n) for n in names) if isinstance(names, (list, tuple)) else None
    return ImageSet(x, labels.numpy().astype(np.int64), names, {"path": path})


def write_pth(out: str, images, labels) -> str:
    """data.pth at `out` (a .pth path, or a folder that gets data.pth): float32 [N, 3, H, W] in
    [0, 1] (images: float in [0, 1] or uint8, [N, H, W, 3]) and int64 labels [N]."""
    torch = _extra("torch", "pth")
    check_fresh(out)
    path = out if out.endswith((".pth", ".pt")) else os.path.join(out, "data.pth")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    x = np.clip(unit_images(images), 0, 1).transpose(0, 3, 1, 2)
    data = {
        "images": torch.from_numpy(np.ascontiguousarray(x)),
        "labels": torch.from_numpy(np.asarray(labels, np.int64)),
    }
    torch.save(data, path)
    return path


def safe_name(name: str) -> str:
    """A class name usable as a folder name on any file system."""
    name = re.sub(r'[<>:"/\\|?*\x00-\x1f]', "_", str(name)).strip().rstrip(".")
    return name or "_"


def write_folder(out: str, s: ImageSet) -> str:
    """`out/000_<name>/<index>.png`, one subfolder per class in label order, and out/set.json."""
    from PIL import Image

    check_fresh(out)
    names, images = _names(s), uint8_images(s.images)
    empty = sorted(set(range(len(names))) - set(np.asarray(s.labels).tolist()))
    if empty:
        raise InputError(f"classes {empty[:10]} have no images; an image folder cannot hold them")
    width, digits = max(3, len(str(len(names) - 1))), max(4, len(str(len(images) - 1)))
    dirs = [os.path.join(out, f"{c:0{width}d}_{safe_name(n)}") for c, n in enumerate(names)]
    for d in dirs:
        os.makedirs(d)
    for i, (img, c) in enumerate(zip(images, s.labels)):
        Image.fromarray(img).save(os.path.join(dirs[int(c)], f"{i:0{digits}d}.png"))
    with open(os.path.join(out, SET_JSON), "w") as f:
        json.dump({"class_names": list(names), **_meta_record(s)}, f, indent=1)
    return out


def _load_folder(path: str) -> ImageSet:
    from PIL import Image

    dirs = sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)))
    dirs = [d for d in dirs if not d.startswith(".")]
    record = _set_json(path)
    names = record.pop("class_names", None)
    if not isinstance(names, list) or len(names) != len(dirs):
        names = [re.sub(r"^\d+_", "", d, count=1) for d in dirs]
    images, labels = [], []
    for c, d in enumerate(dirs):
        files = sorted(f for f in os.listdir(os.path.join(path, d)) if not f.startswith("."))
        if not files:
            raise InputError(f"{os.path.join(path, d)} holds no images")
        for f in files:
            p = os.path.join(path, d, f)
            if not f.lower().endswith(IMAGE_SUFFIXES):
                raise InputError(f"{p} is not a PNG or JPEG file (an image folder holds images)")
            try:
                with Image.open(p) as img:
                    images.append(np.asarray(img.convert("RGB")))
            except OSError as e:
                raise InputError(f"{p} is not a readable image ({e})") from e
            labels.append(c)
    meta = {**record, "path": path}
    return ImageSet(_stack(images, path), np.asarray(labels), tuple(names), meta)


def _set_json(path: str) -> dict:
    p = os.path.join(path, SET_JSON)
    if not os.path.isfile(p):
        return {}
    record = read_json(p, "a distilled set's set.json", "delete it to name classes by folder")
    return record if isinstance(record, dict) else {}


def _stack(images: list, path: str) -> np.ndarray:
    shapes = sorted({x.shape for x in images})
    if len(shapes) > 1:
        raise InputError(f"the images in {path} differ in size ({shapes[:3]}); they must be one")
    return np.stack(images)


def to_hf(s: ImageSet):
    """The set as a datasets.Dataset: `image` (Image) and `label` (ClassLabel) columns, its
    metadata as JSON in the dataset's description."""
    datasets = _extra("datasets", "hf")
    from PIL import Image

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(_names(s)))}
    )
    info = datasets.DatasetInfo(description=json.dumps(_meta_record(s)), features=features)
    rows = {
        "image": [Image.fromarray(x) for x in uint8_images(s.images)],
        "label": np.asarray(s.labels).tolist(),
    }
    return datasets.Dataset.from_dict(rows, features=features, info=info)


def write_hf(out: str, s: ImageSet):
    """to_hf(s) saved to disk at `out`; returns the Dataset."""
    check_fresh(out)
    ds = to_hf(s)
    ds.save_to_disk(out)
    return ds


def _load_hf(path: str) -> ImageSet:
    datasets = _extra("datasets", "hf")
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # a damaged or partial save
        raise InputError(f"{path} is not a readable saved Hugging Face dataset ({e})") from e
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise InputError(f"{path} holds splits {sorted(ds)}; pass the folder of one split")
        ds = next(iter(ds.values()))
    missing = [c for c in ("image", "label") if c not in ds.column_names]
    if missing:
        raise InputError(f"{path} has no {missing} column (it has {ds.column_names})")
    label = ds.features["label"]
    if not isinstance(label, datasets.ClassLabel):
        raise InputError(f"{path}: 'label' must be a ClassLabel feature, got {label}")
    images = [np.asarray(x.convert("RGB") if hasattr(x, "convert") else x) for x in ds["image"]]
    try:
        meta = json.loads(ds.info.description or "{}")
    except ValueError:
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    labels = np.asarray(ds["label"], np.int64)
    return ImageSet(_stack(images, path), labels, tuple(label.names), {**meta, "path": path})
