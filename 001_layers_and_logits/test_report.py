"""report: the batched test prompts equal single-prompt runs (batches of similar length); strict
JSON; temperature rows."""

import json
import math

import pytest
import torch

from layers_core.pipeline.probes import last_token_log_probs
from layers_core.pipeline.prompts import TEST_PROMPTS
from layers_core.pipeline.sweep import TokenDecoder, padding_groups
from layers_core.results.report import temperature_entries, to_strict_json


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "gpt-neox", "phi"])
def test_right_padded_batch_equals_single_prompt_runs(load_bridge, family):
    model = load_bridge(family)
    batched = last_token_log_probs(model, TEST_PROMPTS)
    with torch.no_grad():
        single = torch.stack([torch.log_softmax(model(model.to_tokens(p))[0, -1].float(), -1)
                              for p in TEST_PROMPTS])
    assert batched.shape == single.shape
    assert torch.allclose(batched, single, atol=1e-4)
    assert (batched.argmax(-1) == single.argmax(-1)).all()


def test_prompts_of_different_lengths_are_read_at_their_own_last_token(load_bridge):
    model = load_bridge("llama")
    prompts = ["Berlin", "Berlin is the capital of Germany and"]
    batched = last_token_log_probs(model, prompts)
    with torch.no_grad():
        short = torch.log_softmax(model(model.to_tokens(prompts[0]))[0, -1].float(), -1)
    assert torch.allclose(batched[0], short, atol=1e-4)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)


def _padded_cost(lengths, groups, per_forward):
    return sum(len(g) * max(lengths[i] for i in g) + per_forward for g in groups)


def test_padding_groups_split_where_padding_costs_more_than_a_forward():
    lengths = [7, 8, 9, 10, 8, 7, 8, 6, 9, 15, 16, 18, 15, 19]  # the test prompts on the bundled model
    groups = padding_groups(lengths, per_forward=16)
    assert [sorted(g) for g in groups] == [[0, 1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13]]
    assert _padded_cost(lengths, groups, 16) == 9 * 10 + 5 * 19 + 32 < 14 * 19 + 16
    assert padding_groups([5, 5, 5]) == [[0, 1, 2]]  # nothing to gain
    assert padding_groups([2, 9]) == [[0, 1]]  # a second forward costs more than 7 pads
    assert padding_groups([3, 1, 2], per_forward=0) == [[1], [2], [0]]  # free forwards: no padding
    assert padding_groups([]) == []


@pytest.mark.parametrize("seed", range(20))
def test_padding_groups_are_an_optimal_partition_of_the_sorted_lengths(seed):
    import itertools
    import random

    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 9))]
    groups = padding_groups(lengths, per_forward=10)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # each prompt once
    ascending = sorted(lengths)
    best = min(  # every split of the sorted lengths into runs, by brute force
        _padded_cost(ascending, [list(range(a, b)) for a, b in zip((0, *cuts), (*cuts, len(ascending)))], 10)
        for r in range(len(ascending)) for cuts in itertools.combinations(range(1, len(ascending)), r))
    assert _padded_cost(lengths, groups, 10) == best


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
