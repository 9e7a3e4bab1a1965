"""Every lens scored on a corpus, layer by layer: the tuned-lens paper's figure.

The text is cut into equal chunks (``lens.tuned.token_chunks``), forwarded in batches through
``pipeline.capture``, and at each position but the first (the BOS row) and the last (no next
token) every lens decodes every layer. Per chunk, lens and layer it sums the cross-entropy to the
true next token (bits), KL(final ‖ lens) (bits; *final* is the model's own distribution: its
last residual through its own final norm and head, which the last-layer gate checks against its
logits) and top-1 agreement with the model. Nothing ``[layers, positions, vocab]`` is ever held:
rows go through the unembedding in blocks under ``budget_bytes``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from layers_core.hooks import residual_hook_names
from layers_core.lens.protocol import Lens
from layers_core.lens.stats import DEFAULT_BUDGET_BYTES
from layers_core.model.lens_model import LensModel
from layers_core.numerics import LN2
from layers_core.pipeline.capture import capture
from layers_core.pipeline.decode import gate_row, transformed_rows

_LIVE_COPIES = 2  # a block's logits (log-softmaxed in place) and one elementwise temporary


@dataclass(frozen=True)
class ChunkScores:
    """Per chunk, lens and layer: ``sums`` ``[chunks, lenses, layers, 3]`` float64 (cross-entropy
    bits, KL bits, top-1 agreements), and per chunk the scored ``tokens`` and their UTF-8
    ``bytes``; ``lenses`` names the second axis."""

    lenses: tuple[str, ...]
    sums: Tensor
    tokens: Tensor
    bytes: Tensor


def capture_chunks(lm: LensModel, chunks: Sequence[list[int]], batch_size: int,
                   progress: Callable[[int], None] | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """For each batch of equal-length chunks: (residuals ``[L+1, B, T, d]`` float32 on the lens
    device, tokens ``[B, T]``). ``progress(n)`` is called with the tokens done."""
    bridge = lm.bridge
    names = residual_hook_names(lm.n_layers)
    device = lm.unembed.W_U.device
    for start in range(0, len(chunks), batch_size):
        tokens = torch.tensor(chunks[start : start + batch_size], device=bridge.cfg.device)
        cache = capture(bridge, tokens, names, device=device).activations
        yield torch.stack([cache.pop(name).float() for name in names]), tokens
        if progress is not None:
            progress(int(tokens.numel()))


def _token_bytes(tokenizer, ids: Tensor) -> int:
    texts = tokenizer.batch_decode([[i] for i in ids.tolist()])
    return sum(len(text.encode("utf-8")) for text in texts)


def _blocks(n_layers: int, n_rows: int, vocab: int, budget_bytes: int) -> tuple[int, int]:
    """(rows per block, layers per unembedding): a row block is as tall as one layer's
    ``[rows, V]`` may be under the budget (its final distribution is computed once), and layers
    share one unembedding while they fit. Each unembedding streams the whole of ``W_U``: few,
    tall ones are what keeps a 262k vocabulary near the floor."""
    per_row = vocab * 4 * _LIVE_COPIES
    rows = max(1, min(n_rows, budget_bytes // per_row))
    return rows, max(1, min(n_layers, budget_bytes // (rows * per_row)))


def score_chunk(lm: LensModel, lenses: Mapping[str, Lens], residuals: Tensor, targets: Tensor,
                budget_bytes: int = DEFAULT_BUDGET_BYTES) -> Tensor:
    """One chunk's sums ``[lenses, layers, 3]`` (CE bits, KL bits, agreements): ``residuals``
    ``[L, rows, d]`` at the scored positions, ``targets`` ``[rows]`` their next tokens."""
    n_layers, n_rows = residuals.shape[0], residuals.shape[1]
    block, group = _blocks(n_layers, n_rows, int(lm.unembed.W_U.shape[-1]), budget_bytes)
    sums = torch.zeros((len(lenses), n_layers, 3), dtype=torch.float64)
    with torch.inference_mode():
        for start in range(0, n_rows, block):
            part, wanted = residuals[:, start : start + block], targets[start : start + block]
            final = lm.unembed.log_probs(gate_row(lm.bridge, part[-1]))  # [rows, V]
            final_top1, p_final = final.argmax(-1), final.exp()
            # KL(final ‖ lens) = Σ p_f log p_f − Σ p_f log p_lens: the first term once per row, the
            # second one batched dot product per layer (no [layers, rows, V] temporary); every
            # log-prob is finite (the lens rows are checked finite, a log-softmax of finite logits is)
            neg_entropy = (p_final * final).sum(-1) / LN2
            del final
            for index, lens in enumerate(lenses.values()):
                transformed = transformed_rows(lens, list(part))
                for first in range(0, n_layers, group):
                    layers = transformed[first : first + group]
                    log_probs = lm.unembed.log_probs(torch.cat(layers)).view(len(layers), part.shape[1], -1)
                    ce = -log_probs.gather(-1, wanted.expand(len(layers), -1).unsqueeze(-1)).squeeze(-1) / LN2
                    cross = torch.einsum("lrv,rv->lr", log_probs, p_final) / LN2
                    kl = (neg_entropy - cross).clamp_min(0.0)
                    agree = (log_probs.argmax(-1) == final_top1).double()
                    sums[index, first : first + len(layers)] += torch.stack(
                        [ce.sum(-1).double(), kl.sum(-1).double(), agree.sum(-1)], dim=-1).cpu()
    return sums


def score_chunks(lm: LensModel, lenses: Mapping[str, Lens], chunks: Sequence[list[int]], batch_size: int = 8,
                 progress: Callable[[int], None] | None = None,
                 budget_bytes: int = DEFAULT_BUDGET_BYTES) -> ChunkScores:
    """``ChunkScores`` of every lens over ``chunks`` (equal-length token lists, each at least 3)."""
    per_chunk, tokens, sizes = [], [], []
    for residuals, batch in capture_chunks(lm, chunks, batch_size, progress):
        for row in range(batch.shape[0]):
            scored = residuals[:, row, 1:-1]  # [L, T−2, d]: not the BOS row, not the last
            targets = batch[row, 2:].to(scored.device)
            per_chunk.append(score_chunk(lm, lenses, scored, targets, budget_bytes))
            tokens.append(int(targets.numel()))
            sizes.append(_token_bytes(lm.bridge.tokenizer, targets))
    return ChunkScores(tuple(lenses), torch.stack(per_chunk), torch.tensor(tokens, dtype=torch.float64),
                       torch.tensor(sizes, dtype=torch.float64))
