"""Numerically safe statistics over logits, and the unembedding path of the lens.

Everything that becomes a statistic is computed in float32 from one ``log_softmax``.
"""

from __future__ import annotations

import math
from typing import Any, TypedDict

import torch
from torch import Tensor

LN2 = math.log(2.0)


class PostUnembedTransform(TypedDict):
    """The model's own transform after ``@ W_U + b_U``; ``None`` fields are inactive."""

    softcap: float | None
    logit_scale_multiply: float | None
    logit_scale_divide: float | None


def _entropy_nats_safe(log_probs: Tensor) -> Tensor:
    terms = log_probs.exp().mul_(log_probs)
    terms.masked_fill_(log_probs.isneginf(), 0.0)  # 0·(−inf) is nan; the limit is 0
    return -terms.sum(dim=-1)


def entropy_bits_from_log_probs(log_probs: Tensor, scratch: Tensor | None = None) -> Tensor:
    """Entropy in bits over the last dim of float32 log-probabilities ``[..., V]``.

    Terms with p = 0 (log p = −inf) count as 0; the result is clamped ≥ 0, so never −0.0.
    ``scratch``, a float32 tensor of the same shape whose contents may be overwritten, holds
    the p·log p terms instead of a fresh ``[..., V]`` allocation (a fresh one costs as much as
    the arithmetic: every page is faulted in).
    """
    flat = log_probs.reshape(-1, log_probs.shape[-1])
    terms = flat.exp() if scratch is None else torch.exp(flat, out=scratch.reshape(flat.shape))
    nats = -terms.mul_(flat).sum(dim=-1)
    bad = torch.isnan(nats)  # only rows holding −inf (0·−inf); recomputed term by term
    if bad.any():
        nats[bad] = _entropy_nats_safe(flat[bad])
    bits = (nats / LN2).clamp_min(0.0) + 0.0  # + 0.0 turns −0.0 into 0.0
    return bits.reshape(log_probs.shape[:-1])


def topk_last_dim(x: Tensor, k: int, chunk: int = 64) -> tuple[Tensor, Tensor]:
    """``torch.topk(x, k, dim=-1)`` for ``[n, V]``: (values, indices), descending, exact.

    Two passes instead of a selection over all V: the maximum of every ``chunk``-wide slice,
    then a top-k over the k slices with the largest maxima (they hold the top-k elements: an
    element outside them has k slice maxima above it) plus the ragged tail. About 2.5× faster
    than ``torch.topk`` on CPU at V = 49k–128k. Ties may be ordered differently from ``torch.topk``.
    """
    n_rows, width = x.shape
    n_chunks = width // chunk
    if n_chunks < 4 * k:  # small vocabularies: nothing to gain over the plain kernel
        top = torch.topk(x, k, dim=-1)
        return top.values, top.indices
    body = x[:, : n_chunks * chunk].view(n_rows, n_chunks, chunk)
    best_chunks = body.amax(dim=-1).topk(k, dim=-1).indices  # [n, k]
    offsets = torch.arange(chunk, device=x.device)
    candidates = (best_chunks.unsqueeze(-1) * chunk + offsets).view(n_rows, k * chunk)
    tail = torch.arange(n_chunks * chunk, width, device=x.device).expand(n_rows, -1)
    candidates = torch.cat([candidates, tail], dim=1)
    top = x.gather(1, candidates).topk(k, dim=-1)
    return top.values, candidates.gather(1, top.indices)


def bits_entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy in bits of softmax(logits) over the last dim; ``[..., V]`` → ``[...]`` float32."""
    return entropy_bits_from_log_probs(torch.log_softmax(logits.float(), dim=-1))


def safe_cast_for_unembed(resid: Tensor, W_U: Tensor, force_fp32_unembed: bool = False) -> Tensor:
    """Casts the residual to the dtype the unembedding matmul needs.

    ``force_fp32_unembed`` with a float32 ``W_U`` → float32; a floating ``W_U`` → its dtype;
    a quantised/integer ``W_U`` → the residual unchanged (its kernel handles the cast).
    """
    if force_fp32_unembed and W_U.dtype == torch.float32:
        return resid.float()
    if W_U.is_floating_point():
        return resid.to(W_U.dtype)
    return resid


def kl_bits(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(P ‖ Q) in bits over the last dim; inputs ``[..., V]`` of any float dtype → ``[...]``.

    Computed from float32 log-softmax and clamped ≥ 0.
    """
    log_p = torch.log_softmax(logits_p.float(), dim=-1)
    log_q = torch.log_softmax(logits_q.float(), dim=-1)
    return kl_bits_from_log_probs(log_p, log_q)


def kl_bits_from_log_probs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(P ‖ Q) in bits from float32 log-probabilities; p = 0 terms count as 0; clamped ≥ 0."""
    terms = log_p.exp().mul_(log_p - log_q)
    terms.masked_fill_(log_p.isneginf(), 0.0)  # p = 0 contributes nothing, even where q = 0
    return (terms.sum(dim=-1) / LN2).clamp_min(0.0) + 0.0


def answer_rank(logits: Tensor, answer_id: int) -> int:
    """1 + the number of tokens strictly more probable than ``answer_id``; ties favour the answer;
    a NaN answer log-prob ranks last (V + 1)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return int((~(log_probs <= log_probs[..., answer_id])).sum().item()) + 1  # NaN: never ahead


