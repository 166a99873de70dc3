"""Every setting of a distillation run, with its default and meaning, and the one translation of
a config into the static settings the code takes (backbone, augmentation, step).

configs/*.py start from `base()` (the demos from `demo()`); `smoke(c)` shrinks any of them to a
few CPU steps. The run, the benchmark, the feature cache and the golden check all read a config
through `augment_config`, `step_config` and `build_backbone` below, so a key means the same
thing everywhere.

Two resolutions, each with one name: `syn_res` is the side of the synthetic images (and of the
real images they are matched against, before augmentation); `input_res` is the side of the
backbone's input (what augmentation crops to).
"""

import math

import ml_collections

from lgm_jax import augment, lgm
from lgm_jax.errors import InputError
from lgm_jax.preprocess import IMAGENET_MEAN, IMAGENET_STD


def base() -> ml_collections.ConfigDict:
    """Every key a run reads, with its default (configs/*.py start from this)."""
    c = ml_collections.ConfigDict()
    for section in SECTIONS:
        section(c)
    return c


def _data_and_backbone(c) -> None:
    """The dataset and the frozen backbone."""
    c.dataset = "imagenet100"
    c.data_dir = ""  # tfds data_dir or image-folder root; "" for the default
    c.num_classes = 0  # if > 0, the dataset must have exactly this many classes
    c.backbone = "dinov2_vitb"
    c.weights = ""  # directory of converted Flax weights (tools/convert_weights.py); "" = random
    c.input_res = 224  # side of the backbone's input images
    c.dtype = "bfloat16"  # backbone compute: "float32" or "bfloat16"
    c.remat = False  # rematerialise backbone blocks in the backward pass
    c.remat_policy = "block"  # "block" (keep block inputs) or "matmuls" (also q/k/v, MLP hidden)
    # Attention kernel: "xla" (anywhere) or "cudnn" (fused; NVIDIA GPUs, bfloat16 only).
    c.attention = "xla"
    c.mean = IMAGENET_MEAN
    c.std = IMAGENET_STD


def _synthetic_set(c) -> None:
    """The synthetic set: its size, side and pyramid."""
    c.ipc = 1  # synthetic images per class
    c.aug_rounds = 10  # K: augmented copies of each synthetic image per step
    c.syn_res = 256  # side of the synthetic images
    c.decorrelate_colors = True
    c.pyramid = ml_collections.ConfigDict()
    c.pyramid.pixels = False  # True: plain pixels at syn_res (the "no pyramid" ablation)
    c.pyramid.start_res = 1
    c.pyramid.grow_every = 200
    c.pyramid.init_mode = "noise"  # or "zero"


def _augmentation(c) -> None:
    """The differentiable augmentation (the same for real and synthetic rows)."""
    c.augment = ml_collections.ConfigDict()
    c.augment.mode = "train"  # "train", or "off" for the "no augmentation" ablation
    c.augment.flip_p = 0.5
    c.augment.crop_scale = (0.08, 1.0)
    c.augment.crop_ratio = (3 / 4, 4 / 3)
    c.augment.noise_p = 0.5
    c.augment.noise_std = 0.2
    c.augment.noise_mean = 0.0


def _optimisation(c) -> None:
    """The outer optimisation and how a step is laid out and fed."""
    c.lr = 2e-3
    c.steps = 5000  # runs steps 0..steps (steps + 1 updates), as the reference
    c.seed = 3407
    c.chunk_size = 0  # rows per backbone call per device; 0 = the whole per-device batch
    c.real_input = "images"  # or "features" (from a real-feature cache)
    c.feature_cache = ""  # directory written by `python -m lgm_jax.feature_cache`
    # "replicated" (every device holds the whole pyramid and its Adam moments) or "class" (each
    # device holds its N/D images' share and works only on their K copies; N = ipc * classes
    # must divide over the devices). Checkpoints restore into either.
    c.state_sharding = "replicated"
    c.prefetch = 2  # real batches loaded ahead of the step, in a background thread
    c.data_threads = 0  # threads decoding one batch's images; 0 = min(32, CPUs)


def _evaluation(c) -> None:
    """The probe evaluation at the end of a run."""
    # The paper's linear-probe evaluation of the result, run at the end (python -m
    # lgm_jax.evaluate does the same on any workdir later).
    c.eval = ml_collections.ConfigDict()
    c.eval.at_end = False
    c.eval.seeds = 5
    c.eval.epochs = 1000
    c.eval.mode = "exact"  # or "fast" (precomputed features of augmented views)


def _profile(c) -> None:
    """A traced window of steps."""
    # Trace `steps` steps from step `start` (-1: never) into workdir/profile and write where the
    # device time went to workdir/profile/summary.json (lgm_jax/profiling.py); pick a window
    # without a pyramid growth (its step compiles anew) or a checkpoint, log or image step.
    c.profile = ml_collections.ConfigDict()
    c.profile.start = -1
    c.profile.steps = 3


