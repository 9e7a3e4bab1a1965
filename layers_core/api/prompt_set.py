"""Prompt sets, the notebook door: ``sweep_set`` and ``SweepSet`` (tables, document, files).

The batch engine (length-sorted right-padded batches, a batch's last positions decoded together,
controls batched) is ``pipeline.batches``; this module wraps each analysed prompt into a
``Sweep`` and keeps a plain, JSON-serialisable *outcome* of it, so that finished batches can be
checkpointed (``progress``) and the set's files written from outcomes alone. The command line's
shard and resume plumbing comes in as one ``SetPlan`` (``run_prompt_set``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cached_property
from typing import Any

import pandas as pd

from layers_core.api.prompt import Sweep, resolve_settings, timed, total_seconds
from layers_core.model.lens_model import LensModel
from layers_core.pipeline.batches import analyse_batches, default_batch_size
from layers_core.pipeline.sweep import SweepSettings
from layers_core.results import outputs, prompt_sets, report
from layers_core.results.document import prompt_entry, provenance, with_timing
from layers_core.results.outcome import PromptOutcome
from layers_core.results.prompt_sets import PromptItem
from layers_core.results.set_document import prompt_set_document, set_picture_title
from layers_core.results.tables import frame_from_rows
from layers_core.run_dir import output_paths


def outcome_of(index: int, item: PromptItem, result: Sweep, records: bool) -> PromptOutcome:
    """A prompt's result as plain data: everything the set's files and JSON are written from."""
    analysis = result.analysis
    return PromptOutcome(
        index=index, prompt_id=item.prompt_id,
        entry=prompt_entry(item.prompt_id, item.prompt, item.answer, analysis),
        summary=prompt_sets.summary_row(item, int(analysis.result.tokens.shape[1]), result.diagnostics,
                                        analysis.result.pure_rows),
        pure=analysis.result.pure_rows, comparison=analysis.comparison.pure_rows,
        comparison_strategy=analysis.comparison.strategy,
        records=analysis.result.records if records else [])


@dataclass
class SweepSet:
    """A prompt set through the lens: plain outcomes in file order, and the ``Sweep`` of every
    prompt computed in this process (prompts resumed from a checkpoint have outcomes only)."""

    lm: LensModel
    outcomes: list[PromptOutcome]
    sweeps: dict[str, Sweep]
    settings: SweepSettings
    records: bool = False
    source_path: str | None = None
    shard: str | None = None
    total: int | None = None  # prompts in the whole set (a shard holds some of them)
    started_at: datetime = field(default_factory=datetime.now)
    timing: dict = field(default_factory=dict)
    clock_start: float | None = None

    @property
    def residuals(self) -> dict[str, Any]:
        """Each prompt's normalised residual stream ``[layers, positions, d_model]`` by prompt id
        (``keep_residuals=True``; prompts computed in this process)."""
        if not self.settings.keep_residuals:
            raise ValueError("no residuals: sweep_set(..., keep_residuals=True)")
        return {prompt_id: result.residuals for prompt_id, result in self.sweeps.items()}

    @property
    def summary_rows(self) -> list[dict]:
        return [outcome.summary for outcome in self.outcomes]

    @cached_property
    def summary(self) -> pd.DataFrame:
        """One row per prompt: collapse layers, milestones, final top-1 and p(answer)."""
        return frame_from_rows(self.summary_rows, prompt_sets.SUMMARY_COLUMNS)

    @property
    def document(self) -> dict:
        """The JSON document of a prompt-set run (``document.prompt_set_document``)."""
        first = self.outcomes[0]  # resumed from checkpoints or analysed here: provenance either way
        analysed = self.sweeps.get(first.prompt_id)
        facts = provenance(self.lm, first.entry["prompt"], self.started_at,
                           analysis=None if analysed is None else analysed.analysis, lens=self.settings.lens)
        set_info = {"path": self.source_path, "total": self.total or len(self.outcomes), "shard": self.shard,
                    "records": self.records, "settings": settings_record(self.settings)}
        body = prompt_set_document([o.entry for o in self.outcomes], self.summary_rows,
                                   [o.index for o in self.outcomes], set_info,
                                   report.model_stats(self.lm.bridge), facts)
        return with_timing(body, self.timing, total_seconds(self))

    def _report_data(self) -> dict:
        title = set_picture_title(self.lm.source.clean_name, self.settings.view, len(self.outcomes))
        return outputs.set_report_page(self.outcomes, self.lm.n_layers, title, self.settings.view)

    def save_html(self, path: str) -> str:
        """Writes the interactive report (the sortable prompt table) to ``path``; returns ``path``."""
        from layers_core.results import html_report
        from layers_core.run_dir import atomic_write

        atomic_write(path, html_report.render(self._report_data()))
        return path

    def _repr_html_(self) -> str:
        """The report embedded in a notebook cell (an isolated iframe)."""
        from layers_core.results import html_report

        return html_report.embedded(self._report_data())

    def save(self, directory: str, *, name: str | None = None, plots: bool = True) -> dict[str, str]:
        """Writes run.py's prompt-set files into ``directory``; returns their paths."""
        os.makedirs(directory, exist_ok=True)
        paths = output_paths(directory, name or self.lm.source.clean_name)
        with timed(self.timing, "write_s"):
            outputs.write_set_tables(paths, self.outcomes, self.records)
            outputs.write_summary(paths, self.summary_rows)
        if plots:
            title = set_picture_title(self.lm.source.clean_name, self.settings.view, len(self.outcomes))
            with timed(self.timing, "plots_s"):
                outputs.write_set_pictures(paths, self.outcomes, self.lm.n_layers, title,
                                           self.settings.view)
        document = self.document
        with timed(self.timing, "write_s"):
            outputs.write_json(paths["json"], document)
        return paths


