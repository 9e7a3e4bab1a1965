"""Trust, round 4 (#31): replacing a model's results is atomic, a set publishes before it drops its
checkpoints, two runs never write one model's files at once, and a run resumes only on the model
it started with. The kill tests kill a real process at every step of a publish."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import run

from conftest import assert_clean_failure
from layers_core import run_dir
from layers_core.run_dir import PublishError, RunLockedError, model_lock, publish_model_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD = {"output-m.json": "old json", "output-m-records.csv": "old records",
       "output-m-pure-next-token.csv": "old pure", "output-m-lens.png": "old png", "m_01_resid.pt": "old resid"}
NEW = {"output-m.json": "new json", "output-m-records.csv": "new records",
       "output-m-pure-next-token.csv": "new pure", "output-m.html": "new html"}
OTHER = {"output-other.json": "another model's"}

KILLED_PUBLISH = r"""
import os, signal, sys
from layers_core import run_dir
kill_at, directory = int(sys.argv[1]), sys.argv[2]
staging = run_dir.create_staging_dir(directory)
for name, text in {new}.items():
    with open(os.path.join(staging, name), "w") as handle:
        handle.write(text)
steps = [0]
def counted(real):
    def step(*args, **kwargs):
        steps[0] += 1
        if steps[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return step
os.rename, os.replace = counted(os.rename), counted(os.replace)
run_dir.publish_model_files(staging, directory, "m")
print(steps[0])
""".replace("{new}", repr(NEW))


def _model_files(directory):
    return {name: open(os.path.join(directory, name)).read() for name in os.listdir(directory)
            if not name.startswith(".") and name not in OTHER}


def _fill(directory, files):
    os.makedirs(directory, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(directory, name), "w") as handle:
            handle.write(text)


def _publish_killed_at(step, directory):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-c", KILLED_PUBLISH, str(step), str(directory)], env=env,
                          capture_output=True, text=True)


def test_a_publish_killed_at_every_step_leaves_the_old_or_the_new_set(tmp_path):
    """It deleted every old file, then renamed the new ones in: SIGKILL in between lost 3 of 8."""
    whole = tmp_path / "whole"
    _fill(whole, {**OLD, **OTHER})
    done = _publish_killed_at(0, whole)
    assert done.returncode == 0, done.stderr
    total = int(done.stdout)
    assert _model_files(whole) == NEW and total >= len(NEW) + 3  # journal twice, obsolete moves, renames
    outcomes = set()
    for step in range(1, total + 1):
        directory = tmp_path / f"kill-{step}"
        _fill(directory, {**OLD, **OTHER})
        killed = _publish_killed_at(step, directory)
        assert killed.returncode == -signal.SIGKILL
        for name, text in _model_files(directory).items():  # never a torn or foreign file, even now
            assert text in (OLD.get(name), NEW.get(name)), (step, name)
        run_dir.remove_stale_staging(str(directory))  # the next run in the directory
        after = _model_files(directory)
        assert after in (OLD, NEW), (step, after)
        assert open(directory / "output-other.json").read() == OTHER["output-other.json"]
        assert [n for n in os.listdir(directory) if n.startswith(".")] == []
        outcomes.add("new" if after == NEW else "old")
    assert outcomes == {"old", "new"}  # killed before the commit: undone; after it: completed


def _stuck(monkeypatch, name):
    """``os.rename`` of a file called ``name`` fails as an undeletable file's would."""
    real = os.rename

    def rename(source, target):
        if os.path.basename(source) == name:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(source, target)

    monkeypatch.setattr(os, "rename", rename)


def test_an_old_file_that_cannot_be_moved_keeps_the_old_set(tmp_path, monkeypatch):
    """It gave exit 1, a traceback, 3–4 of 5 earlier files gone and none of the new ones."""
    directory, staging = tmp_path / "out", tmp_path / "out" / ".staging-x"
    _fill(directory, {**OLD, **OTHER})
    _fill(staging, NEW)
    _stuck(monkeypatch, "output-m-lens.png")
    with pytest.raises(PublishError) as refused:
        publish_model_files(str(staging), str(directory), "m")
    assert _model_files(directory) == OLD
    assert "output-m-lens.png: Permission denied; its earlier files are kept" in refused.value.strerror


def test_run_py_reports_an_unreplaceable_file_in_one_line(tiny_dirs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--out_dir", str(out), "--quiet"]) == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    capsys.readouterr()
    _stuck(monkeypatch, "output-llama-lens.png")
    code = run.main(["--device", "cpu", tiny_dirs["llama"], "--out_dir", str(out), "--quiet", "--no-plots"])
    captured = capsys.readouterr()
    assert_clean_failure(captured, code, 1)
    assert "output-llama-lens.png: Permission denied; its earlier files are kept" in captured.err
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_signals_wait_for_the_end_of_a_publish():
    received = []
    previous = signal.signal(signal.SIGTERM, lambda *_: received.append(time.monotonic()))
    try:
        with run_dir.signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert received == []
            inside = time.monotonic()
        assert len(received) == 1 and received[0] >= inside
    finally:
        signal.signal(signal.SIGTERM, previous)


FACTS = [{"id": f"f{i}", "prompt": f"Fact number {i} is", "answer": "x"} for i in range(6)]


def _facts(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(fact) + "\n" for fact in FACTS))
    return str(path)


def test_a_set_publishes_before_it_drops_its_checkpoints(tiny_dirs, tmp_path, monkeypatch, capsys):
    """SIGTERM while a finished set deleted its checkpoints left nothing published, and without
    settings.json --resume refused: all 24 prompts had to be redone."""
    from layers_core.app import runner
    from layers_core.app.main import Terminated

    argv = ["--device", "cpu", tiny_dirs["llama"], "--prompts", _facts(tmp_path), "--out_dir",
            str(tmp_path / "out"), "--no-plots", "--batch-size", "2"]

    def terminated(*args):
        raise Terminated()

    monkeypatch.setattr(runner, "publish_model_files", terminated)
    assert run.main(argv) == 143
    progress = tmp_path / "out" / ".progress-llama"
    assert (progress / "settings.json").exists() and len(list(progress.glob("batch-*.json"))) == 3
    monkeypatch.undo()
    capsys.readouterr()
    assert run.main([*argv, "--resume"]) == 0
    assert "resume   6 of 6 prompts already done" in capsys.readouterr().out
    assert not progress.exists() and (tmp_path / "out" / "output-llama-summary.csv").exists()


def test_a_run_resumes_only_on_the_model_it_started_with(tiny_dirs, tmp_path, monkeypatch, capsys):
    """The checkpoints recorded the model's path and dtype only: 12 of 40 prompts came from the
    old weights, 28 from the new."""
    import shutil

    from tiny_models import build_tiny_model

    from layers_core.results.progress import ProgressStore

    model = shutil.copytree(tiny_dirs["llama"], tmp_path / "llama")
    argv = ["--device", "cpu", str(model), "--prompts", _facts(tmp_path), "--out_dir", str(tmp_path / "out"),
            "--quiet", "--no-plots"]
    monkeypatch.setattr(ProgressStore, "finish", lambda self: None)  # keep the checkpoints
    assert run.main(argv) == 0
    monkeypatch.undo()
    assert run.main([*argv, "--resume"]) == 0  # the same model: every prompt comes from the checkpoints
    monkeypatch.setattr(ProgressStore, "finish", lambda self: None)
    assert run.main(argv) == 0
    monkeypatch.undo()
    build_tiny_model("llama", str(model), seed=1)  # new weights at the same path
    capsys.readouterr()
    code = run.main([*argv, "--resume"])
    captured = capsys.readouterr()
    assert_clean_failure(captured, code, 1)
    assert f"the model at {model} changed since the checkpoints in" in captured.err


def test_a_second_run_of_the_same_model_into_one_out_dir_is_refused_in_one_line(tiny_dirs, tmp_path, capsys):
    """Two set runs into one --out_dir ended in ``FileNotFoundError …/.tmp-…``."""
    out = tmp_path / "out"
    out.mkdir()
    with model_lock(str(out), "llama") as lock:
        code = run.main(["--device", "cpu", tiny_dirs["llama"], "--prompts", _facts(tmp_path), "--out_dir",
                         str(out), "--quiet", "--no-plots"])
        captured = capsys.readouterr()
        assert_clean_failure(captured, code, 1)
        assert f"process {os.getpid()} on " in captured.err and f"(lock {lock})" in captured.err
    assert not os.path.exists(lock)


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / ".lock-llama").write_text(f"{run_dir.host_name()} {dead}\n")
    with model_lock(str(tmp_path), "llama"):
        assert (tmp_path / ".lock-llama").read_text().split() == [run_dir.host_name(), str(os.getpid())]
    (tmp_path / ".lock-llama").write_text(f"other-host {dead}\n")  # another host's: never taken over
    with pytest.raises(RunLockedError, match=f"process {dead} on other-host is writing llama"):
        with model_lock(str(tmp_path), "llama"):
            pass


