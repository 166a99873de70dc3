"""The Flax DINOv3 equals transformers' DINOv3ViTModel: tiny random models saved with
save_pretrained and converted (offline), and the full-size shapes against transformers'."""

from __future__ import annotations

import pytest
import torch
import torch_models as tm
import transformers

from lgm_jax import convert as cw
from lgm_jax.models import dinov3, registry, weights
from lgm_jax.models.vit import param_shapes

# The released LVD-1689M checkpoints' configs as assumed here (transformers defaults otherwise:
# rope_theta 100, key without bias, layer scale, LayerNorm eps 1e-5, patch 16, 224 px).
HUB = {
    "S/16": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "B/16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "L/16": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
}
TINY = dict(
    hidden_size=tm.W,
    intermediate_size=4 * tm.W,
    num_hidden_layers=tm.D,
    num_attention_heads=tm.H,
    image_size=32,
    patch_size=16,
    num_register_tokens=4,
)
CASES = {  # id: (config overrides, native size, other size)
    "mlp": (dict(), 32, 48),
    "gated": (dict(use_gated_mlp=True, hidden_act="silu"), 32, 64),
}


def _hub_config(name: str) -> transformers.DINOv3ViTConfig:
    w = HUB[name]["hidden_size"]
    return transformers.DINOv3ViTConfig(**HUB[name], intermediate_size=4 * w, num_register_tokens=4)


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, tmp_path_factory):
    """(torch model, backbone, params converted from the saved file's keys, sizes)."""
    kw, native, other = CASES[request.param]
    src = tmp_path_factory.mktemp(request.param)
    model = tm.randomize(transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**TINY, **kw)))
    model.save_pretrained(src)
    family, loaded, _ = cw.load_torch(str(src))
    state = cw.read_checkpoint(str(src / "model.safetensors"))  # "layer.0..." file keys
    backbone, params = cw.convert_module(family, loaded, state, input_res=native)
    return loaded, backbone, params, (native, other)


def test_float32_parity_at_two_resolutions(converted):
    model, backbone, params, sizes = converted
    for size in sizes:
        _, rel = cw.compare("dinov3", model, backbone, params, size)
        assert rel < 1e-5, f"at {size} px: relative difference {rel:.2e}"


@pytest.mark.parametrize("converted", ["gated"], indirect=True)
def test_other_rope_layout_would_fail(converted):
    """The parity above is not vacuous: EVA-02's rope layout on the same weights is far off."""
    model, backbone, params, sizes = converted
    eva = registry.Backbone("x", "dinov3", backbone.config.replace(rope_style="eva02"))
    _, rel = cw.compare("dinov3", model, eva, params, sizes[1])
    assert rel > 1e-3


@pytest.mark.parametrize("converted", ["gated"], indirect=True)
def test_bfloat16_parity(converted):
    model, backbone, params, sizes = converted
    bf16 = registry.Backbone("x", "dinov3", backbone.config.replace(dtype="bfloat16"))
    _, rel = cw.compare("dinov3", model, bf16, params, sizes[0])
    assert rel < 2e-2


def test_cli_converts_and_verifies(tmp_path, capsys):
    """save_pretrained directory -> python -m lgm_jax.convert --verify -> registry.build (the
    verification runs on what was written, so the features need no second check here)."""
    model = tm.randomize(transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**TINY)))
    src, out = tmp_path / "src", tmp_path / "out"
    model.save_pretrained(src)
    argv = ["--source", str(src), "--out", str(out), "--input-res", "32", "--verify"]
    assert cw.main(argv) == 0
    text = capsys.readouterr().out
    assert "dinov3_tiny (dinov3)" in text and "verify at 32 px" in text and "(ok)" in text
    backbone, _ = registry.build("dinov3_vitb", str(out))
    assert backbone.family == "dinov3" and backbone.config == registry.get("dinov3_tiny").config
    with pytest.raises(weights.CheckpointMismatch, match="dinov3"):
        registry.build("dinov2_vitb", str(out))


@pytest.mark.parametrize("name", list(HUB))
def test_full_size_configs_and_parameter_counts(name):
    """The registry's S/B/L are what transformers builds from the assumed hub configs, with the
    same parameter count (meta device: no weights; the mask token is pre-training only)."""
    hf = _hub_config(name)
    ours = registry.get(f"dinov3_vit{name[0].lower()}").config
    assert dinov3.config_from_hf(hf.to_dict()) == ours
    with torch.device("meta"):
        ref = transformers.DINOv3ViTModel(hf)
    want = sum(p.numel() for k, p in ref.named_parameters() if "mask_token" not in k)
    assert weights.count_params(param_shapes(ours)) == want


def test_unsupported_configs_are_refused():
    with pytest.raises(weights.CheckpointMismatch, match="dinov3_vit"):
        dinov3.config_from_hf({"model_type": "dinov2"})
    gelu_gated = dict(_hub_config("S/16").to_dict(), use_gated_mlp=True)
    with pytest.raises(NotImplementedError, match="gated MLP with activation 'gelu'"):
        dinov3.config_from_hf(gelu_gated)
