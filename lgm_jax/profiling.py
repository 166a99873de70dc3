"""Where a step's device time goes: a `jax.profiler` trace read against the step's optimised HLO.

Example (the profile a run wrote with --config.profile.start=N):

    python -m lgm_jax.profiling workdirs/demo/profile --hlo workdirs/demo/profile/step.hlo.txt.gz \
        --steps 3

`python -m lgm_jax.benchmark --profile DIR` and a distillation run with `--config.profile.start=N`
(`StepTracer`) record a few steps with `jax.profiler` (perfetto trace on), save the compiled
step's HLO beside the trace and call `summarize`; this file can also be run on such a folder
later.

How the time is counted. Each op execution of the step's module is one trace event: on a
device's "XLA Ops" line where it has one (TPUs), else a device kernel that names its `hlo_op`
(GPUs), else, with no device in the trace (the CPU backend), a host thunk. An event's
*exclusive* time is its duration minus that of the events nested inside it on the same thread
(on the CPU a `while` contains its body's ops). Each instruction is then classed twice:

- **kind**, from its opcode and what it calls: `matmul` (dot, convolution, cuBLAS/Triton/cuDNN
  GEMM, or a fusion containing one), `attention` (cuDNN's fused attention), `fusion`
  (elementwise or reduction fusions), `data movement` (copy, transpose, slices, gather/scatter,
  dynamic-update-slice), `collective`, `rng`, `control` (while/conditional/call themselves) and
  `other`;
- **phase**, from the JAX name stack in its metadata: the step's named scopes (`real_features`,
  `syn_features`, `probe`, `syn_backward`, `optimizer`, see `lgm.meta_grad`) and, inside them,
  `backbone` (the ViT), `decode` (pyramid) or `augment`; `unlabelled` where the compiler added
  the instruction (loop-carried copies, say) and it has no name stack.

`busy` is the union of the device events' intervals: busy / wall < 1 is time the device waited
(launch gaps, host work, synchronisation).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import logging
import os
import re
import sys
import time

from lgm_jax import errors
from lgm_jax.errors import command_parser, run_command

PHASES = ("real_features", "syn_features", "probe", "syn_backward", "optimizer")
PARTS = {"ViT": "backbone", "decode": "decode", "augment": "augment"}

log = logging.getLogger("lgm_jax")

_MOVES = {
    "copy", "copy-start", "copy-done", "transpose", "bitcast", "reshape", "slice",
    "dynamic-slice", "dynamic-update-slice", "concatenate", "pad", "gather", "scatter",
    "broadcast", "reverse", "iota",
}  # fmt: skip
_COLLECTIVES = (
    "all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all",
    "collective-broadcast", "ragged-all-to-all",
)  # fmt: skip
_CONTROL = {"while", "conditional", "call", "async-start", "async-done", "async-update"}

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([^\s(]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?<![\w\-.])([a-z][a-z0-9\-]*)\(")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _attention_target(target: str) -> bool:
    t = target.lower()
    return "fmha" in t or "flash" in t or "attention" in t


def _matmul_target(target: str) -> bool:
    t = target.lower()
    return "gemm" in t or "cublas" in t or "matmul" in t or "__cudnn$conv" in t


def parse_hlo(text: str) -> dict[str, dict]:
    """{instruction name: {"kind", "op_name", "opcode"}} for every instruction of an optimised
    HLO module's text (`compiled.as_text()`)."""
    comps: dict[str, list[dict]] = {}
    current = None
    for line in text.splitlines():
        m = _COMPUTATION.match(line)
        if m and "=" not in line.split("(", 1)[0]:
            current = comps.setdefault(m.group(1), [])
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _INSTRUCTION.match(line)
        if current is None or not m:
            continue
        name, rhs = m.groups()
        op = _OPCODE.search(rhs)
        target = _TARGET.search(rhs)
        op_name = _OP_NAME.search(rhs)
        current.append(
            {
                "name": name,
                "opcode": op.group(1) if op else "?",
                "target": target.group(1) if target else "",
                "calls": _CALLS.findall(rhs),
                "gemm_config": "gemm" in rhs.split("backend_config=", 1)[-1].lower()
                if "backend_config=" in rhs
                else False,
                "op_name": op_name.group(1) if op_name else "",
            }
        )

    contents: dict[str, set[str]] = {}

    def inside(comp: str, seen=()) -> set[str]:
        """What a computation (and what it calls) holds: opcodes and 'cc:'+custom call targets."""
        if comp in contents:
            return contents[comp]
        found: set[str] = set()
        for ins in comps.get(comp, ()):
            found.add(ins["opcode"])
            if ins["target"]:
                found.add("cc:" + ins["target"])
            for c in ins["calls"]:
                if c not in seen and c != comp:
                    found |= inside(c, (*seen, comp))
        contents[comp] = found
        return found

    out = {}
    for instrs in comps.values():
        for ins in instrs:
            out[ins["name"]] = {
                "kind": _kind(ins, inside),
                "opcode": ins["opcode"],
                "op_name": ins["op_name"],
            }
    return out


