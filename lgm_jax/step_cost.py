"""The step `python -m lgm_jax.benchmark` measures and what it costs, counted rather than timed.

`build_step` builds one distillation step from a config as a run does (config_base's
translation, the registry's backbone) on random weights and random real data, or its shapes
only; the rest counts its model FLOPs, the devices' peak rates, its compiled and device memory,
and what the step lowered for a GPU or TPU will run. lgm_jax/benchmark.py times it and is the
command line.

FLOP convention (analytic, `vit_flops`): one multiply-add = 2 FLOPs; backbone matmuls only
(patch embedding, per block q/k/v, attention scores, attention x V, output projection, MLP), no
LayerNorm/softmax/GELU, no augmentation or pyramid decoding (together < 1% for ViT-B/14 at 224).
A step is counted as 1 forward per real row (0 when real features are cached) plus 3 forward
equivalents per synthetic row when the per-device batch is split into chunks, which is what the
chunked step executes: a forward to get the features, then, in the VJP pass, the forward again
and a backward to the input (~1 forward: no weight gradients); 2 when it is one chunk (the
VJP's forward is kept for its backward). Rematerialisation (`--remat`) executes one more
forward per synthetic row; it is not counted, so the TFLOP/s are "model FLOPs" of the algorithm
as run. SPEC's "about 1 + 2 forwards" counts the algorithm without the chunked recomputation;
the benchmark's JSON gives `flops_per_step` so either can be derived.

Memory: `device_peak_memory` is `device.memory_stats()["peak_bytes_in_use"]` where the backend
has it (GPU, TPU: the process-wide peak, so one run per process); `compiled_memory` is the
compiled executable's `memory_analysis()`, with total = argument + output - aliased (donated) +
temp bytes; `memory_estimate` counts the bytes a step needs per device from its shapes alone
(for a machine it can only be lowered for: `python -m lgm_jax.preflight --target`).

Lowering: the step is traced and lowered for "cuda", "rocm" or "tpu" on any machine (shapes
only: the full ViT-B/14 step lowers in seconds on a laptop). `census` lists the custom calls
(cuDNN's fused attention forward and backward with attention "cudnn"), host callbacks (there
should be none) and how many inputs are donated (updated in place); `residual_bytes_per_row`
counts the bytes the backbone keeps per row for its backward pass. A check of a GPU/TPU setting
before device time is spent on it; nothing is compiled, so it says nothing of XLA's buffer
assignment or its limits.
"""

from __future__ import annotations

import contextlib
import functools
import re

# Peak dense TFLOP/s by device kind substring (as in jax.Device.device_kind) and dtype, and the
# memory of one device as JAX sees it; the kinds `python -m lgm_jax.preflight --target` sizes for.
# Sources: the vendors' spec sheets (dense rates, i.e. without the 2:4 sparsity that the headline
# figures assume). NVIDIA H100 SXM datasheet: bf16 989, TF32 494, 80 GB. H200 SXM datasheet: the
# same rates (the H100's compute with more and faster memory), 141 GB of which JAX sees ~140 GiB.
# A100 80 GB SXM datasheet: bf16 312, TF32 156. RTX 4090 (NVIDIA Ada whitepaper): bf16 with float32
# accumulation (what XLA emits) 165.2, TF32 82.6, 24 GB. Google Cloud TPU system architecture
# pages, per chip: v4 275 bf16, 32 GiB HBM; v5e 197 bf16, 16 GiB; v5p 459 bf16, 95 GiB.
# float32 is the TF32 tensor-core rate on NVIDIA GPUs, which XLA uses for float32 matmuls by
# default; no float32 row for TPUs (their float32 matmuls run as several bf16 passes).
# "TPU v5 lite" (v5e) comes before "TPU v5" (v5p): the first substring that matches wins.
PEAK_TFLOPS = {
    ("H200", "bfloat16"): 989.0,
    ("H200", "float32"): 494.0,
    ("H100", "bfloat16"): 989.0,
    ("H100", "float32"): 494.0,
    ("A100", "bfloat16"): 312.0,
    ("A100", "float32"): 156.0,
    ("RTX 4090", "bfloat16"): 165.2,
    ("RTX 4090", "float32"): 82.6,
    ("TPU v4", "bfloat16"): 275.0,
    ("TPU v5 lite", "bfloat16"): 197.0,
    ("TPU v5", "bfloat16"): 459.0,
}
DEVICE_MEMORY_GIB = {
    "H200": 140.0,
    "H100": 80.0,
    "A100": 80.0,
    "RTX 4090": 24.0,
    "TPU v4": 32.0,
    "TPU v5 lite": 16.0,
    "TPU v5": 95.0,
}

