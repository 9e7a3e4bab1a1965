"""run_dir: rotation with a fixed clock, collision safety, staging and publish, atomic writes."""

import os
import socket
import subprocess
import sys
import time
from datetime import datetime

import pytest
import run

from conftest import assert_clean_failure
from layers_core.run_dir import (
    atomic_write,
    create_staging_dir,
    prune_runs,
    publish_staging_dir,
    remove_stale_staging,
    rotate_run_latest,
    setup_run_latest_directory,
    unique_path,
)


def clock(*args):
    return lambda: datetime(*args)


def _snapshot(directory):
    return {name: open(os.path.join(directory, name), "rb").read()
            for name in sorted(os.listdir(directory))}


def test_first_call_creates_run_latest_with_timestamp(tmp_path):
    path = setup_run_latest_directory(str(tmp_path), clock(2025, 1, 1, 12, 0))
    assert path == str(tmp_path / "run-latest")
    stamp = tmp_path / "run-latest" / "timestamp-20250101-1200"
    assert stamp.read_text() == "Experiment started: 2025-01-01 12:00:00\n"


def test_second_call_rotates_to_first_timestamp(tmp_path):
    setup_run_latest_directory(str(tmp_path), clock(2025, 1, 1, 12, 0))
    setup_run_latest_directory(str(tmp_path), clock(2025, 1, 2, 13, 0))
    assert (tmp_path / "run-20250101-1200" / "timestamp-20250101-1200").exists()
    assert os.listdir(tmp_path / "run-latest") == ["timestamp-20250102-1300"]


def test_timestampless_run_latest_is_rotated_with_suffix(tmp_path):
    (tmp_path / "run-latest").mkdir()
    (tmp_path / "run-latest" / "data.csv").write_text("x")
    setup_run_latest_directory(str(tmp_path), clock(2025, 1, 3, 14, 0))
    assert (tmp_path / "run-20250103-1400-rotated" / "data.csv").read_text() == "x"


def test_existing_rotation_target_gets_a_suffix_regression_defect_9(tmp_path):
    """Legacy defect 9: rotation crashed (or overwrote) when run-<ts> already existed."""
    (tmp_path / "run-20250101-1200").mkdir()
    (tmp_path / "run-20250101-1200" / "keep").write_text("old")
    setup_run_latest_directory(str(tmp_path), clock(2025, 1, 1, 12, 0))
    setup_run_latest_directory(str(tmp_path), clock(2025, 1, 2, 13, 0))
    assert (tmp_path / "run-20250101-1200" / "keep").read_text() == "old"
    assert (tmp_path / "run-20250101-1200-2" / "timestamp-20250101-1200").exists()


def test_timestamp_choice_is_sorted(tmp_path):
    latest = tmp_path / "run-latest"
    latest.mkdir()
    for stamp in ("timestamp-20250105-0900", "timestamp-20250103-0800", "timestamp-20250104-0700"):
        (latest / stamp).write_text("")
    assert rotate_run_latest(str(tmp_path), clock(2025, 2, 1)) == str(tmp_path / "run-20250103-0800")


def test_failed_run_leaves_run_latest_byte_identical(tmp_path):
    setup_run_latest_directory(str(tmp_path), clock(2025, 1, 1, 12, 0))
    atomic_write(str(tmp_path / "run-latest" / "out.json"), '{"ok": true}')
    before = _snapshot(tmp_path / "run-latest")
    staging = create_staging_dir(str(tmp_path), clock(2025, 1, 2, 9, 30))
    atomic_write(os.path.join(staging, "out.json"), '{"error": {}}')
    where = publish_staging_dir(staging, str(tmp_path), success=False, now_fn=clock(2025, 1, 2, 9, 31))
    assert where == str(tmp_path / "run-20250102-0931-failed")
    assert _snapshot(tmp_path / "run-latest") == before
    assert not os.path.exists(staging)


def test_successful_publish_rotates_then_replaces(tmp_path):
    setup_run_latest_directory(str(tmp_path), clock(2025, 1, 1, 12, 0))
    staging = create_staging_dir(str(tmp_path), clock(2025, 1, 2, 9, 30))
    assert os.path.basename(staging).startswith(".staging-20250102-093000-")
    assert os.listdir(staging) == ["timestamp-20250102-0930"]
    publish_staging_dir(staging, str(tmp_path), success=True, now_fn=clock(2025, 1, 2, 9, 31))
    assert sorted(os.listdir(tmp_path / "run-latest")) == [".rotated-name", "timestamp-20250102-0930"]
    assert (tmp_path / "run-latest" / ".rotated-name").read_text() == "run-20250102-0930\n"  # its future name
    assert (tmp_path / "run-20250101-1200").is_dir()


def test_unique_path(tmp_path):
    base = str(tmp_path / "run-x")
    assert unique_path(base) == base
    os.mkdir(base)
    os.mkdir(base + "-2")
    assert unique_path(base) == base + "-3"


def test_atomic_write_replaces_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write(str(target), "first")
    atomic_write(str(target), b"second")
    assert target.read_text() == "second"
    with pytest.raises(TypeError):
        atomic_write(str(target), 12345)  # not str/bytes: nothing replaced, no temp left
    assert target.read_text() == "second" and os.listdir(tmp_path) == ["f.txt"]
    assert oct(os.stat(target).st_mode & 0o777) != oct(0o600)