def _kind(ins: dict, inside) -> str:
    op, target = ins["opcode"], ins["target"]
    if op in ("dot", "convolution", "ragged-dot"):
        return "matmul"
    if op == "custom-call":
        if _attention_target(target):
            return "attention"
        if _matmul_target(target):
            return "matmul"
        return "other"
    if op == "fusion":
        held = set().union(*(inside(c) for c in ins["calls"])) if ins["calls"] else set()
        targets = [h[3:] for h in held if h.startswith("cc:")]
        if any(_attention_target(t) for t in targets):
            return "attention"
        if held & {"dot", "convolution"} or ins["gemm_config"] or any(map(_matmul_target, targets)):
            return "matmul"
        return "fusion"
    if op in _MOVES:
        return "data movement"
    if op.startswith(_COLLECTIVES):
        return "collective"
    if op.startswith("rng"):
        return "rng"
    if op in _CONTROL:
        return "control"
    if op in ("reduce", "reduce-window", "select-and-scatter", "sort", "map"):
        return "fusion"
    return "other"


def phase(op_name: str) -> str:
    """'syn_backward/backbone'-style label from a JAX name stack ('jit(step)/...')."""
    if not op_name:
        return "unlabelled"  # no metadata: copies and the like that the compiler added
    parts = op_name.split("/")
    top = next((p for p in parts if p in PHASES), "other")
    sub = next((PARTS[k] for p in parts for k in PARTS if p == k or p.startswith(k + "(")), None)
    if sub is None:  # transposed scopes read 'transpose(jvp(ViT))'
        sub = next((v for k, v in PARTS.items() if any(f"({k})" in p for p in parts)), None)
    return top if sub is None else f"{top}/{sub}"


def find_trace(trace_dir: str) -> str:
    """The newest perfetto trace under a `jax.profiler.trace` log folder."""
    paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    paths += glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(
            f"no *.trace.json.gz or perfetto_trace.json.gz under {trace_dir}: record one with "
            "jax.profiler.trace(dir, create_perfetto_trace=True)"
        )
    perfetto = [p for p in paths if p.endswith("perfetto_trace.json.gz")]
    return max(perfetto or paths, key=os.path.getmtime)


