"""The 10-class ImageNet subsets (birds, fruits, cats, imagenette, imagewoof, a-e), DINOv2 B/14.

    python -m lgm_jax.main --config=configs/subsets.py:imagenette --workdir=workdirs/imagenette \
        --config.weights=weights/dinov2_vitb

The argument picks the subset (default imagenette); `SUBSET,smoke` gives a 3-step CPU run with a
tiny random backbone. Needs ImageNet prepared with tfds (docs/data.md). 5001 updates, K = 10.
Expected time: not yet measured on a GPU (the reference takes about 0.12 s per step on an
H200 at this size, 10 minutes in all); expected result: the paper's 10-class subset tables.
"""

from lgm_jax.config_base import base, smoke

SUBSETS = ("birds", "fruits", "cats", "imagenette", "imagewoof", "a", "b", "c", "d", "e")


def get_config(arg=None):
    subset, _, mode = (arg or "imagenette").partition(",")
    if subset not in SUBSETS:
        raise ValueError(f"unknown ImageNet subset {subset!r}; choose from {SUBSETS}")
    c = base()
    c.dataset = f"imagenet_{subset}"
    c.num_classes = 10
    return smoke(c) if mode == "smoke" else c
