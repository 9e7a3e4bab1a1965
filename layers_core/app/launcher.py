"""Several models: one child ``python -m layers_core run`` process each, all writing into one directory.

Every flag is forwarded. Models whose folder names collide get distinct file names
(``org1-llama``, ``org2-llama``). In managed mode the batch replaces ``run-latest/`` only if every
model succeeded; otherwise it is published as ``run-<stamp>-partial`` (or ``-failed``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import suppress

from layers_core.app.cli import EXIT_FAILED, EXIT_OK, ExperimentConfig, child_argv
from layers_core.model.loading import clean_model_name
from layers_core.run_dir import (
    create_staging_dir,
    distinct_names,
    output_paths,
    prune_runs,
    publish_staging_dir,
    remove_stale_staging,
    rotation_target,
)

CHILD = [sys.executable, "-m", "layers_core", "run"]  # the same CLI as run.py, from any install


def _has_valid_json(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            json.load(handle)
        return True
    except (OSError, ValueError):
        return False


def _ensure_error_document(path: str, model: str, rc: int) -> None:
    """A child that died without leaving valid JSON gets an error document written for it."""
    if _has_valid_json(path):
        return
    from layers_core.results.outputs import write_error_document

    error = RuntimeError(f"child process exited with code {rc} without writing its results")
    write_error_document(path, error, "load", model, {"argv": sys.argv})


def _progress_line(done: int, total: int, started: float, model: str) -> str:
    from tqdm import tqdm

    bar = tqdm.format_meter(done, total, time.perf_counter() - started, ncols=70, prefix="models")
    return f"{bar}  next: {model}"


CHILD_GRACE_S = 60.0  # how long a signalled child may take to clean up before it is killed


def run_child(command: list[str]) -> int:
    """Runs one child to its end and returns its exit code. If this process is interrupted
    (SIGTERM raises ``Terminated``, Ctrl-C ``KeyboardInterrupt``), the child is sent the same
    signal and waited for, so it removes its staging directory itself (``subprocess.call``
    would SIGKILL it); then the interruption goes on."""
    child = subprocess.Popen(command)
    try:
        return child.wait()
    except KeyboardInterrupt as stop:  # Terminated too (a subclass)
        from layers_core.errors import Terminated

        with suppress(ProcessLookupError):
            child.send_signal(signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)
        try:
            child.wait(timeout=CHILD_GRACE_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        raise


def launch(models: list[str], config: ExperimentConfig, base_dir: str) -> int:
    """Runs each model in a child process, in order; prints one verdict line per model."""
    managed = config.out_dir is None and not config.self_test
    directory = None
    if managed:
        remove_stale_staging(base_dir)
        directory = create_staging_dir(base_dir)
    elif not config.self_test:
        directory = config.out_dir
        os.makedirs(directory, exist_ok=True)
    names = distinct_names(models, [clean_model_name(m) for m in models])
    outcomes = []
    started = time.perf_counter()
    try:
        for index, (model, name) in enumerate(zip(models, names)):
            if not config.quiet:
                print(_progress_line(index, len(models), started, model), flush=True)
            command = [*CHILD, *child_argv(config), "--name", name]
            if directory is not None:
                command += ["--out_dir", directory]
            rc = run_child(command + [model])
            if rc != EXIT_OK and directory is not None:
                _ensure_error_document(output_paths(directory, name)["error_json"], model, rc)
            outcomes.append((name, rc))
    except KeyboardInterrupt:
        if managed:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    for name, rc in outcomes:
        mark, word = ("✅", "SUCCESS") if rc == EXIT_OK else ("❌", "FAILED")
        print(f"{mark} {name}: {word} (exit {rc})")
    succeeded = [rc == EXIT_OK for _, rc in outcomes]
    if managed:
        where = publish_staging_dir(directory, base_dir, success=all(succeeded), partial=any(succeeded))
        if all(succeeded):
            prune_runs(base_dir, config.keep_runs, current=where)
            later = rotation_target(where)
            print(f"results in {where}" + (f" (moves to {later} when a newer run publishes)" if later else ""))
        else:
            print(f"some models failed: results in {where}; run-latest/ left as it was")
    return EXIT_OK if all(succeeded) else EXIT_FAILED