# Substrings of a custom call's target that mean a round trip to the host.
HOST_CALL_MARKERS = ("callback", "infeed", "outfeed", "send", "recv")


# ----------------------------------------------------------------------------- the step
def backbone_and_params(c, abstract: bool = False):
    """(Backbone, random params) of the config's backbone; shapes only with `abstract`."""
    import jax

    from lgm_jax import config_base
    from lgm_jax.models import registry

    overrides = config_base.backbone_overrides(c)
    if not abstract:
        return registry.build(c.backbone, **overrides)
    built = []

    def init():  # the registry's own init, traced for its shapes
        backbone, params = registry.build(c.backbone, **overrides)
        built.append(backbone)
        return params

    params = jax.eval_shape(init)
    return built[0], params


def build_step(c, classes: int, *, real_res=None, mesh=False, abstract=False):
    """(step, its arguments, backbone, step config) of config `c` with `classes` classes, as a
    run builds them (config_base), on random weights and random real data of side `real_res`
    (default: syn_res); `mesh`: True for a mesh over all devices, or the mesh. With `abstract`
    the arguments are shapes only (nothing allocated: enough to lower and compile the step),
    laid out on the mesh as a run lays them out."""
    import jax

    from lgm_jax import config_base, lgm, pyramid

    cfg = config_base.step_config(c, classes)
    backbone, params = backbone_and_params(c, abstract)
    tx = lgm.optimizer(c.lr)
    mesh = lgm.data_mesh() if mesh is True else (mesh or None)
    step = lgm.make_step(backbone.features, backbone.feature_dim, tx, cfg, mesh=mesh)
    # The full pyramid (1 .. syn_res): the steady state after the last level is added.
    levels = pyramid.resolutions(1, cfg.syn_res)
    init = lambda k: lgm.init_state(k, cfg, tx, start_res=levels)
    key = jax.random.key(1)
    state = jax.eval_shape(init, key) if abstract else jax.jit(init)(key)
    real, labels = real_batch(cfg, backbone.feature_dim, real_res, abstract, mesh)
    step_args = (state, params, real, labels)
    if abstract and mesh is not None:
        step_args = laid_out(step_args, mesh, cfg.state_sharding == "class")
    return step, step_args, backbone, cfg


def laid_out(step_args, mesh, by_class: bool):
    """Shapes of the step's arguments with the shardings a run gives them on `mesh`: the state
    by `lgm.state_sharding`, the weights replicated, the real rows split over the devices."""
    import jax

    from lgm_jax import lgm

    state, params, real, labels = step_args
    P, named = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
    with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    state = jax.tree_util.tree_map(with_sharding, state, lgm.state_sharding(state, mesh, by_class))
    params = jax.tree_util.tree_map(lambda x: with_sharding(x, named(mesh, P())), params)
    rows = named(mesh, P("data"))
    return state, params, with_sharding(real, rows), with_sharding(labels, rows)


