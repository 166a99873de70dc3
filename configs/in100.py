"""ImageNet-100 (the CMC class list), DINOv2 ViT-B/14, K = 10.

    python -m lgm_jax.main --config=configs/in100.py --workdir=workdirs/in100 \\
        --config.weights=weights/dinov2_vitb

Needs the tfds dataset prepared (docs/data.md) and converted DINOv2 weights
(docs/backbones.md). 5001 updates; expected time: not yet measured on a GPU (BENCHMARKS.md;
the reference takes 0.95 s per ImageNet-100 step on an H200, 80 minutes in all); expected result:
91.5% top-1 (DINOv2 probe on the distilled images, paper Table 1).
Smallest machines it fits, by `python -m lgm_jax.preflight --config=configs/in100.py --target T`
(an estimate from shapes with a 10% margin, and a lower bound: docs/preflight.md): one 24 GB
GPU (RTX 4090: 10.8 GiB a device, ~2.8 s a step at 40% of peak) or one TPU v5e chip (16 GiB);
an H100 or H200 runs it in about 40 minutes at that rate. Not yet measured on a device.
Append `:smoke` to the config path (configs/in100.py:smoke) for a 3-step run with a tiny random
backbone that checks the data and the plumbing on a CPU.
"""

from lgm_jax.config_base import base, smoke


def get_config(arg=None):
    c = base()
    c.dataset = "imagenet100"
    c.num_classes = 100
    c.aug_rounds = 10
    c.chunk_size = 100
    return smoke(c) if arg == "smoke" else c
