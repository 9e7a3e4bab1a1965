"""The unembedding every lens decodes through: W_U/b_U for analysis and the model's post-unembed
transform (softcap, logit scaling). It applies no norm: the norm belongs to the lens."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from layers_core.numerics import unembed_logits


@dataclass
class Unembedding:
    """Float32 logits from lens outputs.

    ``W_U`` ``[d, V]`` and ``b_U`` ``[V]`` are float32 shadow copies where the compute dtype is
    half precision (or the model's own half-precision W_U, upcast ``chunk_columns`` columns at a
    time where no copy fits); ``transform`` is the model's head transform on ``[..., V]`` logits;
    ``head`` the model's own layers between its final norm and ``W_U`` (ModernBERT-decoder's
    prediction head), None for almost every family.
    """

    W_U: Tensor
    b_U: Tensor | None
    transform: Callable[[Tensor], Tensor]
    force_fp32: bool = False
    chunk_columns: int | None = None  # upcast a half-precision W_U this many columns at a time
    head: Callable[[Tensor], Tensor] | None = None  # layers between the final norm and W_U, if any

    @property
    def matmul_dtype(self) -> torch.dtype:
        """The dtype the unembedding's matmul runs in."""
        if self.force_fp32 and self.W_U.is_floating_point():
            return torch.float32
        return self.W_U.dtype

    def logits(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """``[..., d]`` → float32 logits ``[..., V]``, head transform applied. ``out``: a buffer
        of the result's shape that receives the product where the matmul is float32."""
        if self.head is not None:  # e.g. ModernBERT-decoder's dense → GELU → LayerNorm, [..., d] → [..., d]
            x = self.head(x)
        return unembed_logits(x, self.W_U, self.b_U, self.transform, self.force_fp32, out=out,
                              chunk_columns=self.chunk_columns)

    @property
    def float32_matmul(self) -> bool:
        """Whether the product is computed in float32 (a float32 W_U, or a half one upcast in chunks)."""
        return self.W_U.dtype == torch.float32 or bool(self.chunk_columns and self.force_fp32)

    @torch.inference_mode()
    def log_probs(self, rows: Tensor, out: Tensor | None = None) -> Tensor:
        """Float32 log-probs ``[R, V]`` of lens outputs ``[R, d]``: one matmul, W_U read once.
        ``out``: a reusable ``[R, V]`` float32 buffer (the result then lives in it)."""
        logits = self.logits(rows, out)
        return torch.log_softmax(logits, dim=-1,
                                 out=logits) if logits.is_contiguous() else torch.log_softmax(logits, -1)


