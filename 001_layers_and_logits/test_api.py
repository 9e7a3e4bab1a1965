"""The notebook API: load / sweep / sweep_set give what run.py writes, as typed DataFrames."""

import os
import re

import pandas as pd
import pytest
import torch

import layers_core as lc
from layers_core.csv_io import pure_header, records_header
from layers_core.pipeline.prompts import DEFAULT_PROMPT
from layers_core.results.tables import frame_from_rows, read_csv

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PROMPT = "The capital of Germany is called simply"
OUTSIDE_REFERENCE = re.compile("|".join(["SPEC" + r"\.md", "SPEC" + " §", r"\.\./" + "shared"]))


@pytest.fixture(scope="module")
def bundled_sweep(bundled_model_dir):
    lens_model = lc.load(device="cpu")  # load and sweep in separate statements, as in a notebook
    return lc.sweep(lens_model, DEFAULT_PROMPT, "Berlin")


def test_sweep_pure_equals_the_csv_run_py_writes(bundled_sweep, bundled_cli_run):
    written = read_csv(os.path.join(bundled_cli_run, "output-SmolLM2-135M-Instruct-pure-next-token.csv"))
    ours = bundled_sweep.pure
    assert list(ours.columns) == pure_header() and len(ours) == 31
    assert (ours["entropy"] - written["entropy"]).abs().max() <= 1e-6
    assert ours["top1"].tolist() == written["top1"].tolist()
    assert ours.iloc[-1]["top1"] == " Berlin" and ours.iloc[-1]["p_answer"] == pytest.approx(0.82, abs=0.03)
    pd.testing.assert_frame_equal(ours, written)  # same values and the same dtypes


def test_sweep_in_one_expression_equals_separate_statements(bundled_sweep):
    from layers_core.pipeline.prompts import DEFAULT_PROMPT as prompt

    again = lc.sweep(lc.load(device="cpu"), prompt, "Berlin").pure
    pd.testing.assert_frame_equal(again, bundled_sweep.pure)


def test_sweep_tables_are_typed(bundled_sweep):
    pure, records = bundled_sweep.pure, bundled_sweep.records
    assert pure["layer"].dtype == "int64" and pure["pos"].dtype == "int64"
    assert pure["answer_rank"].dtype == "Int64" and pure["entropy"].dtype == "float64"
    assert pure["is_answer"].dtype == bool and pure["kl_to_final_bits"].dtype == "float64"
    assert list(records.columns) == records_header() and len(records) == 31 * 17
    assert records["prob20"].dtype == "float64" and records["prob20"].isna().any()
    non_verbose = records[records["prob6"].isna()]
    assert len(non_verbose) > 0 and non_verbose["top6"].isna().all()
    assert records["top1"].notna().all()


def test_tokens_that_look_like_missing_values_stay_strings():
    rows = [{"layer": 0, "pos": 0, "token": "NaN", "entropy": 1.5, "top1": "null", "prob1": 0.5,
             "rest_mass": 0.5}, {"layer": 0, "pos": 1, "token": "", "entropy": 0.25, "top1": "NA",
                                 "prob1": 1.0, "rest_mass": 0.0}]
    frame = frame_from_rows(rows, records_header())
    assert frame["token"].tolist() == ["NaN", ""] and frame["top1"].tolist() == ["null", "NA"]
    assert frame["prob2"].isna().all() and frame["top2"].isna().all()


def test_diagnostics_document_and_figures(bundled_sweep):
    from matplotlib.figure import Figure

    assert bundled_sweep.diagnostics["L_semantic"] == 30
    document = bundled_sweep.document
    assert list(document)[:8] == ["prompt", "test_prompts", "temperature_exploration", "diagnostics",
                                  "final_prediction", "model_stats", "gold_answer", "provenance"]
    assert document["diagnostics"] is bundled_sweep.diagnostics and len(document["test_prompts"]) == 14
    figure = bundled_sweep.lens_figure()
    assert isinstance(figure, Figure) and isinstance(bundled_sweep.curves_figure(), Figure)
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # not registered with pyplot: Jupyter shows it once


