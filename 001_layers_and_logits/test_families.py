"""The family matrix: every attention-based, text-only decoder the pinned TransformerLens bridges.

Each family is a tiny random model built from its transformers config class
(``tiny_models.MATRIX``) and is either exact or refused in one line:
- the last-layer gate holds (KL(model ‖ lens) ≤ 1e-6 bits, float32);
- the ``final`` lens equals an HF-only reference: the HF model's own decoder-layer outputs
  (forward hooks), its own final norm module and head, and the config's head transform;
- the ``arch`` lens equals each planned norm's own HF ``forward`` on the HF residual (our
  float32 re-implementation of every norm kind against the module itself).
The reference's head is checked against the HF model's own logits first, so a wrong reference
cannot pass. The README's family table is checked against the same facts.
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
from conftest import HERE
from tiny_models import MATRIX, build_tiny_model

from layers_core.lens.protocol import NormLens
from layers_core.model import upstream
from layers_core.model.lens_model import analysis_unembedding
from layers_core.models import ModelLoadError, load_model, resolve_model_source
from layers_core.norm_utils import classify_norm, unwrap_norm
from layers_core.pipeline.sweep import SweepSettings, run_sweep, self_test

PROMPT = "Give the city name only, plain text. The capital of Germany is called simply"
TOLERANCE_BITS = 2e-3
GATE_BITS = 1e-6
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "final_norm", "norm_f", "embedding_norm", "layer_norm")
_LAYER_LIST_NAMES = ("layers", "h", "blocks")


@pytest.fixture(scope="module")
def matrix_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    built: dict[str, str] = {}

    def build(family: str) -> str:
        if family not in built:
            built[family] = build_tiny_model(family, str(root / family))
        return built[family]

    return build


def _entropy_bits(log_probs):
    return float(-(log_probs.exp() * log_probs).nan_to_num().sum(-1) / math.log(2))


def _kl_bits(log_p, log_q):
    return float((log_p.exp() * (log_p - log_q)).nan_to_num().sum(-1) / math.log(2))


def _decoder_layers(hf):
    """(parent module, the decoder layers' ModuleList) found by name and length."""
    n_layers = hf.config.num_hidden_layers
    for name, module in hf.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers \
                and name.rsplit(".", 1)[-1] in _LAYER_LIST_NAMES:
            parent = hf.get_submodule(name.rsplit(".", 1)[0]) if "." in name else hf
            return parent, module
    raise AssertionError("no decoder layer list found")


def _hf_head(hf):
    """The HF model's own head on a final-normed residual ``[d]`` → float64 log-probs ``[V]``."""
    config = hf.config
    output = hf.get_output_embeddings()
    pre_head = getattr(hf, "lm_head", None)
    pre_head = None if pre_head is output else pre_head  # ModernBERT-decoder: dense, GELU, LayerNorm

    def head(x):
        z = output(pre_head(x) if pre_head is not None else x).double()
        if getattr(config, "logits_scaling", None):
            z = z / config.logits_scaling
        if getattr(config, "logit_scale", None):
            z = z * config.logit_scale
        cap = getattr(config, "final_logit_softcapping", None)
        if cap:
            z = cap * torch.tanh(z / cap)
        return torch.log_softmax(z, -1)

    return head


def _hf_residuals(hf, tokens):
    """The HF model's own residual stream at the last position: layer 0 (the input of the first
    decoder layer) and each layer's output, from forward hooks; and its own logits there."""
    _, layers = _decoder_layers(hf)
    captured = []

    def before(module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"])[0, -1])

    def after(module, args, output):
        captured.append((output[0] if isinstance(output, (tuple, list)) else output)[0, -1])

    handles = [layers[0].register_forward_pre_hook(before, with_kwargs=True)]
    handles += [layer.register_forward_hook(after) for layer in layers]
    try:
        with torch.no_grad():
            logits = hf(tokens).logits[0, -1]
    finally:
        for handle in handles:
            handle.remove()
    return captured, logits


def _final_norm(hf):
    parent, _ = _decoder_layers(hf)
    for name in _FINAL_NORM_NAMES:
        module = getattr(parent, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None  # a post-norm model whose blocks end in a norm (OpenAI GPT)


def _load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _config(path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


LENSED = sorted(set(MATRIX) - set(upstream.REFUSED))


@pytest.mark.parametrize("family", LENSED)
def test_family_passes_the_gate_and_both_lenses_match_hf_only_references(matrix_dir, family):
    path = matrix_dir(family)
    bridge = load_model(resolve_model_source(path), "cpu", torch.float32)
    unembed = analysis_unembedding(bridge, torch.float32)
    assert self_test(bridge, PROMPT, "Berlin", unembed)["kl_model_to_lens_bits"] <= GATE_BITS

    hf = _load_hf(path)
    final = run_sweep(bridge, PROMPT, "Berlin", unembed, SweepSettings(norm_strategy="final"), records=False)
    residuals, hf_logits = _hf_residuals(hf, final.tokens)
    head, final_norm = _hf_head(hf), _final_norm(hf)
    with torch.no_grad():
        normed_last = residuals[-1] if final_norm is None else final_norm(residuals[-1])
        model_log_probs = torch.log_softmax(hf_logits.double(), -1)
        # the reference's own head reproduces the HF model's logits (else the reference is wrong)
        assert _kl_bits(model_log_probs, head(normed_last)) < 1e-9
        reference = [head(h if final_norm is None else final_norm(h)) for h in residuals]
    assert len(final.pure_rows) == len(reference) == bridge.cfg.n_layers + 1
    for row, ref in zip(final.pure_rows, reference):
        assert row["entropy"] == pytest.approx(_entropy_bits(ref), abs=TOLERANCE_BITS)
        assert row["kl_to_final_bits"] == pytest.approx(_kl_bits(ref, model_log_probs), abs=TOLERANCE_BITS)
        assert row["prob1"] == pytest.approx(float(ref.max().exp()), abs=1e-4)

    arch = run_sweep(bridge, PROMPT, "Berlin", unembed, SweepSettings(norm_strategy="arch"), records=False)
    plan = NormLens(bridge, "arch").plan
    with torch.no_grad():
        for row, h, (module, _) in zip(arch.pure_rows, residuals, plan):
            ref = head(h if module is None else unwrap_norm(module)(h.reshape(1, -1))[0])
            assert row["entropy"] == pytest.approx(_entropy_bits(ref), abs=TOLERANCE_BITS)
            assert row["prob1"] == pytest.approx(float(ref.max().exp()), abs=1e-4)


@pytest.mark.parametrize("family", sorted(upstream.REFUSED))
def test_a_family_without_one_residual_stream_is_refused_in_one_line(matrix_dir, family):
    with pytest.raises(ModelLoadError) as refused:
        load_model(resolve_model_source(matrix_dir(family)), "cpu", torch.float32)
    message = str(refused.value)
    assert "\n" not in message and family in message and "cannot be lensed" in message


def _readme_family_rows() -> dict[str, list[str]]:
    with open(os.path.join(HERE, "..", "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    section = text.split("### Families", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and re.fullmatch(r"`\w+`", cells[0]):
            rows[cells[0].strip("`")] = cells
    return rows


def test_the_readme_family_table_matches_the_matrix(matrix_dir):
    """One row per family: status, the final norm's kind and the head transform, as loaded."""
    rows = _readme_family_rows()
    assert sorted(rows) == sorted(MATRIX)
    for family in MATRIX:
        status, norm_kind, transform = rows[family][1], rows[family][2], rows[family][3]
        if family in upstream.REFUSED:
            assert status.startswith("refused"), family
            continue
        assert status.startswith("exact"), family
        bridge = load_model(resolve_model_source(matrix_dir(family)), "cpu", torch.float32)
        ln_final = getattr(bridge, "ln_final", None)
        assert norm_kind == ("none" if ln_final is None else classify_norm(ln_final)), family
        config = _config(matrix_dir(family))
        expected = [name for name, key in (("softcap", "final_logit_softcapping"), ("×scale", "logit_scale"),
                                           ("÷scale", "logits_scaling")) if getattr(config, key, None)]
        if getattr(bridge, "prediction_head", None) is not None:
            expected.insert(0, "prediction head")
        assert transform == (", ".join(expected) or "–"), family
