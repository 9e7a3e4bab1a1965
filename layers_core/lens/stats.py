"""The vectorised logit lens: normalised residuals ``[(n+1), T, d]`` → per-row statistics.

All (layer, position) rows are unembedded in row blocks whose ``[rows, V]`` float32 working set
stays under a memory budget; from one float32 ``log_softmax`` per block come the entropy, top-k,
answer probability and rank, and (at the last position) the KL to the model's own distribution.
Only small ``[rows, k]`` results leave the block, and they cross to the CPU once, at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from layers_core.lens.unembed import Unembedding
from layers_core.numerics import (
    entropy_bits_from_log_probs,
    kl_bits_from_log_probs,
    topk_last_dim,
)

DEFAULT_BUDGET_BYTES = 256 * 2**20  # peak [rows, V] float32 working set of one block
_LIVE_ROW_COPIES = 3  # the logits and log-probs buffers, and a post-unembed transform's temporaries


@dataclass(frozen=True)
class LensStats:
    """Lens statistics for L layers × T positions, on the CPU.

    ``entropy_bits`` ``[L, T]`` float32; ``topk_ids`` ``[L, T, k]`` int64 and ``topk_probs``
    ``[L, T, k]`` float32 (full-softmax probabilities, descending); ``p_answer`` ``[L, T]`` or
    None without a gold id. At the last position only (the pure rows): ``answer_rank`` ``[L]``
    (1-based, or None) and ``kl_to_final_bits`` ``[L]``, KL(P_ℓ ‖ P_final).
    """

    entropy_bits: Tensor
    topk_ids: Tensor
    topk_probs: Tensor
    p_answer: Tensor | None
    answer_rank: Tensor | None
    kl_to_final_bits: Tensor | None


def rows_per_block(d_vocab: int, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> int:
    """How many ``[V]`` float32 rows fit the budget, counting the block's live temporaries."""
    return max(1, budget_bytes // (d_vocab * 4 * _LIVE_ROW_COPIES))


AnswerIds = int | Sequence[int] | None  # one answer token, several (aliases: summed, best rank), none


def _block_stats(
    log_probs: Tensor, scratch: Tensor, top_k: int, answer_id: AnswerIds
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    entropy = entropy_bits_from_log_probs(log_probs, scratch)
    top_values, top_ids = topk_last_dim(log_probs, top_k)
    p_answer = None
    if isinstance(answer_id, int):
        p_answer = log_probs[:, answer_id].exp()
    elif answer_id is not None:
        p_answer = set_scores(log_probs, answer_id)[0]
    return entropy, top_ids, top_values.exp(), p_answer


def _last_position_stats(
    log_probs: Tensor, final_log_probs: Tensor, answer_id: AnswerIds
) -> tuple[Tensor, Tensor | None]:
    kl = kl_bits_from_log_probs(log_probs, final_log_probs)
    if answer_id is None:
        return kl, None
    if isinstance(answer_id, int):
        return kl, ranks_of(log_probs, answer_id)
    return kl, set_scores(log_probs, answer_id)[1]


def ranks_of(log_probs: Tensor, answer_id: int) -> Tensor:
    """1 + the number of tokens strictly more probable than the answer, per row (ties favour the
    answer). A NaN never helps the answer: a NaN token counts as more probable, and a row whose
    answer log-prob is NaN ranks last (V + 1), so it never reaches a rank milestone."""
    return (~(log_probs <= log_probs[:, answer_id : answer_id + 1])).sum(dim=-1) + 1


def set_scores(log_probs: Tensor, token_ids: Sequence[int]) -> tuple[Tensor, Tensor]:
    """A token set's (summed probability ``[rows]`` float32, best rank ``[rows]``) per row of
    ``log_probs`` ``[rows, V]``: one gather, a log-sum-exp, and the rank of the set's most
    probable member (as ``ranks_of``: ties favour the set; a NaN never helps it)."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=log_probs.device)
    members = log_probs.index_select(-1, ids)
    best = members.max(dim=-1, keepdim=True).values
    return members.logsumexp(dim=-1).exp(), (~(log_probs <= best)).sum(dim=-1) + 1


@torch.inference_mode()
def lens_statistics(
    resid_normed: Sequence[Tensor],
    unembed: Unembedding,
    final_log_probs: Tensor | None,
    answer_id: AnswerIds,
    top_k: int = 20,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> LensStats:
    """Decodes every (layer, position) row of ``resid_normed`` (L tensors ``[T, d]``) through
    ``unembed`` (W_U, b_U, the head transform; float32 logits).

    ``final_log_probs`` ``[V]`` float32 is the model's own last-position distribution; the KL
    and the answer rank are taken at position T−1 of each layer (the pure next-token rows).
    None: no last-position statistics (``answer_rank`` and ``kl_to_final_bits`` are None).
    Memory: at most ``budget_bytes`` of ``[rows, V]`` work.
    """
    n_layers, seq_len = len(resid_normed), resid_normed[0].shape[0]
    rows = torch.cat(list(resid_normed), dim=0)  # [L·T, d], layer-major
    vocab = int(unembed.W_U.shape[-1])
    block = min(rows_per_block(vocab, budget_bytes), rows.shape[0])
    last_rows = torch.arange(n_layers, device=rows.device) * seq_len + (seq_len - 1)
    # Buffers reused by every block: the log-probs, and the float32 matmul's logits (later the
    # entropy's scratch). Fresh [rows, V] allocations cost as much as the arithmetic on them.
    log_probs_buffer = torch.empty((block, vocab), dtype=torch.float32, device=rows.device)
    logits_buffer = torch.empty_like(log_probs_buffer) if unembed.float32_matmul else None
    parts: list[tuple] = []
    last_parts: list[tuple] = []
    for start in range(0, rows.shape[0], block):
        stop = min(start + block, rows.shape[0])
        buffer = None if logits_buffer is None else logits_buffer[: stop - start]
        logits = unembed.logits(rows[start:stop], buffer)
        log_probs = torch.log_softmax(logits, dim=-1, out=log_probs_buffer[: stop - start])
        parts.append(_block_stats(log_probs, logits, top_k, answer_id))
        in_block = last_rows[(last_rows >= start) & (last_rows < stop)] - start
        if in_block.numel() and final_log_probs is not None:
            last_parts.append(_last_position_stats(log_probs[in_block], final_log_probs, answer_id))
    entropy, ids, probs, p_answer = (_cat_cpu(part) for part in zip(*parts))
    kl, rank = (_cat_cpu(part) for part in zip(*last_parts)) if last_parts else (None, None)
    shape = (n_layers, seq_len)
    return LensStats(
        entropy_bits=entropy.reshape(shape),
        topk_ids=ids.reshape(*shape, top_k),
        topk_probs=probs.reshape(*shape, top_k),
        p_answer=None if p_answer is None else p_answer.reshape(shape),
        answer_rank=rank,
        kl_to_final_bits=kl,
    )


def _cat_cpu(pieces: Sequence[Tensor | None]) -> Tensor | None:
    return None if pieces[0] is None else torch.cat(list(pieces)).cpu()


@torch.inference_mode()
def stats_from_log_probs(log_probs: Tensor, final_log_probs: Tensor, answer_id: AnswerIds,
                         top_k: int = 20) -> LensStats:
    """``LensStats`` of L last-position rows (``[L, V]`` float32 log-probs) as ``[L, 1]`` tables."""
    entropy, ids, probs, p_answer = _block_stats(log_probs, None, top_k, answer_id)
    kl, rank = _last_position_stats(log_probs, final_log_probs, answer_id)
    n_layers = log_probs.shape[0]
    return LensStats(
        entropy_bits=entropy.cpu().reshape(n_layers, 1), topk_ids=ids.cpu().reshape(n_layers, 1, top_k),
        topk_probs=probs.cpu().reshape(n_layers, 1, top_k),
        p_answer=None if p_answer is None else p_answer.cpu().reshape(n_layers, 1),
        answer_rank=None if rank is None else rank.cpu(), kl_to_final_bits=kl.cpu())


def followed_by_last_position(earlier: LensStats, last: LensStats) -> LensStats:
    """Positions 0..T−2 (``earlier``, ``[L, T−1]`` tables) then the last position (``last``,
    ``[L, 1]`` with its rank and KL) as one ``[L, T]`` set of statistics."""
    def joined(a: Tensor | None, b: Tensor | None) -> Tensor | None:
        return None if b is None else torch.cat([a, b], dim=1)

    return LensStats(entropy_bits=joined(earlier.entropy_bits, last.entropy_bits),
                     topk_ids=joined(earlier.topk_ids, last.topk_ids),
                     topk_probs=joined(earlier.topk_probs, last.topk_probs),
                     p_answer=joined(earlier.p_answer, last.p_answer),
                     answer_rank=last.answer_rank, kl_to_final_bits=last.kl_to_final_bits)