def op_events(trace: dict, module: str | None) -> tuple[list[tuple], str]:
    """((pid, tid, start us, duration us, HLO instruction) of the module's op executions, where
    they came from). Where a device has an "XLA Ops" line (TPUs; GPUs where the profiler derives
    it from the kernels), that line alone, one event per op execution: the kernels beneath it
    would count the time twice. Else the device's kernels that name their `hlo_op`; else, with
    no device in the trace (the CPU backend), the host's op events."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e.get("args", {}).get("name", "")
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
    device = {pid for pid, name in procs.items() if name.startswith("/device:")}
    xla_ops = {k for k, name in threads.items() if k[0] in device and name == "XLA Ops"}
    ops = []
    for e in events:
        if e.get("ph") != "X":
            continue
        a = e.get("args") or {}
        if xla_ops:
            if (e["pid"], e.get("tid")) not in xla_ops:
                continue
            # TPU op events are named by the instruction's text: "%fusion.3 = bf16[...] ...".
            name = a.get("hlo_op") or e.get("name", "").split(" = ")[0].strip().lstrip("%")
        elif "hlo_op" in a:
            name = a["hlo_op"]
        else:
            continue
        mod = a.get("hlo_module", "")
        if module and mod and not (mod == module or mod.startswith(module + "(")):
            continue
        ops.append((e["pid"], e.get("tid", 0), float(e["ts"]), float(e.get("dur", 0)), name))
    if xla_ops:
        return ops, "device XLA Ops line"
    on_device = [o for o in ops if o[0] in device]
    return (on_device, "device kernels") if on_device else (ops, "host")


def exclusive(ops: list[tuple]) -> list[tuple[str, float]]:
    """(hlo_op, exclusive us) per event: its duration less its children's on the same thread."""
    out = []
    by_thread = collections.defaultdict(list)
    for o in ops:
        by_thread[o[:2]].append(o)
    for evs in by_thread.values():
        evs.sort(key=lambda o: (o[2], -o[3]))
        stack: list[list] = []  # [end, name, exclusive]
        for _, _, ts, dur, name in evs:
            while stack and ts >= stack[-1][0]:
                end, n, x = stack.pop()
                out.append((n, x))
            if stack:
                stack[-1][2] -= min(dur, stack[-1][0] - ts)
            stack.append([ts + dur, name, dur])
        out.extend((n, x) for _, n, x in stack)
    return out


def busy_us(ops: list[tuple]) -> float:
    """Length of the union of the events' intervals."""
    total, end = 0.0, float("-inf")
    for ts, stop in sorted((o[2], o[2] + o[3]) for o in ops):
        if stop <= end:
            continue
        total += stop - max(ts, end)
        end = stop
    return total


