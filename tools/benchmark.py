"""Time and size one distillation step (`lgm.make_step`) on random backbone weights.

    python tools/benchmark.py --backbone dinov2_vitb --classes 100 --aug-rounds 10 \
        --real images --chunk 100 --dtype bfloat16 --remat --steps 20 --warmup 3 --json out.json

Four modes:
  default            build the real step, compile it (timed), run `--warmup` untimed and `--steps`
                     timed steps (block_until_ready on every step's outputs) and report the step
                     time (median, p10, p90), images per second, achieved TFLOP/s, the fraction of
                     the device's peak and the peak memory; with `--profile DIR`, then traces
                     `--profile-steps` more steps and reports where the device time went (by
                     kind of op, by phase of the step, the top ops: lgm_jax/profiling.py);
  --memory-scaling   compile (not run) the step at `--classes` and at `--scale`x that many
                     classes with the same chunk and print both memory figures and their ratio;
  --sweep            one subprocess per (classes, chunk) pair (so that each gets a fresh
                     allocator and its own peak) and a table of step time and memory;
  --lower PLATFORM   trace and lower the step for "cuda", "rocm" or "tpu" on any machine (shapes
                     only: the full ViT-B/14 step lowers in seconds on a laptop) and list what it
                     will run: custom calls (cuDNN's fused attention forward and backward with
                     --attention cudnn), host callbacks (there should be none), how many inputs
                     are donated (updated in place), and the bytes the backbone keeps per row
                     for its backward pass. A check of a GPU/TPU setting before device time is
                     spent on it; it does not compile, so it says nothing of XLA's buffer
                     assignment or its own limits.

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
the JSON gives `flops_per_step` so either can be derived.

Memory: `peak_mem_bytes` is `device.memory_stats()["peak_bytes_in_use"]` where the backend has
it (GPU, TPU; mem_source "memory_stats", the process-wide peak, so one run per process); else
(CPU) the compiled executable's `memory_analysis()`: argument + output - aliased (donated) +
temp bytes (mem_source "memory_analysis"). The compiled figures are always in the JSON too.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

# Peak dense TFLOP/s by device kind substring and dtype. H200: SPEC's "about 790" for bf16 (the
# datasheet's 989 assumes the SXM part at its top clock); float32 is the TF32 tensor-core rate,
# which XLA uses for float32 matmuls by default on Hopper.
PEAK_TFLOPS = {
    ("H200", "bfloat16"): 790.0,
    ("H200", "float32"): 395.0,
    ("H100", "bfloat16"): 989.0,
    ("H100", "float32"): 494.0,
    ("A100", "bfloat16"): 312.0,
    ("A100", "float32"): 156.0,
}

BACKBONES = {  # name: dinov2 variant (or None for the tiny test model)
    "dinov2_vits": "S/14",
    "dinov2_vitb": "B/14",
    "dinov2_vitl": "L/14",
    "tiny": None,
}

_COMMIT: list[str] = []

FIELDS = (
    "device_kind",
    "platform",
    "num_devices",
    "jax_version",
    "git_commit",
    "date",
    "config",
    "compile_s",
    "step_s_median",
    "step_s_p10",
    "step_s_p90",
    "syn_images_per_s",
    "real_images_per_s",
    "flops_per_step",
    "flops_convention",
    "tflops",
    "peak_fraction",
    "peak_mem_bytes",
    "mem_source",
    "compiled_mem",
    "profile",
)


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


def git_commit() -> str:
    """HEAD of this checkout ("-dirty" when tracked files differ); read once, at start-up."""
    if _COMMIT:
        return _COMMIT[0]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        _COMMIT.append(out + ("-dirty" if dirty else ""))
    except (OSError, subprocess.CalledProcessError):
        _COMMIT.append("unknown")
    return _COMMIT[0]


def vit_config(
    backbone: str,
    input_res: int,
    dtype: str,
    remat: bool,
    attention: str = "xla",
    remat_policy: str = "block",
):
    from lgm_jax.models import dinov2

    if backbone not in BACKBONES:
        raise SystemExit(f"unknown backbone {backbone!r}; choose from {sorted(BACKBONES)}")
    name = BACKBONES[backbone]
    kw = dict(
        input_res=input_res,
        dtype=dtype,
        remat=remat,
        attention=attention,
        remat_policy=remat_policy,
    )
    if name is None:  # tiny: width 64, depth 2, heads 4, patch 14
        return dinov2.variant("S/14", width=64, depth=2, heads=4, mlp_dim=256, pos_grid=4, **kw)
    return dinov2.variant(name, **kw)


def config_defaults(path: str) -> dict:
    """The few keys this tool reads from a `configs/*.py` file's get_config([arg]).

    Looks at the top level and at a `step` / `distill` sub-dict; absent keys are ignored.
    """
    path, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    scopes = [config] + [config[k] for k in ("step", "distill") if k in config]
    keys = {
        "num_classes": "classes",
        "ipc": "ipc",
        "aug_rounds": "aug_rounds",
        "syn_res": "syn_res",
        "chunk_size": "chunk",
        "real_input": "real",
        "dtype": "dtype",
        "remat": "remat",
        "remat_policy": "remat_policy",
        "attention": "attention",
    }
    out = {}
    for scope in scopes:
        for key, dest in keys.items():
            if key in scope:
                out[dest] = scope[key]
    if out.get("real") == "cache":
        out["real"] = "features"
    return out


def setup(args, abstract: bool = False):
    """(step, its arguments, vit config, step config) for one setting; with `abstract` the
    arguments are shapes only (nothing allocated: enough to lower the step)."""
    import jax
    import jax.numpy as jnp

    from lgm_jax import augment, lgm, pyramid
    from lgm_jax.models.vit import ViT

    vcfg = vit_config(
        args.backbone, args.input_res, args.dtype, args.remat, args.attention, args.remat_policy
    )
    cfg = lgm.StepConfig(
        num_classes=args.classes,
        ipc=args.ipc,
        aug_rounds=args.aug_rounds,
        syn_res=args.syn_res,
        augment=augment.AugmentConfig(input_res=args.input_res),
        chunk_size=args.chunk,
        real_input=args.real,
    )
    model = ViT(vcfg)
    features = lambda p, x: model.apply({"params": p}, x)
    tx = lgm.optimizer()
    mesh = lgm.data_mesh() if args.mesh else None
    step = lgm.make_step(features, vcfg.feature_dim, tx, cfg, mesh=mesh)
    make = (lambda f, *a: jax.eval_shape(f, *a)) if abstract else (lambda f, *a: jax.jit(f)(*a))
    params = make(model.init, jax.random.key(0), jnp.zeros((1, args.input_res, args.input_res, 3)))
    # The full pyramid (1 .. syn_res): the steady state after the last level is added.
    levels = pyramid.resolutions(1, args.syn_res)
    state = make(lambda k: lgm.init_state(k, cfg, tx, start_res=levels), jax.random.key(1))
    if args.real == "features":
        real = jax.ShapeDtypeStruct((cfg.num_real, vcfg.feature_dim), jnp.float32)
    else:
        real_res = args.real_res or args.syn_res
        real = jax.ShapeDtypeStruct((cfg.num_real, real_res, real_res, 3), jnp.uint8)
    labels = jax.ShapeDtypeStruct((cfg.num_real,), jnp.int32)
    if not abstract:
        rng = np.random.default_rng(0)
        if args.real == "features":
            real = jnp.asarray(rng.standard_normal(real.shape), real.dtype)
        else:
            real = jnp.asarray(rng.integers(0, 256, real.shape), real.dtype)
        labels = jnp.asarray(rng.integers(0, cfg.num_classes, cfg.num_real), jnp.int32)
        if mesh is not None:
            shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
            real, labels = jax.device_put(real, shard), jax.device_put(labels, shard)
    return step, (state, params["params"], real, labels), vcfg, cfg


def build(args):
    """(compiled step, its arguments, compile seconds, vit config, step config)."""
    step, step_args, vcfg, cfg = setup(args)
    t0 = time.perf_counter()
    compiled = step.lower(*step_args).compile()
    compile_s = time.perf_counter() - t0
    return compiled, step_args, compile_s, vcfg, cfg


@contextlib.contextmanager
def _assume_cudnn(platform: str):
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


HOST_CALL_MARKERS = ("callback", "infeed", "outfeed", "send", "recv")


def residual_bytes_per_row(vcfg) -> int:
    """Bytes the backbone's VJP with respect to its input images keeps per image between the
    forward and the backward pass, as JAX saves them (XLA's fusion can only drop some): what a
    one-chunk step holds for every synthetic row, and a chunked step for every row of a chunk.
    The remat policy of `vcfg` applies. Counted on shapes only (the leaves of the VJP function
    `jax.vjp` returns), as the difference between 3 and 2 images, so the weights cancel."""
    import jax
    import jax.numpy as jnp

    from lgm_jax.models.vit import ViT

    model = ViT(vcfg)
    side = vcfg.input_res
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, side, side, 3)))

    def total(n):
        x = jax.ShapeDtypeStruct((n, side, side, 3), jnp.float32)
        vjp_fn = jax.eval_shape(lambda p, x: jax.vjp(lambda x: model.apply(p, x), x)[1], params, x)
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(vjp_fn))

    return total(3) - total(2)


def lower(args) -> dict:
    """Trace and lower the step for `args.lower` ("cuda", "rocm" or "tpu") without compiling
    it or allocating it: a check, on any machine, that the configured GPU/TPU step builds, and
    a census of what it will run (custom calls such as cuDNN's fused attention, host round
    trips, donated inputs)."""
    import re

    import jax

    from lgm_jax import lgm

    with _assume_cudnn(args.lower):  # the parameters' init traces attention too
        step, step_args, vcfg, cfg = setup(args, abstract=True)
        t0 = time.perf_counter()
        lowered = step.trace(*step_args).lower(lowering_platforms=(args.lower,))
        lower_s = time.perf_counter() - t0
        per_row = residual_bytes_per_row(vcfg)
    text = lowered.as_text()
    calls: dict[str, int] = {}
    for name in re.findall(r"custom_call @([\w$.]+)", text):
        calls[name] = calls.get(name, 0) + 1
    main_sig = next((line for line in text.splitlines() if "func.func public @main" in line), "")
    devices = jax.device_count() if args.mesh else 1
    chunk = lgm.chunk_size(cfg.num_real // devices, cfg.chunk_size)  # synthetic rows a call
    return {
        "lowered_for": args.lower,
        "jax_version": jax.__version__,
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": run_config(args, cfg),
        "lower_s": lower_s,
        "stablehlo_chars": len(text),
        "custom_calls": calls,
        "host_calls": sorted(c for c in calls if any(m in c.lower() for m in HOST_CALL_MARKERS)),
        # Donated arguments: paired with an output at lowering (tf.aliasing_output), or left to
        # XLA to pair (jax.buffer_donor, when the arguments carry shardings).
        "donated_inputs": sum(
            main_sig.count(m) for m in ("tf.aliasing_output", "jax.buffer_donor")
        ),
        "flops_per_step": step_flops(vcfg, cfg, devices),
        "residual_bytes_per_row": per_row,
        "rows_per_chunk": chunk,
        "residual_bytes_per_chunk": per_row * chunk,
    }


def run_config(args, cfg) -> dict:
    keys = ("backbone", "classes", "ipc", "aug_rounds", "real", "chunk", "dtype", "remat",
            "remat_policy", "attention", "syn_res", "input_res", "real_res", "steps", "warmup",
            "mesh")  # fmt: skip
    return {k: getattr(args, k) for k in keys} | {
        "num_syn": cfg.num_syn,
        "num_real": cfg.num_real,
        "syn_rows": cfg.num_real,
    }


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


def run(args) -> dict:
    """Compile, warm up, time; returns the result dict (every key of FIELDS)."""
    import jax

    compiled, (state, params, real, labels), compile_s, vcfg, cfg = build(args)
    cmem = compiled_memory(compiled)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, params, real, labels)
        jax.block_until_ready((state, metrics))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    if not bool(metrics["finite"]):
        print("warning: the last step was not finite", file=sys.stderr)
    times = np.asarray(times)
    median = float(np.median(times))
    devices = jax.device_count() if args.mesh else 1
    flops = step_flops(vcfg, cfg, devices)
    tflops = flops / median / 1e12
    dev = jax.devices()[0]
    peak = peak_tflops(dev.device_kind, args.dtype)
    mem = device_peak_memory()
    result = {
        "device_kind": dev.device_kind,
        "platform": dev.platform,
        "num_devices": jax.device_count(),
        "jax_version": jax.__version__,
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": run_config(args, cfg),
        "compile_s": compile_s,
        "step_s_median": median,
        "step_s_p10": float(np.percentile(times, 10)),
        "step_s_p90": float(np.percentile(times, 90)),
        "syn_images_per_s": cfg.aug_rounds * cfg.num_syn / median,
        "real_images_per_s": cfg.num_real / median,
        "flops_per_step": flops,
        "flops_convention": "vit matmul FLOPs; 1 fwd/real image (0 if cached), "
        f"{syn_passes(cfg, devices)} fwd/syn row",
        "tflops": tflops,
        "peak_fraction": None if peak is None else tflops / peak,
        "peak_mem_bytes": mem if mem is not None else cmem.get("total"),
        "mem_source": "memory_stats" if mem is not None else "memory_analysis",
        "compiled_mem": cmem,
        "loss": float(metrics["loss"]),
        "profile": None,
    }
    if args.profile:
        if args.json:  # the timings are safe on disk before the (slower) traced steps
            write_json(args.json, result)
        result["profile"] = profile(compiled, state, (params, real, labels), args)
    return result


def write_json(path: str, result) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def profile(compiled, state, rest, args) -> dict:
    """Trace `--profile-steps` more steps into `--profile` (`profiling.StepTracer`: the trace,
    the step's optimised HLO and the summary of where the device time went). A failure to trace
    is reported in the result, not raised: the timings above stand without it."""
    from lgm_jax import profiling

    tracer = profiling.StepTracer(args.profile, start=0, steps=args.profile_steps)
    for i in range(args.profile_steps):
        tracer.before(i, state)
        state, metrics = compiled(state, *rest)
        tracer.after(i, (state, metrics), compiled.as_text)
    tracer.close()
    return tracer.summary or {"error": tracer.error or "nothing traced"}


def gib(x) -> str:
    return "n/a" if x is None else f"{x / 2**30:.3f} GiB"


def print_result(r: dict) -> None:
    c = r["config"]
    print(
        f"{r['device_kind']} x{r['num_devices']} | jax {r['jax_version']} | {r['git_commit']}"
        f" | {r['date']}"
    )
    print(
        f"{c['backbone']} {c['dtype']}{' remat ' + c['remat_policy'] if c['remat'] else ''}"
        f" | C={c['classes']} "
        f"ipc={c['ipc']} K={c['aug_rounds']} real={c['real']} chunk={c['chunk']} "
        f"syn_res={c['syn_res']} input_res={c['input_res']}"
    )
    pf = r["peak_fraction"]
    rows = [
        ("compile", f"{r['compile_s']:.2f} s"),
        (
            "step (median [p10, p90])",
            f"{r['step_s_median']:.4f} s [{r['step_s_p10']:.4f}, {r['step_s_p90']:.4f}]",
        ),
        ("synthetic rows / s", f"{r['syn_images_per_s']:.1f}"),
        ("real images / s", f"{r['real_images_per_s']:.1f}"),
        ("TFLOP/s (model)", f"{r['tflops']:.3f}"),
        ("fraction of peak", "n/a" if pf is None else f"{pf:.1%}"),
        (f"peak memory ({r['mem_source']})", gib(r["peak_mem_bytes"])),
    ]
    for name, val in rows:
        print(f"  {name:<28} {val}")
    prof = r.get("profile")
    if prof and "error" in prof:
        print(f"  profile: failed ({prof['error']})")
    elif prof:
        from lgm_jax import profiling

        profiling.print_summary(prof)


def print_lowered(r: dict) -> None:
    c = r["config"]
    print(
        f"lowered for {r['lowered_for']} in {r['lower_s']:.1f} s | jax {r['jax_version']} | "
        f"{r['git_commit']} | {c['backbone']} {c['dtype']} attention={c['attention']} "
        f"C={c['classes']} K={c['aug_rounds']} real={c['real']} chunk={c['chunk']}"
    )
    calls = ", ".join(f"{k} x{v}" for k, v in sorted(r["custom_calls"].items())) or "none"
    print(f"  custom calls: {calls}")
    print(f"  host calls: {', '.join(r['host_calls']) or 'none'}")
    print(f"  donated inputs (updated in place): {r['donated_inputs']}")
    print(
        f"  backbone activations kept for the backward: "
        f"{r['residual_bytes_per_row'] / 2**20:.2f} MiB per synthetic row, "
        f"{gib(r['residual_bytes_per_chunk'])} for a chunk of {r['rows_per_chunk']} rows"
    )


def memory_scaling(args) -> dict:
    """Compiled memory at `classes` and `scale * classes` synthetic images, same chunk."""
    out = {}
    base = args.classes
    for mult in (1, args.scale):
        args.classes = base * mult
        compiled, _, compile_s, _, cfg = build(args)
        out[mult] = compiled_memory(compiled) | {
            "classes": args.classes,
            "num_syn": cfg.num_syn,
            "rows": cfg.num_real,
            "compile_s": compile_s,
        }
        del compiled
    args.classes = base
    lo, hi = out[1], out[args.scale]
    print(f"{'classes':>8} {'rows':>7} {'argument':>12} {'output':>12} {'alias':>12} "
          f"{'temp':>12} {'total':>12}")  # fmt: skip
    for m in (lo, hi):
        print(
            f"{m['classes']:>8} {m['rows']:>7} "
            + " ".join(f"{m[k] / 2**20:>10.1f}Mi" for k in ("argument", "output", "alias", "temp"))
            + f" {m['total'] / 2**20:>10.1f}Mi"
        )
    ratio = hi["total"] / lo["total"]
    print(f"peak ratio at {args.scale}x the synthetic images: {ratio:.3f} (requirement: <= 1.5)")
    for k in ("argument", "output", "temp"):
        print(f"  growth of {k}: {(hi[k] - lo[k]) / 2**20:.1f} MiB")
    return {
        "base": lo,
        "scaled": hi,
        "scale": args.scale,
        "ratio": ratio,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
    }


def sweep(args) -> list[dict]:
    """One subprocess per (classes, chunk): a fresh process per setting keeps peaks apart."""
    results = []
    for c in args.sweep_classes:
        for chunk in args.sweep_chunks:
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "r.json")
                cmd = [sys.executable, os.path.abspath(__file__), *setting_argv(args)]
                cmd += ["--classes", str(c), "--chunk", str(chunk), "--json", out]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode == 0:
                    with open(out) as f:
                        r = json.load(f)
                else:  # e.g. out of memory: keep the row, say why
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
                    r = {"config": {"classes": c, "chunk": chunk}, "error": " ".join(tail)[:300]}
            results.append(r)
            _print_sweep_row(r)
    return results


def setting_argv(args) -> list[str]:
    """The flags of one run (everything but classes, chunk, the mode and the output)."""
    out = []
    for k in ("backbone", "ipc", "aug_rounds", "real", "dtype", "steps", "warmup", "syn_res",
              "input_res", "real_res", "attention", "remat_policy"):  # fmt: skip
        v = getattr(args, k)
        if v is not None:
            out += ["--" + k.replace("_", "-"), str(v)]
    out += ["--remat"] * args.remat + ["--mesh"] * args.mesh
    return out


def _print_sweep_row(r):
    c = r["config"]
    if "error" in r:
        print(f"{c['classes']:>6} {c['chunk']:>6}  failed: {r['error']}", flush=True)
        return
    print(
        f"{c['classes']:>6} {c['chunk']:>6} {r['step_s_median']:>10.4f} "
        f"{r['syn_images_per_s']:>10.1f} {r['tflops']:>8.3f} {gib(r['peak_mem_bytes']):>12}",
        flush=True,
    )


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="configs/X.py[:arg]; reads classes, K, ipc, chunk, ...")
    p.add_argument("--backbone", default="dinov2_vitb", choices=sorted(BACKBONES))
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--aug-rounds", type=int, default=10)
    p.add_argument("--real", default="images", choices=("images", "features"))
    p.add_argument("--chunk", type=int, default=None, help="rows per backbone call")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--remat", action="store_true")
    p.add_argument(
        "--remat-policy",
        default="block",
        choices=("block", "matmuls"),
        help="with --remat: keep only block inputs, or also the q/k/v and MLP-hidden outputs",
    )
    p.add_argument("--attention", default="xla", choices=("xla", "cudnn"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--syn-res", type=int, default=256)
    p.add_argument("--input-res", type=int, default=224)
    p.add_argument("--real-res", type=int, default=None, help="real image side (default syn-res)")
    p.add_argument("--mesh", action="store_true", help="shard over all devices (data mesh)")
    p.add_argument("--json", help="write the result here")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="after the timed steps, trace --profile-steps more into DIR and report where the "
        "device time goes (by kind of op, by phase of the step, top ops)",
    )
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--memory-scaling", action="store_true")
    p.add_argument("--scale", type=int, default=10, help="multiplier for --memory-scaling")
    p.add_argument("--sweep", action="store_true")
    p.add_argument(
        "--lower",
        choices=("cuda", "rocm", "tpu"),
        help="only trace and lower the step for this platform (no device needed) and list its "
        "custom calls, host calls and donated buffers",
    )
    p.add_argument("--sweep-classes", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--sweep-chunks", type=int, nargs="+", default=[50, 100, 200])
    args = p.parse_args(argv)
    if args.config:
        explicit = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a[:2] == "--"}
        for k, v in config_defaults(args.config).items():
            if k not in explicit:
                setattr(args, k, v)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    git_commit()  # before the (long) run, so later edits to the checkout do not show
    if args.memory_scaling:
        result = memory_scaling(args)
    elif args.lower:
        result = lower(args)
        print_lowered(result)
    elif args.sweep:
        print(f"{'C':>6} {'chunk':>6} {'step s':>10} {'syn/s':>10} {'TFLOP/s':>8} {'memory':>12}")
        result = sweep(args)
    else:
        result = run(args)
        print_result(result)
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
