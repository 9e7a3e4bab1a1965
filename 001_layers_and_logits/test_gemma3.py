"""Gemma-3-270M, the second real model (base, Q4_K_M from the package index, dequantised once).

18 layers, d_model 640, vocabulary 262,144, tied embeddings, sandwich norms ((1+w) RMSNorm).
The facts asserted here are the ones docs/models.md quotes.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from hf_reference import entropy_bits, final_norm, hf_head, hf_residuals, kl_bits, load_hf

from conftest import RUN_PY
from layers_core.model.lens_model import analysis_unembedding
from layers_core.model.loading import load_model, resolve_model_source
from layers_core.pipeline.sweep import SweepSettings, run_sweep, self_test

PROMPT = "Give the city name only, plain text. The capital of Germany is called simply"
EXPECTED_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


@pytest.fixture(scope="module")
def gemma3(gemma3_model_dir):
    return load_model(resolve_model_source(gemma3_model_dir), "cpu", torch.float32)


@pytest.fixture(scope="module")
def gemma3_final(gemma3):
    unembed = analysis_unembedding(gemma3, torch.float32)
    return run_sweep(gemma3, PROMPT, "Berlin", unembed, SweepSettings(norm_strategy="final", records=False))


def test_resolves_by_name_to_the_local_package_never_the_hub(gemma3_model_dir):
    source = resolve_model_source("gemma-3-270m")
    assert source.kind == "packaged" and source.clean_name == "gemma-3-270m"
    assert resolve_model_source("Gemma-3-270M").kind == "packaged"
    cfg = json.load(open(os.path.join(gemma3_model_dir, "config.json")))
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (18, 640, 262144)


def test_the_gate_holds(gemma3):
    unembed = analysis_unembedding(gemma3, torch.float32)
    assert self_test(gemma3, PROMPT, "Berlin", unembed)["kl_model_to_lens_bits"] <= 1e-6


def test_the_standard_lens_matches_an_hf_only_reference(gemma3_model_dir, gemma3_final):
    hf = load_hf(gemma3_model_dir)
    residuals, logits = hf_residuals(hf, gemma3_final.tokens)
    head, norm = hf_head(hf), final_norm(hf)
    with torch.no_grad():
        model_log_probs = torch.log_softmax(logits.double(), -1)
        reference = [head(norm(h)) for h in residuals]
    assert kl_bits(model_log_probs, reference[-1]) < 1e-6
    assert len(reference) == len(gemma3_final.pure_rows) == 19
    for row, ref in zip(gemma3_final.pure_rows, reference):
        assert row["entropy"] == pytest.approx(entropy_bits(ref), abs=2e-3)
        assert row["kl_to_final_bits"] == pytest.approx(kl_bits(ref, model_log_probs), abs=2e-3)
        assert row["prob1"] == pytest.approx(float(ref.max().exp()), abs=1e-4)


def test_the_documented_facts_on_the_legacy_prompt(gemma3_final):
    """` Berlin` first becomes rank 1 at layer 17 of 18 and does not stay: the base model's own
    top-1 is ` "` (` Berlin` rank 6, p ≈ 0.051)."""
    rows = gemma3_final.pure_rows
    ranks = [row["answer_rank"] for row in rows]
    assert ranks.index(1) == 17 and ranks[18] == 6
    assert rows[18]["top1"] == ' "' and rows[17]["top1"] == " Berlin"
    assert rows[18]["p_answer"] == pytest.approx(0.0512, abs=0.005)
    assert rows[17]["p_answer"] == pytest.approx(0.392, abs=0.02)


def test_bfloat16_agrees_with_float32(gemma3_model_dir, gemma3_final):
    """docs/models.md: bf16 gives the same top-1 at 18 of 19 layers, entropy within 0.21 bits (mean
    0.064), and its gate KL is ≈ 2e-4 bits (half-precision tolerance 1e-2)."""
    bridge = load_model(resolve_model_source(gemma3_model_dir), "cpu", torch.bfloat16)
    unembed = analysis_unembedding(bridge, torch.bfloat16)
    half = run_sweep(bridge, PROMPT, "Berlin", unembed, SweepSettings(norm_strategy="final", records=False))
    pairs = list(zip(gemma3_final.pure_rows, half.pure_rows))
    assert sum(a["top1"] == b["top1"] for a, b in pairs) >= 18
    drift = [abs(a["entropy"] - b["entropy"]) for a, b in pairs]
    assert max(drift) < 0.3 and sum(drift) / len(drift) < 0.1
    assert self_test(bridge, PROMPT, "Berlin", unembed)["kl_model_to_lens_bits"] < 1e-2


def _pure_rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_the_gguf_file_runs_and_equals_the_dequantised_directory(gemma3_gguf, gemma3_model_dir, tmp_path):
    """``run.py <the assembled .gguf>`` dequantises it (cached by content hash) and its rows equal
    those of the packaged directory (the same file: its conversion is reused)."""
    out_file, out_dir = tmp_path / "file", tmp_path / "dir"
    flags = ["--no-plots", "--quiet", "--no-control"]
    for model, out in ((gemma3_gguf, out_file), (gemma3_model_dir, out_dir)):
        subprocess.run([sys.executable, RUN_PY, model, "--out_dir", str(out), *flags], check=True)
    from_file = _pure_rows(out_file / "output-gemma-3-270m-q4_k_m-pure-next-token.csv")
    from_dir = _pure_rows(out_dir / f"output-{os.path.basename(gemma3_model_dir)}-pure-next-token.csv")
    assert len(from_file) == 19 and from_file == from_dir
    provenance = json.load(open(out_file / "output-gemma-3-270m-q4_k_m.json"))["provenance"]
    assert provenance["model_source"] == "gguf"
    assert provenance["gguf"]["gguf_sha256"] == EXPECTED_SHA256
    assert provenance["gguf"]["gguf_quantization"] == "MOSTLY_Q4_K_M"
    assert provenance["gguf"]["gguf_architecture"] == "gemma3"


def test_a_directory_holding_one_gguf_is_that_file(gemma3_gguf, tmp_path):
    (tmp_path / "model.gguf").symlink_to(gemma3_gguf)
    source = resolve_model_source(str(tmp_path))
    assert source.kind == "gguf" and source.path == str(tmp_path / "model.gguf")
    (tmp_path / "other.gguf").symlink_to(gemma3_gguf)
    from layers_core.model.loading import ModelLoadError

    with pytest.raises(ModelLoadError, match="holds 2 .gguf files"):
        resolve_model_source(str(tmp_path))


def test_a_20_fact_battery(gemma3_model_dir, tmp_path):
    """docs/models.md: of the first 20 capitals, ` <capital>`'s first piece reaches rank 1 on 9 (8 of them
    stay), and rank ≤ 5 on 17; the final top-1 is ` "` on 9 of them."""
    facts = tmp_path / "facts.jsonl"
    with open(os.path.join(os.path.dirname(RUN_PY), "facts", "capitals.jsonl"), encoding="utf-8") as handle:
        facts.write_text("".join(handle.readlines()[:20]), encoding="utf-8")
    out = tmp_path / "out"
    subprocess.run([sys.executable, RUN_PY, "gemma-3-270m", "--prompts", str(facts), "--out_dir", str(out),
                    "--no-plots", "--quiet"], check=True)
    with open(out / "output-gemma-3-270m-summary.csv", newline="", encoding="utf-8") as handle:
        summary = list(csv.DictReader(handle))
    assert len(summary) == 20
    assert sum(row["L_semantic"] != "" for row in summary) == 9
    assert sum(row["L_semantic_stable"] != "" for row in summary) == 8
    assert sum(row["first_rank_le_5"] != "" for row in summary) == 17
    assert sum(row["final_top1"] == ' "' for row in summary) == 9
    kabul = next(row for row in summary if row["prompt_id"] == "Afghanistan")
    assert kabul["L_semantic"] == kabul["L_semantic_stable"] == "16"
    assert float(kabul["final_p_answer"]) == pytest.approx(0.360, abs=0.01)
