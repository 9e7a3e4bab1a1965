"""Prompt sets, the raw-residual check, the control pass and depth fractions."""

import json
import os

import pandas as pd
import pytest
import run

from layers_core.results.prompt_sets import LAYER_INDEX_COLUMNS, SUMMARY_COLUMNS, aggregate, parse_prompt_set
from layers_core.results.set_files import read_prompt_entries

PROMPT = "The capital of Germany is called simply"


def _json(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@pytest.mark.parametrize("text,message", [
    ('{"prompt": "a", "answer": "b"}\n{"prompt": "a"', "x.jsonl:2: not valid JSON"),
    ('{"prompt": "a", "answer": "b"}\n\n["a", "b"]', "x.jsonl:3: expected a JSON object"),
    ('{"prompt": "a"}', "x.jsonl:1: 'answer' must be a non-empty string"),
    ('{"prompt": " ", "answer": "b"}', "x.jsonl:1: 'prompt' must be a non-empty string"),
    ('{"id": 2, "prompt": "a", "answer": "b"}\n{"prompt": "c", "answer": "d"}', "duplicate id '2'"),
    ('{"prompt": "a", "answer": "b", "control_prompt": "c"}', "go together"),
    ("\n\n", "no prompts"),
])
def test_malformed_sets_name_the_line(text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        parse_prompt_set(text, "x.jsonl")


def test_ids_default_to_line_numbers():
    items = parse_prompt_set('\n{"prompt": "a", "answer": "b"}\n{"id": "q", "prompt": "c", '
                             '"answer": "d", "control_prompt": "e", "control_answer": "f"}')
    assert [(i.prompt_id, i.prompt, i.control_answer) for i in items] == [("2", "a", None),
                                                                          ("q", "c", "f")]


def test_malformed_set_fails_before_any_model_work(tmp_path, capsys):
    bad = tmp_path / "set.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a", "answer": 3}\n')
    with pytest.raises(SystemExit) as info:
        run.main(["--device", "cpu", str(tmp_path / "no-such-model"), "--prompts", str(bad), "--out_dir",
                  str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: 'answer' must be a non-empty string" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_aggregate_medians_iqr_and_nulls():
    rows = [{"gold_status": "ok", **{c: None for c in LAYER_INDEX_COLUMNS}} for _ in range(4)]
    for row, value in zip(rows, (10, 20, 30, None)):
        row["L_semantic"] = value
    rows[3]["gold_status"] = "unresolved"
    agg = aggregate(rows)
    assert agg["count"] == 4 and agg["fraction_resolved"] == 0.75
    assert agg["layer_indices"]["L_semantic"] == {"n": 3, "median": 20.0, "q1": 15.0, "q3": 25.0,
                                                  "iqr": 10.0}
    assert agg["layer_indices"]["L_copy"]["median"] is None


@pytest.fixture(scope="module")
def tiny_set_run(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("set")
    path = root / "facts.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [
        {"id": "de", "prompt": PROMPT, "answer": "Berlin"},
        {"id": "fr", "prompt": "The capital of France is called simply", "answer": "Paris",
         "control_prompt": PROMPT, "control_answer": "Berlin"},
        {"prompt": 'Quotes " and, commas', "answer": "x"},
    ]) + "\n")
    out = root / "out"
    # one prompt per forward and every position decoded: exactly the single-prompt path
    assert run.main(["--device", "cpu", tiny_dirs["qwen3"], "--prompts", str(path), "--out_dir", str(out),
                     "--quiet", "--records", "--batch-size", "1"]) == 0
    return out


def test_prompt_set_outputs(tiny_set_run, load_bridge):
    out = tiny_set_run
    n = load_bridge("qwen3").cfg.n_layers
    summary = pd.read_csv(out / "output-qwen3-summary.csv", dtype=str, keep_default_na=False)
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert list(summary["prompt_id"]) == ["de", "fr", "3"]
    records = pd.read_csv(out / "output-qwen3-records.csv", dtype=str, keep_default_na=False)
    pure = pd.read_csv(out / "output-qwen3-pure-next-token.csv", dtype=str, keep_default_na=False)
    assert records.columns[0] == "prompt_id" and pure.columns[0] == "prompt_id"
    assert len(pure) == 3 * (n + 1) and len(pure.columns) == 56
    doc = _json(out / "output-qwen3.json")
    entries = list(read_prompt_entries(out / "output-qwen3-prompts.jsonl"))
    assert doc["aggregate"]["count"] == 3 and len(entries) == 3
    assert doc["prompts_file"] == "output-qwen3-prompts.jsonl"
    assert entries[1]["control_summary"]["control_answer"] == "Berlin"
    assert entries[0]["control_summary"] is None
    assert (out / "output-qwen3-summary.png").stat().st_size > 10_000
    assert (out / "output-qwen3-curves.png").stat().st_size > 10_000  # every prompt's curves


def test_a_prompt_in_a_set_gives_the_numbers_it_gives_alone(tiny_set_run, tiny_dirs, tmp_path):
    assert run.main(["--device", "cpu", tiny_dirs["qwen3"], "--prompt", "The capital of France is called simply",
                     "--answer", "Paris", "--out_dir", str(tmp_path), "--quiet",
                     "--no-plots"]) == 0
    alone = pd.read_csv(tmp_path / "output-qwen3-pure-next-token.csv", dtype=str,
                        keep_default_na=False)
    in_set = pd.read_csv(tiny_set_run / "output-qwen3-pure-next-token.csv", dtype=str,
                         keep_default_na=False)
    in_set = in_set[in_set["prompt_id"] == "fr"].drop(columns="prompt_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(alone, in_set)  # string-exact: every float bit-identical


def test_raw_lens_check_and_depth_fractions(tiny_dirs, load_bridge, tmp_path):
    assert run.main(["--device", "cpu", tiny_dirs["gpt2"], "--out_dir", str(tmp_path), "--quiet", "--no-plots",
                     "--prompt", PROMPT, "--answer", "Berlin"]) == 0
    doc = _json(tmp_path / "output-gpt2.json")
    n = load_bridge("gpt2").cfg.n_layers
    check = doc["raw_lens_check"]
    assert [row["layer"] for row in check["layers"]] == sorted({0, n // 4, n // 2, 3 * n // 4, n})
    judged = [r for r in check["layers"] if r["layer"] < n]  # the last layer always differs: left out
    assert check["max_kl_norm_to_raw_bits"] == max(r["kl_norm_to_raw_bits"] for r in judged)
    assert check["norm_only_semantic_layer"] == any(r["answer_rank_norm"] == 1 and r["answer_rank_raw"] != 1
                                                    for r in judged)
    assert "lens_artifact_risk" not in check  # always "high" on real models: dropped (#31)
    assert doc["control_summary"] is None  # a custom prompt has no default control
    diag = doc["diagnostics"]
    for key, fraction in diag["depth_fractions"].items():
        value = diag["milestones"].get(key, diag.get(key))
        assert fraction == (None if value is None else round(value / n, 3))


def test_control_flags(tiny_dirs, load_bridge, tmp_path):
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--out_dir", str(tmp_path / "a"), "--quiet",
                     "--no-plots",
                     "--control-prompt", "The capital of France is called simply",
                     "--control-answer", "Paris"]) == 0
    doc = _json(tmp_path / "a" / "output-llama.json")
    margins = [row["control_margin"] for row in doc["control_margins"]]
    assert len(margins) == load_bridge("llama").cfg.n_layers + 1
    positive = [i for i, m in enumerate(margins) if m >= 1e-3]  # a lead, not noise
    assert doc["control_summary"]["first_control_margin_pos"] == (positive[0] if positive else None)
    assert doc["control_summary"]["max_control_margin"] == max(margins)
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--out_dir", str(tmp_path / "b"), "--quiet",
                     "--no-plots",
                     "--no-control"]) == 0
    assert _json(tmp_path / "b" / "output-llama.json")["control_summary"] is None


