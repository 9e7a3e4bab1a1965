"""The read-outs beyond the logit lens: the Jacobian lens, direct logit attribution, every lens
side by side, tracked tokens and the residual stream as a tensor."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_models import FAMILIES

import layers_core as lc
from conftest import HERE, RUN_PY
from layers_core.lens.jacobian import JacobianLensReader, fit_prompts
from layers_core.model.loading import load_model, resolve_model_source
from layers_core.pipeline.attribution import attribute, not_decomposable
from layers_core.pipeline.fit import evaluation_split

FIT_LENS = os.path.join(HERE, "fit_lens.py")
PROMPT = "Give the city name only, plain text. The capital of Germany is called simply"
CORPUS_LINES = [
    "The capital of France is Paris and the capital of Germany is Berlin, which lies on the Spree.",
    "Rivers run to the sea; mountains rise over valleys where towns have grown for a thousand years.",
    "A lens maps every layer of a model to the words it would predict if it stopped there and then.",
] * 120  # 2,048 held-out tokens first, then the fits' text
N_PROMPTS, SEQ_LEN, DIM_BATCH = 3, 24, 16


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(CORPUS_LINES), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def jacobian_artifact(tiny_dirs, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("jlens")
    subprocess.run([sys.executable, FIT_LENS, tiny_dirs["llama"], "--kind", "jacobian", "--corpus", corpus,
                    "--prompts", str(N_PROMPTS), "--max-seq-len", str(SEQ_LEN), "--dim-batch", str(DIM_BATCH),
                    "--out", str(out), "--device", "cpu"], check=True, capture_output=True)
    return out


def test_fit_lens_jacobian_equals_transformer_lens_fit_on_the_same_prompts(tiny_dirs, corpus, jacobian_artifact):
    from transformer_lens.tools.analysis import JacobianLens

    from layers_core.lens.tuned import read_corpus

    bridge = load_model(resolve_model_source(tiny_dirs["llama"]), "cpu", torch.float32)
    _, rest = evaluation_split(bridge.tokenizer, read_corpus([corpus]))
    prompts = fit_prompts(bridge.tokenizer, rest, N_PROMPTS, SEQ_LEN)
    direct = JacobianLens.fit(bridge, prompts, corpus=corpus, dim_batch=DIM_BATCH, max_seq_len=SEQ_LEN,
                              show_progress=False)
    saved = JacobianLens.load(str(jacobian_artifact / "llama_jacobian_lens.pt"))
    assert saved.source_layers == direct.source_layers == [0, 1]  # 3 blocks: the last needs none
    assert saved.n_prompts == direct.n_prompts == N_PROMPTS
    for layer in direct.source_layers:
        expected = direct.jacobians[layer].to(torch.float16).float()  # the artifact stores float16
        assert torch.equal(saved.jacobians[layer], expected)
        assert not torch.allclose(expected, torch.eye(expected.shape[0]), atol=1e-2)  # a real transport
    report = json.load(open(jacobian_artifact / "eval.json"))
    assert report["kind"] == "jacobian" and {"logit", "jacobian"} <= set(report["layers"][0])


def test_both_fits_are_evaluated_on_the_same_held_out_text(tiny_dirs, corpus, jacobian_artifact, tmp_path):
    subprocess.run([sys.executable, FIT_LENS, tiny_dirs["llama"], "--corpus", corpus, "--tokens", "1024",
                    "--out", str(tmp_path), "--device", "cpu"], check=True, capture_output=True)
    tuned = json.load(open(tmp_path / "eval.json"))
    jacobian = json.load(open(jacobian_artifact / "eval.json"))
    assert tuned["heldout"] == jacobian["heldout"] and tuned["tokens"]["evaluated"] == 2048
    for ours, theirs in zip(tuned["layers"], jacobian["layers"], strict=True):  # one logit-lens baseline
        assert ours["logit"] == pytest.approx(theirs["logit"], rel=1e-6)
    assert {"logit", "tuned"} <= set(tuned["layers"][0]) and {"logit", "jacobian"} <= set(jacobian["layers"][0])


def test_jacobian_lens_rows_equal_transformer_lens_readout(tiny_dirs, jacobian_artifact):
    lm = lc.load(tiny_dirs["llama"])
    path = str(jacobian_artifact / "llama_jacobian_lens.pt")
    s = lc.sweep(lm, PROMPT, "Berlin", lens="jacobian", settings=lc.SweepSettings(lens_path=path))
    assert s.diagnostics["last_layer_consistency"]["passed"]
    readout = JacobianLensReader.load(path).lens.readout(lm.bridge, s.analysis.result.tokens, positions=[-1],
                                                          return_full_logits=True)
    n_layers = lm.n_layers
    for tl_layer, logits in readout.lens_logits.items():
        log_probs = torch.log_softmax(logits[0].double(), -1)
        entropy = float(-(log_probs.exp() * log_probs).sum() / math.log(2))
        row = s.pure.iloc[tl_layer + 1]  # TL's layer l is block l's output: our layer l + 1
        assert row["entropy"] == pytest.approx(entropy, abs=1e-5)
    marks = [row["transport"] for row in s.diagnostics["norm_strategy"]["per_layer"]]
    assert marks[0].startswith("none: the format has no matrix for the embeddings")
    assert marks[1:n_layers] == [f"J[{layer}]" for layer in range(n_layers - 1)]
    assert marks[n_layers].startswith("identity")


def test_run_py_lens_jacobian_and_a_missing_file_is_a_usage_error(tiny_dirs, jacobian_artifact, tmp_path, capsys):
    import run

    assert run.main([tiny_dirs["llama"], "--lens", "jacobian", "--lens-path", str(jacobian_artifact),
                     "--out_dir", str(tmp_path / "out"), "--quiet", "--no-plots"]) == 0
    document = json.load(open(tmp_path / "out" / "output-llama.json"))
    assert document["diagnostics"]["norm_strategy"]["name"] == "jacobian"
    assert document["provenance"]["lens"]["fingerprint"]["config_hash"]
    with pytest.raises(SystemExit) as usage:
        run.main([tiny_dirs["llama"], "--lens", "jacobian", "--lens-path", str(tmp_path / "none.pt")])
    assert usage.value.code == 2 and "no jacobian lens there" in capsys.readouterr().err


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_attribution_parts_add_up_to_the_models_own_answer_logit(load_bridge, family):
    model = load_bridge(family)
    assert not_decomposable(model) is None
    tokens = model.to_tokens(PROMPT)
    answer, control = 11, 12
    split = attribute(model, tokens, answer, control)
    with torch.no_grad():
        hf = model.original_model
        hidden = hf(tokens, output_hidden_states=True).hidden_states[-1][0, -1]  # after the final norm
        head_logit = float(hf.get_output_embeddings()(hidden)[answer])  # before the softcap
        control_logit = float(hf.get_output_embeddings()(hidden)[control])
    total = sum(part[2] for part in split.parts) + split.bias
    assert total == pytest.approx(head_logit, rel=1e-4, abs=1e-6)
    total_vs = sum(part[3] for part in split.parts) + split.bias_vs_control
    assert total_vs == pytest.approx(head_logit - control_logit, rel=1e-4, abs=1e-6)
    components = [part[1] for part in split.parts]
    assert components[0] == "embed" and components[-1] == "norm_bias"
    assert components.count("attn") == components.count("mlp") == model.cfg.n_layers


def test_attribution_agrees_with_transformer_lens_in_compatibility_mode(tiny_dirs):
    """A separate copy in compatibility mode (folded norms, no unembedding centring): TL's
    per-layer attention and MLP parts equal ours on the raw model within 1e-3."""
    from transformer_lens.tools.analysis import direct_logit_attribution

    raw = load_model(resolve_model_source(tiny_dirs["llama"]), "cpu", torch.float32)
    folded = load_model(resolve_model_source(tiny_dirs["llama"]), "cpu", torch.float32)
    folded.enable_compatibility_mode(disable_warnings=True, center_unembed=False)
    tokens = raw.to_tokens(PROMPT)
    ours = attribute(raw, tokens, 11)
    theirs = direct_logit_attribution(folded, tokens, answer_tokens=torch.tensor([11]))
    by_label = dict(zip(theirs.labels, theirs.attribution.reshape(len(theirs.labels)).tolist()))
    for layer, component, value, _ in ours.parts:
        if component in ("attn", "mlp"):
            assert value == pytest.approx(by_label[f"{layer - 1}_{component}_out"], abs=1e-3)


def test_hybrid_blocks_get_a_note_and_the_run_succeeds(tmp_path):
    import run
    from tiny_models import build_tiny_model

    directory = build_tiny_model("Qwen3_5ForCausalLM", str(tmp_path / "hybrid"))
    assert run.main([directory, "--out_dir", str(tmp_path / "out"), "--quiet", "--no-plots"]) == 0
    document = json.load(open(tmp_path / "out" / "output-hybrid.json"))
    assert document["attribution"]["note"].startswith("no attribution: hybrid blocks")
    assert not os.path.exists(tmp_path / "out" / "output-hybrid-attribution.csv")


def test_attribution_csv_and_json_on_the_bundled_model(bundled_run):
    out, name = bundled_run
    rows = _read_csv(out / f"output-{name}-attribution.csv")
    assert list(rows[0]) == ["layer", "component", "logit", "cumulative", "logit_vs_control",
                             "cumulative_vs_control"]
    assert len(rows) == 2 + 2 * 30
    document = json.load(open(out / f"output-{name}.json"))
    block = document["attribution"]
    assert abs(block["residual_error"]) <= 1e-4 * abs(block["head_logit"])
    assert float(rows[-1]["cumulative"]) + block["b_U"] == pytest.approx(block["head_logit"], rel=1e-4)
    largest = [abs(float(row["logit"])) for row in rows]
    assert abs(block["largest_parts"][0]["logit"]) == pytest.approx(max(largest))


@pytest.fixture(scope="module")
def bundled_run(bundled_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundled-readouts")
    subprocess.run([sys.executable, RUN_PY, "--out_dir", str(out), "--compare-lenses", "--track", " Paris",
                    " Berlin", "--quiet"], check=True)
    return out, "SmolLM2-135M-Instruct"


def test_compare_lenses_reuses_the_main_and_comparison_rows(bundled_run):
    out, name = bundled_run
    lenses = _read_csv(out / f"output-{name}-lenses.csv")
    assert list(lenses[0]) == ["lens", "layer", "entropy", "top1", "p_answer", "answer_rank", "kl_to_final_bits"]
    names = list(dict.fromkeys(row["lens"] for row in lenses))
    assert names[:3] == ["final", "arch", "none"]
    for lens, path in (("final", f"output-{name}-pure-next-token.csv"),
                       ("arch", f"output-{name}-pure-next-token-arch.csv")):
        pure = _read_csv(out / path)
        own = [row for row in lenses if row["lens"] == lens]
        for row, reference in zip(own, pure, strict=True):
            for column in ("entropy", "p_answer", "answer_rank", "kl_to_final_bits"):
                assert row[column] == reference[column]  # the same float32 numbers, not a second decode
            assert row["top1"] == reference["top1"]
    milestones = json.load(open(out / f"output-{name}.json"))["lenses"]
    assert milestones["final"]["first_rank_le_1"] == 30 and set(names) == set(milestones)
    assert os.path.isfile(out / f"output-{name}-lenses.png")


def test_tracked_tokens_equal_the_pure_rows(bundled_run):
    out, name = bundled_run
    tracked = _read_csv(out / f"output-{name}-tracked.csv")
    pure = _read_csv(out / f"output-{name}-pure-next-token.csv")
    berlin = [row for row in tracked if row["token"] == " Berlin" and row["lens"] == "final"]
    assert [int(row["rank"]) for row in berlin] == [int(row["answer_rank"]) for row in pure]
    for row, reference in zip(berlin, pure):
        assert float(row["prob"]) == pytest.approx(float(reference["p_answer"]), rel=1e-6, abs=1e-30)
    assert {row["lens"] for row in tracked} == {"final", "arch", "none"}


def test_a_rerun_without_the_new_outputs_leaves_no_stale_copy(tiny_dirs, tmp_path):
    import run

    out = tmp_path / "out"
    assert run.main([tiny_dirs["llama"], "--out_dir", str(out), "--compare-lenses", "--track", " capital",
                     "--quiet", "--no-plots"]) == 0
    assert os.path.isfile(out / "output-llama-lenses.csv") and os.path.isfile(out / "output-llama-tracked.csv")
    assert run.main([tiny_dirs["llama"], "--out_dir", str(out), "--quiet", "--no-plots",
                     "--prompt", "Berlin is the capital of", "--answer", "Germany"]) == 0
    assert not os.path.exists(out / "output-llama-lenses.csv")
    assert not os.path.exists(out / "output-llama-tracked.csv")
    assert os.path.isfile(out / "output-llama-attribution.csv")


def test_residuals_as_a_tensor_for_a_prompt_and_a_set(tiny_dirs):
    lm = lc.load(tiny_dirs["llama"])
    s = lc.sweep(lm, PROMPT, "Berlin", settings=lc.SweepSettings(keep_residuals=True))
    tokens = s.analysis.result.tokens
    assert tuple(s.residuals.shape) == (lm.n_layers + 1, tokens.shape[1], lm.bridge.cfg.d_model)
    with torch.no_grad():
        _, cache = lm.bridge.run_with_cache(tokens)
        expected = lm.bridge.ln_final(cache["blocks.1.hook_resid_post"])[0]
    assert torch.allclose(s.residuals[2], expected, atol=1e-5)
    with pytest.raises(ValueError, match="keep_residuals=True"):
        lc.sweep(lm, PROMPT, "Berlin").residuals
    items = [{"prompt": PROMPT, "answer": "Berlin", "id": "a"},
             {"prompt": "Berlin is the capital of", "answer": "Germany", "id": "b"}]
    batch = lc.sweep_set(lm, items, settings=lc.SweepSettings(keep_residuals=True, batch_size=2))
    assert tuple(batch.residuals["b"].shape)[::2] == (lm.n_layers + 1, lm.bridge.cfg.d_model)
    assert torch.allclose(batch.residuals["a"], s.residuals, atol=1e-4)


def test_attribution_from_the_lens_forward_equals_its_own_forward(tiny_dirs):
    """A single prompt's split reuses the lens forward's residuals (resid_mid captured with them)."""
    lm = lc.load(tiny_dirs["llama"])
    s = lc.sweep(lm, PROMPT, "Berlin")
    assert s.analysis.result.last_position_mids is not None
    own = attribute(lm.bridge, s.analysis.result.tokens, s.analysis.result.gold["first_id"], None)
    reused = s.attribution
    assert list(reused["logit"]) == pytest.approx([part[2] for part in own.parts], abs=1e-5)


def test_eval_json_gains_the_jacobian_lens_where_one_was_fitted(tiny_dirs, tmp_path):
    env = dict(os.environ, LAYERS_CACHE_DIR=str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS_LINES * 4), encoding="utf-8")  # the tuned lens needs 2,048 tokens
    common = [tiny_dirs["llama"], "--corpus", str(corpus), "--device", "cpu"]
    subprocess.run([sys.executable, FIT_LENS, *common, "--kind", "jacobian", "--prompts", "2",
                    "--max-seq-len", "20"], check=True, capture_output=True, env=env)
    done = subprocess.run([sys.executable, FIT_LENS, *common, "--tokens", "1024"], check=True,
                          capture_output=True, text=True, env=env)
    report = json.load(open(os.path.join(done.stdout.strip().splitlines()[-1], "eval.json")))
    assert report["kind"] == "tuned"
    for row in report["layers"]:
        assert {"logit", "tuned", "jacobian"} <= set(row)
    assert report["layers"][0]["jacobian"] == report["layers"][0]["logit"]  # no matrix for the embeddings
    assert report["layers"][1]["jacobian"] != report["layers"][1]["logit"]


@pytest.mark.parametrize("family", ["llama", "gpt-neox"])  # residual snapshots; parallel blocks' own forward
def test_attribution_in_bfloat16_adds_up_within_the_heads_rounding(tiny_dirs, family):
    """In half precision the model's own head logit is itself rounded (bf16: 8 bits of mantissa),
    so the parts (float32 maths on bf16 residuals) meet it within that rounding."""
    lm = lc.load(tiny_dirs[family], dtype="bfloat16")
    s = lc.sweep(lm, PROMPT, "Berlin")
    block = s.document["attribution"]
    assert block["note"] is None
    assert abs(block["residual_error"]) <= 1e-2 * max(1.0, abs(block["head_logit"]))
    assert list(s.attribution["component"])[-1] == "norm_bias"


def test_a_jacobian_lens_of_another_model_is_refused(tiny_dirs, jacobian_artifact, tmp_path, capsys):
    """Our fingerprint replaces TransformerLens's model-name check, and only that one: its other
    checks (d_model, the layer range) still run with --allow-foreign-lens."""
    import run

    def flags(family):
        return [tiny_dirs[family], "--lens", "jacobian", "--lens-path", str(jacobian_artifact),
                "--out_dir", str(tmp_path / family), "--quiet", "--no-plots"]

    assert run.main(flags("gpt2")) == 1  # 3 blocks of width 64 like the lens's Llama: only the fingerprint differs
    assert "ForeignLensError" in capsys.readouterr().err
    assert run.main([*flags("gpt2"), "--allow-foreign-lens"]) == 0
    assert run.main([*flags("qwen2"), "--allow-foreign-lens"]) == 1  # 2 blocks: the lens's layer 1 has no place
    assert "outside the model's 0..0 source range" in capsys.readouterr().err


def test_a_tied_models_readout_of_the_current_token_is_never_copying(tmp_path):
    """Gemma-3's L_copy was 1 on 11 of 24 prompts: layer 1's tied-embedding readout of the
    current token, which the docs say is not copying (only layer 0 was excluded)."""
    import torch
    from tiny_models import build_tiny_model

    directory = build_tiny_model("qwen2", str(tmp_path / "echo"))
    lm = lc.load(directory, device="cpu")
    hf = lm.bridge.original_model
    with torch.no_grad():  # blocks that add nothing: every layer reads the embedding of its token
        hf.get_input_embeddings().weight.copy_(torch.randn_like(hf.get_input_embeddings().weight))
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    result = lc.sweep(lm, "The capital of Germany is", "Berlin", control=False)
    current = lm.bridge.to_str_tokens("The capital of Germany is")[-1]
    assert (result.pure["top1"] == current).all() and (result.pure["p_top1"] > 0.95).all()
    diagnostics = result.diagnostics
    assert diagnostics["tied_embeddings"] is True
    copies = (diagnostics["L_copy"], diagnostics["L_copy_strict"], diagnostics["L_copy_prompt"])
    assert copies == (None, None, None)
    assert not result.pure[["copy_collapse", "copy_headline", "copy_collapse_prompt"]].any().any()


def test_pieces_of_a_utf8_character_are_shown_by_their_bytes(bundled_model_dir):
    """Four different top-5 tokens of a Japanese prompt all read ``�`` in the CSV, the heatmap and
    the tooltip."""
    from layers_core.model.tokens import TokenDecoder

    lm = lc.load(bundled_model_dir, device="cpu")
    tokenizer = lm.bridge.tokenizer
    ids = tokenizer("日本の首都は", add_special_tokens=False)["input_ids"]
    shown = TokenDecoder(tokenizer).decode_many(ids)
    assert [shown[i] for i in ids][:3] == ["<0xE6><0x97>", "<0xA5>", "本"]
    assert b"".join(bytes([int(h, 16)]) for h in "E6 97 A5".split()).decode() == "日"
    result = lc.sweep(lm, "日本の首都は", "東京", control=False)
    cells = result.records[[f"top{k}" for k in range(1, 6)] + ["token"]].astype(str).to_numpy().ravel()
    assert not any("\ufffd" in cell for cell in cells)
    assert "<0xE6><0x97>" in set(result.records["token"])  # the prompt's own first piece
    assert any(cell.startswith("<0x") for cell in cells if cell != "<0xE6><0x97>")


def test_records_false_decodes_only_the_next_token_and_keeps_every_check(tiny_dirs, tmp_path, capsys):
    """A single sweep decoded every position (13 s for 67 tokens on Gemma-3's 262k vocabulary)
    even when only the next token was wanted: records=False gives the same pure rows and checks."""
    import run

    import layers_core as lc
    from conftest import assert_clean_failure
    from layers_core.pipeline.sweep import SweepSettings

    lm = lc.load(tiny_dirs["llama"], device="cpu")
    prompt, control = "Berlin is the capital of", ("Paris is the capital of", "France")
    full = lc.sweep(lm, prompt, "Germany", control=control)
    last = lc.sweep(lm, prompt, "Germany", control=control, settings=SweepSettings(records=False))
    assert last.records.empty and len(full.records) == len(full.pure) * len(full.analysis.result.str_tokens)
    numbers = ["entropy", "p_answer", "kl_to_final_bits", "prob1", "prob5"]
    np.testing.assert_allclose(last.pure[numbers], full.pure[numbers], rtol=1e-5, atol=1e-9)
    assert last.pure.answer_rank.tolist() == full.pure.answer_rank.tolist()
    for block in ("raw_lens_check", "control_summary", "control_margins", "lens_comparison"):
        assert last.analysis.blocks[block] == full.analysis.blocks[block], block  # the same last-position views
    assert last.diagnostics["milestones"] == full.diagnostics["milestones"]
    assert last.diagnostics["last_layer_consistency"]["passed"]
    out = tmp_path / "out"
    assert run.main([tiny_dirs["llama"], "--out_dir", str(out), "--quiet", "--prompt", prompt, "--answer",
                     "Germany", "--no-records"]) == 0
    assert not os.path.exists(out / "output-llama-records.csv") and os.path.isfile(out / "output-llama-lens.png")
    page = open(out / "output-llama.html", encoding="utf-8").read()
    data = json.loads(page.split('id="report-data">')[1].split("</script>")[0])
    assert len(data["heatmap"]["positions"]) == 1 and len(data["heatmap"]["layers"]) == lm.n_layers + 1
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run.main([tiny_dirs["llama"], "--no-records", "--keep-residuals"])
    assert_clean_failure(capsys.readouterr(), exit_info.value.code, 2)
