"""Time and size one distillation step (`lgm.make_step`) on random backbone weights.

    python -m lgm_jax.benchmark --backbone dinov2_vitb --classes 100 --aug-rounds 10 \\
        --real-input images --chunk-size 100 --dtype bfloat16 --remat --steps 20 --warmup 3 \\
        --json out.json

The settings are a config, `config_base.base()` or the `--config configs/X.py[:arg]` file's
get_config([arg]), with the flags that are given set on it; it is translated into the step and
its backbone as a run does (`config_base.step_config`, `config_base.backbone_overrides`,
`registry.build` with random weights: any backbone name of the registry, `dinov2_tiny` for the
28 px test model). `--classes` defaults to the config's num_classes, or 10.

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
                     only) and list what it will run: custom calls, host callbacks, donated
                     inputs and the bytes the backbone keeps per row for its backward pass
                     (lgm_jax/step_cost.py).

The FLOP convention (model FLOPs of the backbone's matmuls, the passes a chunked step runs)
and where the memory figures come from are in lgm_jax/step_cost.py. `peak_mem_bytes` is the
device's peak where the backend reports one (GPU, TPU; mem_source "memory_stats", the
process-wide peak, so one run per process), else (CPU) the compiled step's total (mem_source
"memory_analysis"); the compiled figures are always in the JSON too.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from lgm_jax import config_base, errors, step_cost
from lgm_jax.errors import command_parser
from lgm_jax.step_cost import residual_bytes_per_row

# The config keys a flag of the same name sets (the class count is passed to step_config).
SETTINGS = ("backbone", "ipc", "aug_rounds", "syn_res", "input_res", "chunk_size", "real_input",
            "dtype", "remat", "remat_policy", "attention")  # fmt: skip

_COMMIT: list[str] = []

# The keys of a timing result (run) and of every row of a sweep that ran.
FIELDS = (
    "device_kind", "platform", "num_devices", "jax_version", "git_commit", "date", "config",
    "compile_s", "step_s_median", "step_s_p10", "step_s_p90", "syn_images_per_s",
    "real_images_per_s", "flops_per_step", "flops_convention", "tflops", "peak_fraction",
    "peak_mem_bytes", "mem_source", "compiled_mem", "profile",
)  # fmt: skip


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


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- settings
def load_config(spec: str):
    """The ConfigDict of a `configs/X.py[:arg]` file: its get_config([arg])."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise errors.InputError(f"--config {path}: no such file")
    module_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    try:
        return module.get_config(arg) if arg else module.get_config()
    except ValueError as e:  # a config's own check of its argument
        raise errors.InputError(f"--config {spec}: {e}") from e


def configure(args):
    """(ConfigDict, classes): the config (base() or --config's) with every flag given set on
    it; classes from --classes, else the config's num_classes, else 10."""
    c = load_config(args.config) if args.config else config_base.base()
    for key in SETTINGS:
        value = getattr(args, key)
        if value is None:
            continue
        if key not in c:
            raise errors.InputError(f"--config {args.config} has no key {key!r}")
        c[key] = value
    return c, args.classes or c.get("num_classes", 0) or 10


# ----------------------------------------------------------------------------- the step
def setup(args, abstract: bool = False):
    """(step, its arguments, backbone, step config) of the resolved settings."""
    return step_cost.build_step(
        args.settings, args.classes, real_res=args.real_res, mesh=args.mesh, abstract=abstract
    )


def build(args):
    """(compiled step, its arguments, compile seconds, backbone, step config)."""
    step, step_args, backbone, cfg = setup(args)
    t0 = time.perf_counter()
    compiled = step.lower(*step_args).compile()
    compile_s = time.perf_counter() - t0
    return compiled, step_args, compile_s, backbone, cfg


def device_count(args) -> int:
    import jax

    return jax.device_count() if args.mesh else 1


def run_config(args, cfg) -> dict:
    """The setting of a result, as its JSON records it."""
    c = args.settings
    return (
        {"config_file": args.config, "backbone": c.backbone, "classes": cfg.num_classes}
        | {k: c[k] for k in SETTINGS if k != "backbone"}
        | {k: getattr(args, k) for k in ("real_res", "steps", "warmup", "mesh")}
        | {"num_syn": cfg.num_syn, "num_real": cfg.num_real, "syn_rows": cfg.num_real}
    )


