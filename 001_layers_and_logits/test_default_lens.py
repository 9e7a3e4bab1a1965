"""The standard logit lens by default; ``--norm arch`` never silent; milestones that hold; chat.

Round 3 made ``final`` (ln_final at every layer) the default: the seed's next-block ``ln1`` rule
reads noise on real models and stays available, exactly, under ``--norm arch``.
"""

import csv
import json
import os

import pandas as pd
import pytest
import run
from tiny_models import build_tiny_model

from conftest import assert_clean_failure
from layers_core.results.set_document import SCHEMA_VERSION
from layers_core.results.set_files import read_prompt_entries


def _json(directory, name):
    with open(os.path.join(directory, f"output-{name}.json"), encoding="utf-8") as handle:
        return json.load(handle)


def _rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


@pytest.fixture(scope="module")
def olmo2_dir(tmp_path_factory):
    return build_tiny_model("olmo2", str(tmp_path_factory.mktemp("olmo2") / "olmo2"))


def test_no_flags_on_the_bundled_model_is_exactly_norm_final(bundled_model_dir, tmp_path):
    default, final = tmp_path / "default", tmp_path / "final"
    assert run.main(["--device", "cpu", "--out_dir", str(default), "--no-plots", "--quiet"]) == 0
    assert run.main(["--device", "cpu", "--out_dir", str(final), "--no-plots", "--quiet", "--norm", "final"]) == 0
    name = "SmolLM2-135M-Instruct"
    pure = f"output-{name}-pure-next-token.csv"
    assert _rows(default / pure) == _rows(final / pure)
    document = _json(default, name)
    assert document["diagnostics"]["norm_strategy"]["name"] == "final"
    assert document["lens_comparison"]["other"] == "arch"  # the seed's rule, written beside it
    assert (default / f"output-{name}-pure-next-token-arch.csv").exists()
    assert document["schema_version"] == SCHEMA_VERSION == 4
    # the standard lens on the bundled model: ` Berlin` climbs through the last layers (docs/outputs.md)
    header, *rows = _rows(default / pure)
    ranks = [int(row[header.index("answer_rank")]) for row in rows]
    assert ranks[-1] == 1 and ranks[28] > ranks[29] > 1


def test_arch_on_a_layout_without_pre_sublayer_norms_applies_ln_final_and_says_so(olmo2_dir, tmp_path):
    """OLMo-2 norms only its sublayers' outputs: under the seed's rule the residual stream met no
    norm at all before (silently), with labels claiming pre_norm and ln1. Now arch applies
    ln_final, names it at every layer, and every label says what was done."""
    arch, final = tmp_path / "arch", tmp_path / "final"
    for out, norm in ((arch, "arch"), (final, "final")):
        assert run.main(["--device", "cpu", olmo2_dir, "--out_dir", str(out), "--no-plots", "--quiet",
                         "--norm", norm]) == 0
    diag = _json(arch, "olmo2")["diagnostics"]
    assert [entry["norm"] for entry in diag["norm_strategy"]["per_layer"]] == ["ln_final"] * 4
    assert diag["norm_strategy"]["architecture"] == "post_sublayer_norm"
    assert _json(arch, "olmo2")["model_stats"]["architecture"] == "post_sublayer_norm"
    assert diag["layer0_norm_fix"] == "using_ln_final_on_embeddings"
    assert diag["norm_alignment_fix"] == "using_ln_final_for_post_block"
    assert diag["first_block_ln1_type"] is None
    assert diag["last_layer_consistency"]["passed"] is True
    pure = "output-olmo2-pure-next-token.csv"
    assert _rows(arch / pure) == _rows(final / pure)  # the same norm, so the same rows


@pytest.mark.parametrize("family,after_block0", [("gpt-neox", "using_next_ln1_for_post_block"),
                                                 ("phi", "using_next_ln1_for_post_block"),
                                                 ("llama", "using_next_ln1_for_post_block")])
def test_arch_names_the_norm_of_every_layer(tiny_dirs, tmp_path, family, after_block0):
    """Parallel blocks (GPT-NeoX, Phi) keep the seed's rule: the next block's ln1."""
    assert run.main(["--device", "cpu", tiny_dirs[family], "--out_dir", str(tmp_path), "--no-plots", "--quiet",
                     "--norm", "arch"]) == 0
    diag = _json(tmp_path, family)["diagnostics"]
    norms = [entry["norm"] for entry in diag["norm_strategy"]["per_layer"]]
    n = len(norms) - 1
    assert norms == ["blocks[0].ln1", *[f"blocks[{i}].ln1" for i in range(1, n)], "ln_final"]
    assert diag["norm_alignment_fix"] == after_block0
    assert diag["layer0_norm_fix"] == "using_real_ln1_on_embeddings"


