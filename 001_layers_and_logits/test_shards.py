"""``--shard auto`` under the launchers users run: torchrun (rank 0 merges after a barrier) and
Slurm (each array task a shard, then one ``merge.py OUT``); both equal an unsharded run."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import run

import layers_core as lc
from conftest import HERE, RUN_PY
from layers_core.results.set_files import read_prompt_entries

FACTS = [{"id": f"f{i}", "prompt": prompt, "answer": answer} for i, (prompt, answer) in enumerate([
    ("The capital of Germany is", "Berlin"), ("The capital of France is", "Paris"),
    ("The capital of Italy is", "Rome"), ("The capital of Spain is", "Madrid"),
    ("The capital of Japan is", "Tokyo")])]
TABLES = ("summary.csv", "pure-next-token.csv", "pure-next-token-arch.csv")


@pytest.fixture(scope="module")
def unsharded(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("unsharded")
    facts = root / "facts.jsonl"
    facts.write_text("\n".join(json.dumps(f) for f in FACTS) + "\n")
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--prompts", str(facts), "--out_dir",
                     str(root / "out"),
                     "--quiet", "--no-plots"]) == 0
    return facts, root / "out"


def _tables(directory):
    return {name: lc.read_csv(str(directory / f"output-llama-{name}")) for name in TABLES}


def _assert_same_tables(merged, whole):
    """Same rows, tokens, ranks and flags; probabilities equal to float32 rounding (the shards
    pad their batches to other lengths, so their matmuls round differently)."""
    ours = _tables(merged)
    for name, frame in _tables(whole).items():
        assert list(ours[name].columns) == list(frame.columns) and len(ours[name]) == len(frame)
        for column in frame.columns:
            bits = column in ("entropy", "kl_to_final_bits")  # differences of near-equal terms: absolute
            pd.testing.assert_series_equal(ours[name][column], frame[column], obj=f"{name}:{column}",
                                           check_exact=False, rtol=0 if bits else 1e-5,
                                           atol=1e-5 if bits else 1e-9)


def _env(**extra):
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    return {**env, **extra}


def test_torchrun_two_ranks_equal_an_unsharded_run(unsharded, tiny_dirs, tmp_path):
    facts, whole = unsharded
    out = tmp_path / "out"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    done = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", RUN_PY, tiny_dirs["llama"],
                           "--device", "cpu", "--prompts", str(facts), "--shard", "auto", "--out_dir", str(out),
                           "--no-plots", "--quiet"], capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["shard-0-of-2", "shard-1-of-2"]
    _assert_same_tables(out, whole)
    merged = json.loads((out / "output-llama.json").read_text())
    entries = read_prompt_entries(out / merged["prompts_file"])
    assert [e["prompt_id"] for e in entries] == [f["id"] for f in FACTS]
    assert merged["prompt_set"]["merged_from"] == [str(out / "shard-0-of-2"), str(out / "shard-1-of-2")]


def test_a_slurm_array_then_one_merge_equals_an_unsharded_run(unsharded, tiny_dirs, tmp_path):
    facts, whole = unsharded
    out = tmp_path / "out"
    tasks = [subprocess.Popen([sys.executable, RUN_PY, tiny_dirs["llama"], "--device", "cpu", "--prompts",
                               str(facts),
                               "--shard", "auto", "--out_dir", str(out), "--no-plots", "--quiet"],
                              env=_env(SLURM_ARRAY_TASK_ID=str(k), SLURM_ARRAY_TASK_COUNT="2"),
                              stderr=subprocess.PIPE, text=True) for k in range(2)]
    for task in tasks:
        assert task.wait(timeout=300) == 0, task.stderr.read()[-2000:]
    done = subprocess.run([sys.executable, os.path.join(HERE, "merge.py"), str(out), "--no-plots"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    _assert_same_tables(out, whole)


def test_shard_auto_reads_the_launchers_environment():
    from layers_core.results.prompt_sets import resolve_shard

    assert resolve_shard("auto", {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}).text == "1/4"
    assert resolve_shard("auto", {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}).local_rank == 1
    array = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert resolve_shard("auto", array).text == "2/3"  # the array wins over the task ids
    assert resolve_shard("auto", {"SLURM_PROCID": "3", "SLURM_NTASKS": "8"}).launcher == "slurm-tasks"
    with pytest.raises(ValueError, match="needs a launcher's environment"):
        resolve_shard("auto", {})
    with pytest.raises(ValueError, match="is not in 0"):
        resolve_shard("auto", {"RANK": "4", "WORLD_SIZE": "4"})


def test_shard_auto_without_a_launcher_is_a_usage_error(tmp_path, capsys, monkeypatch):
    for key in list(os.environ):
        if key.startswith(("SLURM_", "RANK", "WORLD_SIZE")):
            monkeypatch.delenv(key)
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps(FACTS[0]) + "\n")
    with pytest.raises(SystemExit) as info:
        run.main(["--prompts", str(facts), "--shard", "auto", "--out_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "needs a launcher's environment" in err and err.count("\n") == 1
