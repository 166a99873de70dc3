"""The Flax DINOv2 equals transformers' Dinov2Model, and loading checks the checkpoint."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from lgm_jax.models import dinov2, vit, weights


@pytest.mark.parametrize("res", [224, 98])
def test_features_match_transformers(golden_dir, res):
    path = golden_dir / "backbone"
    ref = transformers.Dinov2Model.from_pretrained(path).eval()
    cfg, params = dinov2.load(str(path), input_res=res)
    x = np.random.default_rng(res).normal(size=(2, res, res, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).pooler_output
    got = np.asarray(vit.ViT(cfg).apply({"params": params}, x))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4 * np.abs(want.numpy()).max())


def test_hub_position_resize_differs_slightly(golden_dir):
    cfg, params = dinov2.load(str(golden_dir / "backbone"))
    x = np.random.default_rng(0).normal(size=(1, 224, 224, 3)).astype(np.float32)
    a = vit.ViT(cfg).apply({"params": params}, x)
    b = vit.ViT(cfg.replace(pos_resize="hub")).apply({"params": params}, x)
    assert 0 < np.abs(np.asarray(a - b)).max() < 0.1 * np.abs(np.asarray(a)).max()


def _copy_backbone(golden_dir, tmp_path, edit):
    dst = tmp_path / "bb"
    shutil.copytree(golden_dir / "backbone", dst)
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors")
    return dst


def test_extra_missing_and_misshaped_keys_are_named(golden_dir, tmp_path):
    def edit(s):
        s["encoder.layer.0.mlp.fc3.weight"] = s.pop("encoder.layer.0.mlp.fc2.weight")
        s["layernorm.bias"] = np.zeros(65, np.float32)

    with pytest.raises(weights.CheckpointMismatch) as e:
        dinov2.load(str(_copy_backbone(golden_dir, tmp_path, edit)))
    msg = str(e.value)
    assert "encoder.layer.0.mlp.fc3.weight" in msg  # extra
    assert "blocks_0/mlp/fc2/kernel" in msg  # missing
    assert "layernorm.bias" in msg and "(65,)" in msg  # shape


def test_backbone_dir_without_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        dinov2.load(str(tmp_path))


def test_wrong_model_type_is_refused(golden_dir, tmp_path):
    dst = tmp_path / "bb"
    shutil.copytree(golden_dir / "backbone", dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = "vit"
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(weights.CheckpointMismatch, match="model_type"):
        dinov2.load(str(dst))


def test_full_size_parameter_counts():
    # Dinov2Model parameters (without the unused mask token) at 518 px: 37x37+1 positions.
    hf = transformers.Dinov2Config(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=518
    )
    with torch.device("meta"):
        ref = transformers.Dinov2Model(hf)
    want = sum(p.numel() for n, p in ref.named_parameters() if "mask_token" not in n)
    assert weights.count_params(vit.param_shapes(dinov2.variant("B/14"))) == want
