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
from layers_core.collapse_rules import ambiguous_first_pieces
from layers_core.csv_io import CONCEPT_COLUMNS, pure_header
from layers_core.model.lens_model import LensModel
from layers_core.pipeline.batches import analyse_batches, check_prompt_lengths, default_batch_size
from layers_core.pipeline.sweep import SweepSettings
from layers_core.results import outputs, prompt_sets, report
from layers_core.results.document import prompt_entry, provenance, with_timing
from layers_core.results.outcome import PromptOutcome
from layers_core.results.prompt_sets import PROMPT_ID_COLUMN, PromptItem
from layers_core.results.set_document import prompt_set_document, set_picture_title
from layers_core.results.set_files import PROMPTS_SUFFIX, SetFacts, SetFileWriter, finish_set_files
from layers_core.results.tables import frame_from_rows
from layers_core.run_dir import output_paths


def outcome_of(index: int, item: PromptItem, result: Sweep, records: bool) -> PromptOutcome:
    """A prompt's result as plain data: everything the set's files and JSON are written from."""
    analysis = result.analysis
    return PromptOutcome(
        index=index, prompt_id=item.prompt_id,
        entry={**prompt_entry(item.prompt_id, item.prompt, item.answer, analysis),
               **({"meta": dict(item.meta)} if item.meta else {})},
        summary=prompt_sets.summary_row(item, int(analysis.result.tokens.shape[1]), result.diagnostics,
                                        analysis.result.pure_rows,
                                        (analysis.blocks.get("gold_answer") or {}).get("p_sequence")),
        pure=analysis.result.pure_rows, comparison=analysis.comparison.pure_rows,
        comparison_strategy=analysis.comparison.strategy,
        records=analysis.result.records if records else [], concepts=analysis.concept_rows or [])


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
    first_outcome: PromptOutcome | None = None  # the set's first prompt (its provenance), if streamed
    written_document: dict | None = None  # the document of the files written (``save``, a streamed set)

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
        """One row per prompt: collapse layers, milestones, final top-1 and p(answer), then each
        item's ``meta`` values, one column per key (the CSV keeps them as one JSON cell)."""
        frame = frame_from_rows(self.summary_rows, prompt_sets.SUMMARY_COLUMNS)
        return meta_columns(frame.drop(columns="meta"), [o.entry.get("meta") or {} for o in self.outcomes])

    @cached_property
    def concepts(self) -> pd.DataFrame:
        """Each prompt's concepts per lens and layer: ``prompt_id, lens, layer, concept, p,
        best_rank`` (items with ``concepts``, or the set's ``settings.concepts``)."""
        rows = [{PROMPT_ID_COLUMN: o.prompt_id, **row} for o in self.outcomes for row in o.concepts]
        if not rows:
            raise ValueError("no concepts: give items a 'concepts' key, or settings=SweepSettings(concepts=...)")
        return pd.DataFrame(rows, columns=[PROMPT_ID_COLUMN, *CONCEPT_COLUMNS])

    def layer_values(self) -> pd.DataFrame:
        """One row per (prompt, layer) of the chosen lens: ``prompt_id``, ``layer``, the pure
        rows' numbers and each concept's probability (the curves' input)."""
        from layers_core.results.curves import layer_values

        pure = frame_from_rows([{PROMPT_ID_COLUMN: o.prompt_id, **row} for o in self.outcomes for row in o.pure],
                               [PROMPT_ID_COLUMN, *pure_header()])
        concepts = self.concepts if any(o.concepts for o in self.outcomes) else None
        return layer_values(pure, concepts, self.settings.view)

    def layer_curves(self, columns: str | Sequence[str] | None = None, by: str | Sequence[str] | None = None,
                     ci: float = 0.95) -> pd.DataFrame:
        """Per layer (and per group of ``by``: summary columns or ``meta`` keys) the mean of each
        column over the set's prompts, its bootstrap interval at level ``ci`` (``results.curves``:
        1000 resamples, seed 0) and n. ``columns``: ``entropy``, ``p_answer``, ``answer_rank``,
        ``kl_to_final_bits``, ``p_top1``, or a concept's name (default: the first four, then
        every concept). Returns ``[*by, column, layer, mean, ci_low, ci_high, n]``."""
        from layers_core.results.curves import default_columns, layer_curves

        values = self.layer_values()
        chosen = default_columns(values) if columns is None else [columns] if isinstance(columns, str) else columns
        return layer_curves(values, chosen, self.summary, by, ci)

    def layers_figure(self, columns: str | Sequence[str] | None = None, by: str | Sequence[str] | None = None,
                      ci: float = 0.95):
        """``layer_curves`` drawn: each column's mean with its band, one panel per group (the
        probabilities share a row of panels, every other column has its own)."""
        from layers_core.results.plots import layer_bands

        return layer_bands(self.layer_curves(columns, by, ci), self._title(len(self.outcomes)), ci)

    @property
    def entries(self) -> list[dict]:
        """Each prompt's JSON entry (the lines of ``output-<name>-prompts.jsonl``), in file order,
        ``gold_answer.first_piece_ambiguous`` set over the whole set."""
        flags = ambiguous_first_pieces([o.entry["gold_answer"] for o in self.outcomes])
        return [{**o.entry, "gold_answer": {**o.entry["gold_answer"], "first_piece_ambiguous": flag}}
                for o, flag in zip(self.outcomes, flags)]

    @property
    def document(self) -> dict:
        """The JSON document of a prompt-set run (``set_document.prompt_set_document``: the
        aggregate and provenance; the entries are ``entries``)."""
        if self.written_document is not None:
            return self.written_document
        name = self.lm.source.clean_name
        body = prompt_set_document(prompt_sets.aggregate(self.summary_rows), [o.index for o in self.outcomes],
                                   self._set_info(len(self.outcomes)), report.model_stats(self.lm.bridge),
                                   self._provenance(),
                                   f"output-{name}{PROMPTS_SUFFIX}")
        return with_timing(body, self.timing, total_seconds(self))

    def _provenance(self) -> dict:
        first = self.first_outcome or self.outcomes[0]  # from checkpoints or analysed here: provenance either way
        analysed = self.sweeps.get(first.prompt_id)
        return provenance(self.lm, first.entry["prompt"], self.started_at,
                          analysis=None if analysed is None else analysed.analysis, lens=self.settings.lens)

    def _set_info(self, count: int) -> dict:
        comparison = {"comparison": self.outcomes[0].comparison_strategy} if self.outcomes else {}
        return {"path": self.source_path, "total": self.total or count, "shard": self.shard, **comparison,
                "records": self.records, "settings": settings_record(self.settings)}

    def _title(self, count: int) -> str:
        return set_picture_title(self.lm.source.clean_name, self.settings.view, count)

    def _report_data(self) -> dict:
        return outputs.set_report_page(self.outcomes, self.lm.n_layers, self._title(len(self.outcomes)),
                                       self.settings.view, outputs.SetOverview(layer_curves=self.layer_curves(),
                                                           provenance=self._provenance()))

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
        writer = SetFileWriter(paths, self.records)
        with timed(self.timing, "write_s"):
            try:
                for outcome in self.outcomes:
                    writer.add(outcome)
                writer.close()
            except BaseException:
                writer.discard()
                raise
        self.finish_files(paths, writer, plots)
        return paths

    def finish_files(self, paths: dict[str, str], writer: SetFileWriter, plots: bool) -> dict:
        """The JSON document and pictures of a set whose prompts ``writer`` wrote (and closed)."""
        count = len(writer.indices)
        with timed(self.timing, "plots_s" if plots else "write_s"):
            facts = SetFacts(writer.indices, writer.comparison_strategy, self.records, self._set_info(count),
                             report.model_stats(self.lm.bridge), self._provenance(), self._title(count),
                             self.settings.view)
            self.written_document = finish_set_files(paths, facts, plots=plots, timing=self.timing,
                                                     total_s=total_seconds(self))
        return self.written_document


