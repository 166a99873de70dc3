"""Export a distilled set for other tools: an image folder, the original implementation's data.pth,
or a Hugging Face dataset (the formats lgm_jax/distilled.py owns; every one of them reads back as
--distilled).

    python -m lgm_jax.export --distilled runs/demo --format folder --out exports/demo_folder
    python -m lgm_jax.export --distilled runs/demo --format pth --out exports/demo_pth
    python -m lgm_jax.export --distilled runs/demo --format hf --out exports/demo_hf \\
        [--push-to-hub USER/NAME]

  folder  000_<name>/ subfolders of PNG files in label order (torchvision's ImageFolder reads the
          same labels), and set.json with the exact class names and the set's metadata
  pth     data.pth: {"images": float32 [N, 3, H, W] in [0, 1], "labels": int64 [N]}; from a run
          directory whose checkpoints are at hand, the images are the latest checkpoint's pyramid
          decoded at full precision, else the stored images / 255 (needs the pth extra)
  hf      a datasets.Dataset (image, ClassLabel label) saved with save_to_disk; --push-to-hub
          also uploads it (needs the hf extra and network access)
--distilled is a run directory, a synthetic.npz or any of the formats above. --out must be new
(or an empty folder).
"""

from __future__ import annotations

import os
import sys

import numpy as np

from lgm_jax import distilled, errors
from lgm_jax.errors import InputError, command_parser, run_command

FORMATS = ("folder", "pth", "hf")


def decoded_levels(run: str, s: distilled.ImageSet) -> np.ndarray | None:
    """float32 [N, S, S, 3] in [0, 1]: the run's checkpointed pyramid (at the set's step when
    that checkpoint is kept, else the latest) decoded at full precision; None when `run` is not
    a run directory with checkpoints and config.json."""
    ckpt, cfg_path = os.path.join(run, "checkpoints"), os.path.join(run, "config.json")
    if not (os.path.isdir(ckpt) and os.path.isfile(cfg_path)):
        return None
    from lgm_jax import checkpoint, pyramid

    steps = sorted(int(n) for n in os.listdir(ckpt) if n.isdigit())
    if not steps:
        return None
    step = s.meta.get("step") if s.meta.get("step") in steps else steps[-1]
    cfg = errors.read_json(cfg_path, "a run's config.json")
    levels = checkpoint.read_levels(run, step)
    x = pyramid.decode(levels, int(cfg["syn_res"]), bool(cfg.get("decorrelate_colors", True)))
    x = np.clip(np.asarray(x, np.float32), 0, 1)
    if x.shape != s.images.shape:
        raise InputError(
            f"{ckpt}/{step} decodes to {x.shape}, but {s.meta['path']} holds {s.images.shape}"
        )
    return x


def export(src: str, fmt: str, out: str, push_to_hub: str | None = None) -> str:
    """Write the set at `src` to `out` in `fmt`; returns the path written."""
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; use one of {FORMATS}")
    distilled.check_fresh(out)
    s = distilled.load(src)
    if fmt == "folder":
        return distilled.write_folder(out, s)
    if fmt == "pth":
        images = decoded_levels(src, s) if os.path.isdir(src) else None
        return distilled.write_pth(out, s.images if images is None else images, s.labels)
    ds = distilled.write_hf(out, s)
    if push_to_hub:
        ds.push_to_hub(push_to_hub)
    return out


def parser():
    p = command_parser("export", __doc__)
    p.add_argument("--distilled", required=True, help="run directory, .npz, data.pth, folder, hf")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="a new path (or an empty folder)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="hf: also upload it")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if a.push_to_hub and a.format != "hf":
        parser().error("--push-to-hub goes with --format hf")

    def body():
        print(f"wrote {export(a.distilled, a.format, a.out, a.push_to_hub)}")

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
