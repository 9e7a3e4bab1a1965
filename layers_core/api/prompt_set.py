"""Prompt sets at speed and at scale: batched forwards, plain-data outcomes, shards and resume.

Prompts are sorted by length and forwarded in right-padded batches. The last positions of a
batch's prompts are decoded together, a memory-bounded group at a time into one reused buffer
(W_U read once per group); each prompt is then analysed from its own views and slices. Without
records only the last position is decoded (the pure rows, both standard lenses, the raw check
and the control need nothing else). A prompt keeps its rows, not its ``[L, V]`` log-probs.
Every prompt's result is also kept as a plain, JSON-serialisable *outcome*, so that finished
batches can be checkpointed (``progress``) and the set's files written from outcomes alone.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cached_property
from typing import Any

import pandas as pd
import torch

from layers_core.api.prompt import Sweep, resolve_settings, timed, total_seconds
from layers_core.collapse_rules import resolve_gold_answer
from layers_core.model.lens_model import LensModel
from layers_core.pipeline.analysis import analyse_prompt
from layers_core.pipeline.decode import decode_views, transformed_rows, view_rows
from layers_core.pipeline.sweep import Forwarded, SweepSettings, forward_batch
from layers_core.results import outputs, prompt_sets, report
from layers_core.results.document import prompt_entry, provenance, with_timing
from layers_core.results.outcome import PromptOutcome
from layers_core.results.prompt_sets import PromptItem
from layers_core.results.set_document import prompt_set_document, set_picture_title
from layers_core.results.tables import frame_from_rows
from layers_core.run_dir import output_paths

MAX_BATCH = 32
BATCH_MEMORY_BYTES = 1 * 2**30  # residuals and activations of one batch, at most
ACTIVATION_FACTOR = 4  # activations of a forward per residual-stream copy (attention, MLP, cache)


def default_batch_size(lm: LensModel, items: Sequence[PromptItem]) -> int:
    """As many prompts as keep a batch's residuals and activations under ``BATCH_MEMORY_BYTES``
    (at most ``MAX_BATCH``): (n+1) layers × longest prompt × d_model × dtype size × factor each."""
    cfg = lm.bridge.cfg
    longest = max(len(item.prompt) for item in items) // 2 + 2  # ≥ tokens for BPE vocabularies
    per_prompt = (int(cfg.n_layers) + 1) * longest * int(cfg.d_model) * lm.dtype.itemsize
    return max(1, min(MAX_BATCH, BATCH_MEMORY_BYTES // (per_prompt * ACTIVATION_FACTOR)))


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


def _batches(lm: LensModel, todo: list[tuple[int, PromptItem]], batch_size: int):
    """Batches of (index, item), prompts of similar length together (sorted by token count)."""
    lengths = {index: len(lm.bridge.tokenizer(item.prompt)["input_ids"]) for index, item in todo}
    ordered = sorted(todo, key=lambda pair: (lengths[pair[0]], pair[0]))
    return [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]


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
    device = lm.unembed.W_U.device
    group, buffer = _view_groups(lm, settings, batch_size)
    for batch in _batches(lm, todo, batch_size):
        started = time.perf_counter()
        answers = [resolve_gold_answer(lm.bridge.tokenizer, item.prompt, item.answer)["answer_ids"]
                   for _, item in batch]  # carried by the same forward: p_sequence needs no other
        forwarded = (forward_batch(lm.bridge, [item.prompt for _, item in batch], device, answers)
                     if batch_size > 1 else [None])  # batch size 1: sweep's own forward
        controls = _control_forwards(lm, batch, device) if batch_size > 1 else {}
        forward_s = time.perf_counter() - started
        finished = []
        pairs = list(zip(batch, forwarded))
        for first in range(0, len(pairs), group):
            part = pairs[first : first + group]
            if batch_size > 1:
                _attach_views(lm, settings, [passed for _, passed in part], buffer)
            for (index, item), passed in part:
                control = False if item.control_prompt is None else (item.control_prompt, item.control_answer)
                # batch size 1 is the single-prompt path exactly (every position decoded)
                result = _sweep_forwarded(lm, item, analysed, control, passed, controls.get(index))
                if passed is None:
                    forward_s += result.timing["forward_s"]
                else:
                    passed.views = None
                result.analysis.result.views = None  # [L, V] log-probs (in the buffer, reused next group)
                sweeps[item.prompt_id] = result
                outcomes[index] = outcome_of(index, item, result, records)
                finished.append(outcomes[index])
        timing["forward_s"] += forward_s
        timing["lens_s"] += time.perf_counter() - started - forward_s
        if plan.on_batch is not None:
            plan.on_batch(finished, [sweeps[o.prompt_id] for o in finished])
    ordered = [outcomes[index] for index in sorted(outcomes)]
    return SweepSet(lm, ordered, sweeps, settings, records, plan.source_path, plan.shard,
                    timing=timing)


def _view_groups(lm: LensModel, settings: SweepSettings, batch_size: int) -> tuple[int, Any]:
    """(prompts whose views are decoded together, the float32 buffer they are decoded into): as
    many as keep ``[rows, V]`` under ``settings.budget_bytes``. No buffer for batch size 1 (each
    prompt is decoded alone, as ``sweep`` does) or where the unembedding's matmul is not float32."""
    rows, vocab = view_rows(lm.n_layers + 1), int(lm.unembed.W_U.shape[-1])
    group = max(1, min(batch_size, settings.budget_bytes // (rows * vocab * 4)))
    if batch_size == 1 or lm.unembed.matmul_dtype != torch.float32:
        return group, None
    return group, torch.empty((group * rows, vocab), dtype=torch.float32, device=lm.unembed.W_U.device)


def _attach_views(lm: LensModel, settings: SweepSettings, forwarded: Sequence[Forwarded],
                 buffer: Any = None) -> None:
    """Decodes the last-position views of several forwarded prompts in one unembedding
    (``decode.decode_views``, into ``buffer`` if given) and attaches each prompt's (``views``)."""
    chosen, other = settings.lenses(lm.bridge)
    with torch.inference_mode():
        last = torch.stack([torch.stack([resid[-1] for resid in passed.residuals]) for passed in forwarded])
        chosen_rows = torch.stack(transformed_rows(chosen, list(last.transpose(0, 1))), dim=1)
        views = decode_views(lm.bridge, last, chosen_rows, other, lm.unembed, buffer)
    for passed, own in zip(forwarded, views):
        passed.views = own


def _control_forwards(lm: LensModel, batch: Sequence[tuple[int, PromptItem]], device: Any) -> dict:
    """The control prompts of a batch in one right-padded forward: ``{index: Forwarded}``."""
    with_control = [(index, item.control_prompt) for index, item in batch if item.control_prompt is not None]
    if not with_control:
        return {}
    forwarded = forward_batch(lm.bridge, [prompt for _, prompt in with_control], device)
    return {index: passed for (index, _), passed in zip(with_control, forwarded)}


def _sweep_forwarded(lm: LensModel, item: PromptItem, settings: SweepSettings, control: Any,
                     forwarded: Any, control_forwarded: Any = None) -> Sweep:
    from layers_core.api.prompt import default_control

    started = time.perf_counter()
    analysis = analyse_prompt(lm, settings, item.prompt, item.answer,
                              default_control(item.prompt, control), forwarded, control_forwarded)
    forward_s = analysis.result.timing["forward_s"] if forwarded is None else 0.0
    return Sweep(lm, analysis, item.prompt, item.answer, replace(settings),
                 timing={"forward_s": forward_s, "lens_s": time.perf_counter() - started - forward_s})
