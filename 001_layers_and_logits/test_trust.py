"""No run may succeed with wrong numbers, and no run may lose or mix results.

Every failure here ends the same way: at most three non-empty stderr lines, no traceback, no ✅,
exit 2 for usage errors found before any model work and 1 for failed runs.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import run
import torch

from conftest import RUN_PY, assert_clean_failure

PROMPT = "The capital of Germany is called simply"


def _snapshot(directory):
    return {os.path.relpath(os.path.join(d, f), directory): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(directory) for f in files}


def _tiny_copy(tiny_dirs, family, destination):
    shutil.copytree(tiny_dirs[family], destination)
    return str(destination)


def _rewrite_weights(directory, edit):
    from safetensors.torch import load_file, save_file

    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# ---- 1. weights, architectures, the last-layer gate ------------------------------------------

@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory):
    from tiny_models import train_tokenizer
    from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration

    root = tmp_path_factory.mktemp("encoders")
    bert, t5 = str(root / "bert"), str(root / "t5")
    BertModel(BertConfig(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(bert)
    T5ForConditionalGeneration(T5Config(vocab_size=320, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                        num_heads=2)).save_pretrained(t5)
    for directory in (bert, t5):
        train_tokenizer(directory)
    return {"bert": bert, "t5": t5}


@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_encoder_models_are_refused_before_loading(managed, encoder_dirs, capsys, kind):
    before = _snapshot(managed / "run-latest")
    capsys.readouterr()
    code = run.main(["--device", "cpu", encoder_dirs[kind], "--quiet"])
    captured = capsys.readouterr()
    assert_clean_failure(captured, code, 1)
    assert "is not a decoder-only causal LM" in captured.err
    assert _snapshot(managed / "run-latest") == before


def test_missing_weights_fail_at_load_naming_them(tiny_dirs, tmp_path, capsys):
    model = _tiny_copy(tiny_dirs, "llama", tmp_path / "llama-no-head")
    _rewrite_weights(model, lambda tensors: tensors.pop("lm_head.weight"))
    code = run.main(["--device", "cpu", model, "--out_dir", str(tmp_path / "out"), "--quiet"])
    captured = capsys.readouterr()
    assert_clean_failure(captured, code, 1)
    assert "randomly initialised: lm_head.weight" in captured.err
    document = json.loads((tmp_path / "out" / "output-llama-no-head.error.json").read_text())
    assert document["error"]["stage"] == "load" and "lm_head.weight" in document["error"]["message"]


def test_unused_checkpoint_keys_are_a_warning(tiny_dirs, tmp_path, capsys):
    model = _tiny_copy(tiny_dirs, "llama", tmp_path / "llama-extra")
    _rewrite_weights(model, lambda tensors: tensors.update({"extra.probe.weight": torch.zeros(2)}))
    assert run.main(["--device", "cpu", model, "--out_dir", str(tmp_path / "out"), "--quiet", "--no-plots"]) == 0
    assert "checkpoint keys not used by the model: extra.probe.weight" in capsys.readouterr().err


def _break_the_lens(monkeypatch):
    from layers_core import numerics

    monkeypatch.setattr(numerics, "output_logits_transform", lambda model: lambda z: z * 0.5)


def test_failed_last_layer_check_fails_the_run(managed, tiny_dirs, monkeypatch, capsys):
    before = _snapshot(managed / "run-latest")
    _break_the_lens(monkeypatch)
    capsys.readouterr()
    code = run.main(["--device", "cpu", tiny_dirs["llama"], "--quiet", "--no-plots"])
    captured = capsys.readouterr()
    assert_clean_failure(captured, code, 1)
    assert "last-layer lens does not reproduce the model's logits" in captured.err
    assert _snapshot(managed / "run-latest") == before
    failed = [d for d in os.listdir(managed) if d.endswith("-failed")]
    document = json.loads((managed / failed[0] / "output-llama.error.json").read_text())
    assert document["error"]["stage"] == "lens" and document["error"]["type"] == "LensMismatchError"


def test_allow_lens_mismatch_publishes_with_the_check_recorded(tiny_dirs, tmp_path, monkeypatch):
    _break_the_lens(monkeypatch)
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--out_dir", str(tmp_path), "--quiet", "--no-plots",
                     "--allow-lens-mismatch"]) == 0
    check = json.loads((tmp_path / "output-llama.json").read_text())["diagnostics"]["last_layer_consistency"]
    assert check["passed"] is False and check["kl_model_to_lens_bits"] > 1e-3


def test_half_precision_gate_tolerance(load_bridge):
    """The gate is 1e-6 bits in float32 and 1e-2 bits when the model computes in half precision."""
    from layers_core.lens.unembed import Unembedding
    from layers_core.pipeline.decode import gate_row
    from layers_core.pipeline.sweep import last_layer_consistency

    bridge = load_bridge("llama")
    unembed = Unembedding(bridge.unembed.W_U, None, lambda z: z)
    resid = torch.randn(bridge.cfg.d_model)
    logits = unembed.logits(bridge.ln_final(resid.unsqueeze(0)))[0] + 0.01 * torch.randn(bridge.cfg.d_vocab)
    gate = unembed.log_probs(gate_row(bridge, resid))
    exact = last_layer_consistency(gate, logits, None, unembed, torch.float32)
    half = last_layer_consistency(gate, logits, None, unembed, torch.bfloat16)
    assert exact["tolerance_bits"] == 1e-6 and exact["passed"] is False
    assert half["tolerance_bits"] == 1e-2 and half["passed"] is True


def test_kl_sanity_script_is_seeded_like_run_py(tiny_dirs):
    import kl_sanity_test

    torch.use_deterministic_algorithms(False)
    assert kl_sanity_test.main([tiny_dirs["llama"]]) == 0
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.initial_seed() == 316


# ---- 2. same folder names, 3. --answer alone ----------------------------------------------------

def test_models_with_the_same_folder_name_keep_distinct_files(tiny_dirs, tmp_path):
    first = _tiny_copy(tiny_dirs, "llama", tmp_path / "org1" / "final")
    second = _tiny_copy(tiny_dirs, "gpt2", tmp_path / "org2" / "final")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, RUN_PY, "--device", "cpu", first, second, "--out_dir", str(out),
                           "--quiet",
                           "--no-plots", "--no-control"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "✅ org1-final: SUCCESS" in done.stdout and "✅ org2-final: SUCCESS" in done.stdout
    for name, path in (("org1-final", first), ("org2-final", second)):
        document = json.loads((out / f"output-{name}.json").read_text())
        assert document["provenance"]["model_path"] == path
    assert not (out / "output-final.json").exists()


def test_distinct_names_rule():
    from layers_core.run_dir import distinct_names

    ids = ["a/final", "b/final", "gpt2", "x/y/gpt2", "gpt2"]
    names = distinct_names(ids, ["final", "final", "gpt2", "gpt2", "gpt2"])
    assert names == ["a-final", "b-final", "gpt2", "y-gpt2", "gpt2-2"]


# ---- 4. reusing --out_dir, 5. partial batches -------------------------------------------------


def test_batch_with_a_failed_model_is_published_as_partial(managed, tiny_dirs, capsys):
    before = _snapshot(managed / "run-latest")
    capsys.readouterr()
    code = run.main(["--device", "cpu", tiny_dirs["gpt2"], str(managed / "missing-model"), "--quiet",
                     "--no-plots"])
    captured = capsys.readouterr()
    assert code == 1 and "run-latest/ left as it was" in captured.out
    assert _snapshot(managed / "run-latest") == before
    partial = [d for d in os.listdir(managed) if d.endswith("-partial")]
    assert len(partial) == 1
    inside = os.listdir(managed / partial[0])
    assert "output-gpt2.json" in inside and "output-missing-model.error.json" in inside


# ---- 6. bad --out_dir -------------------------------------------------------------------------


# ---- 7. Ctrl-C, stale staging, pruning ---------------------------------------------------------

def test_interrupt_leaves_no_staging_and_run_latest_untouched(managed, tiny_dirs, monkeypatch, capsys):
    from layers_core.api import prompt as api

    before = _snapshot(managed / "run-latest")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "analyse_prompt", interrupted)
    capsys.readouterr()
    code = run.main(["--device", "cpu", tiny_dirs["llama"], "--quiet"])
    captured = capsys.readouterr()
    assert_clean_failure(captured, code, 130)
    assert captured.err.strip() == "interrupted"
    assert not [d for d in os.listdir(managed) if d.startswith(".staging")]
    assert _snapshot(managed / "run-latest") == before


@pytest.mark.parametrize("signum,code,line", [(signal.SIGINT, 130, "interrupted"),
                                              (signal.SIGTERM, 143, "terminated")])
def test_a_signal_to_a_real_run_ends_it_in_one_line(tiny_dirs, tmp_path, signum, code, line):
    """SIGTERM (timeout, Slurm) like Ctrl-C: one line, its exit code, no staging, earlier results
    byte-identical, and no child left holding the caller's pipes (communicate would hang)."""
    out = tmp_path / "out"
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--out_dir", str(out), "--quiet", "--no-plots"]) == 0
    before = _snapshot(out)
    process = subprocess.Popen([sys.executable, RUN_PY, tiny_dirs["llama"], "--out_dir", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline()
    if first.startswith("  threads"):  # printed first when another process keeps a core busy
        first = process.stdout.readline()
    assert first.startswith("▶")  # the picture worker is running by now
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)  # EOF on both pipes: nothing else holds them
    assert process.returncode == code, err
    assert [text for text in err.splitlines() if text.strip()] == [line]
    assert _snapshot(out) == before
    assert not [n for n in os.listdir(out) if n.startswith(".staging")]


# ---- 8. the hub without network ---------------------------------------------------------------

def test_hub_id_without_network_fails_fast(tmp_path, monkeypatch, capsys):
    from layers_core.model import loading as models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout_s=3.0: False)
    started = time.perf_counter()
    code = run.main(["--device", "cpu", "no-such-org/no-such-model", "--out_dir", str(tmp_path)])
    captured = capsys.readouterr()
    assert_clean_failure(captured, code, 1)
    assert "the hub could not be reached" in captured.err and time.perf_counter() - started < 10


def test_hub_probe_gives_up_within_its_timeout():
    from layers_core.model import loading as models

    started = time.perf_counter()
    models._hub_reachable(timeout_s=0.5)  # no network here: refused, unresolvable or timed out
    assert time.perf_counter() - started < 5


# ---- 9. threads ---------------------------------------------------------------------------------


# ---- 10. smaller usage errors --------------------------------------------------------------------


def test_prompt_set_key_typo_and_byte_order_mark(tmp_path, capsys):
    from layers_core.results.prompt_sets import load_prompt_set

    typo = tmp_path / "typo.jsonl"
    typo.write_text('{"prompt": "a", "answer": "b", "control_promt": "c"}\n')
    with pytest.raises(SystemExit) as info:
        run.main(["--device", "cpu", "--prompts", str(typo)])
    captured = capsys.readouterr()
    assert_clean_failure(captured, info.value.code, 2)
    assert "unknown key 'control_promt' (did you mean 'control_prompt'?)" in captured.err
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes('{"id": "x", "prompt": "a", "answer": "b"}\n'.encode("utf-8-sig"))
    assert [item.prompt_id for item in load_prompt_set(str(bom))] == ["x"]
