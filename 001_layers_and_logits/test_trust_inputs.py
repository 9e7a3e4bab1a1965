"""Trust, round 3: no wrong numbers from ordinary inputs, nothing lost on a failure. Each test is
one numbered case of the round-3 trust review and fails on the code before it."""

import json
import os

import pandas as pd
import pytest
import run

import layers_core as lc
from conftest import assert_clean_failure
from layers_core.results.set_files import read_prompt_entries

BUNDLED = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def bundled(bundled_model_dir):
    return lc.load(bundled_model_dir, device="cpu")


def _snapshot(directory):
    return {os.path.relpath(os.path.join(d, f), directory): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(directory) for f in files}


def test_1_an_answers_surrounding_whitespace_is_never_a_token(bundled):
    """' Buenos Aires' gave the pieces ['Ġ', 'ĠBuenos', 'ĠAires']: L_semantic None, p_sequence 0.00024."""
    prompt = "The capital of Argentina is"
    spaced = lc.sweep(bundled, prompt, " Buenos Aires ", control=False)
    plain = lc.sweep(bundled, prompt, "Buenos Aires", control=False)
    pd.testing.assert_frame_equal(spaced.pure, plain.pure)
    pd.testing.assert_frame_equal(spaced.records, plain.records)
    gold = spaced.document["gold_answer"]
    assert gold["pieces"] == ["ĠBuenos", "ĠAires"] and gold["p_sequence"] == pytest.approx(0.228, abs=0.02)
    assert spaced.diagnostics["L_semantic"] == 30  # the model's own top-1 is ' Buenos'


def test_2_a_prompt_ending_in_whitespace_scores_its_continuation(bundled, tmp_path, capsys):
    """'…is ' scored 'ĠBerlin', i.e. 'is␣␣Berlin' (rank 8), without a word."""
    s = lc.sweep(bundled, "The capital of Germany is ", "Berlin", control=False)
    alignment = s.diagnostics["gold_alignment"]
    assert alignment["pieces"] == ["Ber", "lin"] and alignment["variant"] == "no_space"
    assert "ends in whitespace" in alignment["warnings"][0]
    assert run.main(["--device", "cpu", "--out_dir", str(tmp_path), "--quiet", "--no-plots",
                     "--prompt", "The capital of Germany is ", "--answer", "Berlin"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "ends in whitespace" in err[0]


LONG = "The quick brown fox jumps over the lazy dog. " * 40 + "The capital of Germany is"


def test_3_a_prompt_longer_than_the_context_is_refused_before_any_forward(tiny_dirs, tmp_path, capsys):
    """9,005 tokens on an 8,192 context were cut from the end, without a word: the question went."""
    code = run.main(["--device", "cpu", tiny_dirs["llama"], "--out_dir", str(tmp_path), "--quiet",
                     "--prompt", LONG, "--answer", "Berlin"])
    captured = capsys.readouterr()
    assert_clean_failure(captured, code, 1)
    assert "the prompt is 1486 tokens" in captured.err and "at most 128" in captured.err
    error = json.loads((tmp_path / "output-llama.error.json").read_text())["error"]
    assert error["type"] == "PromptTooLong" and error["stage"] == "lens"


def test_3_truncate_left_keeps_the_question_and_the_heatmap_draws_a_window(tiny_dirs, tmp_path):
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--out_dir", str(tmp_path), "--quiet",
                     "--prompt", LONG, "--answer", "Berlin", "--truncate", "left"]) == 0
    document = json.loads((tmp_path / "output-llama.json").read_text())
    assert document["diagnostics"]["truncation"] == {"side": "left", "prompt_tokens": 1486, "kept_tokens": 128}
    records = pd.read_csv(tmp_path / "output-llama-records.csv", dtype=str, keep_default_na=False)
    assert len(records) == 4 * 128  # complete: every kept position of every layer
    assert list(records["token"].iloc[-2:]) == [" Germany", " is"] or records["token"].iloc[-1] == " is"
    s = lc.sweep(lc.load(tiny_dirs["llama"], device="cpu"), LONG, "Berlin", control=False,
                 settings=lc.SweepSettings(truncate="left"))
    heatmap = s.lens_figure()
    assert "last 48 of 128 positions" in heatmap.axes[0].get_title()
    assert len(heatmap.axes[0].get_xticklabels()) == 48