def summarize(
    trace_dir: str, hlo_text: str, steps: int, wall_s: float | None = None, top: int = 15
) -> dict:
    """Per-step device time by kind, by phase and by instruction (seconds). `wall_s`: the
    measured wall time of the `steps` profiled steps together."""
    path = find_trace(trace_dir)
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    m = re.match(r"HloModule\s+([^\s,]+)", hlo_text)
    info = parse_hlo(hlo_text)
    ops, source = op_events(trace, m.group(1) if m else None)
    if not ops:
        raise ValueError(f"{path} holds no op events of the step's module")
    per_op = collections.defaultdict(lambda: [0.0, 0])
    for name, x in exclusive(ops):
        per_op[name][0] += x
        per_op[name][1] += 1
    by_kind: dict[str, float] = collections.Counter()
    by_phase: dict[str, float] = collections.Counter()
    rows = []
    unknown = 0.0
    for name, (us, n) in per_op.items():
        i = info.get(name)
        if i is None:
            unknown += us
        kind = i["kind"] if i else "other"
        ph = phase(i["op_name"]) if i else "other"
        by_kind[kind] += us
        by_phase[ph] += us
        rows.append((us, n, name, kind, ph, i["op_name"] if i else ""))
    rows.sort(reverse=True)
    total, busy = sum(by_kind.values()), busy_us(ops)
    s = lambda us: us / 1e6 / steps
    out = {
        "trace": path,
        "source": source,
        "steps": steps,
        "events": len(ops),
        "op_s_per_step": s(total),
        "busy_s_per_step": s(busy),
        "wall_s_per_step": None if wall_s is None else wall_s / steps,
        "busy_fraction": None if not wall_s else busy / 1e6 / wall_s,
        "unmatched_op_s_per_step": s(unknown),
        "by_kind": {k: s(v) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "by_phase": {k: s(v) for k, v in sorted(by_phase.items(), key=lambda kv: -kv[1])},
        "top_ops": [
            {
                "op": name,
                "kind": kind,
                "phase": ph,
                "s_per_step": s(us),
                "runs_per_step": n / steps,
                "op_name": op_name,
            }
            for us, n, name, kind, ph, op_name in rows[:top]
        ],
    }
    return out


def format_summary(p: dict, top: int = 10) -> str:
    """The summary as text: totals, by kind, by phase (shares of 0.5% and more), the top ops."""
    wall = p["wall_s_per_step"]
    busy = f", busy {p['busy_fraction']:.0%} of the wall time" if p["busy_fraction"] else ""
    lines = [
        f"  profile: {p['op_s_per_step'] * 1e3:.1f} ms of ops per step"
        + (f" in {wall * 1e3:.1f} ms wall" if wall else "")
        + busy
    ]
    total = p["op_s_per_step"] or 1.0
    for title, table in (("kind", p["by_kind"]), ("phase", p["by_phase"])):
        shown = [(k, v) for k, v in table.items() if v / total >= 0.005]
        cells = [f"{k} {v * 1e3:.1f} ms ({v / total:.0%})" for k, v in shown]
        lines.append(f"    by {title}: " + ", ".join(cells))
    for r in p["top_ops"][:top]:
        lines.append(
            f"    {r['s_per_step'] * 1e3:8.2f} ms x{r['runs_per_step']:<5g} {r['kind']:<13} "
            f"{r['phase']:<26} {r['op']}"
        )
    return "\n".join(lines)


def print_summary(p: dict, top: int = 10) -> None:
    print(format_summary(p, top))


class StepTracer:
    """Traces steps [start, start + steps) of a training loop into `folder` and summarises them
    (`summarize`) into folder/summary.json.

        tracer = StepTracer(folder, start=250, steps=3)
        for step in ...:
            tracer.before(step, state)
            state, metrics = step_fn(state, ...)
            tracer.after(step, state, lambda: step_fn.lower(state, ...).compile().as_text())

    The device is synchronised only at the window's two ends, so the traced steps run as the
    others do (dispatched ahead of the device), and the wall time is that of the window alone.
    A profiler that fails (no tracing support, nothing traced) is a logged warning, never an
    error of the run. `close` stops a trace left open by a loop that ended inside the window."""

    def __init__(self, folder: str, start: int, steps: int):
        self.folder, self.start, self.steps = folder, start, steps
        self.active = False
        self.summary: dict | None = None
        self.error: str | None = None  # why there is no summary, when there is none

    def before(self, step: int, state) -> None:
        if step != self.start or self.steps <= 0:
            return
        import jax

        jax.block_until_ready(state)  # the steps before the window are not in its time
        try:
            os.makedirs(self.folder, exist_ok=True)
            jax.profiler.start_trace(self.folder, create_perfetto_trace=True)
        except Exception as e:  # noqa: BLE001 - a profiler problem must not stop the run
            self.error = f"{type(e).__name__}: {e}"
            log.warning("no profile: the trace did not start (%s)", self.error)
            return
        self.active, self.t0 = True, time.perf_counter()

    def after(self, step: int, state, hlo_text) -> dict | None:
        """At the window's last step: stop, summarise, write summary.json; returns the summary.
        `hlo_text`: a callable giving the step's optimised HLO (called only then)."""
        if not self.active or step != self.start + self.steps - 1:
            return None
        import jax

        jax.block_until_ready(state)
        wall = time.perf_counter() - self.t0
        try:
            self.close()
            hlo = hlo_text()
            with gzip.open(os.path.join(self.folder, "step.hlo.txt.gz"), "wt") as f:
                f.write(hlo)
            self.summary = summarize(self.folder, hlo, self.steps, wall)
            with open(os.path.join(self.folder, "summary.json"), "w") as f:
                json.dump(self.summary, f, indent=2)
        except Exception as e:  # noqa: BLE001 - a profiler problem must not stop the run
            self.error = f"{type(e).__name__}: {e}"
            log.warning("no profile summary (%s)", self.error)
            return None
        return self.summary

    def close(self) -> None:
        if self.active:
            import jax

            self.active = False
            jax.profiler.stop_trace()


def read_text(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return f.read()


def main(argv=None) -> int:
    p = command_parser("profiling", __doc__)
    p.add_argument("trace_dir", help="the folder jax.profiler wrote (holding plugins/profile)")
    p.add_argument("--hlo", required=True, help="the step's optimised HLO text (.txt or .txt.gz)")
    p.add_argument("--steps", type=errors.count, default=1, help="how many steps the trace holds")
    p.add_argument("--top", type=errors.count, default=15)
    p.add_argument("--json", help="write the summary here")
    args = p.parse_args(argv)

    def body():
        summary = summarize(args.trace_dir, read_text(args.hlo), args.steps, top=args.top)
        print_summary(summary, args.top)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
