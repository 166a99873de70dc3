"""Food-101, DINOv2 ViT-B/14, K = 10.

    python -m lgm_jax.main --config=configs/food101.py --workdir=workdirs/food101 \\
        --config.weights=weights/dinov2_vitb

Needs the tfds dataset prepared (docs/data.md) and converted DINOv2 weights
(docs/backbones.md). 5001 updates; expected time: not yet measured on a GPU (BENCHMARKS.md;
the reference takes 0.95 s per ImageNet-100 step on an H200, 80 minutes in all); expected result:
see the paper's fine-grained table.
Append `:smoke` to the config path (configs/food101.py:smoke) for a 3-step run with a tiny random
backbone that checks the data and the plumbing on a CPU.
"""

from lgm_jax.config_base import base, smoke


def get_config(arg=None):
    c = base()
    c.dataset = "food101"
    c.num_classes = 101
    c.aug_rounds = 10
    c.chunk_size = 100
    return smoke(c) if arg == "smoke" else c
