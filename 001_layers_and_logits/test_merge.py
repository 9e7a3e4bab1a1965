"""merge: shards of one run joined into exactly the unsharded run's files; models compared."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import run
from test_battery import FACTS, _facts_file, _summary

from conftest import HERE


def test_three_shards_merged_equal_the_unsharded_run(tiny_dirs, tmp_path):
    facts = _facts_file(tmp_path, FACTS * 1 + [{**f, "id": f["id"] + "2"} for f in FACTS[:2]])
    base = ["--device", "cpu", tiny_dirs["llama"], "--prompts", facts, "--quiet", "--batch-size", "3"]
    assert run.main([*base, "--out_dir", str(tmp_path / "whole")]) == 0
    for k in range(3):
        assert run.main([*base, "--shard", f"{k}/3", "--out_dir", str(tmp_path / f"shard{k}")]) == 0
    merge = os.path.join(HERE, "merge.py")
    done = subprocess.run([sys.executable, merge, *(str(tmp_path / f"shard{k}") for k in range(3)),
                           "--out", str(tmp_path / "merged")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    whole, merged = _summary(tmp_path / "whole"), _summary(tmp_path / "merged")
    assert list(merged["prompt_id"]) == list(whole["prompt_id"])
    numeric = [c for c in whole.columns if c not in ("prompt_id", "prompt", "answer", "final_top1", "gold_status")]
    for column in numeric:
        a = pd.to_numeric(whole[column].replace("", None))
        b = pd.to_numeric(merged[column].replace("", None))
        assert ((a - b).abs().fillna(0) <= 1e-5).all() and (a.isna() == b.isna()).all(), column
    assert (whole[["final_top1", "gold_status"]] == merged[["final_top1", "gold_status"]]).all().all()
    pure_whole = pd.read_csv(tmp_path / "whole" / "output-llama-pure-next-token.csv")
    pure_merged = pd.read_csv(tmp_path / "merged" / "output-llama-pure-next-token.csv")
    assert (pure_whole["entropy"] - pure_merged["entropy"]).abs().max() <= 1e-5
    doc = json.loads((tmp_path / "merged" / "output-llama.json").read_text())
    assert doc["aggregate"] == json.loads((tmp_path / "whole" / "output-llama.json").read_text())["aggregate"]
    assert os.path.exists(tmp_path / "merged" / "output-llama-summary.png")


def test_merge_refuses_conflicts(tiny_dirs, tmp_path):
    from layers_core.results.merge import MergeError, merge

    facts = _facts_file(tmp_path, FACTS[:3])
    base = ["--device", "cpu", tiny_dirs["llama"], "--prompts", facts, "--quiet", "--no-plots"]
    assert run.main([*base, "--shard", "0/2", "--out_dir", str(tmp_path / "a")]) == 0
    assert run.main([*base, "--shard", "0/2", "--out_dir", str(tmp_path / "b")]) == 0
    assert run.main([*base, "--shard", "1/2", "--norm", "arch", "--out_dir", str(tmp_path / "c")]) == 0
    with pytest.raises(MergeError, match="prompt id 'de' appears in both"):
        merge([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "out"))
    with pytest.raises(MergeError, match="differ in settings"):
        merge([str(tmp_path / "a"), str(tmp_path / "c")], str(tmp_path / "out"))
    with pytest.raises(MergeError, match="hold 2 of the set's 3 prompts"):
        merge([str(tmp_path / "a")], str(tmp_path / "out"))


def test_comparison_across_models(tiny_dirs, tmp_path):
    from layers_core.results.merge import COMPARISON_COLUMNS

    facts = _facts_file(tmp_path, FACTS[:3])
    for family in ("llama", "gpt2"):
        assert run.main(["--device", "cpu", tiny_dirs[family], "--prompts", facts, "--quiet", "--no-plots",
                         "--out_dir", str(tmp_path / family)]) == 0
    done = subprocess.run([sys.executable, os.path.join(HERE, "merge.py"), str(tmp_path / "llama"),
                           str(tmp_path / "gpt2"), "--out", str(tmp_path / "both")], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(tmp_path / "both" / "comparison.csv")
    assert list(table.columns) == COMPARISON_COLUMNS and len(table) == 6
    assert set(table["model"]) == {"llama", "gpt2"}
    with_value = table.dropna(subset=["L_semantic"])
    fraction = (with_value["L_semantic"] / with_value["n_layers"]).round(3)
    assert (fraction == with_value["L_semantic_fraction"]).all()
    assert os.path.getsize(tmp_path / "both" / "comparison.png") > 10_000