def test_4_a_failed_run_never_deletes_a_previous_result(tiny_dirs, tmp_path, monkeypatch, capsys):
    """A failed run into an --out_dir holding a finished run left only a 558-byte error document."""
    out = tmp_path / "out"
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--out_dir", str(out), "--quiet"]) == 0
    before = _snapshot(out)
    from layers_core import numerics

    monkeypatch.setattr(numerics, "output_logits_transform", lambda model: lambda z: z * 0.5)  # fails the gate
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--out_dir", str(out), "--quiet"]) == 1
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if k != "output-llama.error.json"} == before
    assert json.loads(after["output-llama.error.json"])["error"]["type"] == "LensMismatchError"
    monkeypatch.undo()
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--out_dir", str(out), "--quiet", "--no-plots"]) == 0
    assert not (out / "output-llama.error.json").exists()  # a success replaces the model's files, error included
    capsys.readouterr()


def test_4_what_can_be_checked_without_the_model_is_checked_before_loading(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--out_dir", str(out), "--quiet", "--no-plots"]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run.main(["--device", "cpu", tiny_dirs["llama"], "--out_dir", str(out), "--lens", "tuned",
                  "--lens-path", str(tmp_path / "nonexistent")])
    captured = capsys.readouterr()
    assert_clean_failure(captured, info.value.code, 2)
    assert "no tuned lens there (missing config.json, params.pt)" in captured.err
    assert _snapshot(out) == before


def test_6_a_merge_flags_first_piece_ambiguity_over_the_whole_set(bundled_model_dir, tmp_path):
    """Computed within each shard, the merged JSON flagged 34 prompts where the whole set flags 43."""
    from layers_core.results.merge import merge

    facts = [{"id": "a", "prompt": "The largest city of the state is", "answer": "New York"},
             {"id": "b", "prompt": "The capital of India is", "answer": "New Delhi"},
             {"id": "c", "prompt": "The capital of France is", "answer": "Paris"}]
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join(json.dumps(f) for f in facts) + "\n")
    base = ["--device", "cpu", "--prompts", str(path), "--quiet", "--no-plots", "--name", "llama"]
    assert run.main([*base, "--out_dir", str(tmp_path / "whole")]) == 0
    for k in range(2):
        assert run.main([*base, "--shard", f"{k}/2", "--out_dir", str(tmp_path / f"s{k}")]) == 0
    merge([str(tmp_path / "s0"), str(tmp_path / "s1")], str(tmp_path / "merged"), plots=False)

    def flags(directory):
        shard = {"s0": "s0/shard-0-of-2", "s1": "s1/shard-1-of-2"}.get(directory, directory)
        entries = read_prompt_entries(tmp_path / shard / "output-llama-prompts.jsonl")
        return [entry["gold_answer"]["first_piece_ambiguous"] for entry in entries]

    assert flags("whole")[:2] == [True, True]  # 'a' and 'b' are in different shards
    assert flags("merged") == flags("whole")
    assert flags("s0") == [False, False]


def test_7_headline_indices_mean_what_they_say(bundled):
    """Under final, L_copy = 19 was a comma (the entropy fallback); the raw-lens check counted
    layer n; first_control_margin_pos = 1 came from a ±1e-5 margin."""
    s = lc.sweep(bundled, lc.DEFAULT_PROMPT, "Berlin")
    pure, diag = s.pure, s.diagnostics
    assert diag["copy_rule"]["headline"] == "headline"
    headline = pure[pure["copy_headline"] & (pure["layer"] > 0)]  # tied embeddings: from layer 1
    assert diag["copy_collapse_excludes_layer0"] is True
    assert diag["L_copy"] == (None if headline.empty else int(headline["layer"].iloc[0]))
    assert diag["L_copy"] != 19 and pure.loc[19, "top1"] == ","  # the comma copies nothing
    prompt_ids = set(bundled.bridge.tokenizer(lc.DEFAULT_PROMPT, add_special_tokens=False)["input_ids"])
    for _, row in headline.iterrows():
        assert any(c.isalnum() for c in row["top1"]) and row["prob1"] > 0.9 and row["prob1"] - row["prob2"] > 0.05
    assert pure["copy_collapse"].iloc[19]  # the seed's column keeps its meaning
    raw = s.document["raw_lens_check"]
    judged = [r for r in raw["layers"] if r["layer"] < 30]
    assert raw["max_kl_norm_to_raw_bits"] == max(r["kl_norm_to_raw_bits"] for r in judged)
    margins = [r["control_margin"] for r in s.document["control_margins"]]
    first = s.document["control_summary"]["first_control_margin_pos"]
    assert margins[first] >= 1e-3 and all(m < 1e-3 for m in margins[:first])  # a lead, not noise
    assert first == 29  # under final, Paris leads on the France prompt from layer 29 (0.017)
    assert {"kl_chosen_to_other_bits", "top1_agree"} <= set(s.document["lens_comparison"]["per_layer"][0])
    assert "kl_model_to_lens_bits" in diag["last_layer_consistency"]
    assert bool(prompt_ids)


