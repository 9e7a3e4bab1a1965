"""The tuned lens: the closed-form solver, the library's file format, fit_lens.py, --lens tuned."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import run
import torch

import layers_core as lc
from layers_core.lens.tuned import (
    NormalEquations,
    TunedLens,
    read_corpus,
    solve_translators,
    split_heldout,
    token_chunks,
)
from layers_core.results.set_files import read_prompt_entries

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT = "The capital of Germany is called simply"
TUNED_LENS_CONFIG_FIELDS = ["base_model_name_or_path", "d_model", "num_hidden_layers", "bias",
                            "base_model_revision", "unembed_hash", "lens_type",
                            "config_hash"]  # an extra key: the library's from_dict drops it with a warning


def test_solver_recovers_a_known_affine_map():
    """Y = X A + b (+ tiny noise) in the residual parametrisation h_L = h + h W.T + b."""
    gen = torch.Generator().manual_seed(0)
    d, n = 8, 4000
    a_true = torch.randn(d, d, generator=gen) * 0.3
    b_true = torch.randn(d, generator=gen)
    train, held = NormalEquations(1, d), NormalEquations(1, d)
    for stats in (train, held):
        x = torch.randn(n, d, generator=gen) * 2 + 1
        final = x + x @ a_true + b_true + 1e-3 * torch.randn(n, d, generator=gen)
        stats.add(torch.stack([x, final]))
    weights, biases, ridges = solve_translators(train, held)
    torch.testing.assert_close(weights[0], a_true.T, atol=2e-3, rtol=0)
    torch.testing.assert_close(biases[0], b_true, atol=2e-3, rtol=0)
    assert ridges[0] <= 1e-3  # almost no noise: the smallest ridges win on held-out error


def test_ridge_is_chosen_on_held_out_error():
    """Noise much larger than the signal: the held-out split picks a strong ridge."""
    gen = torch.Generator().manual_seed(1)
    d = 16
    train, held = NormalEquations(1, d), NormalEquations(1, d)
    for stats, n in ((train, 40), (held, 2000)):
        x = torch.randn(n, d, generator=gen)
        stats.add(torch.stack([x, x + 5 * torch.randn(n, d, generator=gen)]))
    _, _, ridges = solve_translators(train, held)
    assert ridges[0] >= 1e-2


def test_save_uses_the_tuned_lens_library_layout(tmp_path):
    lens = TunedLens(torch.randn(3, 4, 4), torch.randn(3, 4), "some/model")
    lens.save(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert list(config) == TUNED_LENS_CONFIG_FIELDS
    assert (config["d_model"], config["num_hidden_layers"], config["lens_type"]) == (4, 3, "linear_tuned_lens")
    state = torch.load(tmp_path / "params.pt", weights_only=True)
    assert sorted(state) == sorted(f"{i}.{p}" for i in range(3) for p in ("weight", "bias"))
    loaded = TunedLens.load(str(tmp_path))
    torch.testing.assert_close(loaded.weights, lens.weights, rtol=0, atol=0)
    h = torch.randn(2, 4)
    torch.testing.assert_close(loaded.translate(h, 1), h + h @ lens.weights[1].T + lens.biases[1])
    assert loaded.translate(h, 3) is h  # the last layer needs no translator


def test_corpus_chunks_are_deterministic_with_a_held_out_split(load_bridge, tmp_path):
    tokenizer = load_bridge("llama").tokenizer
    texts = list(read_corpus([str(_corpus(tmp_path))]))
    first = token_chunks(tokenizer, texts, 32, 1024)
    assert first == token_chunks(tokenizer, texts, 32, 1024)
    assert all(len(chunk) == 32 and chunk[0] == tokenizer.bos_token_id for chunk in first)
    train, held = split_heldout(first)
    assert len(held) == len(first) // 8 and not set(map(tuple, held)) & set(map(tuple, train))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: expected a JSON object with a 'text' string"):
        list(read_corpus([str(bad)]))


def _corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    from pydoc_data.topics import topics

    path.write_text("\n\n".join(topics[key] for key in sorted(topics)[:40]))
    return path


@pytest.fixture(scope="module")
def fitted_lens(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("lens")
    out = root / "lens"
    done = subprocess.run([sys.executable, os.path.join(HERE, "fit_lens.py"), tiny_dirs["llama"], "--device",
                           "cpu", "--corpus", str(_corpus(root)), "--tokens", "4096", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(out)
    return out


def test_fit_lens_writes_the_lens_and_its_evaluation(fitted_lens, load_bridge):
    names = sorted(os.listdir(fitted_lens))
    assert names == ["config.json", "eval.json", "eval.png", "params.pt"]
    report = json.loads((fitted_lens / "eval.json").read_text())
    n = load_bridge("llama").cfg.n_layers
    assert [row["layer"] for row in report["layers"]] == list(range(n))
    assert set(report["tokens"]) >= {"train", "validation", "evaluated"} and report["tokens"]["train"] >= 4096
    assert report["tokens"]["evaluated"] == 2048 and len(report["heldout"]["sha256"]) == 64
    for row in report["layers"]:
        for kind in ("logit", "tuned"):
            assert set(row[kind]) == {"kl_final_to_lens_bits", "kl_final_to_lens_bpb", "ce_bits", "top1_agree"}
            assert row[kind]["kl_final_to_lens_bits"] >= 0 and 0 <= row[kind]["top1_agree"] <= 1
    mean = {kind: sum(r[kind]["kl_final_to_lens_bits"] for r in report["layers"]) / n
            for kind in ("logit", "tuned")}
    assert mean["tuned"] < mean["logit"]


def test_a_zero_tuned_lens_is_the_final_logit_lens(load_bridge):
    bridge = load_bridge("gpt2")
    lens_model = lc.load(bridge)
    d, n = int(bridge.cfg.d_model), int(bridge.cfg.n_layers)
    zero = TunedLens(torch.zeros(n, d, d), torch.zeros(n, d))
    tuned = lc.sweep(lens_model, PROMPT, "Berlin", lens=zero, control=False)
    final = lc.sweep(lens_model, PROMPT, "Berlin", control=False)
    pd.testing.assert_frame_equal(tuned.pure, final.pure)
    assert tuned.diagnostics["norm_strategy"]["name"] == "tuned"
    assert tuned.analysis.comparison.strategy == "final"  # the logit lens under --norm (default final) beside it


def test_run_py_with_the_tuned_lens(fitted_lens, tiny_dirs, tmp_path):
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--lens", "tuned", "--lens-path", str(fitted_lens),
                     "--out_dir", str(tmp_path), "--quiet", "--no-plots"]) == 0
    document = json.loads((tmp_path / "output-llama.json").read_text())
    check = document["diagnostics"]["last_layer_consistency"]
    assert check["passed"] is True and check["kl_model_to_lens_bits"] <= 1e-6
    assert document["diagnostics"]["norm_strategy"]["name"] == "tuned"
    assert (tmp_path / "output-llama-pure-next-token-final.csv").exists()  # the logit lens, --norm final
    tuned = pd.read_csv(tmp_path / "output-llama-pure-next-token.csv")
    logit = pd.read_csv(tmp_path / "output-llama-pure-next-token-final.csv")
    assert tuned["kl_to_final_bits"].iloc[-1] == pytest.approx(logit["kl_to_final_bits"].iloc[-1], abs=1e-6)
    # another lens: not a copy of the logit rows (float32 noise ~1e-7)
    assert (tuned["entropy"].iloc[:-1] - logit["entropy"].iloc[:-1]).abs().max() > 1e-5


def test_tuned_lens_errors(tiny_dirs, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:  # found before the model loads
        run.main(["--device", "cpu", tiny_dirs["llama"], "--lens", "tuned", "--lens-path", str(tmp_path / "none"),
                  "--out_dir", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "no tuned lens there" in err and "layers-and-logits fit" in err
    assert err.count("\n") == 1
    wrong = TunedLens(torch.zeros(2, 8, 8), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="the model has 3 layers of width 64"):
        lc.sweep(lc.load(tiny_dirs["llama"], device="cpu"), PROMPT, "Berlin", lens=wrong)


# ---- fidelity fixes found beside the tuned lens -------------------------------------------------

def test_tied_embeddings_no_longer_make_layer_0_a_copy(bundled_model_dir):
    """The bundled model ties its embeddings: under the final lens layer 0 is the input token,
    which no copy flag counts (round 4: not even the CSV's)."""
    result = lc.sweep(lc.load(device="cpu"), control=False)
    assert result.diagnostics["tied_embeddings"] is True
    current = lc.load(device="cpu").bridge.to_str_tokens(lc.DEFAULT_PROMPT)[-1]
    assert result.pure.loc[0, "top1"] == current and not result.pure.loc[0, "copy_collapse"]
    assert result.diagnostics["L_copy"] != 0 and result.diagnostics["copy_collapse_excludes_layer0"]


def test_untied_models_keep_layer_0(load_bridge):
    assert lc.sweep(lc.load(load_bridge("llama")), PROMPT, "Berlin").diagnostics["tied_embeddings"] is False


def test_multi_token_answers_report_length_sequence_probability_and_ambiguity(load_bridge):
    from transformers import AutoTokenizer  # noqa: F401  (the bridge's tokenizer is used)

    bridge = load_bridge("llama")
    lens_model = lc.load(bridge)
    result = lc.sweep(lens_model, PROMPT, "Berlinqz", control=False)
    gold = result.document["gold_answer"]
    assert gold["n_tokens"] == len(gold["answer_ids"]) > 1
    tokens = bridge.to_tokens(PROMPT)
    full = torch.cat([tokens, torch.tensor([gold["answer_ids"]])], dim=1)
    with torch.no_grad():
        log_probs = torch.log_softmax(bridge.original_model(full).logits[0].float(), -1)
    start = tokens.shape[1] - 1
    expected = sum(float(log_probs[start + k, token]) for k, token in enumerate(gold["answer_ids"]))
    assert gold["p_sequence"] == pytest.approx(float(torch.tensor(expected).exp()), rel=1e-4)
    assert gold["p_sequence"] < result.pure["p_answer"].iloc[-1]  # the first piece alone is likelier
    facts = [{"id": "a", "prompt": PROMPT, "answer": "Berlinqz"},
             {"id": "b", "prompt": PROMPT, "answer": "Berlinxv"},
             {"id": "c", "prompt": PROMPT, "answer": "Paris"}]
    flags = [e["gold_answer"]["first_piece_ambiguous"] for e in lc.sweep_set(lens_model, facts).entries]
    assert flags == [True, True, False]


# ---- a lens belongs to one model (trust, round 3, case 5) -------------------------------------

def _other_model_named_llama(tiny_dirs, tmp_path):
    """Another model (its config differs: rope_theta) under the folder name the lens was fitted on."""
    import shutil

    target = tmp_path / "elsewhere" / "llama"
    shutil.copytree(tiny_dirs["llama"], target)
    config = json.loads((target / "config.json").read_text())
    config["rope_theta"] = 1234.0
    (target / "config.json").write_text(json.dumps(config))
    return str(target)


def test_a_fitted_lens_records_its_models_fingerprint(fitted_lens, tiny_dirs):
    from layers_core.lens.fingerprint import config_hash

    config = json.loads((fitted_lens / "config.json").read_text())
    assert config["config_hash"] == config_hash(tiny_dirs["llama"])
    assert len(config["unembed_hash"]) == 64  # the tuned-lens format's field, filled


def test_a_lens_of_another_model_is_refused_before_loading(fitted_lens, tiny_dirs, tmp_path, capsys):
    """A random model saved as …/SmolLM2-135M-Instruct ran --lens tuned with the real model's lens: ✅."""
    other = _other_model_named_llama(tiny_dirs, tmp_path)
    argv = ["--device", "cpu", other, "--lens", "tuned", "--lens-path", str(fitted_lens),
            "--out_dir", str(tmp_path / "out"), "--quiet", "--no-plots"]
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert "was fitted to another model (its config_hash differ" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # nothing loaded, nothing written
    assert run.main([*argv, "--allow-foreign-lens"]) == 0


def test_same_config_other_weights_is_refused_after_loading(fitted_lens, tiny_dirs, tmp_path, capsys):
    from tiny_models import build_tiny_model

    twin = build_tiny_model("llama", str(tmp_path / "twin" / "llama"), seed=7)  # same config.json
    code = run.main(["--device", "cpu", twin, "--lens", "tuned", "--lens-path", str(fitted_lens),
                     "--out_dir", str(tmp_path / "out"), "--quiet", "--no-plots"])
    err = capsys.readouterr().err
    assert code == 1 and "its unembed_hash differ" in err and "ForeignLensError" in err


def test_a_lens_without_fingerprint_loads_with_one_warning(fitted_lens, tiny_dirs, tmp_path, capsys):
    import shutil

    old = tmp_path / "old-lens"
    shutil.copytree(fitted_lens, old)
    config = json.loads((old / "config.json").read_text())
    config.update(unembed_hash=None, config_hash=None)
    (old / "config.json").write_text(json.dumps(config))
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--lens", "tuned", "--lens-path", str(old),
                     "--out_dir", str(tmp_path / "out"), "--quiet", "--no-plots"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(warnings) == 1 and "records no model fingerprint" in warnings[0]
    lens = json.loads((tmp_path / "out" / "output-llama.json").read_text())["provenance"]["lens"]
    assert lens == {"name": "tuned", "path": str(old), "fingerprint": None}


def test_provenance_records_the_lens_and_its_fingerprint(fitted_lens, tiny_dirs, tmp_path):
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--lens", "tuned", "--lens-path", str(fitted_lens),
                     "--out_dir", str(tmp_path), "--quiet", "--no-plots"]) == 0
    lens = json.loads((tmp_path / "output-llama.json").read_text())["provenance"]["lens"]
    config = json.loads((fitted_lens / "config.json").read_text())
    assert lens["path"] == str(fitted_lens)
    assert lens["fingerprint"] == {"config_hash": config["config_hash"], "unembed_hash": config["unembed_hash"]}