def test_two_set_runs_at_once_end_with_one_complete_result(tiny_dirs, tmp_path):
    argv = [sys.executable, os.path.join(REPO, "001_layers_and_logits", "run.py"), "--device", "cpu",
            tiny_dirs["llama"], "--prompts", _facts(tmp_path), "--out_dir", str(tmp_path / "out"), "--quiet",
            "--no-plots"]
    runs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = [(process.wait(), process.stderr.read()) for process in runs]
    for code, err in outcomes:
        assert "Traceback" not in err
        assert code == 0 or (code == 1 and "is writing llama's results into" in err and err.count("\n") == 1)
    assert any(code == 0 for code, _ in outcomes)
    summary = (tmp_path / "out" / "output-llama-summary.csv").read_text().splitlines()
    assert len(summary) == 1 + len(FACTS)
    assert sorted(n for n in os.listdir(tmp_path / "out") if n.startswith(".")) == []


def test_a_full_disk_is_one_line_and_leaves_no_staging(tiny_dirs, tmp_path, monkeypatch, capsys):
    """``OSError 28`` from create_staging_dir was a traceback, and an empty .staging-* stayed."""
    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_dir, "atomic_write", full)
    code = run.main(["--device", "cpu", tiny_dirs["llama"], "--out_dir", str(tmp_path), "--quiet"])
    captured = capsys.readouterr()
    assert_clean_failure(captured, code, 1)
    assert f"cannot create a staging directory in {tmp_path}: [Errno 28] No space left on device" in captured.err
    assert os.listdir(tmp_path) == []