def real_batch(cfg, feature_dim: int, real_res, abstract: bool, mesh):
    """The step's real input (uint8 images of side `real_res`, default syn_res, or cached
    features) and labels: random, or their shapes with `abstract`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    if cfg.real_input == "features":
        real = jax.ShapeDtypeStruct((cfg.num_real, feature_dim), jnp.float32)
    else:
        side = real_res or cfg.syn_res
        real = jax.ShapeDtypeStruct((cfg.num_real, side, side, 3), jnp.uint8)
    labels = jax.ShapeDtypeStruct((cfg.num_real,), jnp.int32)
    if abstract:
        return real, labels
    rng = np.random.default_rng(0)
    if cfg.real_input == "features":
        real = jnp.asarray(rng.standard_normal(real.shape), real.dtype)
    else:
        real = jnp.asarray(rng.integers(0, 256, real.shape), real.dtype)
    labels = jnp.asarray(rng.integers(0, cfg.num_classes, cfg.num_real), jnp.int32)
    if mesh is not None:
        shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        real, labels = jax.device_put(real, shard), jax.device_put(labels, shard)
    return real, labels


# ----------------------------------------------------------------------------- FLOPs
def vit_flops(cfg, tokens: int | None = None) -> float:
    """Forward FLOPs of one image through a ViT (2 per multiply-add, matmuls only).

    cfg: a `ViTConfig`; tokens: sequence length, default 1 + (input_res / patch)^2.
    Patch embedding (g^2 p^2 3 D), then per block: q, k, v (3 T D^2), scores (T^2 D),
    attention x V (T^2 D), output projection (T D^2), MLP (2 T D M); the final LayerNorm and
    CLS pooling are free at this precision. ViT-B/14 at 224 px: 46.3 GFLOP.
    """
    g = cfg.input_res // cfg.patch_size
    t = 1 + g * g if tokens is None else tokens
    d, m = cfg.width, cfg.mlp_dim
    patch = g * g * cfg.patch_size**2 * 3 * d
    block = 4 * t * d * d + 2 * t * t * d + 2 * t * d * m
    return 2.0 * (patch + cfg.depth * block)


def syn_passes(step_cfg, num_devices: int = 1) -> int:
    """Forward equivalents per synthetic row: 3 when the per-device batch is split into chunks
    (features, then forward again and backward-to-input in the VJP pass), 2 when it runs as one
    chunk (the VJP's forward gives the features)."""
    from lgm_jax import lgm

    local = step_cfg.num_real // num_devices
    return 3 if lgm.chunk_size(local, step_cfg.chunk_size) < local else 2


def step_flops(vit_cfg, step_cfg, num_devices: int = 1) -> float:
    """Model FLOPs of one step (see the module docstring for the convention)."""
    f = vit_flops(vit_cfg)
    real = step_cfg.num_real if step_cfg.real_input == "images" else 0
    syn = step_cfg.aug_rounds * step_cfg.num_syn
    return f * (real + syn_passes(step_cfg, num_devices) * syn)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    for (kind, dt), v in PEAK_TFLOPS.items():
        if kind.lower() in device_kind.lower() and dt == dtype:
            return v
    return None


# ----------------------------------------------------------------------------- memory
def compiled_memory(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {
        k: int(getattr(m, f"{k}_size_in_bytes", 0))
        for k in ("argument", "output", "alias", "temp", "generated_code")
    }
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def device_peak_memory() -> int | None:
    import jax

    stats = [d.memory_stats() for d in jax.local_devices()]
    if not all(s and "peak_bytes_in_use" in s for s in stats):
        return None
    return max(int(s["peak_bytes_in_use"]) for s in stats)


def tree_bytes(tree) -> int:
    import jax

    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def image_bytes_per_row(step_cfg, input_res: int) -> int:
    """Float32 image buffers one synthetic row of a chunk holds while it is differentiated: its
    rows of every pyramid level, the decoded image at syn_res, the backbone's input at
    input_res, and the cotangent of each."""
    from lgm_jax import pyramid

    pixels = sum(r * r for r in pyramid.resolutions(1, step_cfg.syn_res))
    return 2 * 3 * 4 * (pixels + step_cfg.syn_res**2 + input_res**2)


def memory_estimate(step_args, vit_config, step_cfg, num_devices: int = 1, kept=None) -> dict:
    """Bytes per device of one step, counted from shapes (no compilation): what a machine that
    can only lower the step is sized by (`python -m lgm_jax.preflight --target`).

    step_args: (state, params, real, labels) of `build_step` (shapes will do), for the whole
    batch; the device's share follows from `step_cfg` over `num_devices`. Terms:
      state       the pyramid, its Adam moments and counters (split over the devices for the
                  [N, r, r, 3] leaves with state_sharding "class"; updated in place: donated);
      params      the backbone's weights (replicated);
      inputs      the device's real rows and labels;
      gradients   the level gradients and Adam's update of the levels held (2 x levels);
      activations rows per backbone call (the chunk) x (what the backbone keeps per row for its
                  backward pass, `residual_bytes_per_row`, the same count as
                  `python -m lgm_jax.benchmark --lower`, plus `image_bytes_per_row`).
    Not counted: the backward's own working set within one block, XLA's padding and
    fragmentation, the compiled code; the caller keeps a margin for them. `kept`: the
    backbone's `residual_bytes_per_row`, when the caller has it (it traces the backbone).
    """
    from lgm_jax import lgm

    state, params, real, labels = step_args
    split = num_devices if step_cfg.state_sharding == "class" else 1
    levels = tree_bytes(state.levels) // split
    state_b = tree_bytes(state) - tree_bytes(state.levels) * 3 + 3 * levels
    local = step_cfg.num_real // num_devices
    chunk = lgm.chunk_size(local, step_cfg.chunk_size)
    kept = residual_bytes_per_row(vit_config) if kept is None else kept
    per_row = kept + image_bytes_per_row(step_cfg, vit_config.input_res)
    out = {
        "state": state_b,
        "params": tree_bytes(params),
        "inputs": tree_bytes((real, labels)) // num_devices,
        "gradients": 2 * levels,
        "activations": chunk * per_row,
    }
    out["total"] = sum(out.values())
    out |= {"rows_per_chunk": chunk, "kept_bytes_per_row": kept, "bytes_per_row": per_row}
    return out


# ----------------------------------------------------------------------------- lowering


@contextlib.contextmanager
def assume_cudnn(platform: str):
    """Lowering for CUDA on a machine without a GPU: JAX refuses cuDNN's fused attention before
    lowering when it finds no cuDNN library, so its version check is told cuDNN 9.10 and an
    sm_90 GPU (H100/H200) for the duration. Private JAX functions: where they are gone, nothing
    is patched (and lowering the cudnn path then fails with JAX's own message)."""
    import jax

    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa
    except ImportError:
        fa = None
    names = ("check_cudnn_version", "check_compute_capability")
    if platform != "cuda" or jax.default_backend() == "gpu" or fa is None:
        yield
        return
    saved = {n: getattr(fa, n) for n in names if hasattr(fa, n)}
    fakes = {"check_cudnn_version": lambda *a: 91000, "check_compute_capability": lambda *a: True}
    try:
        for n in saved:
            setattr(fa, n, fakes[n])
        yield
    finally:
        for n, f in saved.items():
            setattr(fa, n, f)


@functools.lru_cache(maxsize=16)  # it traces the whole backbone twice: seconds for ViT-B/14
def residual_bytes_per_row(vit_config) -> int:
    """Bytes the backbone's VJP with respect to its input images keeps per image between the
    forward and the backward pass, as JAX saves them (XLA's fusion can only drop some): what a
    one-chunk step holds for every synthetic row, and a chunked step for every row of a chunk.
    The remat policy of `vit_config` (a ViTConfig) applies. Counted on shapes only (the leaves
    of the VJP function `jax.vjp` returns), as the difference between 3 and 2 images, so the
    weights cancel."""
    import jax
    import jax.numpy as jnp

    from lgm_jax.models.vit import ViT

    model = ViT(vit_config)
    side = vit_config.input_res
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, side, side, 3)))

    def total(n):
        x = jax.ShapeDtypeStruct((n, side, side, 3), jnp.float32)
        vjp_fn = jax.eval_shape(lambda p, x: jax.vjp(lambda x: model.apply(p, x), x)[1], params, x)
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(vjp_fn))

    return total(3) - total(2)