def test_7_under_arch_the_seeds_rule_stays_the_headline(bundled):
    s = lc.sweep(bundled, lc.DEFAULT_PROMPT, "Berlin", settings=lc.SweepSettings(norm_strategy="arch"))
    assert s.document["control_summary"]["first_control_margin_pos"] == 30  # was 1: a 1e-5 margin
    assert s.diagnostics["copy_rule"]["headline"] == "seed"
    flagged = s.pure[s.pure["copy_collapse"] & (s.pure["layer"] > 0)]
    assert s.diagnostics["L_copy"] == (None if flagged.empty else int(flagged["layer"].iloc[0]))


def test_9_a_bad_byte_in_a_prompt_file_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "set.jsonl"
    bad.write_bytes(b'{"prompt": "a", "answer": "b"}\n{"prompt": "ok", "answer": "c"}\n{"prompt": "caf\xe0"}\n')
    with pytest.raises(SystemExit) as info:
        run.main(["--device", "cpu", "--prompts", str(bad)])
    captured = capsys.readouterr()
    assert_clean_failure(captured, info.value.code, 2)
    assert f"{bad}:3: not UTF-8 text (byte 0xe0 at column 16)" in captured.err


def test_9_token_counts_are_split_and_every_answer_piece_is_kept(tiny_dirs, tmp_path):
    answer = "Llanfairpwllgwyngyll in Anglesey, Wales"
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps({"id": "w", "prompt": "The village with the long name is",
                                "answer": answer}) + "\n")
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--prompts", str(path), "--out_dir", str(tmp_path),
                     "--quiet", "--no-plots"]) == 0
    summary = pd.read_csv(tmp_path / "output-llama-summary.csv", dtype=str, keep_default_na=False)
    entry = next(read_prompt_entries(tmp_path / "output-llama-prompts.jsonl"))
    pieces = entry["gold_answer"]["pieces"]
    assert len(pieces) == len(entry["gold_answer"]["answer_ids"]) > 4  # no cap at 4
    assert int(summary["answer_tokens"].iloc[0]) == len(pieces)
    assert int(summary["prompt_tokens"].iloc[0]) == entry["prompt_tokens"] != len(pieces)


def test_no_answer_gives_the_lens_rows_with_the_answer_columns_empty(tiny_dirs, bundled, tmp_path):
    s = lc.sweep(bundled, "The capital of Germany is", control=False)
    assert s.pure["answer_rank"].isna().all() and s.pure["p_answer"].isna().all()
    assert not s.pure["is_answer"].any() and s.diagnostics["L_semantic"] is None
    assert s.diagnostics["gold_alignment"]["status"] == "no_answer"
    assert s.pure["top1"].iloc[-1] == " Berlin"  # the lens itself is unchanged
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--out_dir", str(tmp_path), "--quiet", "--no-plots",
                     "--prompt", "The capital of Germany is"]) == 0
    pure = pd.read_csv(tmp_path / "output-llama-pure-next-token.csv", dtype=str, keep_default_na=False)
    assert (pure["answer_rank"] == "").all() and (pure["p_answer"] == "").all()


# ---- round 4: one line for damaged inputs (#31, the first cases) ----------------------------------

