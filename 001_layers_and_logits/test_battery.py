"""Fact batteries: batched sets equal one-at-a-time, shards merge to the unsharded run, a killed
run resumes to the uninterrupted result, cross-model comparison, the bundled battery."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import run
from tiny_models import FAMILIES

import layers_core as lc
from conftest import RUN_PY
from layers_core.api.prompt_set import SetPlan, run_prompt_set, sweep_set
from layers_core.pipeline.sweep import SweepSettings
from layers_core.results.outcome import PromptOutcome
from layers_core.results.prompt_sets import load_prompt_set

HERE = os.path.dirname(os.path.abspath(__file__))
BATTERY = os.path.join(HERE, "facts", "capitals.jsonl")
FACTS = [  # different lengths, so that a batch pads
    {"id": "de", "prompt": "The capital of Germany is called simply", "answer": "Berlin"},
    {"id": "fr", "prompt": "Give the city name only, plain text. The capital of France is called simply",
     "answer": "Paris"},
    {"id": "jp", "prompt": "Tokyo", "answer": "Japan"},
    {"id": "q", "prompt": 'Quotes " and, commas, back\\slashes', "answer": "x"},
    {"id": "it", "prompt": "In Germany the capital city is known as", "answer": "Berlin"},
]


def _facts_file(tmp_path, facts):
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join(json.dumps(f) for f in facts) + "\n")
    return str(path)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_batched_set_equals_one_prompt_at_a_time(load_bridge, family):
    lens_model = lc.load(load_bridge(family))
    batched = sweep_set(lens_model, FACTS, settings=SweepSettings(batch_size=4))
    alone = sweep_set(lens_model, FACTS, settings=SweepSettings(batch_size=1))
    assert [o.prompt_id for o in batched.outcomes] == [f["id"] for f in FACTS]  # input order
    for fact in FACTS:
        ours, theirs = batched.sweeps[fact["id"]].pure, alone.sweeps[fact["id"]].pure
        assert (ours["entropy"] - theirs["entropy"]).abs().max() <= 1e-4
        assert (ours["kl_to_final_bits"] - theirs["kl_to_final_bits"]).abs().max() <= 1e-4
        decided = (np.log(theirs["prob1"]) - np.log(theirs["prob2"])) > 1e-4  # top-1/top-2 log-prob gap
        assert (ours["top1"][decided] == theirs["top1"][decided]).all()
        assert len(batched.sweeps[fact["id"]].records) == 0  # records only on request


def test_views_decoded_in_groups_through_one_buffer_equal_one_prompt_at_a_time(load_bridge):
    """A budget of one prompt's views: every group reuses the buffer the previous one was read from."""
    from layers_core.pipeline.decode import view_rows
    from layers_core.pipeline.sweep import SweepSettings

    lens_model = lc.load(load_bridge("llama"))
    one_prompt = view_rows(lens_model.n_layers + 1) * int(lens_model.unembed.W_U.shape[-1]) * 4
    grouped = sweep_set(lens_model, FACTS, settings=SweepSettings(batch_size=5, budget_bytes=one_prompt))
    together = sweep_set(lens_model, FACTS, settings=SweepSettings(batch_size=5))
    alone = sweep_set(lens_model, FACTS, settings=SweepSettings(batch_size=1))
    for fact in FACTS:
        ours, theirs = grouped.sweeps[fact["id"]], alone.sweeps[fact["id"]]
        assert (ours.pure["entropy"] - theirs.pure["entropy"]).abs().max() <= 1e-5
        assert (ours.pure["kl_to_final_bits"] - theirs.pure["kl_to_final_bits"]).abs().max() <= 1e-5
        assert (ours.comparison["entropy"] - theirs.comparison["entropy"]).abs().max() <= 1e-5
        assert ours.analysis.consistency["kl_model_to_lens_bits"] <= 1e-6
        pd.testing.assert_frame_equal(ours.pure, together.sweeps[fact["id"]].pure, check_exact=True)


