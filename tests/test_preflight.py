"""python -m lgm_jax.preflight: sizing a config for a target or for the devices present, the
advice it gives when the step does not fit, and the accelerator check a run starts with."""

import json
import pathlib

import pytest

from lgm_jax import accelerators, preflight

ROOT = pathlib.Path(__file__).resolve().parents[1]
IN1K = "--config=" + str(ROOT / "configs" / "in1k.py")


def run_json(capsys, *argv) -> tuple[int, dict]:
    status = preflight.main([*argv, "--json"])
    return status, json.loads(capsys.readouterr().out)


def test_in1k_fits_80gb_and_gets_advice_on_v5e8_that_fits_when_applied(capsys):
    # Targets are sized from shapes (no compilation): seconds each, the backbone's count of
    # activations per row traced once per process.
    status, r = run_json(capsys, IN1K, "--target", "h100")
    assert status == 0 and r["fits"] and r["device"]["count"] == 1
    assert r["memory_source"] == "estimate" and 0 < r["memory"] <= r["usable"]
    assert r["step_s"] > 0 and r["run_s"] == pytest.approx(r["step_s"] * 5001)
    # The whole per-device batch in one backbone call: 375 rows of ViT-B/14 do not fit 16 GiB.
    status, r = run_json(capsys, IN1K, "--config.chunk_size=0", "--target", "v5e-8")
    assert status == 2 and not r["fits"] and r["device"]["count"] == 8
    assert r["rows_per_chunk"] == 375 and r["syn_passes"] == 2
    layouts = {a["state_sharding"]: a for a in r["advice"]}
    assert set(layouts) == {"replicated", "class"}  # 1000 images divide over 8 chips
    for a in r["advice"]:
        assert a["memory"] <= r["usable"] and 375 % a["chunk_size"] == 0
        assert a["step_s"] > r["step_s"]  # chunked: the forward pass runs again
        status, again = run_json(capsys, IN1K, *a["flags"].split(), "--target", "v5e-8")
        assert status == 0 and again["fits"] and again["memory"] == a["memory"]
        assert again["syn_passes"] == 3 and again["step_s"] == pytest.approx(a["step_s"])
    # Split by image, each chip holds an eighth of the state: room for a larger chunk.
    assert layouts["class"]["chunk_size"] > layouts["replicated"]["chunk_size"]
    preflight.print_table(r, "configs/in1k.py")  # the people's form of the same result
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "--config.state_sharding=class" in out


def test_bad_target_or_key_is_one_line_and_exit_2(capsys):
    assert preflight.main([IN1K, "--target", "v7x-8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "v7x-8" in err[0] and "v5e" in err[0]
    assert preflight.main([IN1K, "--config.no_such_key=1", "--target", "h100"]) == 2
    assert "no_such_key" in capsys.readouterr().err


def test_estimate_of_the_tiny_step_is_near_its_compiled_memory(capsys):
    # Compiled for one of the 8 CPU test devices (conftest); the demo's 100 rows run in one
    # backbone call.
    status, r = run_json(capsys, f"--config={ROOT}/configs/demo.py", "--devices", "1")
    assert status == 0 and r["fits"] and r["device"]["present"]
    assert r["memory_source"] == "memory_analysis" and r["memory"] == r["compiled"]["total"]
    assert r["estimate"]["total"] == pytest.approx(r["compiled"]["total"], rel=0.25)
    assert r["step_s"] is None  # no peak rate for a CPU


def test_cpu_only_warning_names_the_accelerator_and_the_fix(tmp_path):
    none = lambda name: None
    assert accelerators.cpu_only_warning("cpu", str(tmp_path), {}, none) is None
    assert accelerators.cpu_only_warning("gpu", "/", {}, none) is None
    smi = accelerators.cpu_only_warning("cpu", str(tmp_path), {}, lambda n: "/usr/bin/" + n)
    assert "GPU" in smi and ".[cuda12]" in smi and "jax.devices()" in smi
    env = {"TPU_ACCELERATOR_TYPE": "v5litepod-8"}
    assert ".[tpu]" in accelerators.cpu_only_warning("cpu", str(tmp_path), env, none)
    on_purpose = env | {"JAX_PLATFORMS": "cpu"}  # the CPU asked for: no warning
    assert accelerators.cpu_only_warning("cpu", str(tmp_path), on_purpose, none) is None
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "nvidia0").touch()
    assert "/dev/nvidia0" in accelerators.cpu_only_warning("cpu", str(tmp_path), {}, none)
    chip = tmp_path / "sys" / "bus" / "pci" / "devices" / "0000:00:04.0"
    chip.mkdir(parents=True)
    (chip / "vendor").write_text("0x1ae0\n")
    (chip / "device").write_text("0x0063\n")
    assert "TPU v5e" in accelerators.tpu(str(tmp_path), {})
