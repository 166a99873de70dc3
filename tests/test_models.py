"""Backbone registry and ViT options: parameter counts, strict loading, padding, LGM step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lgm_jax import augment, lgm
from lgm_jax.models import dinov2, registry, weights
from lgm_jax.models.vit import param_shapes
from lgm_jax.preprocess import IMAGENET_MEAN

FULL = [n for n in registry.NAMES if not n.endswith("_tiny") and n.split("_")[0] != "dinov3"]
TINY = [n for n in registry.NAMES if n.endswith("_tiny")]


def _torch_full(name):
    """(the PyTorch model of a full-size backbone on the meta device, params it lacks in ours)."""
    import timm
    import transformers

    family, size = name.split("_", 1)
    with torch.device("meta"):
        if family == "dinov2":
            dims = {
                "vits": (384, 12, 6),
                "vitb": (768, 12, 12),
                "vitl": (1024, 24, 16),
                "vitb_reg": (768, 12, 12),
            }[size]
            kw = dict(
                hidden_size=dims[0],
                num_hidden_layers=dims[1],
                num_attention_heads=dims[2],
                intermediate_size=4 * dims[0],
                image_size=518,
                patch_size=14,
            )
            if size.endswith("reg"):
                model = transformers.Dinov2WithRegistersModel(
                    transformers.Dinov2WithRegistersConfig(**kw)
                )
            else:
                model = transformers.Dinov2Model(transformers.Dinov2Config(**kw))
            return model, {"embeddings.mask_token"}
        if family == "clip":
            patch, w, d, h, proj = {
                "vitb32": (32, 768, 12, 12, 512),
                "vitb": (16, 768, 12, 12, 512),
                "vitl": (14, 1024, 24, 16, 768),
            }[size]
            cfg = transformers.CLIPVisionConfig(
                hidden_size=w,
                intermediate_size=4 * w,
                num_hidden_layers=d,
                num_attention_heads=h,
                patch_size=patch,
                image_size=224,
                projection_dim=proj,
            )
            return transformers.CLIPVisionModelWithProjection(cfg), set()
        arch = {"vitt": "tiny", "vits": "small", "vitb": "base", "vitl": "large"}[size]
        if family == "eva02":
            return timm.create_model(f"eva02_{arch}_patch14_224", num_classes=0), set()
        kw = {"num_heads": 12} if (family, size) == ("mocov3", "vits") else {}
        model = timm.create_model(f"vit_{arch}_patch16_224", num_classes=0, **kw)
        return model, {"pos_embed"} if family == "mocov3" else set()


@pytest.mark.parametrize("name", FULL)
def test_full_size_parameter_count(name):
    backbone = registry.get(name)
    ours = weights.count_params(param_shapes(backbone.config))
    model, not_ours = _torch_full(name)
    theirs = sum(p.numel() for k, p in model.named_parameters() if k not in not_ours)
    assert ours == theirs, f"{name}: {ours:,} parameters, PyTorch {theirs:,}"


def test_registry_names():
    assert set(FULL) == {
        "dinov2_vits",
        "dinov2_vitb",
        "dinov2_vitl",
        "dinov2_vitb_reg",
        "clip_vitb32",
        "clip_vitb",
        "clip_vitl",
        "eva02_vitt",
        "eva02_vits",
        "eva02_vitb",
        "eva02_vitl",
        "mocov3_vits",
        "mocov3_vitb",
        "mocov3_vitl",
        "dino_vits",
        "dino_vitb",
    }
    assert registry.get("clip_vitb").feature_dim == 512
    assert registry.get("eva02_vitl").feature_dim == 1024
    assert registry.get("dinov2_vitb").mean == IMAGENET_MEAN
    with pytest.raises(ValueError, match="unknown backbone"):
        registry.get("resnet50")


def _tiny_state():
    import transformers

    cfg = transformers.Dinov2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    model = transformers.Dinov2Model(cfg)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return dinov2.config_from_hf(cfg.to_dict(), input_res=28), state


def test_checkpoint_mismatch_names_each_key():
    cfg, state = _tiny_state()
    dinov2.to_flax(state, cfg)  # the intact checkpoint loads
    del state["encoder.layer.0.norm2.bias"]
    state["encoder.layer.0.surprise.weight"] = np.zeros(3, np.float32)
    state["layernorm.weight"] = np.zeros(31, np.float32)
    with pytest.raises(weights.CheckpointMismatch) as err:
        dinov2.to_flax(state, cfg)
    msg = str(err.value)
    assert "encoder.layer.0.surprise.weight" in msg  # extra
    assert "blocks_0/norm2/bias" in msg  # missing
    assert "layernorm.weight" in msg and "(31,)" in msg  # wrong shape


def test_converted_dir_round_trip_and_mismatch(tmp_path):
    backbone, params = registry.build("eva02_tiny", depth=1)
    registry.save_converted(str(tmp_path), backbone, params)
    loaded, params2 = registry.build("eva02_tiny", str(tmp_path), dtype="bfloat16")
    assert loaded.config == backbone.config.replace(dtype="bfloat16")
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)
    bad = registry.get("eva02_tiny", depth=1, width=32, heads=2, mlp_dim=85)
    registry.save_converted(
        str(tmp_path), registry.Backbone("eva02_tiny", "eva02", bad.config), params
    )
    with pytest.raises(weights.CheckpointMismatch, match="patch_embed/kernel"):
        registry.build("eva02_tiny", str(tmp_path))


@pytest.mark.parametrize("name", ["dinov2_reg_tiny", "eva02_tiny", "clip_tiny"])
def test_token_padding_leaves_features_unchanged(name):
    """Padding the token count (as for cuDNN) and masking the padding keys changes nothing."""
    backbone, params = registry.build(name, depth=1)
    s = backbone.input_res
    x = jax.random.normal(jax.random.key(1), (2, s, s, 3))
    plain = jax.jit(backbone.features)(params, x)
    padded = registry.Backbone(name, backbone.family, backbone.config.replace(token_multiple=8))
    out = jax.jit(padded.features)(params, x)
    np.testing.assert_allclose(out, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["block", "matmuls"])
def test_remat_same_gradient(policy):
    backbone, params = registry.build("dinov2_tiny", depth=1)
    x = jax.random.normal(jax.random.key(2), (2, 28, 28, 3))
    cfg = backbone.config.replace(remat=True, remat_policy=policy)
    remat = registry.Backbone("dinov2_tiny", "dinov2", cfg)
    grads = [jax.grad(lambda x, b=b: b.features(params, x).sum())(x) for b in (backbone, remat)]
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(grads[0]).max()) > 0


# EVA-02 (rope, SwiGLU, mean pooling) always runs; the others are marked slow (a compile each).
GRAD_NAMES = [n if n == "eva02_tiny" else pytest.param(n, marks=pytest.mark.slow) for n in TINY]


@pytest.mark.parametrize("name", GRAD_NAMES)
def test_meta_loss_gradient_through_each_family(name):
    """jax.value_and_grad of the meta-loss through each tiny backbone: finite and non-zero."""
    backbone, params = registry.build(name, depth=1)  # one block: the maths is the same
    features = backbone.features
    cfg = lgm.StepConfig(
        num_classes=2,
        aug_rounds=1,
        syn_res=32,
        augment=augment.AugmentConfig(input_res=backbone.input_res),
    )
    levels = lgm.init_state(jax.random.key(0), cfg, lgm.optimizer(), start_res=(1, 2, 4)).levels
    real = jax.random.uniform(jax.random.key(2), (cfg.num_real, 32, 32, 3))
    labels = jnp.arange(cfg.num_real) % cfg.num_classes
    keys = lgm.step_keys(jax.random.key(3), 0)
    grad = jax.jit(
        lambda lv, p, x, y, k: lgm.reference_grad(
            lv, p, x, y, k, features=features, feat_dim=backbone.feature_dim, cfg=cfg
        )
    )
    loss, grads = grad(levels, params, real, labels, keys)
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert any(np.abs(g).max() > 0 for g in grads)


def test_lgm_step_runs_with_a_tiny_backbone():
    """One full jitted LGM update (lgm.make_step) through the EVA-02 tiny backbone."""
    name = "eva02_tiny"
    backbone, params = registry.build(name, depth=1)  # one block: the step's maths is the same
    features = backbone.features
    cfg = lgm.StepConfig(
        num_classes=2,
        aug_rounds=1,
        syn_res=32,
        augment=augment.AugmentConfig(input_res=backbone.input_res),
    )
    tx = lgm.optimizer()
    state = lgm.init_state(jax.random.key(0), cfg, tx, start_res=(1, 2, 4))
    before = [np.asarray(x) for x in state.levels]
    step = lgm.make_step(features, backbone.feature_dim, tx, cfg)
    real = jax.random.uniform(jax.random.key(2), (cfg.num_real, 32, 32, 3))
    labels = jnp.arange(cfg.num_real) % cfg.num_classes
    state, metrics = step(state, params, real, labels)
    assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
    assert float(metrics["grad_norm"]) > 0
    assert any(not np.array_equal(a, b) for a, b in zip(before, state.levels, strict=True))


@pytest.mark.parametrize("name", ["dinov2_tiny", "clip_tiny", "eva02_tiny"])
def test_recomputed_norms_and_activations_keep_values_and_save_memory(name, monkeypatch):
    """LayerNorms and MLP activations recompute their insides in the backward pass (vit.py):
    the same parameters, features and input gradients as without, and less kept per image."""
    from flax import linen as nn

    from lgm_jax import benchmark
    from lgm_jax.models import vit

    backbone, params = registry.build(name, depth=2)
    s = backbone.input_res
    x = jax.random.normal(jax.random.key(3), (2, s, s, 3))

    def run():
        benchmark.residual_bytes_per_row.cache_clear()  # cached per config: measure afresh
        model = vit.ViT(backbone.config)
        fresh = model.init(jax.random.key(0), x[:1])["params"]
        f = lambda x: model.apply({"params": params}, x)
        feats, vjp = jax.vjp(f, x)
        (grad,) = vjp(jnp.cos(feats))
        kept = benchmark.residual_bytes_per_row(backbone.config)
        return jax.tree_util.tree_structure(fresh), feats, grad, kept

    tree, feats, grad, kept = run()
    monkeypatch.setattr(vit, "LayerNorm", nn.LayerNorm)
    monkeypatch.setattr(vit, "_recomputed", lambda fn: fn)
    tree0, feats0, grad0, kept0 = run()
    assert tree == tree0  # checkpoints load as before
    np.testing.assert_allclose(feats, feats0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad, grad0, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(grad0).max()) > 0
    # Each norm would keep 3 float32 [T, D] tensors more per image (2 norms a block at least).
    t, d = 1 + (s // backbone.config.patch_size) ** 2, backbone.config.width  # tokens >= this
    assert kept0 - kept >= 2 * 2 * 3 * t * d * 4


@pytest.mark.parametrize("dtype,bias", [(jnp.float32, True), (jnp.bfloat16, False)])
def test_patch_embed_is_the_strided_convolution(dtype, bias):
    """PatchEmbed (a matmul over flattened patches) against flax's stride-p nn.Conv: the same
    parameter names, shapes and initial values, the same outputs and input gradients."""
    from flax import linen as nn

    from lgm_jax.models import vit

    p, width = 7, 16
    x = jax.random.uniform(jax.random.key(1), (3, 28, 28, 3))
    ours = vit.PatchEmbed(width, p, bias, dtype)
    conv = nn.Conv(width, (p, p), strides=(p, p), padding="VALID", use_bias=bias, dtype=dtype)
    params = ours.init(jax.random.key(0), x)["params"]
    conv_params = conv.init(jax.random.key(0), x)["params"]
    assert jax.tree_util.tree_map(np.asarray, params).keys() == conv_params.keys()
    for k in params:
        np.testing.assert_array_equal(params[k], conv_params[k])
    if bias:  # a non-zero bias, so that adding it is checked too
        params = {**params, "bias": jnp.linspace(-1.0, 1.0, width)}
    f = lambda x: ours.apply({"params": params}, x)
    g = lambda x: conv.apply({"params": params}, x).reshape(3, 16, width)
    y, vjp = jax.vjp(f, x)
    y0, vjp0 = jax.vjp(g, x)
    assert y.shape == (3, 16, width) and y.dtype == y0.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.float32(y), np.float32(y0), rtol=tol, atol=tol)
    ct = jnp.cos(jnp.arange(3 * 16 * width, dtype=jnp.float32).reshape(3, 16, width)).astype(dtype)
    np.testing.assert_allclose(np.float32(vjp(ct)[0]), np.float32(vjp0(ct)[0]), rtol=tol, atol=tol)
