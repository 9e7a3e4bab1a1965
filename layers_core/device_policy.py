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
CPU_FP32_COPY_LIMIT_BYTES = 512 * 2**20  # larger float32 W_U copies on the CPU: upcast in chunks
GPU_FREE_MARGIN_BYTES = 2 * 2**30  # a float32 W_U copy on a GPU must leave this much free
UPCAST_CHUNK_BYTES = 64 * 2**20  # float32 columns of W_U upcast at a time when no copy fits


def _is_available(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_available()
    if device == "mps":
        backend = getattr(torch.backends, "mps", None)
        return bool(backend is not None and backend.is_available())
    return device == "cpu"


def resolve_device(requested: str, warnings: list[str] | None = None) -> str:
    """``auto`` → cuda, then mps, then cpu. An unavailable cuda/mps falls back to cpu.

    The fallback's message (verbatim, as the legacy script printed it) is appended to ``warnings``
    for the caller to print.
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


def choose_dtype(
    device: str,
    declared: torch.dtype | None = None,
    *,
    bf16_supported: bool = True,
    float32_fits: bool = True,
) -> torch.dtype:
    """The ``auto`` compute dtype.

    CPU: float32. GPU (cuda/mps): the checkpoint's declared half dtype (bf16 → bfloat16, or
    float32 where the GPU lacks bf16: never fp16 for a bf16 checkpoint, whose activations may
    overflow it; fp16 → float16); a float32 (or undeclared) checkpoint stays float32 when it fits
    comfortably, else bfloat16 (float16 without bf16 support).
    """
    if device == "cpu":
        return torch.float32
    if declared == torch.float16:
        return torch.float16
    if declared == torch.bfloat16:
        return torch.bfloat16 if bf16_supported else torch.float32
    if float32_fits:
        return torch.float32
    return torch.bfloat16 if bf16_supported else torch.float16


def declared_dtype(config: Any) -> torch.dtype | None:
    """The dtype a HF config declares for its weights (``dtype``/``torch_dtype``), or None."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        return DTYPES.get(value.removeprefix("torch."))
    return None


def bf16_supported(device: str) -> bool:
    """Whether ``device`` computes in bfloat16 natively (the CPU and MPS emulate where needed)."""
    if device == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return True


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
    """True for every floating compute dtype: the lens takes its statistics from float32 logits,
    so a half-precision model is decoded through a float32 W_U (a copy or chunked upcasts)."""
    return compute_dtype.is_floating_point


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


def fp32_unembed_copy_fits(W_U: Tensor) -> bool:
    """Whether a float32 copy of ``W_U`` fits on its device (GPU: with a margin left free; CPU:
    up to ``CPU_FP32_COPY_LIMIT_BYTES``, so that half precision keeps its memory saving)."""
    need = W_U.numel() * 4
    if W_U.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(W_U.device)
        return need + GPU_FREE_MARGIN_BYTES <= free
    return need <= CPU_FP32_COPY_LIMIT_BYTES


def upcast_chunk_columns(d_model: int, chunk_bytes: int = UPCAST_CHUNK_BYTES) -> int:
    """Vocabulary columns per float32 upcast of a ``[d_model, V]`` W_U."""
    return max(256, chunk_bytes // (4 * d_model))
