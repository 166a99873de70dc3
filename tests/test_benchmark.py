"""python -m lgm_jax.benchmark: the FLOP count against SPEC's figure, and one tiny run end to
end."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from lgm_jax import benchmark, lgm, step_cost
from lgm_jax.models import registry
from lgm_jax.models.vit import ViTConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--backbone", "dinov2_tiny", "--syn-res", "32", "--input-res", "28"]


def tiny_config(**overrides):
    """The 28 px test backbone's ViTConfig, as the benchmark builds it by default."""
    return registry.get("dinov2_tiny", **overrides).config


def test_vit_b14_forward_flops_match_spec():
    # SPEC: "A ViT-B/14 forward at 224 px is about 46.3 GFLOP per image".
    cfg = registry.get("dinov2_vitb").config
    assert step_cost.vit_flops(cfg) / 1e9 == pytest.approx(46.3, abs=0.05)


def test_vit_flops_by_hand():
    # width 4, depth 1, mlp 8, patch 2 at 4 px: 4 patches + CLS = 5 tokens.
    cfg = ViTConfig(width=4, depth=1, heads=1, mlp_dim=8, patch_size=2, input_res=4)
    patch = 4 * (2 * 2 * 3) * 4
    block = 3 * 5 * 4 * 4 + 5 * 5 * 4 + 5 * 5 * 4 + 5 * 4 * 4 + 2 * 5 * 4 * 8
    assert step_cost.vit_flops(cfg) == 2 * (patch + block)


def test_peak_table():
    assert step_cost.peak_tflops("NVIDIA H200", "bfloat16") == 989.0
    assert step_cost.peak_tflops("cpu", "float32") is None


def test_tiny_run_writes_every_field(tmp_path):
    out = tmp_path / "r.json"
    # The documented shell, tools/benchmark.py, runs `python -m lgm_jax.benchmark`.
    cmd = [sys.executable, str(ROOT / "tools" / "benchmark.py"), *TINY]
    cmd += ["--classes", "2", "--aug-rounds", "2", "--chunk-size", "2", "--dtype", "float32"]
    cmd += ["--steps", "3", "--warmup", "1"]
    cmd += ["--json", str(out), "--profile", str(tmp_path / "trace")]
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert set(benchmark.FIELDS) <= set(r)
    assert r["compile_s"] > 0
    assert 0 < r["step_s_p10"] <= r["step_s_median"] <= r["step_s_p90"]
    assert r["syn_images_per_s"] == pytest.approx(4 / r["step_s_median"])
    assert r["real_images_per_s"] == pytest.approx(4 / r["step_s_median"])
    assert r["tflops"] == pytest.approx(r["flops_per_step"] / r["step_s_median"] / 1e12)
    assert r["peak_fraction"] is None  # CPU: no peak in the table
    assert r["mem_source"] == "memory_analysis" and r["peak_mem_bytes"] > 0
    assert r["compiled_mem"]["temp"] > 0
    assert r["platform"] == "cpu" and r["jax_version"] and len(r["git_commit"]) >= 7
    assert r["config"]["classes"] == 2 and r["config"]["chunk_size"] == 2
    assert 0 <= r["loss"] <= 2
    assert "step (median" in proc.stdout
    # --profile: two more steps traced; every op of the trace found in the step's HLO, and the
    # backbone's time in each phase that runs it (C = 2, K = 2, chunk 2: real and synthetic).
    p = r["profile"]
    assert "error" not in p, p
    assert p["source"] == "host" and p["steps"] == 2 and p["events"] > 0
    assert p["unmatched_op_s_per_step"] == 0
    assert sum(p["by_kind"].values()) == pytest.approx(p["op_s_per_step"])
    assert sum(p["by_phase"].values()) == pytest.approx(p["op_s_per_step"])
    assert p["by_kind"]["matmul"] > 0
    for ph in ("real_features/backbone", "syn_features/backbone", "syn_backward/backbone"):
        assert p["by_phase"].get(ph, 0) > 0, (ph, p["by_phase"])
    assert 0 < p["busy_s_per_step"] <= p["wall_s_per_step"]
    assert (tmp_path / "trace" / "step.hlo.txt.gz").exists()
    assert "by phase:" in proc.stdout


