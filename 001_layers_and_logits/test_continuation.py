"""The lens over a continuation: each token's rank per layer and its commit layer, checked against
the Hugging Face model alone; generation equal to transformers' own ``generate``."""

from __future__ import annotations

import json

import pytest
import torch
from hf_reference import final_norm, hf_all_residuals, hf_head, load_hf

import layers_core as lc
from layers_core.pipeline.sweep import SweepSettings

PROMPT = "The capital of France is"


def _hf_ranks(path, ids):
    """The HF model's own residuals at every position of ``ids``, its final norm and head."""
    hf = load_hf(path)
    captured, _ = hf_all_residuals(hf, ids)
    return captured, hf_head(hf), final_norm(hf)


def test_ranks_probabilities_and_commit_layers_equal_the_hf_models_own(tiny_dirs):
    lm = lc.load(tiny_dirs["llama"], device="cpu", dtype="float32")
    s = lc.sweep(lm, PROMPT, None, settings=SweepSettings(continuation=" Paris and the capital of Germany is",
                                                          records=False))
    rows = s.continuation[s.continuation.lens == "final"].reset_index(drop=True)
    ids = rows.token_id.tolist()
    prompt_ids = lm.bridge.to_tokens(PROMPT)[0].tolist()
    captured, head, norm = _hf_ranks(tiny_dirs["llama"], prompt_ids + ids[:-1])
    records = s.continuation_records[s.continuation_records.lens == "final"]
    for index, token_id in enumerate(ids):
        pos = len(prompt_ids) - 1 + index
        with torch.no_grad():
            log_probs = [head(norm(resid[pos])).float() for resid in captured]
        ranks = [int((lp > lp[token_id]).sum()) + 1 for lp in log_probs]
        mine = records[records.pos == pos].sort_values("layer")
        assert mine["rank"].tolist() == ranks, index
        assert mine.p.tolist() == pytest.approx([float(lp[token_id].exp()) for lp in log_probs], abs=1e-6)
        committed = None
        if ranks[-1] == 1:
            committed = len(ranks) - 1
            while committed > 0 and ranks[committed - 1] == 1:
                committed -= 1
        assert (None if rows.commit_layer.isna()[index] else int(rows.commit_layer[index])) == committed
        top5 = next((layer for layer, rank in enumerate(ranks) if rank <= 5), None)
        assert (None if rows.first_top5_layer.isna()[index] else int(rows.first_top5_layer[index])) == top5
    assert set(s.continuation.lens) == {"final", "arch"}


def test_a_generation_equals_transformers_greedy_generate_and_is_written(bundled_model_dir, tmp_path):
    import run
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    assert run.main(["--device", "cpu", "--quiet", "--no-plots", "--out_dir", str(out), "--prompt", PROMPT,
                     "--answer", "Paris", "--generate", "8", "--no-records"]) == 0
    rows = lc.read_csv(str(out / "output-SmolLM2-135M-Instruct-continuation.csv"))
    final = rows[rows.lens == "final"]
    hf = AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32).eval()
    lm_tokens = lc.load(bundled_model_dir).bridge.to_tokens(PROMPT)
    greedy = hf.generate(lm_tokens, attention_mask=torch.ones_like(lm_tokens), max_new_tokens=8, do_sample=False)
    assert final.token_id.tolist() == greedy[0, lm_tokens.shape[1]:].tolist()
    assert final.commit_layer.notna().all()  # a greedy token is top-1 at the last layer
    document = json.loads((out / "output-SmolLM2-135M-Instruct.json").read_text())
    block = document["continuation"]
    assert block["source"] == "generated" and block["token_ids"] == final.token_id.tolist()
    assert 0 < block["lenses"]["final"]["mean_commit_depth"] <= 1
    records = lc.read_csv(str(out / "output-SmolLM2-135M-Instruct-continuation-records.csv"))
    assert len(records) == 2 * 8 * 31  # two lenses × tokens × layers


def test_bad_continuation_flags_fail_in_one_line(capsys):
    import run

    from conftest import assert_clean_failure

    for bad in (["--generate", "3", "--continuation", "x"], ["--temperature", "0.5"], ["--generate", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            run.main(["--prompt", "x", *bad])
        assert_clean_failure(capsys.readouterr(), exit_info.value.code, 2)