def _semantic_milestones_from(pure):
    """An independent recomputation of the two milestones from a pure CSV's columns."""
    rank, layers = pure["answer_rank"].tolist(), pure["layer"].tolist()
    stable = None
    for index in range(len(rank) - 1, -1, -1):
        if rank[index] != "1":
            break
        stable = int(layers[index])
    margin = next((int(layer) for layer, r, p, p2 in zip(layers, rank, pure["p_answer"], pure["prob2"])
                   if r == "1" and float(p) - float(p2) >= 0.1), None)
    return stable, margin


def test_semantic_milestones_hold_and_match_the_pure_csv(bundled_model_dir, tmp_path):
    assert run.main(["--device", "cpu", "--out_dir", str(tmp_path), "--no-plots", "--quiet"]) == 0
    name = "SmolLM2-135M-Instruct"
    pure = pd.read_csv(tmp_path / f"output-{name}-pure-next-token.csv", dtype=str, keep_default_na=False)
    diag = _json(tmp_path, name)["diagnostics"]
    assert (diag["L_semantic_stable"], diag["L_semantic_margin"]) == _semantic_milestones_from(pure)
    assert diag["L_semantic_stable"] == 30 and diag["L_semantic_margin"] == 30
    assert diag["depth_fractions"]["L_semantic_stable"] == 1.0


def test_a_milestone_that_does_not_hold_is_not_stable():
    from layers_core.collapse_rules import semantic_milestones

    rows = [{"layer": i, "answer_rank": r, "p_answer": p, "prob2": p2}
            for i, (r, p, p2) in enumerate([(9, 0.01, 0.2), (1, 0.30, 0.25), (2, 0.2, 0.3), (1, 0.5, 0.3),
                                             (1, 0.6, 0.2)])]
    assert semantic_milestones(rows) == {"L_semantic_stable": 3, "L_semantic_margin": 3}
    rows[-1]["answer_rank"] = 2
    assert semantic_milestones(rows)["L_semantic_stable"] is None  # not rank 1 at the last layer
    assert semantic_milestones(rows[:2])["L_semantic_margin"] is None  # a lead of 0.05 < 0.1


def test_set_summary_and_comparison_carry_the_milestones(tiny_dirs, tmp_path):
    from layers_core.results.merge import COMPARISON_COLUMNS
    from layers_core.results.prompt_sets import SUMMARY_COLUMNS

    facts = tmp_path / "facts.jsonl"
    facts.write_text('{"id": "a", "prompt": "The capital of Germany is", "answer": "Berlin"}\n'
                     '{"id": "b", "prompt": "Paris is the capital of", "answer": "France"}\n')
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--prompts", str(facts), "--out_dir", str(tmp_path),
                     "--no-plots", "--quiet"]) == 0
    summary = pd.read_csv(tmp_path / "output-llama-summary.csv", dtype=str, keep_default_na=False)
    pure = pd.read_csv(tmp_path / "output-llama-pure-next-token.csv", dtype=str, keep_default_na=False)
    document = _json(tmp_path, "llama")
    entries = read_prompt_entries(tmp_path / "output-llama-prompts.jsonl")
    for entry, (_, row) in zip(entries, summary.iterrows()):
        expected = _semantic_milestones_from(pure[pure["prompt_id"] == row["prompt_id"]])
        as_text = tuple("" if v is None else str(v) for v in expected)
        assert (row["L_semantic_stable"], row["L_semantic_margin"]) == as_text
        assert (entry["diagnostics"]["L_semantic_stable"], entry["diagnostics"]["L_semantic_margin"]) == expected
    assert {"L_semantic_stable", "L_semantic_margin"} <= set(document["aggregate"]["layer_indices"])
    assert {"L_semantic_stable", "L_semantic_margin"} <= set(SUMMARY_COLUMNS) & set(COMPARISON_COLUMNS)


def test_chat_wraps_the_prompt_in_the_template(bundled_model_dir, tmp_path, capsys):
    """--chat warned "the prompt ends in whitespace" about the template's own newline, and
    ``templated_prompt`` lacked its leading ``<|im_start|>``."""
    assert run.main(["--device", "cpu", "--out_dir", str(tmp_path), "--no-plots", "--quiet", "--chat"]) == 0
    assert "whitespace" not in capsys.readouterr().err
    document = _json(tmp_path, "SmolLM2-135M-Instruct")
    block = document["prompt"]
    assert block["chat_template"] is True and block["context_prompt"].startswith("Give the city name only")
    assert block["templated_prompt"].startswith("<|im_start|>system\n")
    assert document["diagnostics"]["gold_alignment"]["warnings"] == []
    assert block["templated_prompt"].endswith("<|im_start|>user\n" + block["context_prompt"]
                                              + "<|im_end|>\n<|im_start|>assistant\n")
    assert document["gold_answer"]["variant"] == "no_space"  # the assistant's turn starts the answer
    assert document["diagnostics"]["last_layer_consistency"]["passed"] is True


