"""Will a run fit, and how long will it take? Sized before any data is read or step is run.

    python -m lgm_jax.preflight --config=configs/in1k.py --target v5e-8
    python -m lgm_jax.preflight --config=configs/in100.py --config.chunk_size=200   # this machine
    python -m lgm_jax.preflight --config=configs/in1k.py --target h100 --devices 4 --json

The config is read as a run reads it (--config=FILE[:ARG] and --config.KEY=VALUE overrides, as
`python -m lgm_jax.main` takes them; `config_base.check`), and its step is built as the run and
`python -m lgm_jax.benchmark` build it (`step_cost.build_step`: the full pyramid, random
weights, shapes only). Then, per device:

  memory   on the devices present (no --target; --devices N: the first N of them): the step
           compiled for them, its `memory_analysis()`, against the device's memory (its
           allocator's limit; on a CPU the machine's memory over its devices); with --target:
           `step_cost.memory_estimate` (state, inputs, gradients, and the activations kept per
           row times the rows per backbone call: the count of `benchmark --lower`) against
           the target's memory per device; either must leave a --margin (10%) free;
  time     the step's model FLOPs (`step_cost.step_flops`) over the devices at --utilisation
           of the device's peak dense rate (default 40%: BENCHMARKS.md has no measured
           utilisation on any accelerator yet), times the config's steps + 1 updates;
  advice   when it does not fit: the largest chunk (--config.chunk_size) that fits, with the
           state replicated and, where the synthetic images divide over the devices, split by
           image (--config.state_sharding=class), each with its estimated memory and time.
           Going from one chunk to several adds one backbone forward per synthetic row (the
           chunked step recomputes the forward pass under its VJP: 2 -> 3 forward equivalents
           per synthetic row, `step_cost.syn_passes`); smaller chunks add no FLOPs in this
           count (they may run the matmuls less efficiently). Splitting the state by image adds
           no FLOPs: every device still runs num_real / D rows.

Targets: h200, h100, a100, rtx4090 (one GPU each, or NAME-N for N of them) and the TPU slices
v4-N, v5p-N (N TensorCores: 2 per chip, as Cloud TPU names them) and v5e-N (N chips); the
memory and peak rates are step_cost's tables (sources there). Exit status 0 when the step fits,
2 when it does not (with the advice) or on a bad input (one line). --json prints the result as
JSON instead of the table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys

from lgm_jax import errors

# name: (device kind in step_cost's tables, devices per unit of the topology number).
TARGETS = {
    "h200": ("H200", 1.0),
    "h100": ("H100", 1.0),
    "a100": ("A100", 1.0),
    "rtx4090": ("RTX 4090", 1.0),
    "v4": ("TPU v4", 0.5),  # v4-8: 8 TensorCores, 4 chips (JAX devices)
    "v5p": ("TPU v5", 0.5),
    "v5e": ("TPU v5 lite", 1.0),  # v5e-8 (v5litepod-8): 8 chips
}
ALIASES = {"v5litepod": "v5e", "4090": "rtx4090"}
# Fraction of peak measured by `python -m lgm_jax.benchmark` on a device kind (BENCHMARKS.md);
# none yet, so every target uses --utilisation.
MEASURED_UTILISATION: dict[str, float] = {}


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    kind: str  # as in step_cost's tables
    count: int
    memory: int | None  # bytes per device
    present: bool  # the devices of this process (compiled) or a target (estimated)


# ----------------------------------------------------------------------------- inputs
def load_config(argv: list[str]):
    """The run's config from --config=FILE[:ARG] and --config.KEY=VALUE, as main.py reads it
    (ml_collections' config flags on a private flag set), checked by config_base.check."""
    from absl import flags
    from ml_collections import config_flags

    from lgm_jax import config_base
    from lgm_jax.main import unknown_overrides

    argv = ["preflight", *argv]
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        raise errors.InputError("give --config=FILE, e.g. --config=configs/in1k.py")
    if not os.path.isfile(spec.split(":", 1)[0]):
        raise errors.InputError(f"--config {spec.split(':', 1)[0]} not found")
    if bad := unknown_overrides(argv[1:]):
        raise errors.InputError(f"unknown config key(s): {', '.join(bad)} (lgm_jax/config_base.py)")
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
    try:
        fv(argv)
    except flags.Error as e:
        raise errors.InputError(str(e)) from e
    config = fv.config
    config_base.check(config)
    if not config.num_classes:
        raise errors.InputError(
            "the config sets no num_classes; give --config.num_classes=C (preflight reads no data)"
        )
    return config


def parse_target(name: str, devices: int | None) -> Device:
    """A --target NAME[-N]: its device kind, memory and device count (--devices wins)."""
    from lgm_jax import step_cost

    m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+))?", name.lower())
    base = m and ALIASES.get(m.group(1), m.group(1))
    if not m or base not in TARGETS:
        raise errors.InputError(
            f"--target {name!r}: unknown; give one of {', '.join(TARGETS)}, optionally with "
            "-N for N devices (TPU slices: v5e-8, v4-8, v5p-16)"
        )
    kind, per_unit = TARGETS[base]
    count = devices or max(1, int(int(m.group(2) or 1 / per_unit) * per_unit))
    memory = int(step_cost.DEVICE_MEMORY_GIB[kind] * 2**30)
    return Device(name, kind, count, memory, present=False)


