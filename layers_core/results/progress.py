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
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from layers_core.results.outcome import PromptOutcome
from layers_core.run_dir import atomic_write

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

    def start(self, resume: bool) -> dict[int, PromptOutcome]:
        """Opens the store: with ``resume``, the outcomes already finished (by index), checked
        against this run's settings; without, an empty store. Returns the finished outcomes."""
        if resume and os.path.isdir(self.directory):
            self.check_settings()
            return self._load()
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

    def _load(self) -> dict[int, PromptOutcome]:
        done: dict[int, PromptOutcome] = {}
        for name in sorted(os.listdir(self.directory)):
            if name.startswith(BATCH_PREFIX) and name.endswith(".json"):
                with open(os.path.join(self.directory, name), encoding="utf-8") as handle:
                    for outcome in json.load(handle):
                        done[int(outcome["index"])] = PromptOutcome.from_record(outcome)
        return done

    def record(self, outcomes: Sequence[PromptOutcome]) -> None:
        """Checkpoints one finished batch (atomically)."""
        first = min(o.index for o in outcomes)
        path = os.path.join(self.directory, f"{BATCH_PREFIX}{first:07d}.json")
        atomic_write(path, json.dumps([o.to_record() for o in outcomes], ensure_ascii=False))

    def finish(self) -> None:
        """Removes the checkpoints once the set's outputs are published: renamed away first (one
        atomic step), so a kill never leaves a store without its ``settings.json``."""
        if not os.path.isdir(self.directory):
            return
        doomed = tempfile.mkdtemp(prefix=f"{os.path.basename(self.directory)}.done-",
                                  dir=os.path.dirname(self.directory))
        try:
            os.rename(self.directory, os.path.join(doomed, "store"))
        finally:
            shutil.rmtree(doomed, ignore_errors=True)
