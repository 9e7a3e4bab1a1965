"""Run directories: staging, rotation of ``run-latest/``, and atomic writes (no torch import).

Managed mode (SPEC §5.5): every file of an invocation is written into a staging directory. Only if
at least one model succeeded is the old ``run-latest/`` renamed to ``run-<its timestamp>`` and the
staging directory renamed to ``run-latest/``; otherwise the staging directory becomes
``run-<now>-failed`` and ``run-latest/`` is left byte-identical (legacy defect 9).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from datetime import datetime

RUN_LATEST = "run-latest"
TIMESTAMP_PREFIX = "timestamp-"
STAGING_PREFIX = ".staging-"
MINUTE_FORMAT = "%Y%m%d-%H%M"
SECOND_FORMAT = "%Y%m%d-%H%M%S"

Clock = Callable[[], datetime]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, data: str | bytes) -> None:
    """Writes ``data`` to ``path`` via a temp file in the same directory, fsync and ``os.replace``.

    Text is encoded as UTF-8. On failure the temp file is removed and ``path`` is untouched.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_path, 0o666 & ~_current_umask())  # mkstemp makes 0600; use normal perms
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise


def unique_path(path: str) -> str:
    """The first of ``path``, ``path-2``, ``path-3``, … that does not exist."""
    candidate, suffix = path, 2
    while os.path.lexists(candidate):
        candidate = f"{path}-{suffix}"
        suffix += 1
    return candidate


def write_timestamp_file(directory: str, now_fn: Clock = datetime.now) -> str:
    """Writes ``timestamp-<%Y%m%d-%H%M>`` with ``Experiment started: …`` into ``directory``."""
    now = now_fn()
    path = os.path.join(directory, TIMESTAMP_PREFIX + now.strftime(MINUTE_FORMAT))
    atomic_write(path, f"Experiment started: {now.strftime('%Y-%m-%d %H:%M:%S')}\n")
    return path


def rotate_run_latest(base_dir: str, now_fn: Clock = datetime.now) -> str | None:
    """Renames ``run-latest/`` to ``run-<first timestamp in sorted order>`` (collision-safe).

    A ``run-latest/`` without a timestamp file becomes ``run-<now>-rotated``. Returns the new path,
    or None if there was nothing to rotate.
    """
    latest = os.path.join(base_dir, RUN_LATEST)
    if not os.path.isdir(latest):
        return None
    stamps = sorted(name for name in os.listdir(latest) if name.startswith(TIMESTAMP_PREFIX))
    if stamps:
        name = "run-" + stamps[0][len(TIMESTAMP_PREFIX):]
    else:
        name = f"run-{now_fn().strftime(MINUTE_FORMAT)}-rotated"
    target = unique_path(os.path.join(base_dir, name))
    os.rename(latest, target)
    return target


def setup_run_latest_directory(base_dir: str, now_fn: Clock = datetime.now) -> str:
    """Legacy contract: rotate ``run-latest/``, recreate it with a timestamp file, return its path."""
    rotate_run_latest(base_dir, now_fn)
    latest = os.path.join(base_dir, RUN_LATEST)
    os.makedirs(latest, exist_ok=True)
    write_timestamp_file(latest, now_fn)
    return latest


def create_staging_dir(base_dir: str, now_fn: Clock = datetime.now) -> str:
    """Creates ``.staging-<%Y%m%d-%H%M%S>-<pid>`` with its timestamp file; returns its path."""
    os.makedirs(base_dir, exist_ok=True)
    name = f"{STAGING_PREFIX}{now_fn().strftime(SECOND_FORMAT)}-{os.getpid()}"
    staging = unique_path(os.path.join(base_dir, name))
    os.makedirs(staging)
    write_timestamp_file(staging, now_fn)
    return staging


def publish_staging_dir(
    staging_dir: str, base_dir: str, success: bool, now_fn: Clock = datetime.now
) -> str:
    """Publishes a finished staging dir and returns where it now lives.

    Success: rotate the old ``run-latest/`` away, then rename staging to ``run-latest/``.
    Failure: rename staging to ``run-<now>-failed`` (collision-safe); ``run-latest/`` untouched.
    """
    if not success:
        failed = unique_path(os.path.join(base_dir, f"run-{now_fn().strftime(MINUTE_FORMAT)}-failed"))
        os.rename(staging_dir, failed)
        return failed
    rotate_run_latest(base_dir, now_fn)
    latest = os.path.join(base_dir, RUN_LATEST)
    os.rename(staging_dir, latest)
    return latest


def output_paths(directory: str, clean_name: str) -> dict[str, str]:
    """The files of one model's run inside ``directory``, keyed by role."""
    stem = os.path.join(directory, f"output-{clean_name}")
    return {"json": f"{stem}.json", "records": f"{stem}-records.csv",
            "pure": f"{stem}-pure-next-token.csv", "lens_png": f"{stem}-lens.png",
            "curves_png": f"{stem}-curves.png", "summary": f"{stem}-summary.csv",
            "summary_png": f"{stem}-summary.png", "dir": directory}


def comparison_csv_path(directory: str, clean_name: str, norm_strategy: str) -> str:
    """``output-<clean>-pure-next-token-<norm>.csv``: the pure rows under the comparison lens."""
    return os.path.join(directory, f"output-{clean_name}-pure-next-token-{norm_strategy}.csv")


def residual_path(directory: str, clean_name: str, layer: int) -> str:
    """``<clean>_<LL>_resid.pt`` for ``--keep-residuals`` (LL two digits)."""
    return os.path.join(directory, f"{clean_name}_{layer:02d}_resid.pt")