# ----------------------------------------------------------------------------- the modes
def lower(args) -> dict:
    """Trace and lower the step for `args.lower` ("cuda", "rocm" or "tpu") without compiling
    it or allocating it: a check, on any machine, that the configured GPU/TPU step builds, and
    a census of what it will run (lgm_jax/step_cost.py)."""
    import jax

    from lgm_jax import lgm

    with step_cost.assume_cudnn(args.lower):  # the parameters' init traces attention too
        step, step_args, backbone, cfg = setup(args, abstract=True)
        t0 = time.perf_counter()
        lowered = step.trace(*step_args).lower(lowering_platforms=(args.lower,))
        lower_s = time.perf_counter() - t0
        per_row = residual_bytes_per_row(backbone.config)
    devices = device_count(args)
    chunk = lgm.chunk_size(cfg.num_real // devices, cfg.chunk_size)  # synthetic rows a call
    return {
        "lowered_for": args.lower,
        "jax_version": jax.__version__,
        "git_commit": git_commit(),
        "date": now(),
        "config": run_config(args, cfg),
        "lower_s": lower_s,
        **step_cost.census(lowered.as_text()),
        "flops_per_step": step_cost.step_flops(backbone.config, cfg, devices),
        "residual_bytes_per_row": per_row,
        "rows_per_chunk": chunk,
        "residual_bytes_per_chunk": per_row * chunk,
    }


def time_steps(compiled, step_args, warmup: int, steps: int):
    """Run `warmup` untimed and `steps` timed steps; (state, last metrics, step times)."""
    import jax

    state, rest = step_args[0], step_args[1:]
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, *rest)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if not bool(metrics["finite"]):
        print("warning: the last step was not finite", file=sys.stderr)
    return state, metrics, np.asarray(times)


def run(args) -> dict:
    """Compile, warm up, time; returns the result dict (every key of FIELDS)."""
    import jax

    compiled, step_args, compile_s, backbone, cfg = build(args)
    cmem = step_cost.compiled_memory(compiled)
    state, metrics, times = time_steps(compiled, step_args, args.warmup, args.steps)
    median = float(np.median(times))
    devices = device_count(args)
    flops = step_cost.step_flops(backbone.config, cfg, devices)
    tflops = flops / median / 1e12
    dev = jax.devices()[0]
    peak = step_cost.peak_tflops(dev.device_kind, args.settings.dtype)
    mem = step_cost.device_peak_memory()
    result = {
        "device_kind": dev.device_kind,
        "platform": dev.platform,
        "num_devices": jax.device_count(),
        "jax_version": jax.__version__,
        "git_commit": git_commit(),
        "date": now(),
        "config": run_config(args, cfg),
        "compile_s": compile_s,
        "step_s_median": median,
        "step_s_p10": float(np.percentile(times, 10)),
        "step_s_p90": float(np.percentile(times, 90)),
        "syn_images_per_s": cfg.aug_rounds * cfg.num_syn / median,
        "real_images_per_s": cfg.num_real / median,
        "flops_per_step": flops,
        "flops_convention": "vit matmul FLOPs; 1 fwd/real image (0 if cached), "
        f"{step_cost.syn_passes(cfg, devices)} fwd/syn row",
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
        result["profile"] = profile(compiled, state, step_args[1:], args)
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
        f" | C={c['classes']} ipc={c['ipc']} K={c['aug_rounds']} real={c['real_input']} "
        f"chunk={c['chunk_size']} syn_res={c['syn_res']} input_res={c['input_res']}"
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


def memory_scaling(args) -> dict:
    """Compiled memory at `classes` and `scale * classes` synthetic images, same chunk."""
    out = {}
    base = args.classes
    for mult in (1, args.scale):
        args.classes = base * mult
        compiled, _, compile_s, _, cfg = build(args)
        out[mult] = step_cost.compiled_memory(compiled) | {
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
        "date": now(),
        "git_commit": git_commit(),
    }


def sweep(args) -> list[dict]:
    """One subprocess per (classes, chunk): a fresh process per setting keeps peaks apart."""
    import lgm_jax

    # The child imports this package from where this process did.
    root = os.path.dirname(os.path.dirname(os.path.abspath(lgm_jax.__file__)))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    print(f"{'C':>6} {'chunk':>6} {'step s':>10} {'syn/s':>10} {'TFLOP/s':>8} {'memory':>12}")
    results = []
    for c in args.sweep_classes:
        for chunk in args.sweep_chunks:
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "r.json")
                cmd = [sys.executable, "-m", "lgm_jax.benchmark", *setting_argv(args)]
                cmd += ["--classes", str(c), "--chunk-size", str(chunk), "--json", out]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode == 0:
                    with open(out) as f:
                        r = json.load(f)
                else:  # e.g. out of memory: keep the row, say why
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
                    r = {"config": {"classes": c, "chunk_size": chunk}}
                    r["error"] = " ".join(tail)[:300]
            results.append(r)
            _print_sweep_row(r)
    return results


