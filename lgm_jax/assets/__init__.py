"""Small files that ship with the package.

`demo_vit/`: self-supervised weights of the demo's tiny ViT (`dinov2_tiny`: 2 blocks, width 64,
28 px), made by `python -m lgm_jax.pretrain_demo --out lgm_jax/assets/demo_vit` (SimCLR on
the unlabelled mnist_demo train digits, 600 steps, seed 0; pretrain.json records how). They let
the demo show the method without downloading anything; see docs/demo.md.
"""

import os


def path(name: str) -> str:
    """Absolute path of a bundled asset (no I/O: configs call this)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