def _bookkeeping(c) -> None:
    """Logs, pictures, checkpoints, multi-host start-up, the compilation cache."""
    c.log_every = 10
    c.image_every = 500
    c.checkpoint_every = 250
    c.keep_checkpoints = 3
    c.max_nonfinite = 20  # consecutive non-finite steps before the run stops
    c.distributed = False  # call jax.distributed.initialize() (multi-host)
    # Persistent XLA compilation cache ("" = off; the JAX_COMPILATION_CACHE_DIR variable wins).
    c.compilation_cache = "~/.cache/lgm_jax/xla"


SECTIONS = (
    _data_and_backbone,
    _synthetic_set,
    _augmentation,
    _optimisation,
    _evaluation,
    _profile,
    _bookkeeping,
)


def demo(dataset: str = "mnist_demo") -> ml_collections.ConfigDict:
    """The bundled demo (configs/demo.py, configs/colour_bias.py): `dataset`, a bundled-digit
    set of 10 classes, distilled with the bundled self-supervised dinov2_tiny at 28 px into one
    32 px image per class, 2001 updates, evaluated at the end."""
    from lgm_jax import assets

    c = base()
    c.dataset = dataset
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


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a config to a few CPU steps with a tiny random backbone (same data, same code)."""
    c.backbone = "dinov2_tiny"
    c.weights = ""
    c.input_res = 28
    c.dtype = "float32"
    c.syn_res = 32
    c.aug_rounds = 1
    c.chunk_size = 0
    c.steps = 2
    c.log_every = 1
    c.image_every = 0
    c.checkpoint_every = 0
    return c


def augment_config(config) -> augment.AugmentConfig:
    """The step's augmentation (config.augment, cropping to config.input_res)."""
    a = config.augment
    return augment.AugmentConfig(
        mode=a.mode,
        input_res=config.input_res,
        flip_p=a.flip_p,
        crop_scale=tuple(a.crop_scale),
        crop_ratio=tuple(a.crop_ratio),
        noise_p=a.noise_p,
        noise_std=a.noise_std,
        noise_mean=a.noise_mean,
    )


def step_config(config, num_classes: int) -> lgm.StepConfig:
    """The static settings of one distillation step for a dataset of `num_classes` classes."""
    return lgm.StepConfig(
        num_classes=num_classes,
        ipc=config.ipc,
        aug_rounds=config.aug_rounds,
        syn_res=config.syn_res,
        decorrelate_colors=config.decorrelate_colors,
        augment=augment_config(config),
        mean=tuple(config.mean),
        std=tuple(config.std),
        chunk_size=config.chunk_size or None,
        real_input=config.real_input,
        state_sharding=config.state_sharding,
    )


def backbone_overrides(config) -> dict:
    """The ViTConfig fields a run sets on its backbone (input side and compute options)."""
    if config.attention not in ("xla", "cudnn"):
        raise ValueError(f"attention must be 'xla' or 'cudnn', got {config.attention!r}")
    return dict(
        input_res=config.input_res,
        dtype=config.dtype,
        remat=config.remat,
        remat_policy=config.remat_policy,
        attention=config.attention,
    )


def build_backbone(config):
    """(Backbone, params) of config.backbone: converted weights from config.weights, random
    weights when it is empty."""
    from lgm_jax.models import registry

    return registry.build(config.backbone, config.weights or None, **backbone_overrides(config))


def probe_config(
    backbone, num_classes: int, *, epochs, batch_size=100, lr=None, mode="exact", views=100
):
    """The probe protocol's static settings for `backbone` (its input side, mean and std):
    mode "exact" (the backbone on fresh augmentations every step) or "fast" (`views`
    precomputed augmented views per image)."""
    from lgm_jax import probe

    if mode not in ("exact", "fast"):
        raise InputError(f"the probe mode must be 'exact' or 'fast', got {mode!r}")
    return probe.ProbeConfig(
        num_classes=num_classes,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        augment=augment.AugmentConfig(mode="eval", input_res=backbone.input_res),
        mean=tuple(backbone.mean),
        std=tuple(backbone.std),
        views=views if mode == "fast" else 0,
    )


# ----------------------------------------------------------------------------------------------
# Checking a config before anything slow


def _is_pow2(v) -> bool:
    return isinstance(v, int) and v >= 1 and v & (v - 1) == 0


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _pair(lo_ok):
    def ok(v):
        return (
            isinstance(v, (tuple, list))
            and len(v) == 2
            and all(_finite(x) for x in v)
            and lo_ok(v[0])
            and v[0] <= v[1]
        )

    return ok


_INT = lambda lo: lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo
_PROB = lambda v: _finite(v) and 0 <= v <= 1
_POSITIVE = lambda v: _finite(v) and v > 0
_ONE_OF = lambda *names: lambda v: v in names
_BOOL = lambda v: isinstance(v, bool)
_RGB = lambda v: isinstance(v, (tuple, list)) and len(v) == 3 and all(_finite(x) for x in v)

