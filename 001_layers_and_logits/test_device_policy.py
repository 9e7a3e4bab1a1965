"""device_policy (dtype table, device resolution, shadow unembedding) and models (sources, cache)."""


import pytest
import torch

from layers_core import device_policy
from layers_core.device_policy import (
    choose_dtype,
    resolve_device,
    should_auto_promote_unembed,
    unembed_weights_for_analysis,
)

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize("device,declared,bf16,fits,dtype", [
    ("cpu", BF16, True, True, FP32),          # CPU: float32 (bf16 only on request)
    ("cpu", FP16, True, True, FP32),
    ("cuda", BF16, True, True, BF16),         # Llama-3, Qwen2.5, Mistral, Gemma-2 ship in bf16
    ("cuda", BF16, False, True, FP32),        # never fp16 for a bf16 checkpoint
    ("cuda", FP16, True, True, FP16),
    ("cuda", FP32, True, True, FP32),         # a float32 checkpoint that fits stays float32
    ("cuda", FP32, True, False, BF16),
    ("cuda", FP32, False, False, FP16),
    ("cuda", None, True, True, FP32),         # undeclared: stored as float32
    ("mps", BF16, True, True, BF16),
])
def test_auto_dtype_policy(device, declared, bf16, fits, dtype):
    assert choose_dtype(device, declared, bf16_supported=bf16, float32_fits=fits) == dtype


@pytest.mark.parametrize("value,dtype", [("bfloat16", BF16), ("torch.float16", FP16), (FP32, FP32),
                                         (None, None), ("int8", None)])
def test_declared_dtype_from_config(value, dtype):
    from types import SimpleNamespace

    from layers_core.device_policy import declared_dtype

    assert declared_dtype(SimpleNamespace(dtype=value)) == dtype
    assert declared_dtype(SimpleNamespace(torch_dtype=value)) == dtype


def test_lens_statistics_are_always_float32():
    """Every floating compute dtype decodes through float32 W_U (a copy, or chunked upcasts)."""
    assert all(should_auto_promote_unembed(d) for d in (FP32, FP16, BF16))


def _available(monkeypatch, cuda, mps):
    monkeypatch.setattr(device_policy, "_is_available",
                        lambda d: {"cuda": cuda, "mps": mps, "cpu": True}[d])


@pytest.mark.parametrize("cuda,mps,expected", [(True, True, "cuda"), (False, True, "mps"),
                                               (False, False, "cpu")])
def test_auto_order(monkeypatch, cuda, mps, expected):
    _available(monkeypatch, cuda, mps)
    assert resolve_device("auto") == expected


def test_unavailable_device_falls_back_with_legacy_warning(monkeypatch):
    _available(monkeypatch, False, False)
    warnings = []
    assert resolve_device("cuda", warnings) == "cpu"
    assert resolve_device("mps", warnings) == "cpu"
    assert warnings == ["⚠️  CUDA requested but not available; falling back to CPU.",
                        "⚠️  MPS requested but not available; falling back to CPU."]


def test_shadow_unembed_never_touches_the_model_regression_defect_3(load_bridge):
    """Legacy defect 3: --fp32-unembed cast W_U in place, breaking the fp16/bf16 forward."""
    model = load_bridge("phi")  # a real, non-zero unembedding bias
    half = type("Half", (), {})()
    half.unembed = type("U", (), {})()
    half.unembed.W_U = model.unembed.W_U.detach().to(torch.bfloat16)
    half.unembed.b_U = model.unembed.b_U.detach().to(torch.bfloat16)
    original_W, original_b = half.unembed.W_U, half.unembed.b_U
    snapshot = original_W.clone()
    W_U, b_U = unembed_weights_for_analysis(half, use_fp32=True)
    assert W_U.dtype == torch.float32 and b_U.dtype == torch.float32
    assert half.unembed.W_U is original_W and half.unembed.W_U.dtype == torch.bfloat16
    assert torch.equal(half.unembed.W_U, snapshot) and half.unembed.b_U is original_b
    W_same, _ = unembed_weights_for_analysis(model, use_fp32=True)
    assert W_same.data_ptr() == model.unembed.W_U.data_ptr()  # float32 already: no copy
    W_orig, _ = unembed_weights_for_analysis(half, use_fp32=False)
    assert W_orig is original_W


def test_all_zero_bias_is_dropped_not_added(load_bridge):
    """The Bridge reports zeros for a bias-free head; the lens then skips the [rows, V] add."""
    _, b_U = unembed_weights_for_analysis(load_bridge("llama"), use_fp32=False)
    assert b_U is None
    _, b_U = unembed_weights_for_analysis(load_bridge("phi"), use_fp32=False)
    assert b_U is not None and b_U.abs().max() > 0.1