def present_devices(devices: int | None) -> Device:
    """The devices this process has (the first `devices` of them)."""
    import jax

    found = jax.devices()
    count = devices or len(found)
    if count > len(found):
        raise errors.InputError(f"--devices {count}: this machine has {len(found)}")
    stats = found[0].memory_stats() or {}
    memory = stats.get("bytes_limit")
    if memory is None and found[0].platform == "cpu":  # the host's memory, shared by all
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // len(found)
    return Device(found[0].device_kind, found[0].device_kind, count, memory, present=True)


# ----------------------------------------------------------------------------- sizing
def build(config, device: Device):
    """(step, its arguments as shapes, backbone, step config) for `device`'s devices: laid out
    on a mesh of the devices present, or whole (a target's share is counted per device)."""
    import jax

    from lgm_jax import config_base, lgm, step_cost

    platform = "cuda" if device.kind in ("H200", "H100", "A100", "RTX 4090") else "tpu"
    if config.attention == "cudnn" and not device.present and platform != "cuda":
        raise errors.InputError("attention='cudnn' is for NVIDIA GPUs; use --config.attention=xla")
    mesh = lgm.data_mesh(jax.devices()[: device.count]) if device.present else None
    try:
        lgm.check_split(config_base.step_config(config, config.num_classes), device.count)
        # A target's step is traced on this machine: cuDNN's attention as if for a GPU.
        with step_cost.assume_cudnn(jax.default_backend() if device.present else platform):
            return step_cost.build_step(config, config.num_classes, mesh=mesh, abstract=True)
    except ValueError as e:  # a batch or state that does not divide over the devices
        raise errors.InputError(str(e)) from e


def compiled_memory(step, step_args) -> dict:
    """`memory_analysis()` of the step compiled for the devices its arguments are laid out on."""
    from lgm_jax import step_cost

    return step_cost.compiled_memory(step.trace(*step_args).lower().compile())


def timing(backbone, cfg, device: Device, dtype: str, utilisation: float | None) -> dict:
    """FLOPs of one step and its estimated time on `device` (None where no peak is known)."""
    from lgm_jax import step_cost

    flops = step_cost.step_flops(backbone.config, cfg, device.count)
    peak = step_cost.peak_tflops(device.kind, dtype)
    util = utilisation or MEASURED_UTILISATION.get(device.kind, 0.4)
    step_s = None if peak is None else flops / device.count / (peak * 1e12 * util)
    return {
        "flops_per_step": flops,
        "syn_passes": step_cost.syn_passes(cfg, device.count),
        "peak_tflops": peak,
        "utilisation": util,
        "utilisation_source": "given"
        if utilisation
        else ("BENCHMARKS.md" if device.kind in MEASURED_UTILISATION else "assumed"),
        "step_s": step_s,
    }


