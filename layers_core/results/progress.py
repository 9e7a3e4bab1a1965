"""Checkpoints of a prompt set in progress: one file per finished batch, in a dot-directory.

``<out_dir>/.progress-<name>/`` holds ``settings.json`` (what the results depend on) and
``batch-<first index>.json`` files, each written atomically: a killed run (even SIGKILL) loses at
most the batch in flight and never leaves a truncated row. ``--resume`` reads them back; a run
without it starts the store afresh; a set that completes removes it (its results are then in the
output files). Stale-staging sweeps never touch it (it is no staging dir).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from layers_core.results.outcome import PromptOutcome
from layers_core.run_dir import atomic_write, remove_tree_atomically

PROGRESS_PREFIX = ".progress-"
SETTINGS_FILE = "settings.json"
BATCH_PREFIX = "batch-"
MODEL_FINGERPRINT = "model_fingerprint"  # the settings key of the model's config, W_U and weight-file hashes


class ProgressMismatch(ValueError):
    """The checkpoints were made with other settings than this run's."""


class ProgressStore:
    """Finished batches of one model's prompt set inside an output directory."""

    def __init__(self, out_dir: str, name: str, settings: Mapping[str, Any]):
        self.directory = os.path.join(out_dir, PROGRESS_PREFIX + name)
        self.settings = dict(settings)

    def start(self, resume: bool) -> Mapping[int, PromptOutcome]:
        """Opens the store: with ``resume``, the outcomes already finished (by index, read from
        disk as they are asked for), checked against this run's settings; without, an empty
        store. Returns the finished outcomes."""
        if resume and os.path.isdir(self.directory):
            self.check_settings()
            return CheckpointedOutcomes(self.directory)
        shutil.rmtree(self.directory, ignore_errors=True)
        os.makedirs(self.directory)
        atomic_write(os.path.join(self.directory, SETTINGS_FILE), json.dumps(self.settings, indent=1))
        return {}

    def check_settings(self, ignore: Sequence[str] = ()) -> None:
        """``ProgressMismatch`` unless the checkpoints (if any) were made with these settings,
        the fields in ``ignore`` aside (those not known yet)."""
        if not os.path.isdir(self.directory):
            return
        try:
            with open(os.path.join(self.directory, SETTINGS_FILE), encoding="utf-8") as handle:
                recorded = json.load(handle)
        except (OSError, ValueError):
            recorded = None
        if ignore and recorded is not None:
            recorded = {key: value for key, value in recorded.items() if key not in ignore}
        if recorded != self.settings:
            changed = sorted(key for key in set(self.settings) | set(recorded or {})
                             if (recorded or {}).get(key) != self.settings.get(key))
            if changed == [MODEL_FINGERPRINT]:
                raise ProgressMismatch(f"the model at {self.settings.get('model')} changed since the checkpoints "
                                       f"in {self.directory} were made (its weights or config differ); "
                                       "run without --resume to start over")
            raise ProgressMismatch(f"the checkpoints in {self.directory} were made with other "
                                   f"settings ({', '.join(changed)}); run without --resume to start over")

    def record(self, outcomes: Sequence[PromptOutcome]) -> None:
        """Checkpoints one finished batch (atomically)."""
        first = min(o.index for o in outcomes)
        path = os.path.join(self.directory, f"{BATCH_PREFIX}{first:07d}.json")
        atomic_write(path, json.dumps([o.to_record() for o in outcomes], ensure_ascii=False))

    def finish(self) -> None:
        """Removes the checkpoints once the set's outputs are published: renamed away first (one
        atomic step), so a kill never leaves a store without its ``settings.json``."""
        if os.path.isdir(self.directory):
            remove_tree_atomically(self.directory)


class CheckpointedOutcomes(Mapping[int, PromptOutcome]):
    """The outcomes in a store's batch files, by prompt index: the files are scanned once for
    their indices, and a batch is read back only when one of its prompts is asked for (the last
    ``KEPT_BATCHES`` read are kept: a window's prompts sit in a few batches), so resuming a set of
    any size holds a few batches in memory."""

    KEPT_BATCHES = 64

    def __init__(self, directory: str):
        self.directory = directory
        self._where: dict[int, str] = {}
        for name in sorted(os.listdir(directory)):
            if name.startswith(BATCH_PREFIX) and name.endswith(".json"):
                for record in self._read(name):
                    self._where[int(record["index"])] = name
        self._cached: dict[str, dict[int, PromptOutcome]] = {}

    def _read(self, name: str) -> list[dict]:
        path = os.path.join(self.directory, name)
        try:
            with open(path, encoding="utf-8") as handle:
                records = json.load(handle)
            if not isinstance(records, list):
                raise ValueError("not a list of outcomes")
            return records
        except (OSError, ValueError) as error:
            raise ProgressMismatch(f"{path}: a damaged checkpoint ({type(error).__name__}: {error}); "
                                   "run without --resume to start over, or delete that file to redo "
                                   "its prompts") from error

    def __getitem__(self, index: int) -> PromptOutcome:
        name = self._where[index]
        if name not in self._cached:
            if len(self._cached) >= self.KEPT_BATCHES:
                del self._cached[next(iter(self._cached))]  # the oldest read
            self._cached[name] = {int(r["index"]): PromptOutcome.from_record(r) for r in self._read(name)}
        return self._cached[name][index]

    def __contains__(self, index: object) -> bool:
        return index in self._where

    def __iter__(self) -> Iterator[int]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)
