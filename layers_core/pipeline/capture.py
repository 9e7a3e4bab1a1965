"""The one place the model runs: tokens in, the hook points wanted, the model's logits out.

Every forward pass of the library goes through ``capture``: the lens pass of a prompt or a batch,
the control and answer-probability passes, the test prompts, attribution and lens fitting; a
generation goes through ``generate``. The hooks are ``hooks.activation_cache``'s, removed even
when the forward raises.
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


def generate_tokens(model: Any, tokens: Tensor, new_tokens: int, *, temperature: float = 0.0,
                    seed: int = 0) -> list[int]:
    """The model's own continuation of ``tokens`` ``[1, T]``: up to ``new_tokens`` ids (fewer if it
    ends), greedy at ``temperature`` 0, else sampled from the whole distribution after
    ``torch.manual_seed(seed)``. TransformerLens's ``generate`` without its KV cache: with
    transformers 5 every cached path of the bridge (its ``generate`` and ``hf_generate``, which
    calls the wrapped model's own ``generate``) writes other tokens than the model (SmolLM2, "The
    capital of France is": `` Paris`` then ``-`` 23 times, where the model writes `` Paris.``);
    the uncached path equals a fresh transformers model's greedy ``generate`` token for token
    (24 tokens, three prompts, measured) at about 1.7× the time."""
    sampled = temperature > 0
    with torch.inference_mode():
        if sampled:
            torch.manual_seed(seed)
        out = model.generate(tokens, max_new_tokens=int(new_tokens), do_sample=sampled,
                             temperature=temperature if sampled else 1.0, use_past_kv_cache=False,
                             stop_at_eos=True, return_type="tokens", verbose=False)
    return out[0, tokens.shape[1]:].tolist()
