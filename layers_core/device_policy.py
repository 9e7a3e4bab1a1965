"""Device and dtype policy, and float32 shadow unembedding weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

DEVICES = ("auto", "cuda", "mps", "cpu")
FALLBACK_WARNINGS = {
    "cuda": "⚠️  CUDA requested but not available; falling back to CPU.",
    "mps": "⚠️  MPS requested but not available; falling back to CPU.",
}
# Families whose fp16 activations overflow: bf16 on CUDA. Matched on model id and model_type.
_BF16_FAMILY_MARKERS = ("gemma",)


def _is_available(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_available()
    if device == "mps":
        backend = getattr(torch.backends, "mps", None)
        return bool(backend is not None and backend.is_available())
    return device == "cpu"


def resolve_device(requested: str, warnings: list[str] | None = None) -> str:
    """``auto`` → cuda, then mps, then cpu. An unavailable cuda/mps falls back to cpu.

    The fallback's message (verbatim, as the legacy script printed it) is appended to ``warnings`` for the caller to print.
    """
    if requested not in DEVICES:
        raise ValueError(f"unknown device {requested!r}; expected one of {DEVICES}")
    if requested == "auto":
        return next(d for d in ("cuda", "mps", "cpu") if _is_available(d))
    if _is_available(requested):
        return requested
    if warnings is not None:
        warnings.append(FALLBACK_WARNINGS[requested])
    return "cpu"


def choose_dtype(device: str, model_id: str, model_type: str | None = None) -> torch.dtype:
    """cpu → float32; mps → float16; cuda → float16, or bfloat16 for Gemma (by id or model_type)."""
    if device == "cpu":
        return torch.float32
    if device == "mps":
        return torch.float16
    names = (model_id.lower(), (model_type or "").lower())
    if any(marker in names[0] or names[1].startswith(marker) for marker in _BF16_FAMILY_MARKERS):
        return torch.bfloat16
    return torch.float16


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A ``torch.dtype`` from itself or its name (``float32``, ``bfloat16``, ``float16``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def should_auto_promote_unembed(compute_dtype: torch.dtype) -> bool:
    """True only for float32 compute: the analysis unembedding is then float32 anyway."""
    return compute_dtype == torch.float32


def unembed_weights_for_analysis(model: Any, use_fp32: bool) -> tuple[Tensor, Tensor | None]:
    """(W_U ``[d, V]``, b_U ``[V]``, or None for an all-zero bias) for the lens.

    Never mutates the model.

    With ``use_fp32`` the float weights are float32 *shadow copies* (legacy defect 3 cast them in
    place); otherwise, and for already-float32 or quantised weights, the originals are returned.
    """
    unembed = model.unembed
    W_U, b_U = unembed.W_U, getattr(unembed, "b_U", None)
    if b_U is not None and not bool(b_U.detach().any()):
        b_U = None  # the Bridge reports zeros for a bias-free head; adding them costs a [rows, V] pass
    if use_fp32 and W_U.is_floating_point() and W_U.dtype != torch.float32:
        W_U = W_U.detach().to(torch.float32, copy=True)
        if b_U is not None:
            b_U = b_U.detach().to(torch.float32, copy=True)
    return W_U, b_U