def test_save_writes_run_py_files(bundled_sweep, bundled_cli_run, tmp_path):
    paths = bundled_sweep.save(str(tmp_path), plots=False)
    for suffix in ("-records.csv", "-pure-next-token.csv", "-pure-next-token-arch.csv"):
        name = f"output-SmolLM2-135M-Instruct{suffix}"
        assert (tmp_path / name).read_bytes() == open(os.path.join(bundled_cli_run, name), "rb").read()
    assert os.path.isfile(paths["json"])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_plain_hf_model_object_gives_the_same_rows_as_its_directory(tiny_dirs, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = tiny_dirs[family]
    by_path = lc.sweep(lc.load(directory, device="cpu"), PROMPT, "Berlin", control=False).pure
    hf = AutoModelForCausalLM.from_pretrained(directory)
    by_object = lc.load(hf, tokenizer=AutoTokenizer.from_pretrained(directory))
    pd.testing.assert_frame_equal(lc.sweep(by_object, PROMPT, "Berlin", control=False).pure, by_path)
    found_tokenizer = lc.load(AutoModelForCausalLM.from_pretrained(directory))  # from name_or_path
    pd.testing.assert_frame_equal(lc.sweep(found_tokenizer, PROMPT, "Berlin", control=False).pure, by_path)


def test_a_loaded_bridge_is_used_as_it_is(tiny_dirs, load_bridge):
    bridge = load_bridge("qwen2")
    lens_model = lc.load(bridge)
    assert lens_model.bridge is bridge and lens_model.dtype == torch.float32
    assert lc.sweep(lens_model, PROMPT, "Berlin").diagnostics["last_layer_consistency"]["passed"]


def test_sweep_set_matches_single_sweeps(tiny_dirs):
    lens_model = lc.load(tiny_dirs["llama"], device="cpu")
    items = [{"id": "de", "prompt": PROMPT, "answer": "Berlin"},
             lc.PromptItem("fr", "The capital of France is called simply", "Paris")]
    result = lc.sweep_set(lens_model, items)
    assert list(result.sweeps) == ["de", "fr"] and result.summary["prompt_id"].tolist() == ["de", "fr"]
    assert result.summary["L_semantic"].dtype == "Int64"
    single = lc.sweep(lens_model, PROMPT, "Berlin", control=False).pure
    pd.testing.assert_frame_equal(result.sweeps["de"].pure, single)
    with pytest.raises(ValueError, match="unknown key 'promt'"):
        lc.sweep_set(lens_model, [{"promt": PROMPT, "answer": "x"}])


def test_bad_arguments_raise_value_errors(tiny_dirs, load_bridge):
    lens_model = lc.load(load_bridge("llama"))
    with pytest.raises(ValueError, match="unknown lens"):
        lc.sweep(lens_model, PROMPT, "Berlin", lens="tunnel")


def test_the_sweep_function_is_not_shadowed_by_a_module():
    """A module named layers_core/sweep.py would replace the function once imported."""
    import importlib

    for module in ("pipeline.sweep", "pipeline.analysis", "api.prompt", "model.lens_model", "app.runner",
                   "app.cli"):
        importlib.import_module(f"layers_core.{module}")
    assert callable(lc.sweep) and callable(lc.load) and callable(lc.sweep_set)
    assert not os.path.exists(os.path.join(ROOT, "layers_core", "sweep.py"))


def test_run_py_is_thin():
    with open(os.path.join(HERE, "run.py"), encoding="utf-8") as handle:
        assert len(handle.read().splitlines()) <= 200


def test_repository_stands_alone():
    """No file in the repository points at the specification outside it."""
    offenders = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in {"venv", ".git", "__pycache__", ".pytest_cache"}
                   and not d.startswith(("run-", ".staging"))]
        for name in files:
            if name.endswith((".py", ".md", ".txt", ".toml", ".cfg")) or name in {"Makefile", "run"}:
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8", errors="replace") as handle:
                    if OUTSIDE_REFERENCE.search(handle.read()):
                        offenders.append(os.path.relpath(path, ROOT))
    assert offenders == []
