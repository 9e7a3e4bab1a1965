"""run.py end to end: CLI, outputs on every fixture family, self-test, errors, the real model."""

import csv
import dataclasses
import json
import os
import subprocess
import sys
import time

import pandas as pd
import pytest
import run
import torch
from tiny_models import FAMILIES

from conftest import RUN_PY
from layers_core.csv_io import pure_header, records_header

FLAGS = ["--device", "--fp32-unembed", "--keep-residuals", "--copy-threshold", "--copy-margin",
         "--no-copy-entropy-fallback", "--norm", "--prompt", "--answer", "--out_dir",
         "--self-test", "--quiet", "--no-plots"]
TOP_KEYS = ["prompt", "test_prompts", "temperature_exploration", "diagnostics", "final_prediction",
            "model_stats", "gold_answer", "provenance", "lens_comparison", "raw_lens_check",
            "control_summary", "control_margins", "attribution", "schema_version", "timing"]
DIAG_KEYS = ["type", "model", "device", "use_norm_lens", "use_fp32_unembed", "unembed_dtype",
             "first_block_ln1_type", "final_ln_type", "layernorm_bias_fix", "norm_alignment_fix",
             "layer0_norm_fix", "mixed_precision_fix", "layer0_position_info", "context_prompt",
             "target_prediction", "L_copy", "L_copy_H", "L_semantic", "delta_layers",
             "L_copy_strict", "copy_rule", "norm_strategy", "gold_alignment", "milestones",
             "last_layer_consistency", "L_copy_prompt", "tied_embeddings",
             "copy_collapse_excludes_layer0", "L_semantic_stable", "L_semantic_margin", "truncation",
             "depth_fractions"]
PROVENANCE_KEYS = ["torch_version", "transformers_version", "transformer_lens_version",
                   "python_version", "platform", "device", "dtype", "declared_dtype", "unembed_dtype", "seed",
                   "deterministic_algorithms", "model_source", "model_path", "bos_prepended",
                   "n_tokens", "started_at", "argv", "lens", "gguf"]
ANSWER = "Berlin"
PROMPT = "The capital of Germany is called simply"


def _strict_json(path):
    def reject(value):
        raise ValueError(f"non-finite {value}")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle, parse_constant=reject)


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def _outputs(directory, name):
    stem = os.path.join(directory, f"output-{name}")
    return stem + ".json", stem + "-records.csv", stem + "-pure-next-token.csv"


@pytest.fixture(scope="module")
def family_runs(tiny_dirs, tmp_path_factory):
    """Each tiny family run once through main(), in process, under the seed's arch rule (the
    round-2 default: these are the legacy-parity runs; the default lens has test_default_lens.py)."""
    results = {}
    for family, path in tiny_dirs.items():
        out = tmp_path_factory.mktemp(f"out-{family}")
        code = run.main(["--device", "cpu", path, "--out_dir", str(out), "--prompt", PROMPT, "--answer", ANSWER,
                         "--quiet", "--no-plots", "--norm", "arch"])  # plots: test_plots.py and the bundled run
        results[family] = (code, str(out))
    return results


# ---- CLI and import discipline (Legacy defect 7) -------------------------------------------