def test_reused_out_dir_replaces_the_models_files_as_a_whole(tiny_dirs, tmp_path):
    out = tmp_path / "out"
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--out_dir", str(out), "--quiet",
                     "--keep-residuals"]) == 0
    assert run.main(["--device", "cpu", tiny_dirs["gpt2"], "--out_dir", str(out), "--quiet", "--no-plots"]) == 0
    assert (out / "output-llama-lens.png").exists() and (out / "llama_00_resid.pt").exists()
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--out_dir", str(out), "--quiet", "--no-plots",
                     "--norm", "final"]) == 0
    names = sorted(os.listdir(out))
    assert "output-llama-lens.png" not in names and "llama_00_resid.pt" not in names
    assert "output-llama-pure-next-token-final.csv" not in names  # the comparison lens is now arch
    assert "output-llama-pure-next-token-arch.csv" in names
    assert "output-gpt2.json" in names and "output-gpt2-records.csv" in names  # others stay
    assert not [n for n in names if n.startswith(".")]


@pytest.mark.parametrize("make", [lambda p: p / "a-file", lambda p: p / "a-file" / "below"])
def test_unusable_out_dir_is_a_usage_error_before_loading(tmp_path, capsys, make):
    (tmp_path / "a-file").write_text("x")
    started = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        run.main(["--device", "cpu", str(tmp_path / "never-loaded"), "--out_dir", str(make(tmp_path))])
    assert_clean_failure(capsys.readouterr(), info.value.code, 2)
    assert time.perf_counter() - started < 5


def test_read_only_out_dir_is_refused(tmp_path, monkeypatch):
    """Root ignores permission bits, so the check's own verdict is tested."""
    from layers_core import run_dir

    monkeypatch.setattr(run_dir.os, "access", lambda path, mode: False)
    assert "is not writable" in run_dir.check_writable_dir(str(tmp_path))


def test_stale_staging_of_dead_processes_on_this_host_is_swept(tmp_path):
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine_dead = tmp_path / f".staging-20250101-000000-{host}-{dead.pid}"
    mine_alive = tmp_path / f".staging-20250101-000000-{host}-{os.getpid()}"
    other_host = tmp_path / f".staging-20250101-000000-elsewhere-{dead.pid}"
    for directory in (mine_dead, mine_alive, other_host):
        directory.mkdir()
    assert remove_stale_staging(str(tmp_path)) == [str(mine_dead)]
    assert mine_alive.exists() and other_host.exists()


def test_keep_runs_prunes_the_oldest_runs_only(tmp_path):
    for name in ("run-20250101-1200", "run-20250102-1200-failed", "run-20250103-1200",
                 "run-20250104-1200-partial", "run-latest", "notes"):
        (tmp_path / name).mkdir()
    deleted = prune_runs(str(tmp_path), keep=2, current=str(tmp_path / "run-20250101-1200"))
    assert sorted(os.path.basename(p) for p in deleted) == ["run-20250102-1200-failed"]
    assert sorted(os.listdir(tmp_path)) == ["notes", "run-20250101-1200", "run-20250103-1200",
                                            "run-20250104-1200-partial", "run-latest"]


def test_managed_runs_keep_at_most_keep_runs(managed, tiny_dirs):
    for _ in range(3):
        assert run.main(["--device", "cpu", tiny_dirs["gpt2"], "--quiet", "--no-plots", "--keep-runs", "1"]) == 0
    rotated = [d for d in os.listdir(managed) if d.startswith("run-") and d != "run-latest"]
    assert len(rotated) == 1


def test_concurrent_managed_runs_each_know_their_own_directory(tmp_path):
    """Two runs started in the same minute both printed 'results in …/run-latest'; each now
    reserves the name it is rotated to, and says so, and that is where its files end up."""
    from layers_core.run_dir import rotation_target

    clock = lambda: datetime(2025, 1, 1, 12, 0)  # noqa: E731 - both runs in the same minute
    first, second = create_staging_dir(str(tmp_path), clock), create_staging_dir(str(tmp_path), clock)
    (tmp_path / "run-20250101-1200").mkdir()  # an older run already holds the plain name
    for staging, content in ((first, "first"), (second, "second")):
        atomic_write(os.path.join(staging, "output-m.json"), content)
    where_first = publish_staging_dir(first, str(tmp_path), success=True, now_fn=clock)
    promise_first = rotation_target(where_first)
    where_second = publish_staging_dir(second, str(tmp_path), success=True, now_fn=clock)
    promise_second = rotation_target(where_second)
    assert promise_first != promise_second and os.path.basename(promise_first) == "run-20250101-1200-2"
    with open(os.path.join(promise_first, "output-m.json")) as handle:
        assert handle.read() == "first"  # the first run is where it said it would be
    third = create_staging_dir(str(tmp_path), clock)
    publish_staging_dir(third, str(tmp_path), success=True, now_fn=clock)
    with open(os.path.join(promise_second, "output-m.json")) as handle:
        assert handle.read() == "second"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".reserved-run-20250101-1200-2")]
