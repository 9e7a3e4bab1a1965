"""The one place the model runs: tokens in, the hook points wanted, the model's logits out.

Every forward pass of the library goes through ``capture``: the lens pass of a prompt or a batch,
the control and answer-probability passes, the test prompts, attribution and lens fitting. The
hooks are ``hooks.activation_cache``'s, removed even when the forward raises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from layers_core.hooks import activation_cache

ALL_POSITIONS = None  # logits_to_keep: the head at every position


@dataclass
class Captured:
    """One forward pass: the model's own logits ``[B, K, V]`` (as its head returns them, K the
    positions kept) and each requested hook point's output ``[B, T, …]`` by hook name."""

    logits: Tensor
    activations: dict[str, Tensor]


def capture(model: Any, tokens: Tensor, points: Sequence[str] = (), *,
            logits_to_keep: int | Tensor | None = 1, device: Any = None) -> Captured:
    """Runs ``model`` on ``tokens`` ``[B, T]`` under ``torch.inference_mode``, keeping the outputs of
    the hook points named in ``points`` (moved to ``device`` as they are captured; None: left where
    they are). ``logits_to_keep``: how many last positions (an int) or which positions (a tensor)
    the head runs at; ``ALL_POSITIONS`` (None) for every position."""
    with torch.inference_mode(), activation_cache(model, points, device) as cache:
        if logits_to_keep is ALL_POSITIONS:
            logits = model(tokens)
        else:
            logits = model(tokens, logits_to_keep=logits_to_keep)
    return Captured(logits, cache)
