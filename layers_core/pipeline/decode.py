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


class NonFiniteLensError(ValueError):
    """A lens turned a finite residual into inf/NaN (a damaged fitted lens, a user lens's bug)."""


def transformed_rows(lens: Lens, residuals: list[Tensor], first_layer: int = 0) -> list[Tensor]:
    """Layer ℓ's residual ``[rows, d]`` through ``lens.transform(·, ℓ)``, for every layer (ℓ from
    ``first_layer``). Raises ``NonFiniteLensError`` naming the lens (and its file) and the first
    layer whose output holds inf/NaN: the residuals are checked finite, so only the lens can have
    made them (one sync)."""
    rows = [lens.transform(resid, layer) for layer, resid in enumerate(residuals, start=first_layer)]
    finite = torch.stack([torch.isfinite(row).all() for row in rows]).tolist() if rows else []
    if not all(finite):
        raise NonFiniteLensError(f"{lens_label(lens)} produced non-finite values (inf/NaN) at layer "
                                 f"{first_layer + finite.index(False)}; no number it gives can be trusted")
    return rows


def lens_label(lens: Lens) -> str:
    """``the tuned lens (/path/to/lens)``: the lens by name, and the file it was read from."""
    path = getattr(lens, "path", None)
    return f"the {getattr(lens, 'name', type(lens).__name__)} lens" + (f" ({path})" if path else "")


def gate_row(model: Any, last_block_resid: Tensor) -> Tensor:
    """``ln_final`` of ``blocks.{n−1}.hook_resid_post`` at the last position (``[d]`` → ``[1, d]``,
    or ``[B, d]`` for B prompts): the row the last-layer gate compares with the model's own
    logits, whatever the lens."""
    return apply_norm_or_skip(last_block_resid.reshape(-1, last_block_resid.shape[-1]),
                              getattr(model, "ln_final", None))


def decode_last_positions(model: Any, last_resid: Tensor, chosen_rows: Tensor, other: Lens,
                          unembed: Unembedding) -> LastPositionViews:
    """All last-position views of one prompt in one unembedding.

    ``last_resid`` ``[L, d]`` is every layer's raw residual at the last position and
    ``chosen_rows`` ``[L, d]`` the chosen lens's output there (already transformed).
    """
    return decode_views(model, last_resid.unsqueeze(0), chosen_rows.unsqueeze(0), other, unembed)[0]


def view_rows(n_layers_plus_one: int) -> int:
    """How many rows one prompt's views take: two lenses at every layer, the raw check, the gate."""
    return 2 * n_layers_plus_one + len(raw_check_layers(n_layers_plus_one - 1)) + 1


def decode_views(model: Any, last_resid: Tensor, chosen_rows: Tensor, other: Lens, unembed: Unembedding,
                 out: Tensor | None = None) -> list[LastPositionViews]:
    """The last-position views of B prompts in one unembedding (W_U read once for all of them).

    ``last_resid`` ``[B, L, d]``: each prompt's raw residual at its last position, every layer;
    ``chosen_rows`` ``[B, L, d]``: the chosen lens's output there. ``out``: a reusable float32
    buffer of at least ``B · view_rows(L)`` rows of width V (a fresh ``[rows, V]`` allocation
    costs as much as the matmul's arithmetic); the views then live in it until it is reused.
    """
    n_prompts, n_rows = last_resid.shape[:2]
    raw_layers = raw_check_layers(n_rows - 1)
    with torch.inference_mode():
        other_rows = torch.stack(transformed_rows(other, list(last_resid.transpose(0, 1))), dim=1)
        gate = gate_row(model, last_resid[:, -1]).unsqueeze(1)
        rows = torch.cat([chosen_rows, other_rows, last_resid[:, raw_layers], gate], dim=1)
        flat = rows.reshape(-1, rows.shape[-1])
        log_probs = unembed.log_probs(flat, out=None if out is None else out[: flat.shape[0]])
        log_probs = log_probs.view(n_prompts, rows.shape[1], -1)
    raw_stop = 2 * n_rows + len(raw_layers)
    return [LastPositionViews(chosen=lp[:n_rows], other=lp[n_rows : 2 * n_rows], raw=lp[2 * n_rows : raw_stop],
                              consistency=lp[raw_stop]) for lp in log_probs]
