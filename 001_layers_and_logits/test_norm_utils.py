"""norm_utils: norm maths, class-name dispatch, architecture detection and norm selection."""

import math

import pytest
import torch
from torch import nn

from layers_core.norm_utils import (
    _get_rms_scale,
    apply_norm_or_skip,
    classify_norm,
    detect_model_architecture,
    get_correct_norm_module,
    norm_module_label,
    unwrap_norm,
)


class MockRMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5, weight=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d) if weight is None else weight)


class Gemma2RMSNorm(nn.Module):  # named like HF's, stores w with scale 1 + w
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(d))


class LayerNorm(nn.Module):  # TransformerLens-style: not an nn.LayerNorm, named LayerNorm
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.randn(d))
        self.b = nn.Parameter(torch.randn(d))


class LayerNormPre(nn.Module):
    eps = 1e-5


class Wrapper(nn.Module):  # a TransformerBridge-style wrapper
    def __init__(self, inner):
        super().__init__()
        self.original_component = inner


class Mystery(nn.Module):
    eps = 1e-5


def test_rms_epsilon_inside_sqrt():
    x = torch.randn(4, 8) * 1e-3  # small x makes ε matter
    out = apply_norm_or_skip(x, MockRMSNorm(8, eps=1e-5))
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert torch.allclose(out, expected, atol=1e-6)


def test_rms_scaling_equivalence_unit_normalise_then_gamma():
    gamma = torch.randn(8)
    x = torch.randn(3, 8)
    unit = apply_norm_or_skip(x, MockRMSNorm(8))
    scaled = apply_norm_or_skip(x, MockRMSNorm(8, weight=gamma.clone()))
    assert torch.allclose(scaled, unit * gamma, atol=1e-6)


def test_layernorm_matches_functional_layer_norm_with_gamma_and_beta():
    ln = nn.LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(16))
        ln.bias.copy_(torch.randn(16))
    x = torch.randn(5, 16) * 3 + 2
    expected = torch.nn.functional.layer_norm(x, (16,), ln.weight, ln.bias, 1e-5)
    assert torch.allclose(apply_norm_or_skip(x, ln), expected, atol=1e-6)


def test_class_named_layernorm_gets_layernorm_maths_regression_defect_5():
    """Legacy defect 5: isinstance(nn.LayerNorm) gave TL's LayerNorm RMS maths (no centring, β)."""
    ln = LayerNorm(16)
    x = torch.randn(4, 16) + 5.0
    expected = torch.nn.functional.layer_norm(x, (16,), ln.w, ln.b, 1e-5)
    assert classify_norm(ln) == "layernorm"
    assert torch.allclose(apply_norm_or_skip(x, ln), expected, atol=1e-5)


def test_pre_kinds_apply_no_affine():
    x = torch.randn(3, 8) + 1
    out = apply_norm_or_skip(x, LayerNormPre())
    expected = torch.nn.functional.layer_norm(x, (8,), eps=1e-5)
    assert classify_norm(LayerNormPre()) == "layernorm_pre"
    assert torch.allclose(out, expected, atol=1e-6)


def test_gemma_rmsnorm_zero_weight_is_unit_rms():
    x = torch.randn(3, 8) * 4
    out = apply_norm_or_skip(x, Gemma2RMSNorm(8))
    assert classify_norm(Gemma2RMSNorm(8)) == "rmsnorm_one_plus"
    rms = out.pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.ones(3), atol=1e-4)


def test_bridge_wrapper_is_unwrapped():
    inner = MockRMSNorm(8)
    assert unwrap_norm(Wrapper(inner)) is inner
    x = torch.randn(2, 8)
    assert torch.equal(apply_norm_or_skip(x, Wrapper(inner)), apply_norm_or_skip(x, inner))


def test_fp16_large_residual_stays_finite_regression_defect_4():
    """Legacy defect 4: x² in fp16 overflows above |x| ≈ 256, giving NaN/0 distributions."""
    x = torch.full((2, 64), 1e4, dtype=torch.float16)
    x[:, ::2] = -1e4
    out = apply_norm_or_skip(x, MockRMSNorm(64))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert torch.allclose(out.float().abs(), torch.ones(2, 64), atol=1e-2)


def test_unknown_norm_is_skipped_with_warning():
    x = torch.randn(2, 4)
    warnings = []
    out = apply_norm_or_skip(x, Mystery(), warnings, label="blocks[0].ln1")
    assert torch.equal(out, x)
    assert warnings == ["unknown norm type Mystery at blocks[0].ln1: normalisation skipped"]


