"""Trust, round 4 (#31): batteries of any size stream to disk, a merge checks that every shard is
complete and writes what the unsharded run writes (heatmaps included), manual shards of one
``--out_dir`` never overwrite each other."""

import json
import os
import re
import subprocess
import sys

import pytest
import run

from conftest import HERE, assert_clean_failure
from layers_core.api import prompt_set
from layers_core.results.merge import merge
from layers_core.results.set_files import read_prompt_entries

FACTS = [{"id": f"p{i}", "prompt": f"Fact {i}: the capital of Germany is", "answer": "Berlin"} for i in range(9)]


def _facts(tmp_path, facts=FACTS):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(fact) + "\n" for fact in facts))
    return str(path)


def _files(directory):
    """Every output file but the JSON document (provenance, timing), the HTML page's provenance
    line (when and how each run started) left out."""
    def content(name):
        data = (directory / name).read_bytes()
        return re.sub(rb'"provenance":\{[^{}]*\}', b'"provenance":null', data) if name.endswith(".html") else data

    return {name: content(name) for name in sorted(os.listdir(directory))
            if name.startswith("output-") and not name.endswith(".json")}


@pytest.fixture(scope="module")
def whole_and_shards(tiny_dirs, tmp_path_factory):
    """The set run whole, and as three manual shards into one --out_dir (batch size 1: every
    prompt computed exactly as alone, so the files can be compared byte for byte)."""
    root = tmp_path_factory.mktemp("battery")
    base = ["--device", "cpu", tiny_dirs["llama"], "--prompts", _facts(root), "--quiet", "--records",
            "--batch-size", "1"]
    assert run.main([*base, "--out_dir", str(root / "whole")]) == 0
    for k in range(3):
        assert run.main([*base, "--shard", f"{k}/3", "--out_dir", str(root / "shards")]) == 0
    return root


def test_manual_shards_of_one_out_dir_each_keep_their_files(whole_and_shards):
    """``--shard 0/3``, ``1/3``, ``2/3`` into one --out_dir each printed ✅ and overwrote each
    other: only the last survived."""
    shards = whole_and_shards / "shards"
    assert sorted(os.listdir(shards)) == ["shard-0-of-3", "shard-1-of-3", "shard-2-of-3"]
    for k in range(3):
        entries = list(read_prompt_entries(shards / f"shard-{k}-of-3" / "output-llama-prompts.jsonl"))
        assert [e["prompt_id"] for e in entries] == [f"p{i}" for i in range(k, 9, 3)]


def test_a_merge_writes_what_the_unsharded_run_writes_heatmaps_included(whole_and_shards):
    """merge.py's HTML dropped the per-prompt heatmaps of a --records set: 283 KB, not 1,023 KB."""
    root = whole_and_shards
    merge([str(root / "shards")], str(root / "merged"))
    whole, merged = _files(root / "whole"), _files(root / "merged")
    assert sorted(merged) == sorted(whole)
    for name in whole:
        assert merged[name] == whole[name], name
    html = merged["output-llama.html"].decode()
    assert html.count('"heatmap":') == len(FACTS)
    documents = [json.loads((root / d / "output-llama.json").read_text()) for d in ("whole", "merged")]
    assert documents[1]["aggregate"] == documents[0]["aggregate"]
    assert documents[1]["prompts_file"] == "output-llama-prompts.jsonl"


def _copy_shards(root, target):
    import shutil

    shutil.copytree(root / "shards", target)
    return target