def test_sigterm_to_a_multi_model_parent_lets_the_child_clean_up(tiny_dirs, tmp_path):
    """SIGTERM to the parent killed the child outright, and the child's .staging-* (5 files) stayed."""
    out = tmp_path / "out"
    argv = [sys.executable, os.path.join(REPO, "001_layers_and_logits", "run.py"), "--device", "cpu",
            tiny_dirs["llama"], tiny_dirs["gpt2"], "--out_dir", str(out), "--quiet"]
    parent = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    def staging():
        return [n for n in os.listdir(out) if n.startswith(".staging-")] if out.exists() else []

    while time.time() < deadline and not staging():
        time.sleep(0.01)
    assert time.time() < deadline, "the first child never started"
    parent.send_signal(signal.SIGTERM)
    _, err = parent.communicate(timeout=120)
    assert parent.returncode == 143 and "terminated" in err and "Traceback" not in err
    assert staging() == []
    assert subprocess.run(["pgrep", "-f", "--", f"--out_dir {out}"], capture_output=True).returncode == 1


def test_a_disk_that_fills_while_writing_is_one_line_and_keeps_the_earlier_files(tiny_dirs, tmp_path, monkeypatch,
                                                                                 capsys):
    from layers_core.results import outputs

    out = tmp_path / "out"
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--out_dir", str(out), "--quiet", "--no-plots"]) == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    capsys.readouterr()

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "atomic_write", full)
    code = run.main(["--device", "cpu", tiny_dirs["llama"], "--out_dir", str(out), "--quiet", "--no-plots"])
    captured = capsys.readouterr()
    assert_clean_failure(captured, code, 1)
    assert "write failed: OSError: [Errno 28] No space left on device (no error document: " in captured.err
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
