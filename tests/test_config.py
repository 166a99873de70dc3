"""Settings are checked when a run starts, before anything slow: every config file passes, and
a value out of its range names the key, the value and what is allowed."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

from lgm_jax import config_base
from lgm_jax.errors import InputError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.py")), ids=lambda p: p.stem)
def test_every_config_file_passes(path):
    config_base.check(_load(path)())


@pytest.mark.parametrize(
    "key,value,allowed",
    [
        ("aug_rounds", -1, "an integer >= 1"),
        ("lr", float("nan"), "a finite number > 0"),
        ("lr", 0.0, "a finite number > 0"),
        ("syn_res", 100, "a power of two"),
        ("augment.flip_p", 1.5, "a probability in [0, 1]"),
        ("augment.crop_scale", (0.5, 0.2), "0 < lo <= hi"),
        ("chunk_size", -3, "an integer >= 1, or 0"),
        ("dtype", "float16", "'float32' or 'bfloat16'"),
        ("attention", "flash", "'xla' or 'cudnn'"),
        ("state_sharding", "rows", "'replicated' or 'class'"),
        ("eval.mode", "quick", "'exact' or 'fast'"),
        ("backbone", "dinov9", "factory:<module>"),
    ],
)
def test_a_bad_value_names_the_key_the_value_and_what_is_allowed(key, value, allowed):
    c = config_base.base()
    node, last = c, key.split(".")
    for part in last[:-1]:
        node = node[part]
    node[last[-1]] = value
    with pytest.raises(InputError) as e:
        config_base.check(c)
    msg = str(e.value)
    assert f"{key}={value!r}" in msg and allowed in msg, msg


def test_every_bad_key_is_named_at_once():
    c = config_base.base()
    c.ipc, c.pyramid.start_res = 0, 512
    with pytest.raises(InputError, match=r"ipc=0.*pyramid.start_res=512 \(larger than syn_res"):
        config_base.check(c)


def test_the_run_refuses_a_bad_setting_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "lgm_jax.main", "--config=configs/demo.py"]
    cmd += [f"--workdir={tmp_path / 'w'}", "--config.aug_rounds=-1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: bad settings: aug_rounds=-1"), lines[-3:]
    assert not (tmp_path / "w").exists()  # refused before the workdir was made


@pytest.mark.parametrize("case", ["config", "workdir"])
def test_a_missing_config_file_or_a_workdir_that_is_a_file_is_one_line(tmp_path, case):
    (tmp_path / "afile").write_text("x")
    config = "configs/nope.py" if case == "config" else "configs/demo.py"
    workdir = tmp_path / ("w" if case == "config" else "afile")
    cmd = [sys.executable, "-m", "lgm_jax.main", f"--config={config}", f"--workdir={workdir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: ") and ("nope.py not found" in last or "is a file" in last)
    assert "Traceback" not in proc.stderr