# key: (check, what is allowed). Keys not listed are free-form (paths, names checked where they
# are opened: the dataset, the weights, the feature cache).
RULES = {
    "num_classes": (_INT(0), "an integer >= 0 (0: any)"),
    # input_res may exceed syn_res: the augmentation resizes its crop to input_res either way
    # (the smoke configs and tiny tests upsample 4 or 32 px crops to a 28 px backbone).
    "input_res": (_INT(1), "an integer >= 1"),
    "dtype": (_ONE_OF("float32", "bfloat16"), "'float32' or 'bfloat16'"),
    "remat": (_BOOL, "true or false"),
    "remat_policy": (_ONE_OF("block", "matmuls"), "'block' or 'matmuls'"),
    "attention": (_ONE_OF("xla", "cudnn"), "'xla' or 'cudnn'"),
    "mean": (_RGB, "three numbers"),
    "std": (lambda v: _RGB(v) and all(x > 0 for x in v), "three numbers > 0"),
    "ipc": (_INT(1), "an integer >= 1"),
    "aug_rounds": (_INT(1), "an integer >= 1"),
    "syn_res": (_is_pow2, "a power of two (1, 2, 4, ..., 256, ...)"),
    "decorrelate_colors": (_BOOL, "true or false"),
    "pyramid.pixels": (_BOOL, "true or false"),
    "pyramid.start_res": (_is_pow2, "a power of two no larger than syn_res"),
    "pyramid.grow_every": (_INT(1), "an integer >= 1"),
    "pyramid.init_mode": (_ONE_OF("noise", "zero"), "'noise' or 'zero'"),
    "augment.mode": (_ONE_OF("train", "off"), "'train' or 'off'"),
    "augment.flip_p": (_PROB, "a probability in [0, 1]"),
    "augment.noise_p": (_PROB, "a probability in [0, 1]"),
    "augment.crop_scale": (_pair(lambda lo: lo > 0), "two numbers 0 < lo <= hi"),
    "augment.crop_ratio": (_pair(lambda lo: lo > 0), "two numbers 0 < lo <= hi"),
    "lr": (_POSITIVE, "a finite number > 0"),
    "steps": (_INT(0), "an integer >= 0"),
    "seed": (_INT(0), "an integer >= 0"),
    "chunk_size": (_INT(0), "an integer >= 1, or 0 for the whole per-device batch"),
    "real_input": (_ONE_OF("images", "features"), "'images' or 'features'"),
    "state_sharding": (_ONE_OF("replicated", "class"), "'replicated' or 'class'"),
    "prefetch": (_INT(1), "an integer >= 1"),
    "data_threads": (_INT(0), "an integer >= 0 (0: min(32, CPUs))"),
    "eval.at_end": (_BOOL, "true or false"),
    "eval.seeds": (_INT(1), "an integer >= 1"),
    "eval.epochs": (_INT(1), "an integer >= 1"),
    "eval.mode": (_ONE_OF("exact", "fast"), "'exact' or 'fast'"),
    "profile.start": (_INT(-1), "a step >= 0, or -1 for no profile"),
    "profile.steps": (_INT(1), "an integer >= 1"),
    "log_every": (_INT(1), "an integer >= 1"),
    "image_every": (_INT(0), "an integer >= 0 (0: never)"),
    "checkpoint_every": (_INT(0), "an integer >= 0 (0: only at the end and on SIGTERM)"),
    "keep_checkpoints": (_INT(1), "an integer >= 1"),
    "max_nonfinite": (_INT(0), "an integer >= 0 (0: never stop)"),
    "distributed": (_BOOL, "true or false"),
}


def _lookup(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


def check(config) -> None:
    """Refuse a config with a value out of its range or set (an InputError naming every such
    key, the value given and what is allowed); the backbone must be a registered name or a
    factory: name. Runs in milliseconds, before any data or weights are read."""
    from lgm_jax.models import registry

    bad = []
    for key, (ok, allowed) in RULES.items():
        value = _lookup(config, key)
        if not ok(value):
            bad.append(f"{key}={value!r} (allowed: {allowed})")
    if _is_pow2(config.pyramid.start_res) and _is_pow2(config.syn_res):
        if config.pyramid.start_res > config.syn_res:
            bad.append(f"pyramid.start_res={config.pyramid.start_res} (larger than syn_res)")
    if config.backbone not in registry.NAMES and not config.backbone.startswith("factory:"):
        bad.append(
            f"backbone={config.backbone!r} (allowed: {', '.join(registry.NAMES)}, or "
            "factory:<module>:<function>[:<arg>])"
        )
    if bad:
        raise InputError("bad settings: " + "; ".join(bad))