def advice(step_args, backbone, cfg, device: Device, usable: int, dtype, utilisation, steps):
    """The largest chunk that fits, for the configured state layout and (where the synthetic
    images divide over the devices) for the state split by image; each with its estimate."""
    from lgm_jax import step_cost

    layouts = [cfg.state_sharding]
    if device.count > 1 and cfg.num_syn % device.count == 0 and "class" not in layouts:
        layouts.append("class")
    local = cfg.num_real // device.count
    kept = step_cost.residual_bytes_per_row(backbone.config)
    out = []
    for layout in layouts:
        one = dataclasses.replace(cfg, chunk_size=1, state_sharding=layout)
        est = step_cost.memory_estimate(step_args, backbone.config, one, device.count, kept)
        room = (usable - (est["total"] - est["activations"])) // est["bytes_per_row"]
        chunks = [d for d in range(1, min(room, local) + 1) if local % d == 0]
        if not chunks:
            continue
        cand = dataclasses.replace(one, chunk_size=chunks[-1])
        est = step_cost.memory_estimate(step_args, backbone.config, cand, device.count, kept)
        t = timing(backbone, cand, device, dtype, utilisation)
        out.append(
            {
                "state_sharding": layout,
                "chunk_size": chunks[-1],
                "memory": est["total"],
                "step_s": t["step_s"],
                "run_s": None if t["step_s"] is None else t["step_s"] * (steps + 1),
                "flops_per_step": t["flops_per_step"],
                "flags": f"--config.chunk_size={chunks[-1]}"
                + (f" --config.state_sharding={layout}" if layout != cfg.state_sharding else ""),
            }
        )
    return out


def size(config, device: Device, margin: float, utilisation: float | None) -> dict:
    """The whole pre-flight of `config` on `device` (see the module docstring)."""
    from lgm_jax import lgm, step_cost

    step, step_args, backbone, cfg = build(config, device)
    est = step_cost.memory_estimate(step_args, backbone.config, cfg, device.count)
    compiled = compiled_memory(step, step_args) if device.present else None
    need = compiled["total"] if compiled else est["total"]
    usable = None if device.memory is None else int(device.memory * (1 - margin))
    fits = usable is None or need <= usable
    t = timing(backbone, cfg, device, config.dtype, utilisation)
    local = cfg.num_real // device.count
    result = {
        "config": {k: config[k] for k in CONFIG_KEYS},
        "device": dataclasses.asdict(device),
        "rows_per_device": local,
        "rows_per_chunk": lgm.chunk_size(local, cfg.chunk_size),
        "memory_source": "memory_analysis" if compiled else "estimate",
        "memory": need,
        "estimate": est,
        "compiled": compiled,
        "usable": usable,
        "margin": margin,
        "fits": fits,
        **t,
        "run_s": None if t["step_s"] is None else t["step_s"] * (config.steps + 1),
        "updates": config.steps + 1,
        "advice": [],
    }
    if not fits:
        steps = config.steps
        result["advice"] = advice(
            step_args, backbone, cfg, device, usable, config.dtype, utilisation, steps
        )
    return result


CONFIG_KEYS = ("dataset", "num_classes", "ipc", "aug_rounds", "backbone", "dtype", "attention",
               "remat", "remat_policy", "chunk_size", "state_sharding", "real_input", "syn_res",
               "input_res", "steps")  # fmt: skip


# ----------------------------------------------------------------------------- output
def gib(x) -> str:
    if x is None:
        return "n/a"
    return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.1f} MiB"


def duration(s) -> str:
    if s is None:
        return "n/a (no peak rate known for this device and dtype)"
    return f"{s:.3f} s" if s < 60 else (f"{s / 60:.1f} min" if s < 3600 else f"{s / 3600:.1f} h")