def test_help_lists_every_flag_without_torch_regression_defect_7():
    """Legacy defect 7: argparse ran at import and --help loaded torch and probed CUDA."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, RUN_PY, "--help"], capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    assert done.returncode == 0
    assert all(flag in done.stdout for flag in FLAGS)
    assert "Layer-by-layer logit-lens sweep" in done.stdout
    assert elapsed < 3.0  # interpreter start-up included; torch alone takes longer to import
    code = ("import sys; sys.path.insert(0, %r); import run\n"
            "try:\n    run.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "heavy = [m for m in ('torch', 'transformers', 'transformer_lens') if m in sys.modules]\n"
            "assert not heavy, heavy" % os.path.dirname(RUN_PY))
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_import_reads_no_argv_and_has_no_side_effects(monkeypatch):
    import importlib

    monkeypatch.setattr(sys, "argv", ["run.py", "--definitely-not-a-flag"])
    module = importlib.reload(run)
    assert callable(module.main) and callable(module.build_parser)
    assert not hasattr(module, "torch")


def test_config_defaults_have_one_home():
    from layers_core.collapse_rules import COPY_MARGIN, COPY_THRESHOLD
    from layers_core.pipeline.prompts import DEFAULT_ANSWER, DEFAULT_PROMPT

    parsed = run.build_parser().parse_args([])
    config = run.ExperimentConfig()
    assert (config.copy_threshold, config.copy_margin) == (COPY_THRESHOLD, COPY_MARGIN)
    assert (config.prompt, config.answer) == (DEFAULT_PROMPT, DEFAULT_ANSWER)
    assert parsed.copy_threshold == config.copy_threshold and parsed.norm_strategy == config.norm_strategy
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.device = "cuda"


# ---- every family end to end ----------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_outputs_schema_and_consistency(family_runs, load_bridge, family):
    code, out = family_runs[family]
    assert code == 0
    n = load_bridge(family).cfg.n_layers
    json_path, records_path, pure_path = _outputs(out, family)
    doc = _strict_json(json_path)
    records, pure = _read_csv(records_path), _read_csv(pure_path)
    n_tokens = doc["provenance"]["n_tokens"]
    assert records[0] == records_header() and pure[0] == pure_header()
    assert len(records) - 1 == (n + 1) * n_tokens and len(pure) - 1 == n + 1
    assert all(len(row) == 45 for row in records) and all(len(row) == 55 for row in pure)
    assert list(doc) == TOP_KEYS
    assert list(doc["diagnostics"]) == DIAG_KEYS
    assert list(doc["provenance"]) == PROVENANCE_KEYS
    consistency = doc["diagnostics"]["last_layer_consistency"]
    assert consistency["passed"] is True and consistency["kl_model_to_lens_bits"] <= 1e-6
    assert consistency["top1_agree"] is True
    assert len(doc["test_prompts"]) == 14 and all(len(t["topk"]) == 10 for t in doc["test_prompts"])
    assert [t["temperature"] for t in doc["temperature_exploration"]] == [0.1, 2.0]
    assert len(doc["final_prediction"]["topk"]) == 20
    assert doc["model_stats"]["num_layers"] == n
    last = pure[-1]
    row = dict(zip(pure[0], last))
    assert float(row["kl_to_final_bits"]) < 1e-5  # the arch lens ends at ln_final
    assert pure[1][2] == "⟨NEXT⟩"


def test_gemma2_softcap_is_applied_regression_defect_6(family_runs):
    """Legacy defect 6: without the final softcap the last lens row differs from the head."""
    doc = _strict_json(_outputs(family_runs["gemma2"][1], "gemma2")[0])
    consistency = doc["diagnostics"]["last_layer_consistency"]
    assert consistency["post_unembed_transform"]["softcap"] == 5.0
    assert consistency["kl_model_to_lens_bits"] <= 1e-6
    frame = pd.read_csv(_outputs(family_runs["gemma2"][1], "gemma2")[2])
    assert frame["prob1"].max() < 1.0


def test_unembedding_bias_is_used(family_runs, load_bridge):
    """phi has a real lm_head bias: the consistency gate passes only if b_U is added."""
    doc = _strict_json(_outputs(family_runs["phi"][1], "phi")[0])
    assert doc["diagnostics"]["last_layer_consistency"]["passed"] is True
    assert load_bridge("phi").unembed.b_U.abs().max() > 0.1


def test_json_values_are_consistent_with_pure_rows(family_runs):
    doc = _strict_json(_outputs(family_runs["llama"][1], "llama")[0])
    frame = pd.read_csv(_outputs(family_runs["llama"][1], "llama")[2])
    diag = doc["diagnostics"]
    semantic = frame.index[frame["is_answer"]].tolist()
    assert diag["L_semantic"] == (semantic[0] if semantic else None)
    assert (frame["p_answer"] <= frame["p_top5"] + frame["rest_mass"] + 1e-6).all()
    assert ((frame["rest_mass"] >= 0) & (frame["rest_mass"] <= 1)).all()
    assert (frame["answer_rank"] >= 1).all()
    final_top = doc["final_prediction"]["topk"][0]
    assert frame["top1"].iloc[-1] == final_top[0]
    assert frame["prob1"].iloc[-1] == pytest.approx(final_top[1], abs=1e-6)


# ---- strategies, flags ------------------------------------------------------------------------

@pytest.mark.parametrize("strategy,layer0_norm,label", [
    ("final", "using_ln_final_on_embeddings", "ln_final"),
    ("none", "no_normalization", None),
])
def test_norm_strategies(tiny_dirs, tmp_path, strategy, layer0_norm, label):
    assert run.main(["--device", "cpu", tiny_dirs["gpt2"], "--out_dir", str(tmp_path), "--norm", strategy,
                     "--quiet"]) == 0
    doc = _strict_json(_outputs(tmp_path, "gpt2")[0])
    diag = doc["diagnostics"]
    assert diag["layer0_norm_fix"] == layer0_norm
    assert diag["use_norm_lens"] is (strategy != "none")
    assert {entry["norm"] for entry in diag["norm_strategy"]["per_layer"]} == {label}
    check = diag["last_layer_consistency"]
    assert check["pipeline_passed"] is True  # the gate always uses ln_final
    assert check["passed"] is (strategy != "none")  # the raw lens's last layer is not the model's


def test_none_differs_from_final(tiny_dirs, tmp_path):
    for strategy in ("final", "none"):
        run.main(["--device", "cpu", tiny_dirs["llama"], "--out_dir", str(tmp_path / strategy), "--norm", strategy,
                  "--quiet"])
    final = pd.read_csv(_outputs(tmp_path / "final", "llama")[2])
    raw = pd.read_csv(_outputs(tmp_path / "none", "llama")[2])
    assert (final["entropy"] - raw["entropy"]).abs().max() > 1e-3


def test_self_test_passes_and_writes_nothing_regression_defect_1(tiny_dirs, tmp_path, capsys,
                                                                  monkeypatch):
    """Legacy defect 1: --self-test crashed (undefined tokenizer), then was skipped silently."""
    monkeypatch.setattr(run, "RUN_BASE_DIR", str(tmp_path))
    assert run.main(["--device", "cpu", tiny_dirs["gemma2"], "--self-test"]) == 0
    out = capsys.readouterr().out
    assert "✅ Self-test passed: KL(model‖lens) =" in out and "(tolerance 1e-06)" in out
    assert os.listdir(tmp_path) == []


def test_self_test_fails_when_the_lens_is_wrong(tiny_dirs, tmp_path, capsys, monkeypatch):
    """Break the transform on purpose: the gate must notice and exit 1."""
    from layers_core import numerics

    monkeypatch.setattr(numerics, "output_logits_transform", lambda model: lambda z: z * 0.5)
    monkeypatch.setattr(run, "RUN_BASE_DIR", str(tmp_path))
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--self-test"]) == 1
    assert "❌ Self-test FAILED" in capsys.readouterr().out


def test_keep_residuals_writes_n_plus_1_files_regression_defect_2(tiny_dirs, load_bridge, tmp_path):
    """Legacy defect 2: --keep-residuals crashed on a path used before assignment."""
    assert run.main(["--device", "cpu", tiny_dirs["qwen3"], "--out_dir", str(tmp_path), "--keep-residuals",
                     "--quiet"]) == 0
    n = load_bridge("qwen3").cfg.n_layers
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".pt"))
    assert files == [f"qwen3_{i:02d}_resid.pt" for i in range(n + 1)]
    tensor = torch.load(tmp_path / files[0])
    assert tensor.shape[0] == 1 and tensor.shape[2] == load_bridge("qwen3").cfg.d_model


def test_thread_count_unchanged_regression_defect_11(tiny_dirs, tmp_path):
    """Legacy defect 11: torch.set_num_threads(1) made CPU runs single-threaded."""
    before = torch.get_num_threads()
    run.main(["--device", "cpu", tiny_dirs["llama"], "--out_dir", str(tmp_path), "--quiet"])
    assert torch.get_num_threads() == before


def test_nasty_prompt_round_trips_through_both_csvs(tiny_dirs, tmp_path):
    prompt = 'Quotes " and commas, back\\slashes and\nnew lines'
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--out_dir", str(tmp_path), "--prompt", prompt,
                     "--answer", "x", "--quiet"]) == 0
    _, records_path, pure_path = _outputs(tmp_path, "llama")
    frame = pd.read_csv(records_path, dtype=str, keep_default_na=False)
    tokens = frame[frame["layer"] == "0"]["token"].tolist()
    assert "".join(tokens).replace("<|bos|>", "") == prompt
    assert any('"' in t for t in tokens) and any("\n" in t for t in tokens)
    assert any("\\" in t for t in tokens) and any("," in t for t in tokens)
    assert len(pd.read_csv(pure_path, dtype=str, keep_default_na=False).columns) == 55


# ---- managed directories and errors ----------------------------------------------------------

def test_managed_mode_rotates_run_latest(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(run, "RUN_BASE_DIR", str(tmp_path))
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--quiet"]) == 0
    first = sorted(os.listdir(tmp_path / "run-latest"))
    assert "output-llama.json" in first and any(f.startswith("timestamp-") for f in first)
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--quiet"]) == 0
    assert len([d for d in os.listdir(tmp_path) if d.startswith("run-2")]) == 1
    assert not [d for d in os.listdir(tmp_path) if d.startswith(".staging")]


def test_missing_model_dir_error_document_and_untouched_run_latest_regression_defect_8(
        tiny_dirs, tmp_path, monkeypatch, capsys):
    """Legacy defect 8: a failure wrote plain text into output-<model>.json."""
    monkeypatch.setattr(run, "RUN_BASE_DIR", str(tmp_path))
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--quiet"]) == 0
    latest = tmp_path / "run-latest"
    before = {f: (latest / f).read_bytes() for f in os.listdir(latest)}
    capsys.readouterr()
    assert run.main(["--device", "cpu", str(tmp_path / "no-such-model")]) == 1
    err = capsys.readouterr().err
    assert "model directory not found" in err and "Traceback" not in err
    assert {f: (latest / f).read_bytes() for f in os.listdir(latest)} == before
    failed = [d for d in os.listdir(tmp_path) if d.endswith("-failed")]
    assert len(failed) == 1
    doc = _strict_json(tmp_path / failed[0] / "output-no-such-model.error.json")
    assert doc["error"]["stage"] == "load" and doc["error"]["type"] == "ModelLoadError"
    assert set(doc["error"]) == {"type", "message", "stage", "model", "timestamp"}
    assert list(doc) == ["error", "provenance"] and doc["provenance"]["model_source"] == "local_dir"


@pytest.mark.parametrize("make_dir,needle", [
    (lambda p: p, "no config.json"),
    (lambda p: (p / "config.json").write_text(
        '{"architectures": ["FooForCausalLM"], "model_type": "foo"}') and p, "cannot load"),
])
def test_bad_model_dirs_fail_with_one_line(tmp_path, capsys, make_dir, needle):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    make_dir(model_dir)
    out = tmp_path / "out"
    assert run.main(["--device", "cpu", str(model_dir), "--out_dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert needle in err and err.strip().count("\n") == 0
    assert _strict_json(out / "output-model.error.json")["error"]["stage"] == "load"


def test_uncached_hub_id_offline_fails_cleanly(tmp_path, capsys):
    assert run.main(["--device", "cpu", "no-such-org/no-such-model", "--out_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "not in the local Hugging Face cache" in err and "Traceback" not in err


def test_launcher_two_models_forwards_flags(tiny_dirs, tmp_path):
    done = subprocess.run(
        [sys.executable, RUN_PY, "--device", "cpu", tiny_dirs["llama"], str(tmp_path / "missing"), "--norm",
         "final",
         "--prompt", PROMPT, "--answer", ANSWER, "--out_dir", str(tmp_path / "out"), "--quiet"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 1
    assert "✅ llama: SUCCESS (exit 0)" in done.stdout
    assert "❌ missing: FAILED (exit 1)" in done.stdout
    doc = _strict_json(tmp_path / "out" / "output-llama.json")
    assert doc["diagnostics"]["norm_strategy"]["name"] == "final"  # --norm was forwarded
    assert doc["prompt"]["context_prompt"] == PROMPT
    assert "error" in _strict_json(tmp_path / "out" / "output-missing.error.json")


def test_launcher_forwards_self_test(tiny_dirs, tmp_path):
    done = subprocess.run([sys.executable, RUN_PY, "--device", "cpu", tiny_dirs["llama"], tiny_dirs["gpt2"],
                           "--self-test", "--quiet", "--no-plots"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("Self-test passed") == 2


# ---- the bundled real model  (docs: the bundled model) ------------------------------------------------------

@pytest.fixture(scope="module")
def bundled_run(bundled_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundled")
    code = run.main(["--device", "cpu", "--out_dir", str(out), "--quiet"])
    return code, str(out)


def test_bundled_default_model_run(bundled_run):
    code, out = bundled_run
    assert code == 0
    doc = _strict_json(_outputs(out, "SmolLM2-135M-Instruct")[0])
    frame = pd.read_csv(_outputs(out, "SmolLM2-135M-Instruct")[2], keep_default_na=False)
    assert doc["provenance"]["model_source"] == "bundled_default"
    for picture in ("lens", "curves"):  # a person looks at these first
        assert os.path.getsize(os.path.join(out, f"output-SmolLM2-135M-Instruct-{picture}.png")) > 50_000
    assert doc["provenance"]["n_tokens"] == 17 and doc["provenance"]["bos_prepended"] is True
    assert doc["provenance"]["model_path"].endswith("smollm2-135m-instruct-q4_1-fp32")
    assert doc["final_prediction"]["topk"][0][0] == " Berlin"
    assert doc["final_prediction"]["topk"][0][1] == pytest.approx(0.82, abs=0.03)
    assert doc["gold_answer"]["first_id"] == 11452 and doc["gold_answer"]["variant"] == "with_space"
    last = frame.iloc[-1]
    assert last["top1"] == " Berlin" and last["answer_rank"] == 1
    assert last["p_answer"] == pytest.approx(0.82, abs=0.03)
    assert last["p_answer"] <= last["p_top5"] and last["kl_to_final_bits"] < 1e-5
    assert doc["diagnostics"]["L_semantic"] == 30
    assert doc["diagnostics"]["last_layer_consistency"]["kl_model_to_lens_bits"] < 1e-6
    assert doc["diagnostics"]["layer0_position_info"] == "token_only_rotary_model"
    # the default final lens: ` Berlin` climbs through the last layers (SPEC facts: 185, then 31)
    assert frame["answer_rank"].iloc[28] == 185 and frame["answer_rank"].iloc[29] == 31
    arch = pd.read_csv(os.path.join(out, "output-SmolLM2-135M-Instruct-pure-next-token-arch.csv"))
    lens_entropy = arch["entropy"].iloc[:30]
    assert (lens_entropy > 12).all() and (lens_entropy < 15.6).all()  # arch lens: near-uniform


def test_timing_block_splits_the_whole_run(bundled_run):
    doc = _strict_json(_outputs(bundled_run[1], "SmolLM2-135M-Instruct")[0])
    timing = doc["timing"]
    assert list(timing) == [*run.TIMING_KEYS, "total_s"]
    assert all(timing[key] > 0 for key in run.TIMING_KEYS)
    assert sum(timing[key] for key in run.TIMING_KEYS) <= timing["total_s"] + 0.01


def test_bundled_final_lens_ranks(bundled_model_dir, tmp_path):
    assert run.main(["--device", "cpu", "--out_dir", str(tmp_path), "--norm", "final", "--quiet"]) == 0
    frame = pd.read_csv(_outputs(tmp_path, "SmolLM2-135M-Instruct")[2])
    ranks = frame["answer_rank"].tolist()
    assert ranks[28:] == [185, 31, 1]
    assert all(rank >= 100 for rank in ranks[:29])
    assert frame["kl_to_final_bits"].iloc[-1] < 1e-6


def test_kl_sanity_script_is_the_same_gate(tiny_dirs):
    script = os.path.join(os.path.dirname(RUN_PY), "kl_sanity_test.py")
    done = subprocess.run([sys.executable, script, tiny_dirs["gemma2"]], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("✅ Self-test passed: KL(model‖lens) =")
    missing = subprocess.run([sys.executable, script, "/no/such/dir"], capture_output=True,
                             text=True)
    assert missing.returncode == 1 and "model directory not found" in missing.stderr


def test_comparison_lens_csv_and_block(family_runs, load_bridge):
    out = family_runs["llama"][1]
    doc = _strict_json(_outputs(out, "llama")[0])
    block = doc["lens_comparison"]
    assert (block["chosen"], block["other"]) == ("arch", "final")
    frame = pd.read_csv(os.path.join(out, "output-llama-pure-next-token-final.csv"))
    assert list(frame.columns) == pure_header()
    n = load_bridge("llama").cfg.n_layers
    assert len(frame) == n + 1 and len(block["per_layer"]) == n + 1
    last = block["per_layer"][-1]  # both lenses decode the last layer through ln_final
    assert last["top1_agree"] is True and last["kl_chosen_to_other_bits"] < 1e-6
    assert block["per_layer"][0]["kl_chosen_to_other_bits"] > 1e-3  # ln1 of block 0 vs ln_final differ
    assert set(block["milestones"]) == {"arch", "final"}
    arch = pd.read_csv(_outputs(out, "llama")[2])
    assert frame["kl_to_final_bits"].iloc[-1] == pytest.approx(arch["kl_to_final_bits"].iloc[-1],
                                                               abs=1e-6)
