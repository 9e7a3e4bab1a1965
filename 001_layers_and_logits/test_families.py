"""The family matrix: every attention-based, text-only decoder the pinned TransformerLens bridges.

Each family is a tiny random model built from its transformers config class
(``tiny_models.MATRIX``) and is either exact or refused in one line:
- the last-layer gate holds (KL(model ‖ lens) ≤ 1e-6 bits, float32);
- the ``final`` lens equals an HF-only reference: the HF model's own decoder-layer outputs
  (forward hooks), its own final norm module and head, and the config's head transform;
- the ``arch`` lens equals each planned norm's own HF ``forward`` on the HF residual (our
  float32 re-implementation of every norm kind against the module itself);
- where the blocks decompose, the attribution parts add up to the HF head's own answer logit.
The reference's head is checked against the HF model's own logits first, so a wrong reference
cannot pass. The docs' family table (docs/models.md) is checked against the same facts.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from hf_reference import entropy_bits, final_norm, hf_head, hf_residuals, kl_bits, load_hf
from tiny_models import MATRIX, build_tiny_model

from conftest import HERE
from layers_core.lens.protocol import NormLens
from layers_core.model import upstream
from layers_core.model.lens_model import analysis_unembedding
from layers_core.model.loading import ModelLoadError, load_model, resolve_model_source
from layers_core.norm_utils import classify_norm, unwrap_norm
from layers_core.pipeline.attribution import attribute, not_decomposable
from layers_core.pipeline.sweep import SweepSettings, run_sweep, self_test

PROMPT = "Give the city name only, plain text. The capital of Germany is called simply"
TOLERANCE_BITS = 2e-3
GATE_BITS = 1e-6


@pytest.fixture(scope="module")
def matrix_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    built: dict[str, str] = {}

    def build(family: str) -> str:
        if family not in built:
            built[family] = build_tiny_model(family, str(root / family))
        return built[family]

    return build


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

    hf = load_hf(path)
    final = run_sweep(bridge, PROMPT, "Berlin", unembed, SweepSettings(norm_strategy="final", records=False))
    residuals, hf_logits = hf_residuals(hf, final.tokens)
    head, norm = hf_head(hf), final_norm(hf)
    with torch.no_grad():
        normed_last = residuals[-1] if norm is None else norm(residuals[-1])
        model_log_probs = torch.log_softmax(hf_logits.double(), -1)
        # the reference's own head reproduces the HF model's logits (else the reference is wrong)
        assert kl_bits(model_log_probs, head(normed_last)) < 1e-9
        reference = [head(h if norm is None else norm(h)) for h in residuals]
    assert len(final.pure_rows) == len(reference) == bridge.cfg.n_layers + 1
    for row, ref in zip(final.pure_rows, reference):
        assert row["entropy"] == pytest.approx(entropy_bits(ref), abs=TOLERANCE_BITS)
        assert row["kl_to_final_bits"] == pytest.approx(kl_bits(ref, model_log_probs), abs=TOLERANCE_BITS)
        assert row["prob1"] == pytest.approx(float(ref.max().exp()), abs=1e-4)

    if not_decomposable(bridge) is None:  # the attribution parts add up to the model's own logit
        split = attribute(bridge, final.tokens, 11)
        with torch.no_grad():
            own = float(hf.get_output_embeddings()(normed_last)[11])
        assert sum(part[2] for part in split.parts) + split.bias == pytest.approx(own, rel=1e-4, abs=1e-6)

    arch = run_sweep(bridge, PROMPT, "Berlin", unembed, SweepSettings(norm_strategy="arch", records=False))
    plan = NormLens(bridge, "arch").plan
    with torch.no_grad():
        for row, h, (module, _) in zip(arch.pure_rows, residuals, plan):
            ref = head(h if module is None else unwrap_norm(module)(h.reshape(1, -1))[0])
            assert row["entropy"] == pytest.approx(entropy_bits(ref), abs=TOLERANCE_BITS)
            assert row["prob1"] == pytest.approx(float(ref.max().exp()), abs=1e-4)


@pytest.mark.parametrize("family", sorted(upstream.REFUSED))
def test_a_family_without_one_residual_stream_is_refused_in_one_line(matrix_dir, family):
    with pytest.raises(ModelLoadError) as refused:
        load_model(resolve_model_source(matrix_dir(family)), "cpu", torch.float32)
    message = str(refused.value)
    assert "\n" not in message and family in message and "cannot be lensed" in message


def _docs_family_rows() -> dict[str, list[str]]:
    with open(os.path.join(HERE, "..", "docs", "models.md"), encoding="utf-8") as handle:
        text = handle.read()
    section = text.split("## Families", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and re.fullmatch(r"`\w+`", cells[0]):
            rows[cells[0].strip("`")] = cells
    return rows


def test_the_docs_family_table_matches_the_matrix(matrix_dir):
    """One row per family: status, the final norm's kind and the head transform, as loaded."""
    rows = _docs_family_rows()
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