def print_table(r: dict, spec: str) -> None:
    d, c, e = r["device"], r["config"], r["estimate"]
    how = "compiled for them" if d["present"] else "estimated from shapes"
    print(f"preflight of {spec} on {d['name']}: {d['count']} x {d['kind']}, {how}")
    print(
        f"  step: {c['backbone']} {c['dtype']} attention={c['attention']} remat="
        f"{c['remat_policy'] if c['remat'] else 'off'} | C={c['num_classes']} ipc={c['ipc']} "
        f"K={c['aug_rounds']} real={c['real_input']} | {r['rows_per_device']} rows per device "
        f"in chunks of {r['rows_per_chunk']} | state {c['state_sharding']}"
    )
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    usable = f"{gib(r['usable'])} usable ({gib(d['memory'])} less {r['margin']:.0%})"
    print(f"  {'memory per device':<20} {gib(r['memory'])} ({r['memory_source']}) of {usable}: "
          f"{verdict}")  # fmt: skip
    parts = ("state", "params", "inputs", "gradients", "activations")
    print("  estimate: " + " + ".join(f"{k} {gib(e[k])}" for k in parts) + f" = {gib(e['total'])}"
          f" ({e['rows_per_chunk']} rows x {e['bytes_per_row'] / 2**20:.1f} MiB)")  # fmt: skip
    if not d["present"]:
        print("  (the estimate counts what JAX keeps; XLA can keep more: on the machine itself,"
              " run this without --target for the compiled figure; docs/preflight.md)")  # fmt: skip
    print(f"  {'FLOPs per step':<20} {r['flops_per_step'] / 1e12:.4g} TFLOP ({r['syn_passes']} "
          "forwards per synthetic row, 1 per real image unless cached)")  # fmt: skip
    if r["peak_tflops"] is not None:
        rate = f"at {r['utilisation']:.0%} ({r['utilisation_source']}) of {r['peak_tflops']:g}"
        print(f"  {'step time':<20} {duration(r['step_s'])} {rate} TFLOP/s per device")
    else:
        print(f"  {'step time':<20} {duration(None)}")
    print(f"  {'run time':<20} {duration(r['run_s'])} for {r['updates']} updates")
    if r["fits"]:
        return
    if not r["advice"]:
        print("  nothing fits by chunking or splitting the state: add devices or --config.remat")
    for a in r["advice"]:
        print(f"  fits with {a['flags']}: {gib(a['memory'])} (estimate), step "
              f"{duration(a['step_s'])}, run {duration(a['run_s'])}")  # fmt: skip


def parse(argv):
    p = errors.command_parser("preflight", __doc__)
    p.add_argument(
        "--config",
        required=True,
        metavar="FILE[:ARG]",
        help="the run's config, as main.py takes it; --config.KEY=VALUE overrides follow it",
    )
    p.add_argument("--target", help="size for this machine instead of the devices present")
    p.add_argument(
        "--devices", type=errors.count, help="device count (default: the target's or all)"
    )
    p.add_argument("--utilisation", type=errors.fraction, help="fraction of peak (default 0.4)")
    p.add_argument(
        "--margin", type=errors.probability, default=0.1, help="memory left free (default 0.1)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args, rest = p.parse_known_args(argv)
    rest = [f"--config={args.config}", *rest]
    if other := [a for a in rest if not a.startswith("--config")]:
        raise errors.InputError(f"unexpected argument(s): {' '.join(other)}")
    if args.margin >= 1:  # the flag types check the rest
        raise errors.InputError(f"--margin {args.margin}: must be below 1 (a share kept free)")
    return args, rest


def run(argv) -> int:
    args, rest = parse(argv)
    config = load_config(rest)
    if args.target:
        device = parse_target(args.target, args.devices)
    else:
        import jax

        from lgm_jax import accelerators

        if warning := accelerators.cpu_only_warning(jax.default_backend()):
            print(f"warning: {warning}", file=sys.stderr)
        device = present_devices(args.devices)
    r = size(config, device, args.margin, args.utilisation)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        spec = next(a.split("=", 1)[1] for a in rest if a.startswith("--config="))
        print_table(r, spec)
    return 0 if r["fits"] else 2


def main(argv=None) -> int:
    return errors.run_command(lambda: run(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
