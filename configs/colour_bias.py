"""Colour-bias demo: distil colour-MNIST (bundled digits, no download) whose train colours
follow the class 95% of the time, then see whether the distilled set carries the colour.

    python -m lgm_jax.main --config=configs/colour_bias.py --workdir=workdirs/colour_bias

The demo's settings (configs/demo.py: dinov2_tiny with the bundled lgm_jax/assets/demo_vit
weights at 28 px, one 32 px image per class, 2001 updates) on `mnist_colour_demo`: every digit
drawn in one of 10 colours, its class's colour for 95% of the train digits and a uniformly
random colour in test. The evaluation at the end reports top-1 plus per-group accuracy over the
100 (digit, colour) groups, the worst and average group, and the pooled "colour = class
colour" / "other colour" accuracies (eval.json). Measured numbers and the baselines:
docs/analysis.md.
"""

from lgm_jax.config_base import demo


def get_config():
    return demo("mnist_colour_demo")  # configs/demo.py's settings but the dataset
