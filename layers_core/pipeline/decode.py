"""The one decode path of a prompt's last position: every view a prompt needs — the chosen lens,
the comparison lens, the raw residual at the sampled layers and the last-layer gate's row — in
one batched unembedding (W_U read once)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from layers_core.lens.protocol import Lens
from layers_core.lens.unembed import Unembedding
from layers_core.norm_utils import apply_norm_or_skip


@dataclass(frozen=True)
class LastPositionViews:
    """Float32 log-probs at the last position: ``chosen`` and ``other`` ``[L, V]`` (every layer
    under the chosen and the comparison lens), ``raw`` ``[S, V]`` (the raw residual at
    ``raw_check_layers``) and ``consistency`` ``[V]`` (``ln_final`` of the last block's output)."""

    chosen: Tensor
    other: Tensor
    raw: Tensor
    consistency: Tensor


def raw_check_layers(n_layers: int) -> list[int]:
    """The sampled layers of the raw-residual check: {0, ⌊n/4⌋, ⌊n/2⌋, ⌊3n/4⌋, n}, no repeats."""
    return sorted({0, n_layers // 4, n_layers // 2, (3 * n_layers) // 4, n_layers})


def transformed_rows(lens: Lens, residuals: list[Tensor]) -> list[Tensor]:
    """Layer ℓ's residual ``[rows, d]`` through ``lens.transform(·, ℓ)``, for every layer."""
    return [lens.transform(resid, layer) for layer, resid in enumerate(residuals)]


def gate_row(model: Any, last_block_resid: Tensor) -> Tensor:
    """``ln_final`` of ``blocks.{n−1}.hook_resid_post`` at one position ``[1, d]``: the row the
    last-layer gate compares with the model's own logits, whatever the lens."""
    return apply_norm_or_skip(last_block_resid.reshape(1, -1), getattr(model, "ln_final", None))


def decode_last_positions(model: Any, last_resid: Tensor, chosen_rows: Tensor, other: Lens,
                          unembed: Unembedding) -> LastPositionViews:
    """All last-position views of one prompt in one unembedding.

    ``last_resid`` ``[L, d]`` is every layer's raw residual at the last position and
    ``chosen_rows`` ``[L, d]`` the chosen lens's output there (already transformed).
    """
    n_rows = last_resid.shape[0]
    raw_layers = raw_check_layers(n_rows - 1)
    with torch.inference_mode():
        other_rows = torch.cat(transformed_rows(other, list(last_resid.unsqueeze(1))))
        rows = torch.cat([chosen_rows, other_rows, last_resid[raw_layers], gate_row(model, last_resid[-1])])
        log_probs = unembed.log_probs(rows)
    raw_stop = 2 * n_rows + len(raw_layers)
    return LastPositionViews(chosen=log_probs[:n_rows], other=log_probs[n_rows : 2 * n_rows],
                             raw=log_probs[2 * n_rows : raw_stop], consistency=log_probs[raw_stop])