def test_controls_forwarded_in_a_batch_equal_their_own_forward(load_bridge):
    controlled = [dict(fact, control_prompt=FACTS[(i + 1) % len(FACTS)]["prompt"],
                       control_answer=FACTS[(i + 1) % len(FACTS)]["answer"]) for i, fact in enumerate(FACTS)]
    controlled[2] = FACTS[2]  # a prompt without a control among them
    lens_model = lc.load(load_bridge("llama"))
    batched = sweep_set(lens_model, controlled, settings=SweepSettings(batch_size=5))
    alone = sweep_set(lens_model, controlled, settings=SweepSettings(batch_size=1))
    for fact in controlled:
        ours = batched.sweeps[fact["id"]].analysis.blocks
        theirs = alone.sweeps[fact["id"]].analysis.blocks
        if "control_prompt" not in fact:
            assert ours["control_summary"] is None and theirs["control_summary"] is None
            continue
        assert ours["control_summary"]["control_prompt"] == fact["control_prompt"]
        margins = np.array([row["control_margin"] for row in ours["control_margins"]])
        expected = np.array([row["control_margin"] for row in theirs["control_margins"]])
        assert margins.shape == expected.shape == (lens_model.n_layers + 1,)
        assert np.abs(margins - expected).max() <= 1e-5
        assert ours["control_summary"]["status"] == theirs["control_summary"]["status"] == "ok"


def test_a_set_keeps_rows_not_full_vocabulary_tensors(load_bridge):
    """Each prompt's [L, V] log-probs go once it is analysed (they were 13 MB a prompt on the
    bundled model), and its model logits are its own [1, V], not a view of its batch's."""
    lens_model = lc.load(load_bridge("llama"))
    vocab = int(lens_model.unembed.W_U.shape[-1])
    for batch_size in (1, 4):
        result = sweep_set(lens_model, FACTS, settings=SweepSettings(batch_size=batch_size))
        for prompt_sweep in result.sweeps.values():
            assert prompt_sweep.analysis.result.views is None
            assert prompt_sweep.analysis.result.model_logits.untyped_storage().nbytes() == vocab * 4


def test_batch_of_one_is_the_single_prompt_path_bit_for_bit(load_bridge):
    lens_model = lc.load(load_bridge("llama"))
    in_set = sweep_set(lens_model, FACTS[:2], settings=SweepSettings(batch_size=1, records=True))
    for fact in FACTS[:2]:
        alone = lc.sweep(lens_model, fact["prompt"], fact["answer"], control=False)
        pd.testing.assert_frame_equal(in_set.sweeps[fact["id"]].pure, alone.pure, check_exact=True)
        pd.testing.assert_frame_equal(in_set.sweeps[fact["id"]].records, alone.records, check_exact=True)


def test_set_mode_writes_records_only_when_asked(tiny_dirs, tmp_path):
    facts = _facts_file(tmp_path, FACTS)
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--prompts", facts, "--out_dir",
                     str(tmp_path / "a"), "--quiet", "--no-plots"]) == 0
    names = os.listdir(tmp_path / "a")
    assert "output-llama-records.csv" not in names and "output-llama-pure-next-token.csv" in names
    timing = json.loads((tmp_path / "a" / "output-llama.json").read_text())["timing"]
    assert timing["forward_s"] > 0 and timing["lens_s"] > 0
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--prompts", facts, "--out_dir",
                     str(tmp_path / "b"), "--quiet", "--no-plots", "--records"]) == 0
    records = pd.read_csv(tmp_path / "b" / "output-llama-records.csv", keep_default_na=False)
    assert records.columns[0] == "prompt_id" and list(dict.fromkeys(records["prompt_id"])) == \
        [f["id"] for f in FACTS]


def _summary(directory, name="llama"):
    return pd.read_csv(os.path.join(directory, f"output-{name}-summary.csv"), dtype=str, keep_default_na=False)


