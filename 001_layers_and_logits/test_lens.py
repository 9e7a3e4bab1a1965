"""The lens against independent references, and its memory bound.

- ``final``: TransformerLens's own ``tools.analysis.logit_lens`` (ln_final → W_U → adapter
  transform), per layer at the last position.
- ``arch``: a reference built only from the Hugging Face model: ``output_hidden_states`` and each
  family's own norm modules called directly, then ``lm_head`` and the config's softcap.
Entropy, top-1 and KL to the final distribution must agree to 2e-3 bits on every family.
"""

import math

import pytest
import torch
from tiny_models import FAMILIES

from layers_core.lens.protocol import NormLens
from layers_core.lens.stats import lens_statistics, rows_per_block
from layers_core.lens.unembed import Unembedding
from layers_core.numerics import output_logits_transform
from layers_core.pipeline.sweep import SweepSettings, run_sweep

PROMPT = "Give the city name only, plain text. The capital of Germany is called simply"
TOLERANCE_BITS = 2e-3

# family → (path to the decoder layers, name of the norm a block applies first)
HF_LAYOUT = {
    "llama": ("model.layers", "input_layernorm"),
    "mistral": ("model.layers", "input_layernorm"),
    "qwen2": ("model.layers", "input_layernorm"),
    "qwen3": ("model.layers", "input_layernorm"),
    "gemma2": ("model.layers", "input_layernorm"),
    "phi": ("model.layers", "input_layernorm"),
    "gpt2": ("transformer.h", "ln_1"),
    "gpt-neox": ("gpt_neox.layers", "input_layernorm"),
}


def _attr(obj, dotted):
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def _entropy_bits(log_probs):
    return -(log_probs.exp() * log_probs).nan_to_num().sum(-1) / math.log(2)


def _kl_bits(log_p, log_q):
    return (log_p.exp() * (log_p - log_q)).nan_to_num().sum(-1) / math.log(2)