@pytest.mark.parametrize("damage,named,why", [
    ("pure", "shard-1-of-3/output-llama-pure-next-token.csv", "rows for 3 prompts where its document needs"),
    ("records", "shard-1-of-3/output-llama-records.csv", "the shard is truncated or incomplete"),
    ("jsonl", "shard-1-of-3/output-llama-prompts.jsonl", "entries, its document 3"),
    ("json", "shard-1-of-3/output-llama.json", "not a readable JSON document (JSONDecodeError"),
    ("missing", "shard-1-of-3/output-llama-summary.csv", "missing"),
])
def test_a_truncated_or_missing_shard_file_is_named_and_nothing_is_merged(whole_and_shards, tmp_path, damage,
                                                                           named, why):
    """A shard's pure CSV cut by two rows merged with ✅ 24 prompts and a CSV two rows short; a
    shard's truncated JSON named no file."""
    shards = _copy_shards(whole_and_shards, tmp_path / "shards")
    shard = shards / "shard-1-of-3"
    if damage in ("pure", "records", "jsonl"):
        path = shard / {"pure": "output-llama-pure-next-token.csv", "records": "output-llama-records.csv",
                        "jsonl": "output-llama-prompts.jsonl"}[damage]
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(lines[:-2 if damage != "jsonl" else -1]))
    elif damage == "json":
        path = shard / "output-llama.json"
        path.write_text(path.read_text()[:200])
    else:
        (shard / "output-llama-summary.csv").unlink()
    done = subprocess.run([sys.executable, os.path.join(HERE, "merge.py"), str(shards), "--out",
                           str(tmp_path / "out"), "--no-plots"], capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr and "✅" not in done.stdout
    assert done.stderr.count("\n") == 1 and str(shards / named) in done.stderr and why in done.stderr
    out = tmp_path / "out"
    assert not out.exists() or not any(name.startswith("output-") for name in os.listdir(out))


def test_a_set_larger_than_a_window_streams_and_resumes_to_the_same_files(tiny_dirs, tmp_path, monkeypatch):
    """Windows of 4 prompts over 9: each window's outcomes leave in file order and are not kept."""
    monkeypatch.setattr(prompt_set, "WINDOW", 4)
    base = ["--device", "cpu", tiny_dirs["llama"], "--prompts", _facts(tmp_path), "--quiet", "--batch-size", "1"]
    assert run.main([*base, "--out_dir", str(tmp_path / "streamed")]) == 0
    monkeypatch.setattr(prompt_set, "WINDOW", 512)
    assert run.main([*base, "--out_dir", str(tmp_path / "one-window")]) == 0
    streamed, whole = _files(tmp_path / "streamed"), _files(tmp_path / "one-window")
    for name in whole:
        assert streamed[name] == whole[name], name
    kept = []
    real = prompt_set.SetFileWriter.add
    monkeypatch.setattr(prompt_set, "WINDOW", 4)
    monkeypatch.setattr(prompt_set.SetFileWriter, "add", lambda self, o: kept.append(o.index) or real(self, o))
    from layers_core.results.progress import ProgressStore

    monkeypatch.setattr(ProgressStore, "finish", lambda self: None)
    assert run.main([*base, "--out_dir", str(tmp_path / "resumed")]) == 0
    monkeypatch.undo()
    monkeypatch.setattr(prompt_set, "WINDOW", 4)
    assert run.main([*base, "--out_dir", str(tmp_path / "resumed"), "--resume"]) == 0
    assert _files(tmp_path / "resumed") == streamed
    assert kept == list(range(9))


def test_a_streamed_set_keeps_no_outcome_in_memory(load_bridge, tmp_path):
    import layers_core as lc

    lm = lc.load(load_bridge("llama"))
    result = prompt_set.stream_prompt_set(lm, FACTS, "logit", None, prompt_set.SetPlan(),
                                          prompt_set.SetOutput(str(tmp_path), "llama", plots=False))
    assert result.outcomes == [] and result.sweeps == {}
    assert result.document["prompt_set"]["count"] == len(FACTS) == result.document["aggregate"]["count"]
    in_memory = lc.sweep_set(lm, FACTS)
    streamed = read_prompt_entries(tmp_path / "output-llama-prompts.jsonl")
    assert [e["prompt_id"] for e in in_memory.entries] == [e["prompt_id"] for e in streamed]
    assert in_memory.document["aggregate"] == result.document["aggregate"]


def test_a_damaged_checkpoint_is_named_in_one_line(tiny_dirs, tmp_path, monkeypatch, capsys):
    """A truncated checkpoint batch said ``JSONDecodeError … column 4998`` and named no file."""
    from layers_core.results.progress import ProgressStore

    base = ["--device", "cpu", tiny_dirs["llama"], "--prompts", _facts(tmp_path), "--quiet", "--no-plots",
            "--batch-size", "3", "--out_dir", str(tmp_path / "out")]
    monkeypatch.setattr(ProgressStore, "finish", lambda self: None)
    assert run.main(base) == 0
    monkeypatch.undo()
    batch = sorted((tmp_path / "out" / ".progress-llama").glob("batch-*.json"))[1]
    batch.write_text(batch.read_text()[:100])
    capsys.readouterr()
    code = run.main([*base, "--resume"])
    captured = capsys.readouterr()
    assert_clean_failure(captured, code, 1)
    assert f"{batch}: a damaged checkpoint (JSONDecodeError" in captured.err
