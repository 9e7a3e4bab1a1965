"""Start-up resources: the default thread count gives back the cores other processes keep busy
(--threads overrides); the garbage collector is paused through start-up, then frozen and resumed."""

import gc
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import run
import torch

from layers_core import threads
from layers_core.app import collector


def test_thread_rule_gives_busy_cores_back():
    assert threads.threads_for(0.0, cores=2, default_threads=2) == 2
    assert threads.threads_for(0.3, cores=2, default_threads=2) == 2
    assert threads.threads_for(0.9, cores=2, default_threads=2) == 1
    assert threads.threads_for(3.0, cores=2, default_threads=2) == 1
    assert threads.threads_for(1.0, cores=16, default_threads=16) == 15


def test_busy_cores_of_others_subtracts_our_own_time():
    start = threads.CpuSnapshot(machine_busy_s=100.0, own_busy_s=10.0, wall_s=0.0)
    end = threads.CpuSnapshot(machine_busy_s=104.0, own_busy_s=12.0, wall_s=2.0)
    assert threads.busy_cores_of_others(start, end) == pytest.approx(1.0)
    assert threads.busy_cores_of_others(None, end) == 0.0


HOG = [sys.executable, "-c", "while True: pass"]


def _busy_while(seconds: float = 1.0) -> float:
    time.sleep(0.3)
    start = threads.snapshot()
    time.sleep(seconds)
    return threads.busy_cores_of_others(start, threads.snapshot())


def test_busy_core_is_detected_on_this_machine():
    """Another process's busy core (not our child: started by a shell that exits at once)."""
    command = " ".join(shlex.quote(part) for part in HOG)
    launched = subprocess.run(["sh", "-c", f"{command} >/dev/null 2>&1 & echo $!"], capture_output=True, text=True,
                              check=True)
    pid = int(launched.stdout.strip())
    try:
        busy = _busy_while()
    finally:
        os.kill(pid, signal.SIGKILL)
    assert busy > 0.6


def test_our_own_children_are_not_others():
    """The picture processes warm up while torch is imported: their CPU is the run's own."""
    hog = subprocess.Popen(HOG)
    try:
        busy = _busy_while()
    finally:
        hog.kill()
        hog.wait()
    assert busy < 0.4


def test_threads_flag_is_used_and_the_count_restored(tiny_dirs, tmp_path, monkeypatch):
    seen = []
    from layers_core.api import prompt as api

    real = api.analyse_prompt
    monkeypatch.setattr(api, "analyse_prompt",
                        lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    before = torch.get_num_threads()
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--out_dir", str(tmp_path), "--quiet", "--no-plots",
                     "--threads", "1"]) == 0
    assert seen == [1] and torch.get_num_threads() == before


def test_collector_resumes_only_what_was_paused():
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    collector.resume_after_load()  # never paused (tests, notebooks): nothing happens
    assert gc.isenabled() and gc.get_freeze_count() == frozen
    collector.pause()
    try:
        assert not gc.isenabled()
        alive = [[index] for index in range(1000)]  # tracked containers
        collector.resume_after_load()
        assert gc.isenabled() and gc.get_freeze_count() >= frozen + len(alive)
    finally:
        gc.enable()
        gc.unfreeze()


def test_the_entry_points_pause_the_collector_and_the_runner_resumes_it(tiny_dirs, tmp_path):
    probe = ("import gc, layers_core.app.main as m; "
             "m.main = lambda argv=None, base_dir=None, prog=None: print('collecting:', gc.isenabled()) or 0; "
             "m.script_main()")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout.strip()) == (0, "collecting: False")
    gc.disable()  # as script_main leaves it before the model loads
    try:
        assert run.main(["--device", "cpu", tiny_dirs["llama"], "--out_dir", str(tmp_path), "--quiet",
                         "--no-plots"]) == 0
        assert gc.isenabled()  # resumed once the model was loaded
    finally:
        gc.enable()
        gc.unfreeze()


def _hog_outside():
    """A busy process that is not our child (started by a shell that exits at once)."""
    command = " ".join(shlex.quote(part) for part in HOG)
    launched = subprocess.run(["sh", "-c", f"{command} >/dev/null 2>&1 & echo $!"], capture_output=True,
                              text=True, check=True)
    return int(launched.stdout.strip())


def test_the_notebook_api_gives_busy_cores_back_and_can_be_overridden(tiny_dirs, monkeypatch):
    """Notebooks kept torch's default: with another job on the machine, 8 prompts took 22–27 s on
    2 threads and 8.3–8.6 s on 1. A sweep now runs with the cores others left idle since the last
    one (or since loading began), restores torch's own count after, and ``lm.threads`` fixes it."""
    import layers_core as lc

    lm = lc.load(tiny_dirs["llama"], device="cpu")
    seen = []
    real = lm.bridge.forward

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(lm.bridge, "forward", recording)
    before = torch.get_num_threads()
    pid = _hog_outside()
    try:
        time.sleep(1.0)
        lc.sweep(lm, "one two three", "four", control=False)
    finally:
        os.kill(pid, signal.SIGKILL)
    cores = threads.available_cores()
    assert seen[-1] == (max(1, min(before, cores - 1)) if cores > 1 else 1)
    assert torch.get_num_threads() == before  # restored
    lm.threads = 1
    lc.sweep_set(lm, [{"prompt": "one two", "answer": "three"}])
    assert seen[-1] == 1 and torch.get_num_threads() == before
    lm.threads = 0
    with pytest.raises(ValueError, match="threads must be"):
        lc.sweep(lm, "one two", "three")