def _saved_lens(directory):
    import torch

    from layers_core.lens.tuned import TunedLens

    TunedLens(torch.zeros(3, 4, 4), torch.zeros(3, 4), "tiny").save(str(directory))
    return directory


def test_a_tuned_lens_config_that_is_broken_json_is_one_usage_line(tiny_dirs, tmp_path, capsys):
    """It was a 34-line JSONDecodeError traceback (the pre-load fingerprint check read it raw)."""
    lens = _saved_lens(tmp_path / "lens")
    (lens / "config.json").write_text("{not json")
    code = run.main(["--device", "cpu", tiny_dirs["llama"], "--lens", "tuned", "--lens-path", str(lens),
                     "--out_dir", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert_clean_failure(captured, code, 2)
    assert f"{lens / 'config.json'}: not a valid tuned-lens config (JSONDecodeError" in captured.err
    assert captured.err.count("\n") == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage,message", [
    ("missing", "no tensor 2.weight (1 of the 3 translators' weights missing)"),
    ("garbage", "not a readable tuned-lens state dict"),
    ("list", "not a valid tuned-lens config (a JSON list, not an object)"),
    ("layers", "num_hidden_layers must be a positive integer, got 'three'"),
    ("huge", "no tensor 3.weight (999999999999999997 of the 1000000000000000000 translators' weights missing)"),
])
def test_a_damaged_tuned_lens_is_refused_naming_the_file(tmp_path, damage, message):
    """A missing tensor was ``KeyError: '2.weight'``; a garbage params.pt ``pop from empty list``."""
    import torch

    from layers_core.lens.tuned import TunedLens

    lens = _saved_lens(tmp_path)
    params, config = lens / "params.pt", lens / "config.json"
    if damage == "missing":
        state = torch.load(params, weights_only=True)
        del state["2.weight"]
        torch.save(state, params)
    elif damage == "garbage":
        params.write_bytes(os.urandom(64))
    elif damage == "list":
        config.write_text("[1, 2]")
    elif damage == "huge":  # the fuzz test's find: it walked range(10**18) and the OOM killer ended the suite
        config.write_text(json.dumps({**json.loads(config.read_text()), "num_hidden_layers": 10**18}))
    else:
        config.write_text(json.dumps({**json.loads(config.read_text()), "num_hidden_layers": "three"}))
    with pytest.raises(ValueError) as refused:
        TunedLens.load(str(lens))
    assert message in str(refused.value) and str(lens) in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_dangling_symlink_out_dir_is_a_usage_error(tmp_path, capsys):
    """It was ``FileExistsError`` from makedirs, after the model had loaded."""
    link = tmp_path / "results"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(SystemExit) as info:
        run.main(["--device", "cpu", "--out_dir", str(link)])
    captured = capsys.readouterr()
    assert_clean_failure(captured, info.value.code, 2)
    assert f"{link} is a symbolic link to {tmp_path / 'gone'}, which does not exist" in captured.err


@pytest.mark.parametrize("name", ["a/b", "..", " "])
def test_a_name_with_a_path_separator_is_refused_before_loading(name, capsys):
    """``--name a/b`` failed after the whole run, and then its error document failed too."""
    with pytest.raises(SystemExit) as info:
        run.main(["--device", "cpu", "--name", name])
    captured = capsys.readouterr()
    assert_clean_failure(captured, info.value.code, 2)
    assert "a file-name stem, without a path separator" in captured.err and captured.err.count("\n") == 1


def test_jsonl_with_line_separators_inside_strings_is_valid():
    """U+2028 and U+0085 are valid inside a JSON string; ``str.splitlines`` cut the line there."""
    from layers_core.results.prompt_sets import parse_prompt_set

    prompts = ["The capital\u2028of Peru is", "The capital\u0085of Chile is"]
    text = "".join(json.dumps({"prompt": p, "answer": a}, ensure_ascii=False) + "\r\n"
                   for p, a in zip(prompts, ("Lima", "Santiago")))
    items = parse_prompt_set(text, "facts.jsonl")
    assert [item.prompt for item in items] == prompts and [item.prompt_id for item in items] == ["1", "2"]