def _hf_reference_arch(path, family, tokens):
    """Per-layer log-probs at the last position, computed with HF modules only (float64 stats)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    layers_path, norm_name = HF_LAYOUT[family]
    layers = _attr(hf, layers_path)
    softcap = getattr(hf.config, "final_logit_softcapping", None)
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
        rows = []
        for layer in range(len(layers)):  # hidden_states[ℓ] is the input of block ℓ
            normed = getattr(layers[layer], norm_name)(out.hidden_states[layer][0, -1])
            logits = hf.get_output_embeddings()(normed)
            if softcap:
                logits = softcap * torch.tanh(logits / softcap)
            rows.append(torch.log_softmax(logits.double(), -1))
        rows.append(torch.log_softmax(out.logits[0, -1].double(), -1))  # after the last block
    return torch.stack(rows)


def _ours(model, strategy):
    unembed = Unembedding(model.unembed.W_U, model.unembed.b_U, output_logits_transform(model))
    return run_sweep(model, PROMPT, "Berlin", unembed, SweepSettings(norm_strategy=strategy))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_arch_lens_matches_an_hf_only_reference(tiny_dirs, load_bridge, family):
    model = load_bridge(family)
    result = _ours(model, "arch")
    reference = _hf_reference_arch(tiny_dirs[family], family, result.tokens)
    final = reference[-1]
    for row, ref in zip(result.pure_rows, reference):
        assert row["entropy"] == pytest.approx(float(_entropy_bits(ref)), abs=TOLERANCE_BITS)
        assert row["kl_to_final_bits"] == pytest.approx(float(_kl_bits(ref, final)),
                                                        abs=TOLERANCE_BITS)
        top_ref = int(ref.argmax())
        assert row["prob1"] == pytest.approx(float(ref[top_ref].exp()), abs=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_final_lens_matches_transformer_lens_logit_lens(load_bridge, family):
    from transformer_lens.tools.analysis import logit_lens

    model = load_bridge(family)
    result = _ours(model, "final")
    with torch.no_grad():
        reference = logit_lens(model, result.tokens, return_type="log_probs").values[:, 0].double()
    assert reference.shape[0] == len(result.pure_rows)
    final = torch.log_softmax(result.model_logits[-1].double(), -1)
    for row, ref in zip(result.pure_rows, reference):
        assert row["entropy"] == pytest.approx(float(_entropy_bits(ref)), abs=TOLERANCE_BITS)
        assert row["kl_to_final_bits"] == pytest.approx(float(_kl_bits(ref, final)),
                                                        abs=TOLERANCE_BITS)
        assert row["prob1"] == pytest.approx(float(ref.max().exp()), abs=1e-5)


def test_a_wrong_norm_would_be_caught(tiny_dirs, load_bridge):
    """Sanity of the reference test itself: the raw residual does not match the arch reference."""
    model = load_bridge("llama")
    result = _ours(model, "none")
    reference = _hf_reference_arch(tiny_dirs["llama"], "llama", result.tokens)
    gaps = [abs(row["entropy"] - float(_entropy_bits(ref)))
            for row, ref in zip(result.pure_rows[:-1], reference[:-1])]
    assert max(gaps) > 10 * TOLERANCE_BITS


def _stats(model, budget, result=None):
    result = result or _ours(model, "arch")
    final_lp = torch.log_softmax(result.model_logits[-1], -1)
    unembed = Unembedding(model.unembed.W_U, model.unembed.b_U, output_logits_transform(model))
    return lens_statistics(result.resid_normed, unembed, final_lp, result.gold["first_id"], budget_bytes=budget)


def test_row_blocks_give_identical_results(load_bridge):
    model = load_bridge("gemma2")
    whole, tiny = _stats(model, 2**30), _stats(model, 1)  # 1 byte → one row per block
    assert rows_per_block(model.cfg.d_vocab, 1) == 1
    for name in ("entropy_bits", "topk_ids", "topk_probs", "p_answer", "answer_rank",
                 "kl_to_final_bits"):
        assert torch.allclose(getattr(whole, name).double(), getattr(tiny, name).double(),
                              atol=1e-6), name


def test_half_precision_unembedding_matches_float32(load_bridge):
    """bf16 W_U (the GPU policy without --fp32-unembed) takes the path without a logits buffer."""
    model = load_bridge("llama")
    result = _ours(model, "arch")
    final_lp = torch.log_softmax(result.model_logits[-1], -1)
    transform = output_logits_transform(model)
    full = lens_statistics(result.resid_normed, Unembedding(model.unembed.W_U, None, transform), final_lp,
                           result.gold["first_id"])
    half = lens_statistics(result.resid_normed, Unembedding(model.unembed.W_U.detach().to(torch.bfloat16), None,
                                                            transform), final_lp, result.gold["first_id"],
                           budget_bytes=1)
    assert half.entropy_bits.dtype == torch.float32
    assert torch.allclose(half.entropy_bits, full.entropy_bits, atol=0.05)
    assert torch.allclose(half.topk_probs[..., 0], full.topk_probs[..., 0], atol=0.02)


def test_peak_logit_memory_respects_the_budget(load_bridge, monkeypatch):
    """The largest [rows, V] float32 block ever built stays within the budget's row count."""
    from layers_core.lens import unembed as lens_module  # lens_statistics decodes through Unembedding.logits

    model = load_bridge("llama")
    result = _ours(model, "arch")
    seen = []
    original = lens_module.unembed_logits

    def spy(rows, *args, **kwargs):
        out = original(rows, *args, **kwargs)
        seen.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(lens_module, "unembed_logits", spy)
    budget = 64 * model.cfg.d_vocab * 4 * 3  # room for 64 rows with 3 live copies
    _stats(model, budget, result)
    n_rows = len(result.resid_normed) * result.tokens.shape[1]
    assert len(seen) == math.ceil(n_rows / 64)
    assert max(seen) == 64 * model.cfg.d_vocab * 4 <= budget / 3


def test_norm_lens_does_not_mutate_inputs(load_bridge):
    model = load_bridge("gpt2")
    resid = torch.randn(3, model.cfg.d_model)
    copy = resid.clone()
    out = NormLens(model, "final").transform(resid, 1)
    assert torch.equal(resid, copy) and out is not resid
    assert not torch.allclose(out, resid)