def settings_record(settings: SweepSettings) -> dict:
    """The settings a merge must find equal across shards."""
    return {"norm": settings.norm_strategy, "lens": settings.view, "copy_threshold": settings.copy_threshold,
            "copy_margin": settings.copy_margin, "copy_entropy_fallback": settings.copy_entropy_fallback}


def _items(items: Iterable[PromptItem | Mapping[str, Any]]) -> list[PromptItem]:
    parsed = [item if isinstance(item, PromptItem) else prompt_sets.item_from_record(dict(item), f"item {i}", i)
              for i, item in enumerate(items, start=1)]
    prompt_sets.check_unique_ids(parsed)
    return parsed


@dataclass
class SetPlan:
    """The command line's plumbing around a prompt set, built by the runner: ``indices`` (each
    item's position in its file; default 0, 1, …: outcomes keep this order), ``done`` (outcomes
    already computed, by index, e.g. resumed from checkpoints; not rerun), ``on_batch`` (called
    with each finished batch's outcomes and sweeps: checkpoints, progress), and the
    ``source_path`` and ``shard`` the document records."""

    indices: Sequence[int] | None = None
    done: Mapping[int, PromptOutcome] | None = None
    on_batch: Callable[[list[PromptOutcome], list[Sweep]], None] | None = None
    source_path: str | None = None
    shard: str | None = None


def sweep_set(
    lm: LensModel,
    items: Iterable[PromptItem | Mapping[str, Any]],
    *,
    lens: Any = "logit",
    settings: SweepSettings | None = None,
) -> SweepSet:
    """Sweeps every prompt of a set through one loaded model, in batches.

    Args:
        items: ``PromptItem``s or dicts with ``prompt``, ``answer`` and optional ``id``,
            ``control_prompt``, ``control_answer``.
        lens: as for ``sweep``.
        settings: as for ``sweep``; for sets also ``batch_size`` (prompts per forward; None:
            chosen from memory; 1: one forward per prompt, exactly ``sweep``'s numbers),
            ``records`` (also decode every position, the records table; default: the last
            position only) and ``keep_residuals`` (``SweepSet.residuals``).
    """
    return run_prompt_set(lm, items, lens, settings, SetPlan())


def run_prompt_set(lm: LensModel, items: Iterable[PromptItem | Mapping[str, Any]], lens: Any,
                   settings: SweepSettings | None, plan: SetPlan) -> SweepSet:
    """``sweep_set`` with the command line's ``plan`` (shards, resumed outcomes, checkpoints)."""
    settings = resolve_settings(lm, lens, settings)
    records = bool(settings.records)
    parsed = _items(items)
    indices = list(range(len(parsed))) if plan.indices is None else list(plan.indices)
    outcomes = dict(plan.done or {})
    todo = [(index, item) for index, item in zip(indices, parsed) if index not in outcomes]
    batch_size = settings.batch_size or default_batch_size(lm, parsed)
    analysed = replace(settings, records=records or batch_size == 1)  # batch size 1: sweep's own path
    sweeps: dict[str, Sweep] = {}
    timing = {"forward_s": 0.0, "lens_s": 0.0}
    for batch in analyse_batches(lm, todo, analysed, batch_size):
        finished = []
        for done in batch.prompts:
            result = Sweep(lm, done.analysis, done.item.prompt, done.item.answer, replace(analysed),
                           timing=done.timing)
            sweeps[done.item.prompt_id] = result
            outcomes[done.index] = outcome_of(done.index, done.item, result, records)
            finished.append(outcomes[done.index])
        timing["forward_s"] += batch.forward_s
        timing["lens_s"] += batch.lens_s
        if plan.on_batch is not None:
            plan.on_batch(finished, [sweeps[o.prompt_id] for o in finished])
    ordered = [outcomes[index] for index in sorted(outcomes)]
    return SweepSet(lm, ordered, sweeps, settings, records, plan.source_path, plan.shard,
                    timing=timing)
