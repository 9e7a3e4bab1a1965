"""report: the batched test prompts equal single-prompt runs; strict JSON; temperature rows."""

import json
import math

import pytest
import torch

from layers_core.pipeline.prompts import TEST_PROMPTS
from layers_core.pipeline.sweep import TokenDecoder
from layers_core.results.report import last_position_log_probs, temperature_entries, to_strict_json


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "gpt-neox", "phi"])
def test_right_padded_batch_equals_single_prompt_runs(load_bridge, family):
    model = load_bridge(family)
    batched = last_position_log_probs(model, TEST_PROMPTS)
    with torch.no_grad():
        single = torch.stack([torch.log_softmax(model(model.to_tokens(p))[0, -1].float(), -1)
                              for p in TEST_PROMPTS])
    assert batched.shape == single.shape
    assert torch.allclose(batched, single, atol=1e-4)
    assert (batched.argmax(-1) == single.argmax(-1)).all()


def test_prompts_of_different_lengths_are_read_at_their_own_last_token(load_bridge):
    model = load_bridge("llama")
    prompts = ["Berlin", "Berlin is the capital of Germany and"]
    batched = last_position_log_probs(model, prompts)
    with torch.no_grad():
        short = torch.log_softmax(model(model.to_tokens(prompts[0]))[0, -1].float(), -1)
    assert torch.allclose(batched[0], short, atol=1e-4)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)


def test_strict_json_turns_non_finite_into_null():
    text = to_strict_json({"a": math.nan, "b": [math.inf, 1.5], "c": {"d": -math.inf}, "e": "⟨NEXT⟩"})
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": {"d": None}, "e": "⟨NEXT⟩"}
    assert "⟨NEXT⟩" in text  # ensure_ascii=False


def test_temperature_exploration_uses_the_given_logits(load_bridge):
    model = load_bridge("llama")
    logits = torch.tensor([2.0, 1.0, 0.0] + [-5.0] * (model.cfg.d_vocab - 3))
    cold, hot = temperature_entries(logits, TokenDecoder(model.tokenizer))
    assert (cold["temperature"], hot["temperature"]) == (0.1, 2.0)
    assert cold["topk"][0][1] == pytest.approx(1 / (1 + math.exp(-10) + math.exp(-20)), abs=1e-6)
    assert cold["entropy"] < hot["entropy"] and len(hot["topk"]) == 15
