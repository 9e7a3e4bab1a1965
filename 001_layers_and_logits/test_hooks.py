"""hooks: exactly the n+1 residual hooks, detached tensors under requested names, clean removal."""

import pytest
import torch

from layers_core.hooks import (
    attach_residual_hooks,
    build_cache_hook,
    detach_hooks,
    residual_cache,
    residual_hook_names,
)


def _count_hooks(model):
    unique_points = {id(point): point for point in model.hook_dict.values()}  # aliases share one
    return sum(len(point.fwd_hooks) + len(point._forward_hooks) for point in unique_points.values())


def test_hook_names():
    assert residual_hook_names(2) == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post",
                                      "blocks.1.hook_resid_post"]


def test_only_intended_hooks_attached_and_keys_are_requested_names(load_bridge):
    model = load_bridge("llama")
    n = model.cfg.n_layers
    cache = {}
    before = _count_hooks(model)
    handles, _ = attach_residual_hooks(model, cache)
    try:
        assert len(handles) == n + 1
        assert _count_hooks(model) - before == 2 * (n + 1)  # TL bookkeeping + torch hook each
        with torch.no_grad():
            model(model.to_tokens("The capital of Germany"))
    finally:
        detach_hooks(handles)
    # the Bridge reports aliases such as blocks.0.hook_out in hook.name; keys must not follow it
    assert list(cache) == residual_hook_names(n)
    assert all(not t.requires_grad and t.grad_fn is None for t in cache.values())
    assert _count_hooks(model) == before


def test_cached_tensors_are_detached_under_grad():
    cache = {}
    hook = build_cache_hook(cache, "k")
    x = torch.ones(2, requires_grad=True) * 2
    assert hook(x, hook=None) is None
    assert cache["k"].grad_fn is None and cache["k"].dtype == x.dtype


def test_after_detach_firing_leaves_cache_unchanged(load_bridge):
    model = load_bridge("gpt2")
    cache = {}
    handles, _ = attach_residual_hooks(model, cache)
    detach_hooks(handles)
    detach_hooks(handles)  # idempotent
    with torch.no_grad():
        model(model.to_tokens("Berlin"))
    assert cache == {}


def test_hooks_removed_after_an_exception(load_bridge):
    model = load_bridge("llama")
    before = _count_hooks(model)
    with pytest.raises(RuntimeError):
        with residual_cache(model):
            raise RuntimeError("boom")
    assert _count_hooks(model) == before


def test_layer0_is_the_embedding_and_last_matches_hf_hidden_state(load_bridge, tiny_dirs):
    from transformers import AutoModelForCausalLM

    model = load_bridge("gpt2")
    tokens = model.to_tokens("The capital of Germany")
    with torch.no_grad(), residual_cache(model) as (cache, has_pos):
        model(tokens)
        hf = AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"]).eval()
        hidden = hf(tokens, output_hidden_states=True).hidden_states
    assert has_pos is True
    assert torch.allclose(cache["blocks.0.hook_resid_pre"], hidden[0], atol=1e-6)
    assert torch.allclose(cache["blocks.1.hook_resid_post"], hidden[2], atol=1e-5)


@pytest.mark.parametrize("family,expected", [("gpt2", True), ("llama", False)])
def test_has_pos_embed(load_bridge, family, expected):
    handles, has_pos = attach_residual_hooks(load_bridge(family), {})
    detach_hooks(handles)
    assert has_pos is expected