def test_config_file_sets_defaults_and_flags_win(tmp_path):
    cfg = tmp_path / "exp.py"
    cfg.write_text(
        "from lgm_jax.config_base import base\n"
        "def get_config(arg=None):\n"
        "    c = base()\n"
        "    c.num_classes = 2 if arg == 'smoke' else 100\n"
        "    c.aug_rounds = 10\n"
        "    c.chunk_size = 64\n"
        "    c.real_input = 'features'\n"
        "    return c\n"
    )
    args = benchmark.parse(["--config", f"{cfg}:smoke", "--aug-rounds", "3"])
    c = args.settings
    assert (args.classes, c.aug_rounds, c.chunk_size, c.real_input) == (2, 3, 64, "features")
    assert benchmark.parse(["--config", str(cfg)]).classes == 100
    assert benchmark.parse(["--config", str(cfg), "--classes", "7"]).classes == 7
    assert benchmark.parse([]).classes == 10  # base(): the class count comes from the data


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert benchmark.main(["--config", str(tmp_path / "none.py")]) == 2
    assert benchmark.main(["--backbone", "nope", "--lower", "tpu"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "none.py" in err[0] and "unknown backbone 'nope'" in err[1]
    with pytest.raises(SystemExit) as e:
        benchmark.parse(["--help"])
    assert e.value.code == 0


def test_step_flops_count_the_recomputed_forward_only_when_chunked():
    vit = tiny_config()
    f = step_cost.vit_flops(vit)
    whole = lgm.StepConfig(num_classes=10, aug_rounds=2)  # 20 real + 20 synthetic rows
    chunked = lgm.StepConfig(num_classes=10, aug_rounds=2, chunk_size=5)
    cached = lgm.StepConfig(num_classes=10, aug_rounds=2, chunk_size=5, real_input="features")
    assert step_cost.step_flops(vit, whole) == f * (20 + 2 * 20)
    assert step_cost.step_flops(vit, chunked) == f * (20 + 3 * 20)
    assert step_cost.step_flops(vit, cached) == f * 3 * 20
    # Over 4 devices each holds 5 rows: chunk 5 is the whole per-device batch.
    assert step_cost.step_flops(vit, chunked, num_devices=4) == f * (20 + 2 * 20)


def test_data_bench_times_every_thread_count(capsys):
    from lgm_jax import data_bench

    argv = ["--images", "12", "--batch", "4", "--batches", "1", "--threads", "1", "2"]
    assert data_bench.main(argv) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    timed = [r for r in rows if len(r) == 3 and r[0] in ("1", "2")]
    assert [r[0] for r in timed] == ["1", "2"] and all(float(r[2]) > 0 for r in timed)


@pytest.mark.parametrize(
    "flags, real_sites, syn_sites",
    [
        (["--chunk-size", "2"], 1, 2),  # chunked: features pass + the VJP's own forward
        ([], 1, 1),  # one chunk: the VJP's forward gives the features
        (["--real-input", "features"], 0, 1),  # cached real features: no real forward
        (["--chunk-size", "2", "--remat", "--remat-policy", "matmuls"], 1, 3),  # + remat's re-run
    ],
)
def test_cudnn_step_lowers_for_cuda_with_fused_attention(flags, real_sites, syn_sites):
    # No GPU here: the step is traced and lowered for CUDA only. Every attention of the depth-2
    # tiny backbone is cuDNN's fused kernel, one forward site per pass of the program (which is
    # how the FLOP count's passes show in it), one backward per layer (the backward to the
    # synthetic images), no host round trip, and the state's buffers are donated.
    argv = TINY + ["--classes", "4", "--aug-rounds", "2", "--dtype", "bfloat16"]
    argv += ["--attention", "cudnn"]
    r = benchmark.lower(benchmark.parse(argv + flags + ["--lower", "cuda"]))
    depth = 2
    assert r["custom_calls"] == {
        "__cudnn$fmhaSoftmax": depth * (real_sites + syn_sites),
        "__cudnn$fmhaSoftmaxBackward": depth,
    }
    assert r["host_calls"] == []
    levels = 6  # 1, 2, 4, 8, 16, 32 px: each level and its two Adam moments
    assert r["donated_inputs"] == 3 * levels + 3  # the whole state (+ step, count, key)
    # The patched cuDNN check is put back: without a GPU the fused kernel is refused again.
    import jax
    import jax.numpy as jnp

    from lgm_jax.models.vit import ViT

    if jax.default_backend() != "gpu":
        vit = tiny_config(dtype="bfloat16", attention="cudnn")
        with pytest.raises(RuntimeError, match="cuDNN"):
            jax.eval_shape(ViT(vit).init, jax.random.key(0), jnp.zeros((1, 28, 28, 3)))


@pytest.mark.parametrize("mesh", [False, True])
def test_xla_step_lowers_for_tpu_without_custom_calls(mesh):
    # With --mesh, over the 8 test devices: donation is then marked per argument for XLA to pair.
    argv = TINY + ["--classes", "4", "--aug-rounds", "2", "--chunk-size", "2", "--lower", "tpu"]
    r = benchmark.measure(benchmark.parse(argv + ["--json", os.devnull] + ["--mesh"] * mesh))
    assert r["lowered_for"] == "tpu" and r["custom_calls"] == {} and r["host_calls"] == []
    assert r["donated_inputs"] == 21  # the whole state: 6 levels, 12 moments, 3 scalars/keys
    if mesh:
        return
    vit = tiny_config(dtype="bfloat16")
    step = lgm.StepConfig(num_classes=4, aug_rounds=2, chunk_size=2)
    assert r["flops_per_step"] == step_cost.step_flops(vit, step)


def test_residual_count_follows_the_remat_policy():
    # Tiny backbone, float32, 28 px: T = 5 tokens, D = 64, M = 256, depth 2, 2 heads.
    t, d, m, depth, heads, f32 = 5, 64, 256, 2, 2, 4
    none, matmuls, block = (
        step_cost.residual_bytes_per_row(tiny_config(remat=r, remat_policy=p))
        for r, p in ((False, "block"), (True, "matmuls"), (True, "block"))
    )
    # "block" keeps at least each block's input; "matmuls" also q, k, v and the MLP hidden layer;
    # without remat everything the backward needs (attention probabilities included).
    assert block >= depth * t * d * f32
    assert matmuls >= block + depth * t * (3 * d + m) * f32
    assert none > matmuls + depth * heads * t * t * f32  # the heads' [T, T] probabilities