def test_none_module_returns_input():
    x = torch.randn(2, 4)
    assert apply_norm_or_skip(x, None) is x


def test_norm_without_eps_attribute_is_unknown():
    class NoEpsRMSNorm(nn.Module):
        weight = None

    assert classify_norm(NoEpsRMSNorm()) == "unknown"


def test_rms_scale_lookup_order():
    module = nn.Module()
    module.gamma = nn.Parameter(torch.full((3,), 2.0))
    module.weight = nn.Parameter(torch.full((3,), 3.0))
    assert torch.equal(_get_rms_scale(module), module.weight)
    lone = nn.Module()
    lone.anything = nn.Parameter(torch.ones(3))
    assert _get_rms_scale(lone) is lone.anything
    assert _get_rms_scale(nn.Module()) is None


def _model_with_children(order, n_blocks=3):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            for name in order:
                setattr(self, name, MockRMSNorm(4) if name.startswith("ln") else nn.Identity())

    model = nn.Module()
    model.blocks = nn.ModuleList(Block() for _ in range(n_blocks))
    model.ln_final = MockRMSNorm(4)
    return model


@pytest.mark.parametrize("order,expected", [
    (["ln1", "ln2", "mlp"], "pre_norm"),
    (["ln1", "attn", "ln2", "mlp"], "pre_norm"),
    (["attn", "ln1", "mlp", "ln2"], "post_norm"),
    (["attn", "ln1", "mlp", "ln2", "hook"], "post_norm"),
])
def test_architecture_detection_by_child_order(order, expected):
    assert detect_model_architecture(_model_with_children(order)) == expected


def test_model_without_blocks_is_pre_norm():
    assert detect_model_architecture(nn.Module()) == "pre_norm"


def test_pre_norm_selection():
    model = _model_with_children(["ln1", "attn", "ln2", "mlp"])
    assert get_correct_norm_module(model, 0, True) is model.blocks[1].ln1
    assert get_correct_norm_module(model, 2, True) is model.ln_final
    assert get_correct_norm_module(model, 0, False) is model.blocks[0].ln1
    assert norm_module_label(model, 0, True) == "blocks[1].ln1"
    assert norm_module_label(model, 2, True) == "ln_final"


def test_post_norm_selection():
    model = _model_with_children(["attn", "ln1", "mlp", "ln2"])
    for i in range(3):
        assert get_correct_norm_module(model, i, True) is model.blocks[i].ln2
    assert norm_module_label(model, 0, True) == "blocks[0].ln2"


def test_final_and_none_strategies():
    model = _model_with_children(["ln1", "ln2", "mlp"])
    assert get_correct_norm_module(model, 0, False, "final") is model.ln_final
    assert get_correct_norm_module(model, 1, True, "final") is model.ln_final
    assert get_correct_norm_module(model, 1, True, "none") is None
    assert norm_module_label(model, 1, True, "none") is None
    with pytest.raises(ValueError, match="bogus"):
        get_correct_norm_module(model, 0, True, "bogus")


def test_missing_attribute_gives_none():
    model = _model_with_children(["ln2", "mlp"])  # no ln1
    assert get_correct_norm_module(model, 0, False) is None


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "gpt-neox", "qwen3", "phi"])
def test_tiny_bridge_models_detect_as_pre_norm(load_bridge, family):
    assert detect_model_architecture(load_bridge(family)) == "pre_norm"


@pytest.mark.parametrize("family,kind", [
    ("llama", "rmsnorm"), ("gpt2", "layernorm"), ("gemma2", "rmsnorm_one_plus"),
    ("gpt-neox", "layernorm"), ("qwen2", "rmsnorm"), ("phi", "layernorm"),
])
def test_bridge_norms_match_the_hf_module_forward(load_bridge, family, kind):
    """Our float32 maths equals each family's own norm forward on real Bridge modules."""
    model = load_bridge(family)
    x = torch.randn(1, 5, model.cfg.d_model) * 3
    for norm in (model.blocks[0].ln1, model.ln_final):
        assert classify_norm(norm) == kind
        hf_module = unwrap_norm(norm)
        with torch.no_grad():
            expected = hf_module(x)
        assert torch.allclose(apply_norm_or_skip(x, norm), expected, atol=1e-5), family
    assert not math.isnan(float(x.sum()))
