"""The test prompts: the model's own prediction after 14 fixed prompts (the legacy JSON's
``test_prompts``), forwarded in right-padded batches of similar length."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from layers_core.model.tokens import TokenDecoder
from layers_core.pipeline.prompts import TEST_PROMPT_TOP_K, TEST_PROMPTS
from layers_core.pipeline.sweep import last_position_logits, right_padded_batches
from layers_core.results.report import topk_entry


def last_token_log_probs(model: Any, prompts: Sequence[str]) -> Tensor:
    """Float32 log-probs ``[N, V]`` at each prompt's last token, from right-padded forwards of
    prompts of similar length (each row equals that prompt's single-prompt forward)."""
    rows: list[Tensor | None] = [None] * len(prompts)
    with torch.inference_mode():
        for indices, batch, lengths in right_padded_batches(model, prompts):
            log_probs = torch.log_softmax(last_position_logits(model, batch, lengths).float(), dim=-1)
            for index, row in zip(indices, log_probs):
                rows[index] = row
    return torch.stack(rows)


def test_prompt_entries(model: Any, decoder: TokenDecoder) -> list[dict]:
    """The 14 legacy test prompts: entropy and top-10 at the last position (batched by length)."""
    entries = []
    for prompt, log_probs in zip(TEST_PROMPTS, last_token_log_probs(model, TEST_PROMPTS)):
        entropy, topk = topk_entry(log_probs, TEST_PROMPT_TOP_K, decoder)
        entries.append({"type": "test_prompt", "prompt": prompt, "entropy": entropy, "topk": topk})
    return entries
