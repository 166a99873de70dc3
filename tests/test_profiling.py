"""lgm_jax/profiling.py: op kinds from optimised HLO, phases from name stacks, exclusive and
busy time from trace events."""

import gzip
import json
import pathlib

import pytest

from lgm_jax import profiling as ts

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Written in the shapes of XLA:GPU's optimised HLO text: cuBLAS and cuDNN custom calls, a Triton
# GEMM fusion, a loop fusion, a fusion that calls a computation holding a dot, loop machinery.
GPU_HLO = (ROOT / "tests" / "data" / "gpu_step.hlo.txt").read_text()


def test_parse_hlo_kinds_and_phases():
    info = ts.parse_hlo(GPU_HLO)
    kinds = {name: i["kind"] for name, i in info.items()}
    assert kinds["custom-call.3"] == "matmul"  # cuBLAS
    assert kinds["custom-call.7"] == "attention"  # cuDNN fused attention (backward)
    assert kinds["gemm_fusion_dot.1"] == "matmul"  # Triton GEMM fusion
    assert kinds["loop_exp_fusion"] == "fusion"
    assert kinds["input_fusion.2"] == "matmul"  # a dot two computations down
    assert kinds["copy.5"] == "data movement"
    assert kinds["all-reduce.2"] == "collective"
    assert kinds["while.3"] == "control"
    assert kinds["rng-bit-generator.1"] == "rng"
    assert kinds["exponential.1"] == "other" and kinds["dot.0"] == "matmul"
    phases = {name: ts.phase(i["op_name"]) for name, i in info.items()}
    assert phases["custom-call.3"] == "syn_features/backbone"
    assert phases["custom-call.7"] == "syn_backward/backbone"  # through transpose(jvp(ViT))
    assert phases["gemm_fusion_dot.1"] == "real_features/backbone"
    assert phases["loop_exp_fusion"] == "syn_features/decode"
    assert phases["input_fusion.2"] == "syn_backward/augment"
    assert phases["all-reduce.2"] == "probe" and phases["while.3"] == "optimizer"
    assert phases["copy.5"] == "unlabelled"


def test_exclusive_and_busy_time():
    # Thread 1: a 10 us while holding two ops (2 + 3 us); thread 2 overlaps it (8..14 us).
    ops = [
        (1, 1, 0.0, 10.0, "while"),
        (1, 1, 1.0, 2.0, "a"),
        (1, 1, 5.0, 3.0, "b"),
        (1, 2, 8.0, 6.0, "c"),
    ]
    assert dict(ts.exclusive(ops)) == {"while": 5.0, "a": 2.0, "b": 3.0, "c": 6.0}
    assert ts.busy_us(ops) == 14.0
    assert ts.busy_us([(1, 1, 0.0, 1.0, "a"), (1, 1, 3.0, 1.0, "b")]) == 2.0


