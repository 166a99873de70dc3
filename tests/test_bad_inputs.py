"""Bad inputs to every command: each is one line on stderr, `error: ...` naming what is wrong,
and exit status 2, with nothing of the user's overwritten. Commands run in-process through
their `main(argv)` (the run itself, `lgm_jax.main`, is tried in a subprocess in test_config)."""

import importlib
import json
import shutil

import numpy as np
import pytest

from lgm_jax import distilled

DEMO_VIT = "lgm_jax/assets/demo_vit"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good and bad inputs, written once: {name: path}."""
    root = tmp_path_factory.mktemp("inputs")
    good = distilled.save(
        str(root / "good"),
        np.zeros((10, 8, 8, 3), np.uint8),
        np.arange(10),
        list("abcdefghij"),
        dataset="mnist_demo",
    )
    (root / "not_a_zip.npz").write_bytes(b"this is not a zip file")
    np.savez(root / "no_images.npz", labels=np.arange(3))
    (root / "garbage.pth").write_bytes(b"\x80\x02garbage, not a torch file")
    (root / "folder" / "000_a").mkdir(parents=True)
    (root / "folder" / "000_a" / "0.png").write_bytes(b"not a png")
    shutil.copytree(DEMO_VIT, root / "bad_safetensors")
    (root / "bad_safetensors" / "params.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    shutil.copytree(DEMO_VIT, root / "bad_json")
    (root / "bad_json" / "config.json").write_text("{not json")
    (root / "a_file").write_text("a file, not a directory")
    (root / "evals").mkdir()
    (root / "evals" / "eval.json").write_text('{"top1": ')
    return {**{p.name: p for p in root.iterdir()}, "root": root, "good": good}


def _cases(f):
    """(command, argv, what the one line must say)."""
    root, good = f["root"], f["good"]
    ev = ["--backbone", "dinov2_tiny", "--epochs", "1", "--seeds", "1"]
    return [
        # files that are not what they claim
        ("evaluate", ["--distilled", str(f["not_a_zip.npz"]), *ev], "not_a_zip.npz"),
        ("evaluate", ["--distilled", str(f["no_images.npz"]), *ev], "images"),
        ("evaluate", ["--distilled", str(f["garbage.pth"]), *ev], "garbage.pth"),
        ("evaluate", ["--distilled", str(f["folder"]), *ev], "is not a readable image"),
        (
            "evaluate",
            ["--distilled", good, *ev, "--weights", str(f["bad_safetensors"])],
            "params.safetensors",
        ),
        ("evaluate", ["--distilled", good, *ev, "--weights", str(f["bad_json"])], "config.json"),
        ("report", [str(f["evals"]), "--out", str(root / "r")], "eval.json"),
        ("golden", ["--golden", str(f["a_file"])], "golden step"),
        # a file where a directory is expected, or the reverse; paths that do not exist
        ("evaluate", ["--distilled", good, *ev, "--weights", str(f["a_file"])], "a_file"),
        ("evaluate", ["--distilled", str(root / "absent"), *ev], "absent"),
        (
            "export",
            ["--distilled", good, "--format", "folder", "--out", str(f["a_file"])],
            "a_file",
        ),
        (
            "convert",
            ["--source", str(root / "no_such_dir"), "--out", str(root / "c")],
            "no such file or directory",
        ),
        # flags out of range, unknown or malformed
        (
            "evaluate",
            ["--distilled", good, "--backbone", "dinov2_tiny", "--epochs", "0"],
            "--epochs: '0' is not an integer >= 1",
        ),
        (
            "evaluate",
            ["--distilled", good, "--backbone", "dinov2_tiny", "--seeds", "x"],
            "--seeds",
        ),
        ("evaluate", ["--distilled", good, "--backbone", "dinov9", *ev[2:]], "dinov9"),
        ("export", ["--distilled", good, "--format", "tiff", "--out", str(root / "e")], "tiff"),
        (
            "feature_cache",
            [
                "--dataset",
                "mnist_demo",
                "--backbone",
                "dinov2_tiny",
                "--views",
                "-1",
                "--out",
                str(root / "fc"),
            ],
            "--views: '-1'",
        ),
        ("profiling", ["--steps", "0", str(root)], "--steps"),
        ("pretrain_demo", ["--lr", "nan", "--out", str(root / "p")], "--lr: 'nan'"),
        ("imagenet_miniature", ["--out", str(root / "m"), "--per-class", "0"], "--per-class"),
        ("data_bench", ["--batch", "0"], "--batch"),
        (
            "analysis",
            [
                *"alignment --dataset mnist_demo --backbones a b --k 0 --out".split(),
                str(root / "al"),
            ],
            "--k: '0'",
        ),
        ("report", ["--no-such-flag", str(root)], "unrecognized arguments: --no-such-flag"),
        ("benchmark", ["--classes", "0"], "--classes: '0'"),
        (
            "baselines",
            ["random", "--dataset", "mnist_demo", "--backbone", "dinov2_tiny", "--seeds", "0"],
            "--seeds: '0'",
        ),
        (
            "baselines",
            ["full", "--dataset", "mnist_demo", "--backbone", "dinov2_tiny", "--lr", "-1"],
            "--lr: '-1'",
        ),
        ("preflight", ["--config=configs/demo.py", "--utilisation", "2"], "--utilisation: '2'"),
        ("preflight", ["--config=configs/demo.py", "--target", "h900"], "h900"),
        (
            "convert",
            ["--source", str(root), "--out", str(root / "c"), "--input-res", "0"],
            "--input-res",
        ),
    ]


def _run(command, argv):
    module = importlib.import_module(f"lgm_jax.{command}")
    try:
        return module.main(argv)
    except SystemExit as e:
        return e.code


def test_every_bad_input_is_one_line_and_exit_status_2(files, capsys):
    failures = []
    for command, argv, expected in _cases(files):
        status = _run(command, argv)
        err = capsys.readouterr().err.strip().splitlines()
        lines = [line for line in err if not line.startswith(("I", "W"))]  # absl info/warnings
        if status != 2 or len(lines) != 1 or not lines[0].startswith("error: "):
            failures.append(f"{command} {argv}: status {status}, stderr {err[-5:]}")
        elif expected not in lines[0]:
            failures.append(f"{command} {argv}: {lines[0]!r} lacks {expected!r}")
    assert not failures, "\n".join(failures)
    assert files["a_file"].read_text() == "a file, not a directory"  # nothing overwritten


def test_export_refuses_a_corrupt_checkpoint_and_writes_nothing(reference, tmp_path, capsys):
    """The pth export decodes the run's newest checkpoint: one whose arrays were damaged is
    refused (its recorded checksums), and no data.pth appears."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    step = json.loads((run / "config.json").read_text())["steps"] + 1
    for data in (run / "checkpoints" / str(step)).glob("state/**/d/*"):
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    out = tmp_path / "out"
    status = _run("export", ["--distilled", str(run), "--format", "pth", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1].startswith("error: checkpoint "), err
    assert f"checkpoints/{step}" in err[-1], err
    assert not (out / "data.pth").exists()