def test_killed_run_resumes_to_the_uninterrupted_result(tiny_dirs, tmp_path):
    facts = _facts_file(tmp_path, [{**f, "id": f"{f['id']}{i}"} for i in range(8) for f in FACTS])
    argv = [sys.executable, RUN_PY, "--device", "cpu", tiny_dirs["llama"], "--prompts", facts,
            "--quiet", "--no-plots", "--batch-size", "1"]
    out = tmp_path / "killed"
    process = subprocess.Popen([*argv, "--out_dir", str(out)])
    progress = out / ".progress-llama"
    deadline = time.time() + 120
    while time.time() < deadline and len([n for n in os.listdir(progress) if n.startswith("batch-")]
                                         if progress.exists() else []) < 3:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    batches = sorted(n for n in os.listdir(progress) if n.startswith("batch-"))
    assert 3 <= len(batches) < 40 and not (out / "output-llama.json").exists()
    for name in batches:  # every checkpoint is whole
        json.loads((progress / name).read_text())
    assert subprocess.run([*argv, "--out_dir", str(out), "--resume"]).returncode == 0
    assert subprocess.run([*argv, "--out_dir", str(tmp_path / "whole")]).returncode == 0
    for name in ("output-llama-summary.csv", "output-llama-pure-next-token.csv"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    resumed = json.loads((out / "output-llama.json").read_text())
    assert resumed["aggregate"]["count"] == 40


def test_resume_refuses_checkpoints_made_with_other_settings(tiny_dirs, tmp_path, capsys):
    from layers_core.results.progress import ProgressStore

    facts = _facts_file(tmp_path, FACTS[:2])
    base = ["--device", "cpu", tiny_dirs["llama"], "--prompts", facts, "--quiet", "--no-plots",
            "--out_dir", str(tmp_path / "out")]
    assert run.main(base) == 0
    assert not (tmp_path / "out" / ".progress-llama").exists()  # a completed set leaves no checkpoints
    ProgressStore(str(tmp_path / "out"), "llama", {"norm": "arch", "model": tiny_dirs["llama"]}).start(False)
    assert run.main([*base, "--resume", "--norm", "final"]) == 2  # found before the model loads
    err = capsys.readouterr().err
    assert "were made with other settings (" in err and "norm" in err and err.count("\n") == 1


def test_the_bundled_battery():
    facts = load_prompt_set(BATTERY)
    assert len(facts) >= 150 and len({f.prompt_id for f in facts}) == len(facts)
    for fact in facts:
        assert fact.prompt == ("Give the city name only, plain text. "
                               f"The capital of {fact.prompt_id} is called simply")
        assert fact.control_answer != fact.answer and fact.control_prompt != fact.prompt
    capitals = {f.prompt_id: f.answer for f in facts}
    assert (capitals["Germany"], capitals["France"], capitals["Japan"], capitals["Australia"]) == \
        ("Berlin", "Paris", "Tokyo", "Canberra")


def test_bench_prompts_stays_runnable(tiny_dirs, capsys):
    import bench_prompts

    assert bench_prompts.main(["--prompts", "6", "--model", tiny_dirs["llama"]]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["prompts"] == 6 and result["set_s"] > 0 and result["sequential_over_set"] > 0
    assert result["set_controls_s"] > 0 and result["set_controls_over_floor"] > 0


def test_a_set_resumed_entirely_from_checkpoints_keeps_its_provenance(load_bridge):
    """Killed after the last batch but before the write: every outcome comes back from disk."""
    lens_model = lc.load(load_bridge("llama"))
    fresh = sweep_set(lens_model, FACTS[:2])
    done = {o.index: PromptOutcome.from_record(json.loads(json.dumps(o.to_record()))) for o in fresh.outcomes}
    resumed = run_prompt_set(lens_model, FACTS[:2], "logit", None, SetPlan(done=done))
    assert resumed.sweeps == {}
    facts = resumed.document["provenance"]
    assert facts == {**fresh.document["provenance"], "started_at": facts["started_at"]}
    assert facts["n_tokens"] == int(load_bridge("llama").to_tokens(FACTS[0]["prompt"]).shape[1])
