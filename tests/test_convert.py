"""Parity of every family's Flax model with its PyTorch original (tiny random models, offline).

Each PyTorch model is converted with lgm_jax.convert's functions and both are run on
the same random batch, at the resolution their position embeddings were built for and at
another one (resized as the PyTorch model resizes them).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch_models as tm

from lgm_jax import convert as cw
from lgm_jax.models import registry, weights

# (id, builder, (native size, other size)): native = the size the torch model was built for.
CASES = [
    ("dinov2", lambda: tm.dinov2(56), (56, 28)),
    ("dinov2_reg", lambda: tm.dinov2(56, registers=True), (56, 42)),
    ("clip", lambda: tm.clip(28), (28, 42)),
    ("eva02_swiglu", lambda: tm.eva02(28), (28, 42)),
    ("eva02_packed", lambda: tm.eva02(42, packed=True), (42, 28)),
    ("mocov3", lambda: tm.plain("mocov3", 32), (32, None)),
    ("dino", lambda: tm.plain("dino", 32), (32, 48)),
]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def converted(request):
    _, build, sizes = request.param
    family, model = build()
    backbone, params = cw.convert_module(family, model)
    return family, model, backbone, params, sizes


def test_float32_parity(converted):
    family, model, backbone, params, sizes = converted
    for size in (s for s in sizes if s):
        _, rel = cw.compare(family, model, backbone, params, size)
        assert rel < 1e-4, f"{family} at {size} px: relative difference {rel:.2e}"


def test_bfloat16_parity(converted):
    family, model, backbone, params, sizes = converted
    bf16 = registry.Backbone(backbone.name, family, backbone.config.replace(dtype="bfloat16"))
    _, rel = cw.compare(family, model, bf16, params, sizes[0])
    assert rel < 2e-2, f"{family} in bfloat16: relative difference {rel:.2e}"


def test_mocov3_other_resolution_rebuilds_sincos():
    """MoCo-v3's table is a function of the grid: at 48 px it equals the model built for 48 px."""
    _, small = tm.plain("mocov3", 32)
    _, large = tm.plain("mocov3", 48)
    large.load_state_dict(
        {k: v for k, v in small.state_dict().items() if k != "pos_embed"}, strict=False
    )
    backbone, params = cw.convert_module("mocov3", small)
    _, rel = cw.compare("mocov3", large, backbone, params, 48)
    assert rel < 1e-4


def test_mocov3_original_checkpoint_keys(tmp_path):
    """The original .pth.tar layout (module.base_encoder., momentum encoder, predictor) loads."""
    family, model = tm.plain("mocov3", 32)
    path = tmp_path / "vit-tiny.pth.tar"
    state = tm.mocov3_original_state(model)
    torch.save({"epoch": 1, "state_dict": {k: torch.from_numpy(v) for k, v in state.items()}}, path)
    loaded = cw.read_checkpoint(str(path))
    assert set(loaded) == set(state)
    backbone, params = cw.convert_module(family, model, state=loaded)
    _, rel = cw.compare(family, model, backbone, params, 32)
    assert rel < 1e-4


def test_mocov3_rejects_learned_table():
    _, model = tm.plain("dino", 32)  # random learned pos_embed
    with pytest.raises(weights.CheckpointMismatch, match="pos_embed"):
        cw.convert_module("mocov3", model)


def test_cli_converts_and_verifies(tmp_path, capsys):
    """transformers directory -> python -m lgm_jax.convert --verify -> registry.build reads it."""
    _, model = tm.dinov2(56)
    src, out = tmp_path / "src", tmp_path / "out"
    model.save_pretrained(src)
    argv = [
        "--source",
        str(src),
        "--out",
        str(out),
        "--input-res",
        "28",
        "--verify",
        "--verify-size",
        "42",
    ]
    assert cw.main(argv) == 0
    text = capsys.readouterr().out
    assert "verify at 28 px" in text and "verify at 42 px" in text
    backbone, params = registry.build("dinov2_vitb", str(out))
    assert backbone.family == "dinov2" and backbone.config.input_res == 28
    x = np.random.default_rng(1).standard_normal((1, 28, 28, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).pooler_output
    ours = np.asarray(backbone.features(params, x))
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(weights.CheckpointMismatch, match="dinov2"):
        registry.build("clip_vitb", str(out))


@pytest.mark.parametrize("source", ["missing/vit-b.pth.tar", "./no-such-dir", "/no/such/model"])
def test_missing_local_source_is_an_input_error(tmp_path, capsys, source):
    assert cw.main(["--source", source, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --source") and "no such file or directory" in err
    assert not (tmp_path / "out").exists()


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        cw.main(["--help"])
    assert e.value.code == 0 and "python -m lgm_jax.convert" in capsys.readouterr().out