def setting_argv(args) -> list[str]:
    """The flags of one run as this one resolved them (everything but classes, chunk, the mode
    and the output)."""
    c = args.settings
    out = ["--config", args.config] if args.config else []
    for k in SETTINGS:
        if k == "chunk_size":
            continue
        if k == "remat":
            out.append("--remat" if c.remat else "--no-remat")
        else:
            out += ["--" + k.replace("_", "-"), str(c[k])]
    for k in ("steps", "warmup", "real_res"):
        if getattr(args, k) is not None:
            out += ["--" + k.replace("_", "-"), str(getattr(args, k))]
    return out + ["--mesh"] * args.mesh


def _print_sweep_row(r):
    c = r["config"]
    if "error" in r:
        print(f"{c['classes']:>6} {c['chunk_size']:>6}  failed: {r['error']}", flush=True)
        return
    print(
        f"{c['classes']:>6} {c['chunk_size']:>6} {r['step_s_median']:>10.4f} "
        f"{r['syn_images_per_s']:>10.1f} {r['tflops']:>8.3f} {gib(r['peak_mem_bytes']):>12}",
        flush=True,
    )


# ----------------------------------------------------------------------------- command line
def _setting_flags(p: argparse.ArgumentParser) -> None:
    """Flags that set a config key (none given: the config's value stands)."""
    p.add_argument("--config", help="configs/X.py[:arg] to start from (default: config_base)")
    p.add_argument("--backbone", help="a registry name (default dinov2_vitb); dinov2_tiny: 28 px")
    p.add_argument("--classes", type=errors.count, help="default: the config's num_classes, or 10")
    p.add_argument("--ipc", type=errors.count)
    p.add_argument(
        "--aug-rounds", type=errors.count, help="K, augmented copies per image (default 10)"
    )
    p.add_argument("--real-input", choices=("images", "features"))
    p.add_argument(
        "--chunk-size", type=errors.natural, help="rows per backbone call (0: the whole batch)"
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"))
    p.add_argument("--remat", action=argparse.BooleanOptionalAction)
    p.add_argument(
        "--remat-policy",
        choices=("block", "matmuls"),
        help="with --remat: keep only block inputs, or also the q/k/v and MLP-hidden outputs",
    )
    p.add_argument("--attention", choices=("xla", "cudnn"))
    p.add_argument(
        "--syn-res", type=errors.count, help="side of the synthetic images (default 256)"
    )
    p.add_argument(
        "--input-res", type=errors.count, help="side of the backbone's input (default 224)"
    )
    p.add_argument(
        "--real-res",
        type=errors.count,
        help="side of the real images (default: the synthetic images')",
    )


def _mode_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=errors.count, default=10)
    p.add_argument("--warmup", type=errors.natural, default=2)
    p.add_argument("--mesh", action="store_true", help="shard over all devices (data mesh)")
    p.add_argument("--json", help="write the result here")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="after the timed steps, trace --profile-steps more into DIR and report where the "
        "device time goes (by kind of op, by phase of the step, top ops)",
    )
    p.add_argument("--profile-steps", type=errors.count, default=2)
    p.add_argument("--memory-scaling", action="store_true")
    p.add_argument("--scale", type=errors.count, default=10, help="multiplier for --memory-scaling")
    p.add_argument("--sweep", action="store_true")
    p.add_argument(
        "--lower",
        choices=("cuda", "rocm", "tpu"),
        help="only trace and lower the step for this platform (no device needed) and list its "
        "custom calls, host calls and donated buffers",
    )
    p.add_argument("--sweep-classes", type=errors.count, nargs="+", default=[10, 100, 1000])
    p.add_argument("--sweep-chunks", type=errors.count, nargs="+", default=[50, 100, 200])


def parse(argv=None) -> argparse.Namespace:
    """The flags, with the resolved settings: `args.settings` (the ConfigDict) and
    `args.classes`."""
    p = command_parser("benchmark", __doc__)
    _setting_flags(p)
    _mode_flags(p)
    args = p.parse_args(argv)
    args.settings, args.classes = configure(args)
    return args


def measure(args) -> dict | list:
    """Run the mode `args` asks for, print its result and return it."""
    git_commit()  # before the (long) run, so later edits to the checkout do not show
    if args.memory_scaling:
        result = memory_scaling(args)
    elif args.lower:
        result = lower(args)
        step_cost.print_lowered(result)
    elif args.sweep:
        result = sweep(args)
    else:
        result = run(args)
        print_result(result)
    if args.json:
        write_json(args.json, result)
    return result


def main(argv=None) -> int:
    return errors.run_command(lambda: measure(parse(argv)) and None)


if __name__ == "__main__":
    sys.exit(main())