def _write_trace(folder: pathlib.Path, events):
    run = folder / "plugins" / "profile" / "2026_01_01_00_00_00"
    run.mkdir(parents=True)
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
    ]
    with gzip.open(run / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": meta + events}, f)


def test_summarize_uses_the_device_events_of_the_step_module(tmp_path):
    ev = lambda pid, tid, ts_, dur, op, mod="jit_step": {
        "ph": "X", "pid": pid, "tid": tid, "ts": ts_, "dur": dur, "name": op,
        "args": {"hlo_op": op, "hlo_module": mod},
    }  # fmt: skip
    events = [
        ev(2, 7, 0, 300, "custom-call.3"),  # cuBLAS, 2 steps x 300 us
        ev(2, 7, 1000, 300, "custom-call.3"),
        ev(2, 7, 400, 100, "custom-call.7"),  # attention, once
        ev(2, 8, 450, 100, "loop_exp_fusion"),  # another stream, overlapping by 50 us
        ev(2, 7, 2000, 5000, "custom-call.3", mod="jit_other"),  # another program: ignored
        ev(1, 3, 0, 9000, "custom-call.3"),  # the host's launch event: ignored (device exists)
    ]
    _write_trace(tmp_path, events)
    s = ts.summarize(str(tmp_path), GPU_HLO, steps=2, wall_s=0.002)
    assert s["source"] == "device kernels" and s["events"] == 4
    assert s["op_s_per_step"] == pytest.approx(400e-6)  # (600 + 100 + 100) us / 2 steps
    assert s["busy_s_per_step"] == pytest.approx(375e-6)  # union 750 us / 2
    assert s["busy_fraction"] == pytest.approx(750e-6 / 0.002)
    assert s["by_kind"] == pytest.approx({"matmul": 300e-6, "attention": 50e-6, "fusion": 50e-6})
    assert s["by_phase"]["syn_features/backbone"] == pytest.approx(300e-6)
    assert s["by_phase"]["syn_backward/backbone"] == pytest.approx(50e-6)
    top = s["top_ops"][0]
    assert top["op"] == "custom-call.3" and top["runs_per_step"] == 1.0
    assert s["unmatched_op_s_per_step"] == 0


def test_missing_trace_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="create_perfetto_trace=True"):
        ts.summarize(str(tmp_path), GPU_HLO, steps=1)


def test_an_xla_ops_line_is_counted_alone(tmp_path):
    """TPU traces (and GPU ones where the profiler derives it) have one "XLA Ops" event per op
    execution; TPU names them by the instruction's text. The kernels beneath and the "XLA
    Modules" line must not count again."""
    meta = [
        {"ph": "M", "pid": 2, "tid": 1, "name": "thread_name", "args": {"name": "XLA Modules"}},
        {"ph": "M", "pid": 2, "tid": 2, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "M", "pid": 2, "tid": 3, "name": "thread_name", "args": {"name": "Stream #7"}},
    ]
    x = lambda tid, ts_, dur, name, args: {
        "ph": "X", "pid": 2, "tid": tid, "ts": ts_, "dur": dur, "name": name, "args": args
    }  # fmt: skip
    events = meta + [
        x(1, 0, 1000, "jit_step(42)", {}),
        x(2, 0, 400, "%custom-call.3 = (bf16[8,4]{1,0}, s8[1024]{0}) custom-call(...)", {}),
        x(2, 500, 200, "loop_exp_fusion", {"hlo_op": "loop_exp_fusion"}),
        x(3, 0, 390, "sm90_gemm_kernel", {"hlo_op": "custom-call.3", "hlo_module": "jit_step"}),
    ]
    _write_trace(tmp_path, events)
    s = ts.summarize(str(tmp_path), GPU_HLO, steps=1)
    assert s["source"] == "device XLA Ops line" and s["events"] == 2
    assert s["by_kind"] == pytest.approx({"matmul": 400e-6, "fusion": 200e-6})
    assert s["unmatched_op_s_per_step"] == 0


def test_step_tracer_summarises_its_window_and_never_raises(tmp_path, caplog):
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda v: jnp.tanh(v @ v.T).sum(axis=0))
    x = jnp.ones((64, 64))
    hlo = lambda: f.lower(x).compile().as_text()
    tracer = ts.StepTracer(str(tmp_path / "ok"), start=1, steps=2)
    for step in range(4):
        tracer.before(step, x)
        y = f(x)
        tracer.after(step, y, hlo)
        assert tracer.active == (step == 1)
    s = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert s["steps"] == 2 and s["by_kind"]["matmul"] > 0 and s["unmatched_op_s_per_step"] == 0

    def broken():
        raise RuntimeError("no HLO here")

    tracer = ts.StepTracer(str(tmp_path / "bad"), start=0, steps=1)
    tracer.before(0, x)
    assert tracer.after(0, f(x), broken) is None  # a warning, not an error
    assert not tracer.active and "no HLO here" in caplog.text
    assert not (tmp_path / "bad" / "summary.json").exists()
