"""Every fixture family boots offline in the TransformerBridge and reproduces HF's own logits."""

import os

import pytest
import torch
from tiny_models import FAMILIES

from layers_core.pipeline.sweep import forward_with_residuals


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bridge_reproduces_hf_logits_offline(tiny_dirs, load_bridge, family):
    from transformers import AutoModelForCausalLM

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    bridge = load_bridge(family)
    hf = AutoModelForCausalLM.from_pretrained(tiny_dirs[family]).eval()
    tokens = bridge.to_tokens('The capital of Germany is called "Berlin", simply.')
    with torch.no_grad():
        ours, theirs = bridge(tokens), hf(tokens).logits
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert theirs.std() > 1e-3  # a degenerate model would make this test vacuous


def test_fixtures_make_every_lens_term_visible(load_bridge):
    """Norm weights are non-trivial, phi has a real unembedding bias, Gemma-2 hits its softcap."""
    for family in FAMILIES:
        weight = load_bridge(family).ln_final.original_component.weight
        assert (weight - weight.mean()).abs().max() > 0.1, family
    assert load_bridge("phi").unembed.b_U.abs().max() > 0.1
    gemma = load_bridge("gemma2")
    tokens = gemma.to_tokens("The capital of Germany is")
    _, residuals = forward_with_residuals(gemma, tokens)
    with torch.no_grad():
        raw = gemma.ln_final(residuals[-1]) @ gemma.unembed.W_U
    assert raw.abs().max() > 2 * gemma.cfg.output_logits_soft_cap


def test_bundled_model_facts(bundled_bridge):
    cfg = bundled_bridge.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_vocab) == (30, 576, 9, 49152)
    assert type(bundled_bridge.ln_final.original_component).__name__ == "LlamaRMSNorm"
    assert bundled_bridge.to_tokens("x")[0, 0].item() == 1