def test_a_directory_holding_two_ggufs_is_one_line_and_an_error_document(tmp_path, capsys):
    """It was a full traceback, and no error document (the source was resolved before any stage)."""
    folder = tmp_path / "weights"
    folder.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (folder / name).write_bytes(b"GGUF")
    code = run.main(["--device", "cpu", str(folder), "--out_dir", str(tmp_path / "out"), "--no-plots"])
    captured = capsys.readouterr()
    assert_clean_failure(captured, code, 1)
    assert "holds 2 .gguf files (a.gguf, b.gguf); name one of them" in captured.err
    document = json.loads((tmp_path / "out" / "output-weights.error.json").read_text())
    assert "name one of them" in json.dumps(document)


def test_the_control_line_names_what_leads_on_the_control_prompt():
    """The report said "the answer first leads the control answer"; the margin is the control
    answer's lead over the answer, on the control prompt."""
    from layers_core.results.pictures import control_words

    line = control_words({"control_prompt": "… France …", "control_answer": "Paris", "status": "ok",
                          "first_control_margin_pos": 29})
    assert line.endswith("on the control prompt the control answer first leads the answer at layer 29")


def test_a_too_long_prompt_in_a_set_is_named_before_any_forward_and_truncate_left_is_honoured(
        tiny_dirs, tmp_path, capsys):
    """It advised --truncate left even when given, named no prompt, and failed the whole set."""
    facts = [{"id": "short", "prompt": "The capital of Germany is", "answer": "Berlin"},
             {"id": "long", "prompt": LONG, "answer": "Berlin"},
             {"id": "longer", "prompt": LONG + LONG, "answer": "Berlin"}]
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(fact) + "\n" for fact in facts))
    base = ["--device", "cpu", tiny_dirs["llama"], "--prompts", str(path), "--quiet", "--no-plots"]
    code = run.main([*base, "--out_dir", str(tmp_path / "refused")])
    captured = capsys.readouterr()
    assert_clean_failure(captured, code, 1)
    assert "prompt 'long' is 1486 tokens and" in captured.err and "at most 128 (and 1 more)" in captured.err
    assert not (tmp_path / "refused" / ".progress-llama").exists() or not list(
        (tmp_path / "refused" / ".progress-llama").glob("batch-*"))  # nothing was computed
    for batch in ("1", "3"):
        out = tmp_path / f"truncated-{batch}"
        assert run.main([*base, "--truncate", "left", "--batch-size", batch, "--out_dir", str(out)]) == 0
        entries = {e["prompt_id"]: e for e in read_prompt_entries(out / "output-llama-prompts.jsonl")}
        assert entries["long"]["diagnostics"]["truncation"] == {"side": "left", "prompt_tokens": 1486,
                                                                "kept_tokens": 128}
        assert entries["short"]["diagnostics"]["truncation"] is None


def test_a_config_that_does_not_fit_the_weights_names_the_tensor(tiny_dirs, tmp_path, capsys):
    """A config.json with a wrong hidden_size said "For details look at the above report!" and
    showed no report."""
    import shutil

    model = shutil.copytree(tiny_dirs["llama"], tmp_path / "llama")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    code = run.main(["--device", "cpu", str(model), "--out_dir", str(tmp_path / "out"), "--quiet"])
    captured = capsys.readouterr()
    assert_clean_failure(captured, code, 1)
    assert "the checkpoint's tensor shapes do not match its config.json: " in captured.err
    assert "is [320, 64] in the checkpoint, [320, 32] by config.json (and " in captured.err
    assert "above report" not in captured.err


def test_a_jacobian_lens_of_random_bytes_is_one_line_without_torchs_advice(tmp_path):
    """It got torch's advice to use weights_only=False (which would run the file's code)."""
    import random

    from layers_core.lens.jacobian import JacobianLensReader

    for seed in range(8):  # random bytes fail the unpickler in different ways (UnpicklingError, IndexError…)
        (tmp_path / "lens.pt").write_bytes(random.Random(seed).randbytes(4096))
        with pytest.raises(ValueError) as refused:
            JacobianLensReader.load(str(tmp_path))
        message = str(refused.value)
        assert message.startswith(f"{tmp_path / 'lens.pt'}: not a readable Jacobian lens (")
        assert message.endswith("); refit it with fit_lens.py --kind jacobian")
        assert "\n" not in message and "weights_only" not in message