def test_bundled_three_facts_one_model_load(bundled_model_dir, tmp_path, monkeypatch):
    from layers_core.model import lens_model

    loads = []
    real_load = lens_model.load_model_with_report
    monkeypatch.setattr(lens_model, "load_model_with_report",
                        lambda *a, **k: loads.append(a) or real_load(*a, **k))
    facts = tmp_path / "facts.jsonl"
    template = "Give the city name only, plain text. The capital of {} is called simply"
    facts.write_text("\n".join(json.dumps({"id": c, "prompt": template.format(c), "answer": a})
                               for c, a in (("Germany", "Berlin"), ("France", "Paris"),
                                            ("Japan", "Tokyo"))))
    assert run.main(["--device", "cpu", "--prompts", str(facts), "--out_dir", str(tmp_path / "out"),
                     "--quiet"]) == 0
    assert len(loads) == 1
    name = "SmolLM2-135M-Instruct"
    summary = pd.read_csv(tmp_path / "out" / f"output-{name}-summary.csv")
    assert list(summary["final_top1"]) == [" Berlin", " Paris", " Tokyo"]
    assert (summary["L_semantic"] == 30).all()
    doc = _json(tmp_path / "out" / f"output-{name}.json")
    assert doc["aggregate"]["count"] == 3 and doc["aggregate"]["fraction_resolved"] == 1.0
    assert os.path.exists(tmp_path / "out" / f"output-{name}-summary.png")


def test_bundled_default_run_has_control_and_raw_check(bundled_model_dir, tmp_path):
    assert run.main(["--device", "cpu", "--out_dir", str(tmp_path), "--quiet", "--no-plots"]) == 0
    doc = _json(tmp_path / "output-SmolLM2-135M-Instruct.json")
    assert doc["control_summary"]["control_answer"] == "Paris"
    assert doc["control_summary"]["status"] == "ok"
    assert doc["raw_lens_check"]["layers"][-1]["answer_rank_norm"] == 1
    assert doc["lens_comparison"]["per_layer"][-1]["kl_chosen_to_other_bits"] < 1e-6
