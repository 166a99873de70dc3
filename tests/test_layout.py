"""The package's shape: imports point down the layers, and every user command answers --help."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lgm_jax"

# Lowest first. A module may import lgm_jax modules of its own layer or of layers below it,
# never above. The layers below the step's maths (0 and 1) may not import each other's
# groups either: models/, data/, pyramid, augment, resample and preprocess stand on their own.
LAYERS = [
    {"preprocess", "errors", "prefetch", "resample", "assets", "groups"},  # leaves
    {"pyramid", "augment", "models", "data", "distilled"},  # what the step's maths stands on
    {"lgm", "probe"},  # the step's maths and the probe protocol
    {
        "config_base",
        "accelerators",
        "checkpoint",
        "feature_cache",
        "profiling",
        "stops",
        "distill",
        "evaluate",
    },  # runs
    set(),  # commands: every other module
]
# Within layer 1, what each group may use of its own layer.
SIBLINGS = {"augment": set(), "pyramid": set(), "models": set(), "data": set(), "distilled": set()}

COMMANDS = [
    "main",
    "evaluate",
    "baselines",
    "feature_cache",
    "profiling",
    "benchmark",
    "golden",
    "convert",
    "report",
    "pretrain_demo",
    "data_bench",
    "export",
    "imagenet_miniature",
    "analysis",
    "preflight",
    "flowers_miniature",
]


def group(module: str) -> str:
    """lgm_jax.models.vit -> models; lgm_jax.lgm -> lgm."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer(module: str) -> int:
    g = group(module)
    return next((i for i, names in enumerate(LAYERS) if g in names), len(LAYERS) - 1)


def package_imports(path: pathlib.Path, module: str) -> set[str]:
    """Every lgm_jax module `path` imports, at the top or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("lgm_jax")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                pkg = module.split(".")[: -node.level]
                base = ".".join(pkg + ([base] if base else []))
            if base == "lgm_jax":
                out |= {f"lgm_jax.{a.name}" for a in node.names}
            elif base.startswith("lgm_jax."):
                out.add(base)
    return out


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts)
        yield name.removesuffix(".__init__"), path


def test_imports_point_down_the_layers():
    wrong = []
    for name, path in modules():
        for target in package_imports(path, name):
            if group(target) == group(name):
                continue
            lo, hi = layer(target), layer(name)
            sibling = hi == 1 and lo == 1 and group(target) not in SIBLINGS[group(name)]
            if lo > hi or sibling or (hi == 0 and lo == 0):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(sorted(wrong))


def test_the_layer_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "pyramid.py"
    bad.write_text("from lgm_jax import lgm\ndef f():\n    from lgm_jax.data import pipeline\n")
    found = package_imports(bad, "lgm_jax.pyramid")
    assert found == {"lgm_jax.lgm", "lgm_jax.data"}
    assert layer("lgm_jax.lgm") > layer("lgm_jax.pyramid")


def test_every_command_is_a_module_of_the_package():
    for name in COMMANDS:
        assert (PACKAGE / f"{name}.py").is_file(), name


@pytest.mark.parametrize("command", COMMANDS)
def test_help_exits_zero_and_shows_an_example(command):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", f"lgm_jax.{command}", "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"python -m lgm_jax.{command}" in proc.stdout, proc.stdout[:2000]