def census(text: str) -> dict:
    """What the lowered program `text` (StableHLO) runs: its size, custom calls by target, the
    host round trips among them, and how many of its inputs are donated."""
    calls: dict[str, int] = {}
    for name in re.findall(r"custom_call @([\w$.]+)", text):
        calls[name] = calls.get(name, 0) + 1
    main_sig = next((line for line in text.splitlines() if "func.func public @main" in line), "")
    return {
        "stablehlo_chars": len(text),
        "custom_calls": calls,
        "host_calls": sorted(c for c in calls if any(m in c.lower() for m in HOST_CALL_MARKERS)),
        # Donated arguments: paired with an output at lowering (tf.aliasing_output), or left to
        # XLA to pair (jax.buffer_donor, when the arguments carry shardings).
        "donated_inputs": sum(
            main_sig.count(m) for m in ("tf.aliasing_output", "jax.buffer_donor")
        ),
    }


def print_lowered(r: dict) -> None:
    c = r["config"]
    print(
        f"lowered for {r['lowered_for']} in {r['lower_s']:.1f} s | jax {r['jax_version']} | "
        f"{r['git_commit']} | {c['backbone']} {c['dtype']} attention={c['attention']} "
        f"C={c['classes']} K={c['aug_rounds']} real={c['real_input']} chunk={c['chunk_size']}"
    )
    calls = ", ".join(f"{k} x{v}" for k, v in sorted(r["custom_calls"].items())) or "none"
    print(f"  custom calls: {calls}")
    print(f"  host calls: {', '.join(r['host_calls']) or 'none'}")
    print(f"  donated inputs (updated in place): {r['donated_inputs']}")
    gib = r["residual_bytes_per_chunk"] / 2**30
    print(
        f"  backbone activations kept for the backward: "
        f"{r['residual_bytes_per_row'] / 2**20:.2f} MiB per synthetic row, "
        f"{gib:.3f} GiB for a chunk of {r['rows_per_chunk']} rows"
    )
