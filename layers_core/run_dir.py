"""Run directories: staging, rotation of ``run-latest/``, and atomic writes (no torch import).

Managed mode: every file of an invocation is written into a staging directory
``.staging-<stamp>-<host>-<pid>``. Only if every model succeeded is the old ``run-latest/``
renamed to ``run-<its timestamp>`` and the staging directory renamed to ``run-latest/``; a batch
with some failures becomes ``run-<now>-partial``, one with none ``run-<now>-failed``, and
``run-latest/`` is left byte-identical (the legacy script rotated before knowing the outcome).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime

from layers_core.lens.views import VIEWS

RUN_LATEST = "run-latest"
TIMESTAMP_PREFIX = "timestamp-"
STAGING_PREFIX = ".staging-"
DEFAULT_KEEP_RUNS = 20
_STAGING_NAME = re.compile(r"\.staging-\d{8}-\d{6}-(?P<host>.+)-(?P<pid>\d+)(-\d+)?$")
_RUN_NAME = re.compile(r"run-\d{8}-\d{4}.*$")
MINUTE_FORMAT = "%Y%m%d-%H%M"
SECOND_FORMAT = "%Y%m%d-%H%M%S"

Clock = Callable[[], datetime]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AtomicFile:
    """A file written through a temp file beside ``path`` (``handle``; text in UTF-8 with
    ``newline=""``, or bytes): ``commit`` fsyncs it and renames it over ``path``, ``discard``
    removes it; until then ``path`` is untouched. ``atomic_write`` for data written at once; this
    for files appended to as they grow (a prompt set's CSVs)."""

    def __init__(self, path: str, binary: bool = False):
        self.path = path
        fd, self.tmp_path = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
        self.handle = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="")

    def commit(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.chmod(self.tmp_path, 0o666 & ~_current_umask())  # mkstemp makes 0600; use normal perms
        os.replace(self.tmp_path, self.path)

    def discard(self) -> None:
        self.handle.close()
        if os.path.exists(self.tmp_path):
            os.unlink(self.tmp_path)


def atomic_write(path: str, data: str | bytes) -> None:
    """Writes ``data`` to ``path`` via a temp file in the same directory, fsync and ``os.replace``.

    Text is encoded as UTF-8. On failure the temp file is removed and ``path`` is untouched.
    """
    target = AtomicFile(path, binary=True)
    try:
        target.handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        target.commit()
    except BaseException:
        target.discard()
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
    reserved = _reserved_name(latest)
    if reserved is not None and not os.path.exists(os.path.join(base_dir, reserved)):
        target = os.path.join(base_dir, reserved)
        os.rename(latest, target)
        _release(base_dir, reserved)
        return target
    target = unique_path(os.path.join(base_dir, _rotation_name(latest, now_fn)))
    os.rename(latest, target)
    return target


def _rotation_name(run_dir: str, now_fn: Clock) -> str:
    """``run-<first timestamp in sorted order>``, or ``run-<now>-rotated`` without a timestamp file."""
    stamps = sorted(name for name in os.listdir(run_dir) if name.startswith(TIMESTAMP_PREFIX))
    if stamps:
        return "run-" + stamps[0][len(TIMESTAMP_PREFIX):]
    return f"run-{now_fn().strftime(MINUTE_FORMAT)}-rotated"


ROTATED_NAME_FILE = ".rotated-name"  # inside a published run: the name rotation will give it
_RESERVATION_PREFIX = ".reserved-"  # in the base dir: a rotation name a published run holds


def _reserved_name(run_dir: str) -> str | None:
    try:
        with open(os.path.join(run_dir, ROTATED_NAME_FILE), encoding="utf-8") as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def _release(base_dir: str, name: str) -> None:
    try:
        os.unlink(os.path.join(base_dir, _RESERVATION_PREFIX + name))
    except FileNotFoundError:
        pass


def reserve_rotation_name(staging_dir: str, base_dir: str, now_fn: Clock = datetime.now) -> str:
    """Claims, exclusively, the name ``staging_dir`` will be rotated to once it is published and a
    newer run replaces it (the timestamp rule, suffixed ``-2``, ``-3``… past names taken or held),
    and records it inside; returns that path. So concurrent runs each know their own directory."""
    base_name = _rotation_name(staging_dir, now_fn)
    for attempt in range(1, 10_000):
        name = base_name if attempt == 1 else f"{base_name}-{attempt}"
        if os.path.exists(os.path.join(base_dir, name)):
            continue
        try:
            os.close(os.open(os.path.join(base_dir, _RESERVATION_PREFIX + name), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        atomic_write(os.path.join(staging_dir, ROTATED_NAME_FILE), name + "\n")
        return os.path.join(base_dir, name)
    raise FileExistsError(f"no free run name for {base_name} in {base_dir}")


def setup_run_latest_directory(base_dir: str, now_fn: Clock = datetime.now) -> str:
    """Legacy contract: rotate ``run-latest/``, recreate it with a timestamp file, return its path."""
    rotate_run_latest(base_dir, now_fn)
    latest = os.path.join(base_dir, RUN_LATEST)
    os.makedirs(latest, exist_ok=True)
    write_timestamp_file(latest, now_fn)
    return latest


def host_name() -> str:
    """This host's name as it appears in staging and lock names (file-name safe)."""
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def process_gone(pid: int) -> bool:
    """True if no process ``pid`` exists on this host (one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by someone else
        return False
    return False


def orphaned(host: str, pid: int) -> bool:
    """Whether something named after ``host`` and ``pid`` was left by a process of this host that
    is gone (another host's is never judged: its processes cannot be seen from here)."""
    return host == host_name() and process_gone(pid)


def remove_stale_staging(base_dir: str) -> list[str]:
    """Removes staging directories left by dead processes of this host (first finishing or
    undoing a publish one was in: ``recover_publish``); returns their paths.

    Another host's staging directories are never touched (shards of one battery may share a
    filesystem), nor are those of live processes.
    """
    if not os.path.isdir(base_dir):
        return []
    removed = []
    for name in sorted(os.listdir(base_dir)):
        match = _STAGING_NAME.match(name)
        if match and orphaned(match["host"], int(match["pid"])):
            recover_publish(os.path.join(base_dir, name))
            shutil.rmtree(os.path.join(base_dir, name), ignore_errors=True)
            removed.append(os.path.join(base_dir, name))
    return removed


def prune_runs(base_dir: str, keep: int, current: str | None = None) -> list[str]:
    """Deletes all but the newest ``keep`` ``run-<stamp>*`` directories (by name, which sorts by
    time); never ``run-latest/`` or ``current``. Returns the deleted paths."""
    runs = sorted(name for name in os.listdir(base_dir)
                  if _RUN_NAME.match(name) and os.path.isdir(os.path.join(base_dir, name))
                  and os.path.join(base_dir, name) != current)
    doomed = runs[: max(0, len(runs) - keep)]
    for name in doomed:
        shutil.rmtree(os.path.join(base_dir, name), ignore_errors=True)
    return [os.path.join(base_dir, name) for name in doomed]


def remove_tree_atomically(path: str) -> None:
    """Removes directory ``path`` as one step: renamed into a fresh sibling first, so that a kill
    midway never leaves it half there (the sibling, named ``.<name>.gone-*``, goes next)."""
    parent, name = os.path.split(os.path.abspath(path))
    doomed = tempfile.mkdtemp(prefix=f".{name}.gone-", dir=parent)
    try:
        os.rename(path, os.path.join(doomed, "tree"))
    except FileNotFoundError:  # another process removed it first
        pass
    finally:
        shutil.rmtree(doomed, ignore_errors=True)


def check_writable_dir(path: str) -> str | None:
    """None if ``path`` is (or can be made) a directory this process can write; else why not."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        if os.path.islink(existing):  # a dangling symbolic link: makedirs would fail on it
            target = os.readlink(existing)
            return f"--out_dir {path}: {existing} is a symbolic link to {target}, which does not exist"
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"--out_dir {path}: {existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"--out_dir {path}: {existing} is not writable"
    return None


def create_staging_dir(base_dir: str, now_fn: Clock = datetime.now) -> str:
    """Creates ``.staging-<%Y%m%d-%H%M%S>-<host>-<pid>`` with its timestamp file; returns its path."""
    os.makedirs(base_dir, exist_ok=True)
    name = f"{STAGING_PREFIX}{now_fn().strftime(SECOND_FORMAT)}-{host_name()}-{os.getpid()}"
    staging = unique_path(os.path.join(base_dir, name))
    os.makedirs(staging)
    try:
        write_timestamp_file(staging, now_fn)
    except BaseException:  # a full disk: leave no empty staging directory behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def publish_staging_dir(
    staging_dir: str, base_dir: str, success: bool, now_fn: Clock = datetime.now,
    partial: bool = False,
) -> str:
    """Publishes a finished staging dir and returns where it now lives.

    Success: rotate the old ``run-latest/`` away, then rename staging to ``run-latest/``.
    Otherwise rename staging to ``run-<now>-partial`` (some models succeeded) or
    ``run-<now>-failed`` (collision-safe); ``run-latest/`` untouched.
    """
    if not success:
        suffix = "partial" if partial else "failed"
        target = unique_path(os.path.join(base_dir, f"run-{now_fn().strftime(MINUTE_FORMAT)}-{suffix}"))
        os.rename(staging_dir, target)
        return target
    reserve_rotation_name(staging_dir, base_dir, now_fn)
    rotate_run_latest(base_dir, now_fn)
    latest = os.path.join(base_dir, RUN_LATEST)
    os.rename(staging_dir, latest)
    return latest


def rotation_target(run_dir: str) -> str | None:
    """Where a published ``run-latest/`` moves when a newer run replaces it (its reservation)."""
    name = _reserved_name(run_dir)
    return None if name is None else os.path.join(os.path.dirname(run_dir), name)


def output_paths(directory: str, clean_name: str) -> dict[str, str]:
    """The files of one model's run inside ``directory``, keyed by role."""
    stem = os.path.join(directory, f"output-{clean_name}")
    return {"json": f"{stem}.json", "error_json": f"{stem}.error.json", "records": f"{stem}-records.csv",
            "pure": f"{stem}-pure-next-token.csv", "lens_png": f"{stem}-lens.png",
            "curves_png": f"{stem}-curves.png", "summary": f"{stem}-summary.csv",
            "summary_png": f"{stem}-summary.png", "attribution": f"{stem}-attribution.csv",
            "lenses": f"{stem}-lenses.csv", "lenses_png": f"{stem}-lenses.png", "tracked": f"{stem}-tracked.csv",
            "concepts": f"{stem}-concepts.csv", "layers": f"{stem}-layers.csv", "layers_png": f"{stem}-layers.png",
            "continuation": f"{stem}-continuation.csv", "continuation_records": f"{stem}-continuation-records.csv",
            "html": f"{stem}.html",
            "dir": directory, "name": clean_name}


def comparison_csv_path(directory: str, clean_name: str, norm_strategy: str) -> str:
    """``output-<clean>-pure-next-token-<norm>.csv``: the pure rows under the comparison lens."""
    return os.path.join(directory, f"output-{clean_name}-pure-next-token-{norm_strategy}.csv")


def residual_path(directory: str, clean_name: str, layer: int) -> str:
    """``<clean>_<LL>_resid.pt`` for ``--keep-residuals`` (LL two digits)."""
    return os.path.join(directory, f"{clean_name}_{layer:02d}_resid.pt")


OUTPUT_ROLES = ("json", "error_json", "records", "pure", "lens_png", "curves_png", "summary", "summary_png",
                "attribution", "lenses", "lenses_png", "tracked", "concepts", "layers", "layers_png",
                "continuation", "continuation_records", "html")


def model_output_files(directory: str, clean_name: str) -> set[str]:
    """Every file a run of model ``clean_name`` can write into ``directory`` that exists there.

    Exact names only, so ``llama`` never claims the files of ``llama-2``.
    """
    paths = output_paths(directory, clean_name)
    candidates = {paths[role] for role in OUTPUT_ROLES}
    candidates |= {comparison_csv_path(directory, clean_name, view.file_suffix) for view in VIEWS.values()}
    resid = re.compile(re.escape(clean_name) + r"_\d{2,}_resid\.pt$")
    candidates |= {os.path.join(directory, n) for n in os.listdir(directory) if resid.match(n)}
    return {path for path in candidates if os.path.isfile(path)}


PUBLISH_JOURNAL = ".publish.json"  # in a staging dir: what its publish replaces, and whether it committed
_REPLACED_DIR = ".replaced"  # in a staging dir: the model's old files that the new set does not overwrite


class PublishError(OSError):
    """A model's old files could not be moved aside; they are all back in place."""


def publish_model_files(staging_dir: str, directory: str, clean_name: str) -> list[str]:
    """Replaces model ``clean_name``'s files in ``directory`` as a whole by those in
    ``staging_dir`` (other models' files stay); returns the published paths.

    Journaled, so that the complete old set or the complete new set survives any failure:
    a journal is written into the staging dir; the old files the new set does not overwrite are
    moved (renamed, never deleted) into it; the journal is marked committed; the new files are
    renamed over their old names; the staging dir goes. One old file that cannot be moved puts
    the others back and raises ``PublishError``. A process killed outright leaves the journal:
    ``recover_publish`` (run by the next run's stale-staging sweep) finishes a committed publish
    and undoes one that was not.
    """
    new = sorted(name for name in os.listdir(staging_dir)
                 if not name.startswith(TIMESTAMP_PREFIX) and not name.startswith("."))
    obsolete = sorted(os.path.basename(path) for path in model_output_files(directory, clean_name)
                      if os.path.basename(path) not in new)
    journal = {"directory": os.path.abspath(directory), "new": new, "obsolete": obsolete, "committed": False}
    journal_path = os.path.join(staging_dir, PUBLISH_JOURNAL)
    atomic_write(journal_path, json.dumps(journal))
    replaced = os.path.join(staging_dir, _REPLACED_DIR)
    os.makedirs(replaced, exist_ok=True)
    moved: list[str] = []
    for name in obsolete:
        try:
            os.rename(os.path.join(directory, name), os.path.join(replaced, name))
        except OSError as error:
            for back in reversed(moved):
                os.rename(os.path.join(replaced, back), os.path.join(directory, back))
            os.unlink(journal_path)
            raise PublishError(error.errno, f"cannot replace {clean_name}'s files in {directory}: {name}: "
                                            f"{error.strerror}; its earlier files are kept") from error
        moved.append(name)
    atomic_write(journal_path, json.dumps({**journal, "committed": True}))
    _finish_publish(staging_dir, journal)
    return [os.path.join(directory, name) for name in new]


def _finish_publish(staging_dir: str, journal: dict) -> None:
    for name in journal["new"]:
        source = os.path.join(staging_dir, name)
        if os.path.exists(source):
            os.replace(source, os.path.join(journal["directory"], name))
    shutil.rmtree(staging_dir, ignore_errors=True)


def recover_publish(staging_dir: str) -> str | None:
    """Completes (committed) or undoes (not committed) the publish a killed process left in
    ``staging_dir``; returns ``"completed"``, ``"undone"`` or None (no publish was under way)."""
    try:
        with open(os.path.join(staging_dir, PUBLISH_JOURNAL), encoding="utf-8") as handle:
            journal = json.load(handle)
    except (OSError, ValueError):
        return None
    if journal.get("committed"):
        _finish_publish(staging_dir, journal)
        return "completed"
    replaced = os.path.join(staging_dir, _REPLACED_DIR)
    for name in journal.get("obsolete", []):
        source, target = os.path.join(replaced, name), os.path.join(journal["directory"], name)
        if os.path.exists(source) and not os.path.exists(target):
            os.rename(source, target)
    return "undone"


@contextmanager
def signals_deferred(*signums: int) -> Iterator[None]:
    """Holds ``signums`` (default SIGTERM and SIGINT) until the block ends, then delivers them:
    a publish is never cut in half by ``timeout`` or Ctrl-C. A no-op outside the main thread."""
    import signal
    import threading

    signums = signums or (signal.SIGTERM, signal.SIGINT)
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []  # a mask would not do: any of torch's threads may take the signal
    previous = {signum: signal.signal(signum, lambda received, frame: pending.append(received))
                for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)


class RunLockedError(RuntimeError):
    """Another live process is writing the same model's results into the directory."""


@contextmanager
def model_lock(directory: str, clean_name: str) -> Iterator[str]:
    """Holds ``.lock-<name>`` in ``directory`` (created exclusively, holding ``host pid``) while a
    run writes model ``clean_name`` there. A lock whose process on this host is gone is taken
    over; a live holder raises ``RunLockedError`` naming it."""
    path = os.path.join(directory, f".lock-{clean_name}")
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(path)
            if holder is not None and orphaned(*holder):
                with suppress(FileNotFoundError):
                    os.unlink(path)  # a stale lock of a killed run
                continue
            who = "another process" if holder is None else f"process {holder[1]} on {holder[0]}"
            raise RunLockedError(f"{who} is writing {clean_name}'s results into {directory} "
                                 f"(lock {path}); wait for it, or use another --out_dir") from None
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{host_name()} {os.getpid()}\n")
        break
    else:
        raise RunLockedError(f"could not take the lock {path}")
    try:
        yield path
    finally:
        with suppress(FileNotFoundError):
            os.unlink(path)


def _lock_holder(path: str) -> tuple[str, int] | None:
    try:
        with open(path, encoding="utf-8") as handle:
            host, pid = handle.read().split()
        return host, int(pid)
    except (OSError, ValueError):
        return None


def distinct_names(model_ids: list[str], clean_names: list[str]) -> list[str]:
    """File-name stems that differ for every model: a clean name shared by several models gets
    its parent folder (``org1-llama``), and a still-shared one a numeric suffix (``-2``)."""
    names = list(clean_names)
    for index, name in enumerate(clean_names):
        if clean_names.count(name) > 1:
            parent = os.path.basename(os.path.dirname(model_ids[index].rstrip("/")))
            names[index] = f"{parent}-{name}" if parent else name
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            names[index] = f"{name}-{seen[name]}"
    return names
