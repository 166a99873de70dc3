"""ImageNet-1k, DINOv2 ViT-B/14, K = 3 (as the reference).

    python -m lgm_jax.main --config=configs/in1k.py --workdir=workdirs/in1k \\
        --config.weights=weights/dinov2_vitb

Needs the tfds dataset prepared (docs/data.md) and converted DINOv2 weights
(docs/backbones.md). 5001 updates; expected time: not yet measured on a GPU (BENCHMARKS.md;
the reference does not fit ImageNet-1k on one H200 and used four GPUs); expected result:
75.0% top-1 (paper Table 1).
On several devices (a TPU slice, a multi-GPU host) add `--config.state_sharding=class` to split
the pyramid and its Adam moments by image (the 1000 images must divide over the devices).
Smallest machines it fits, by `python -m lgm_jax.preflight --config=configs/in1k.py --target T`
(an estimate from shapes with a 10% margin, and a lower bound: docs/preflight.md): one 24 GB
GPU (RTX 4090: 15.6 GiB a device with the state replicated, ~8.4 s a step at 40% of peak), one
80 GB H100 (~1.4 s a step, 2 h), a TPU v5e-8 slice (12.6 GiB a chip, chunks of 75); one v5e
chip (16 GiB) only with --config.chunk_size=75. Not yet measured on a device.
Append `:smoke` to the config path (configs/in1k.py:smoke) for a 3-step run with a tiny random
backbone that checks the data and the plumbing on a CPU.
"""

from lgm_jax.config_base import base, smoke


def get_config(arg=None):
    c = base()
    c.dataset = "imagenet1k"
    c.num_classes = 1000
    c.aug_rounds = 3
    c.chunk_size = 100
    return smoke(c) if arg == "smoke" else c