def _positive_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def get_post_unembed_transform(model: Any) -> PostUnembedTransform:
    """Reads the post-unembed transform a model declares (for the JSON record).

    Fallback table over the HF config: Granite ``logits_scaling`` (divide), Cohere ``logit_scale``
    (multiply), ``final_logit_softcapping`` (Gemma-2/3), else TransformerLens's
    ``cfg.output_logits_soft_cap``. Non-positive or absent values are None.
    """
    hf_config = getattr(getattr(model, "original_model", None), "config", None)
    tl_cfg = getattr(model, "cfg", None)
    softcap = _positive_or_none(getattr(hf_config, "final_logit_softcapping", None))
    if softcap is None:
        softcap = _positive_or_none(getattr(tl_cfg, "output_logits_soft_cap", None))
    return PostUnembedTransform(
        softcap=softcap,
        logit_scale_multiply=_positive_or_none(getattr(hf_config, "logit_scale", None)),
        logit_scale_divide=_positive_or_none(getattr(hf_config, "logits_scaling", None)),
    )


def apply_post_unembed_transform(logits: Tensor, transform: PostUnembedTransform) -> Tensor:
    """Applies scaling first, then the softcap c·tanh(z/c), in float32; returns a new tensor."""
    z = logits.float()
    if transform.get("logit_scale_divide"):
        z = z / transform["logit_scale_divide"]
    if transform.get("logit_scale_multiply"):
        z = z * transform["logit_scale_multiply"]
    cap = transform.get("softcap")
    if cap:
        z = cap * torch.tanh(z / cap)
    return z


def unembed_logits(
    resid_normed: Tensor,
    W_U: Tensor,
    b_U: Tensor | None,
    transform: PostUnembedTransform | Any,
    force_fp32_unembed: bool = False,
    out: Tensor | None = None,
    chunk_columns: int | None = None,
) -> Tensor:
    """Lens logits ``[..., V]`` float32 from a normalised residual ``[..., d]``.

    Cast (``safe_cast_for_unembed``) → ``@ W_U (+ b_U)`` → float32 → post-unembed transform (a
    model's layers between its final norm and ``W_U`` are ``lens.unembed.Unembedding.head``'s).
    ``transform`` is either a ``PostUnembedTransform`` dict or a callable (a TransformerLens
    adapter's ``apply_output_logits_transform``), which is then preferred as the model's own rule.
    ``out``, a reusable buffer of the result's shape, receives the product when its dtype is the
    matmul's (the result may still be a new tensor if the transform allocates). With
    ``chunk_columns`` and ``force_fp32_unembed``, a half-precision ``W_U`` is upcast ``chunk_columns``
    vocabulary columns at a time (float32 maths without a full float32 copy of ``W_U``).
    """
    if chunk_columns and force_fp32_unembed and W_U.is_floating_point() and W_U.dtype != torch.float32:
        logits = _chunked_fp32_matmul(resid_normed.float(), W_U, chunk_columns, out)
    else:
        x = safe_cast_for_unembed(resid_normed, W_U, force_fp32_unembed)
        use_out = out is not None and out.dtype == x.dtype == W_U.dtype
        logits = torch.matmul(x, W_U, out=out) if use_out else x @ W_U
    if b_U is not None:
        logits += b_U.to(logits.dtype)
    logits = logits.float()
    if callable(transform):
        return transform(logits).float()
    return apply_post_unembed_transform(logits, transform)


def _chunked_fp32_matmul(x: Tensor, W_U: Tensor, chunk_columns: int, out: Tensor | None) -> Tensor:
    """``x @ W_U.float()`` ``[..., V]`` float32, upcasting ``chunk_columns`` columns at a time."""
    shape = (*x.shape[:-1], W_U.shape[-1])
    usable = out is not None and out.dtype == torch.float32 and tuple(out.shape) == shape
    logits = out if usable else torch.empty(shape, dtype=torch.float32, device=x.device)
    for start in range(0, W_U.shape[-1], chunk_columns):
        stop = min(start + chunk_columns, W_U.shape[-1])
        logits[..., start:stop] = x @ W_U[:, start:stop].to(torch.float32)
    return logits


def output_logits_transform(model: Any) -> Any:
    """The model's own post-unembed transform as a callable on float32 logits.

    Prefers the TransformerLens adapter's ``apply_output_logits_transform`` (it knows every
    supported family); falls back to ``get_post_unembed_transform``'s config table.
    """
    adapter_transform = getattr(getattr(model, "adapter", None), "apply_output_logits_transform", None)
    if callable(adapter_transform):
        return adapter_transform
    table = get_post_unembed_transform(model)
    return lambda logits: apply_post_unembed_transform(logits, table)