def meta_columns(frame: pd.DataFrame, metas: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """``frame`` (one row per prompt) with a column per key of the prompts' ``meta`` objects
    (missing values NaN, as pandas writes them)."""
    keys = list(dict.fromkeys(key for meta in metas for key in meta))
    if not keys:
        return frame
    extra = pd.DataFrame([{key: meta.get(key) for key in keys} for meta in metas], index=frame.index)
    return pd.concat([frame, extra], axis=1)


def settings_record(settings: SweepSettings) -> dict:
    """The settings a merge must find equal across shards."""
    return {"norm": settings.norm_strategy, "lens": settings.view, "copy_threshold": settings.copy_threshold,
            "copy_margin": settings.copy_margin, "copy_entropy_fallback": settings.copy_entropy_fallback,
            "answer_join": settings.answer_join}


def _items(items: Iterable[PromptItem | Mapping[str, Any]]) -> list[PromptItem]:
    parsed = [item if isinstance(item, PromptItem) else prompt_sets.item_from_record(dict(item), f"item {i}", i)
              for i, item in enumerate(items, start=1)]
    prompt_sets.check_unique_ids(parsed)
    return parsed


@dataclass
class SetPlan:
    """The command line's plumbing around a prompt set, built by the runner: ``indices`` (each
    item's position in its file; default 0, 1, …: outcomes keep this order), ``done`` (outcomes
    already computed, by index, e.g. resumed from checkpoints, read as needed; not rerun),
    ``on_batch`` (called with each finished batch's outcomes and sweeps: checkpoints, progress),
    ``sink`` (each outcome in file order as soon as its window is done; the set then keeps no
    outcome or sweep in memory: ``stream_prompt_set``), and the ``source_path`` and ``shard`` the
    document records."""

    indices: Sequence[int] | None = None
    done: Mapping[int, PromptOutcome] | None = None
    on_batch: Callable[[list[PromptOutcome], list[Sweep]], None] | None = None
    source_path: str | None = None
    shard: str | None = None
    sink: Callable[[PromptOutcome], None] | None = None


WINDOW = 512  # prompts length-sorted into batches together; outcomes leave in file order per window


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
    """``sweep_set`` with the command line's ``plan`` (shards, resumed outcomes, checkpoints, a
    sink that streams the outcomes instead of keeping them).

    The set is taken ``WINDOW`` prompts at a time in file order; within a window prompts are
    length-sorted into batches, and the window's outcomes leave in file order once it is done.
    """
    settings = resolve_settings(lm, lens, settings)
    records = bool(settings.records)
    parsed = _items(items)
    indices = list(range(len(parsed))) if plan.indices is None else list(plan.indices)
    done = plan.done or {}
    check_prompt_lengths(lm, [item for index, item in zip(indices, parsed) if index not in done],
                         settings.truncate)
    batch_size = settings.batch_size or default_batch_size(lm, parsed)
    analysed = replace(settings, records=records or batch_size == 1)  # batch size 1: sweep's own path
    kept: dict[int, PromptOutcome] = {}
    sweeps: dict[str, Sweep] = {}
    timing = {"forward_s": 0.0, "lens_s": 0.0}
    first: PromptOutcome | None = None
    pairs = list(zip(indices, parsed))
    with lm.thread_scope():  # the notebook's idle-core rule (the command line sets lm.threads None)
        for start in range(0, len(pairs), WINDOW):
            window = pairs[start : start + WINDOW]
            outcomes = {index: done[index] for index, _ in window if index in done}
            todo = [(index, item) for index, item in window if index not in outcomes]
            for batch in analyse_batches(lm, todo, analysed, batch_size):
                finished, batch_sweeps = [], []
                for prompt in batch.prompts:
                    result = Sweep(lm, prompt.analysis, prompt.item.prompt, prompt.item.answer, replace(analysed),
                                   timing=prompt.timing)
                    outcomes[prompt.index] = outcome_of(prompt.index, prompt.item, result, records)
                    finished.append(outcomes[prompt.index])
                    batch_sweeps.append(result)
                    if plan.sink is None:
                        sweeps[prompt.item.prompt_id] = result
                timing["forward_s"] += batch.forward_s
                timing["lens_s"] += batch.lens_s
                if plan.on_batch is not None:
                    plan.on_batch(finished, batch_sweeps)
            for index in sorted(outcomes):
                first = first or outcomes[index]
                if plan.sink is None:
                    kept[index] = outcomes[index]
                else:
                    plan.sink(outcomes[index])
    ordered = [kept[index] for index in sorted(kept)]
    return SweepSet(lm, ordered, sweeps, settings, records, plan.source_path, plan.shard, timing=timing,
                    first_outcome=first)


@dataclass
class SetOutput:
    """Where and how a streamed set writes: ``directory``, the file-name stem ``name``, whether
    to draw ``plots``; ``total`` (prompts in the whole set, a shard holding some), and the
    ``timing`` and ``clock_start`` of the stages before it (start-up, load) for the document."""

    directory: str
    name: str
    plots: bool = True
    total: int | None = None
    timing: Mapping[str, float] = field(default_factory=dict)
    clock_start: float | None = None


def stream_prompt_set(lm: LensModel, items: Iterable[PromptItem | Mapping[str, Any]], lens: Any,
                      settings: SweepSettings | None, plan: SetPlan, output: SetOutput) -> SweepSet:
    """``run_prompt_set`` writing each window's outcomes to the set's files as it finishes (no
    outcome kept in memory: a set of any size), then the document and pictures; the returned
    set holds no outcomes, its ``document`` is the one written."""
    os.makedirs(output.directory, exist_ok=True)
    paths = output_paths(output.directory, output.name)
    writer = SetFileWriter(paths, bool(settings is not None and settings.records))  # resolved once, inside
    try:
        result = run_prompt_set(lm, items, lens, settings, replace(plan, sink=writer.add))
        result.total, result.clock_start = output.total, output.clock_start
        result.timing.update(output.timing)
        with timed(result.timing, "write_s"):
            writer.close()
    except BaseException:
        writer.discard()
        raise
    result.finish_files(paths, writer, output.plots)
    return result