def test_chat_without_a_template_is_refused_in_one_line(tiny_dirs, tmp_path, capsys):
    code = run.main(["--device", "cpu", tiny_dirs["llama"], "--out_dir", str(tmp_path), "--no-plots", "--quiet",
                     "--chat"])
    captured = capsys.readouterr()
    assert_clean_failure(captured, code, 1)
    assert "has no chat template" in captured.err


def _hf_mid_reference(path, tokens):
    """HF only: the input of each layer's post_attention_layernorm (the residual after attention),
    then the final norm and lm_head, at the last position; float64 log-probs per block."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    captured = []
    handles = [layer.post_attention_layernorm.register_forward_pre_hook(
        lambda module, args: captured.append(args[0][0, -1].detach())) for layer in hf.model.layers]
    try:
        with torch.no_grad():
            hf(tokens)
            rows = [torch.log_softmax(hf.lm_head(hf.model.norm(x)).double(), -1) for x in captured]
    finally:
        for handle in handles:
            handle.remove()
    return rows


def test_sublayers_on_tiny_llama_match_an_hf_only_reference(tiny_dirs, tmp_path):
    import math

    import torch

    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--out_dir", str(tmp_path), "--no-plots", "--quiet",
                     "--sublayers"]) == 0
    pure = pd.read_csv(tmp_path / "output-llama-pure-next-token.csv", dtype=str, keep_default_na=False)
    n = 3
    assert len(pure) == 2 * n + 1
    assert list(zip(pure["layer"].astype(int), pure["sublayer"])) == [
        (0, "block"), (1, "attn"), (1, "block"), (2, "attn"), (2, "block"), (3, "attn"), (3, "block")]
    records = pd.read_csv(tmp_path / "output-llama-records.csv", dtype=str, keep_default_na=False)
    assert len(records) == (2 * n + 1) * (int(pure["pos"].iloc[0]) + 1)
    from layers_core.model.loading import load_model, resolve_model_source

    bridge = load_model(resolve_model_source(tiny_dirs["llama"]), "cpu", torch.float32)
    reference = _hf_mid_reference(tiny_dirs["llama"], bridge.to_tokens(run.ExperimentConfig().prompt))
    attn = pure[pure["sublayer"] == "attn"]
    for (_, row), ref in zip(attn.iterrows(), reference):
        entropy = float(-(ref.exp() * ref).nan_to_num().sum() / math.log(2))
        assert float(row["entropy"]) == pytest.approx(entropy, abs=1e-4)
        assert float(row["prob1"]) == pytest.approx(float(ref.max().exp()), abs=1e-5)
    document = _json(tmp_path, "llama")
    assert document["diagnostics"]["last_layer_consistency"]["passed"] is True
    assert float(pure["kl_to_final_bits"].iloc[-1]) < 1e-6  # the last block row is the model


def test_sublayer_milestones_count_only_block_rows(tiny_dirs, tmp_path):
    plain, halves = tmp_path / "plain", tmp_path / "halves"
    for out, extra in ((plain, []), (halves, ["--sublayers"])):
        assert run.main(["--device", "cpu", tiny_dirs["gpt2"], "--out_dir", str(out), "--no-plots", "--quiet",
                         *extra]) == 0
    a, b = _json(plain, "gpt2")["diagnostics"], _json(halves, "gpt2")["diagnostics"]
    for key in ("L_copy", "L_semantic", "L_semantic_stable", "milestones", "depth_fractions"):
        assert a[key] == b[key], key
    block_rows = pd.read_csv(halves / "output-gpt2-pure-next-token.csv").query("sublayer == 'block'")
    plain_rows = pd.read_csv(plain / "output-gpt2-pure-next-token.csv")
    assert block_rows.drop(columns="sublayer").reset_index(drop=True).equals(plain_rows)


@pytest.mark.parametrize("family", ["gpt-neox", "phi"])
def test_sublayers_are_refused_for_parallel_blocks(tiny_dirs, tmp_path, capsys, family):
    code = run.main(["--device", "cpu", tiny_dirs[family], "--out_dir", str(tmp_path), "--no-plots", "--quiet",
                     "--sublayers"])
    captured = capsys.readouterr()
    assert_clean_failure(captured, code, 1)
    assert "parallel blocks" in captured.err


def test_the_pictures_show_mid_reads_as_half_steps(load_bridge):
    import layers_core as lc

    s = lc.sweep(lc.load(load_bridge("llama")), "The capital of Germany is", "Berlin",
                 settings=lc.SweepSettings(sublayers=True))
    heatmap = s.lens_figure()
    labels = [t.get_text().split("  ◀")[0] for t in heatmap.axes[0].get_yticklabels()]
    assert labels == ["0", "1−½ attn", "1", "2−½ attn", "2", "3−½ attn", "3"]
    curves = s.curves_figure()
    xs = curves.axes[0].lines[0].get_xdata()
    assert list(xs) == [0, 0.5, 1, 1.5, 2, 2.5, 3]