def test_a_merged_tuned_set_equals_the_unsharded_run(fitted_lens, tiny_dirs, tmp_path):
    """The merge used to title its pictures "arch lens" for a tuned set (it read settings["norm"]);
    runs and merges now share one document builder and one title."""
    from layers_core.results.merge import merge

    facts = tmp_path / "facts.jsonl"
    facts.write_text("\n".join(json.dumps({"id": f"f{i}", "prompt": f"{PROMPT} {i}", "answer": "Berlin"})
                               for i in range(4)) + "\n")
    base = ["--device", "cpu", tiny_dirs["llama"], "--prompts", str(facts), "--lens", "tuned", "--lens-path",
            str(fitted_lens), "--quiet", "--batch-size", "1"]
    assert run.main([*base, "--out_dir", str(tmp_path / "whole")]) == 0
    for k in range(2):
        assert run.main([*base, "--shard", f"{k}/2", "--out_dir", str(tmp_path / f"s{k}")]) == 0
    merge([str(tmp_path / "s0"), str(tmp_path / "s1")], str(tmp_path / "merged"))
    whole, merged = (json.loads((tmp_path / d / "output-llama.json").read_text()) for d in ("whole", "merged"))
    for volatile in ("merged_from", "shard", "path"):
        whole["prompt_set"].pop(volatile, None), merged["prompt_set"].pop(volatile, None)
    assert merged["prompt_set"] == whole["prompt_set"] and merged["aggregate"] == whole["aggregate"]
    strip = lambda entries: json.loads(json.dumps(entries).replace(str(tmp_path), ""))  # noqa: E731
    entries = {d: list(read_prompt_entries(tmp_path / d / "output-llama-prompts.jsonl"))
               for d in ("whole", "merged")}
    assert strip(entries["merged"]) == strip(entries["whole"])
    for picture in ("summary.png", "curves.png"):  # same rows, same title: the same pixels
        assert (tmp_path / "merged" / f"output-llama-{picture}").read_bytes() == \
            (tmp_path / "whole" / f"output-llama-{picture}").read_bytes()
