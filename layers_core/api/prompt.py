"""The notebook API: ``sweep`` one prompt through a ``LensModel`` (prompt sets: ``battery``).

    import layers_core as lc
    lm = lc.load()                                   # the bundled model; or a hub id, a dir, a model
    s = lc.sweep(lm, "The capital of France is", "Paris")
    s.pure                                           # one row per layer at the next-token position
    s.lens_figure()

A ``Sweep`` holds what ``run.py`` writes for one prompt, as DataFrames, dicts and figures, and
``save`` writes exactly run.py's files.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cached_property
from typing import Any

import pandas as pd

from layers_core.csv_io import (
    CONCEPT_COLUMNS,
    CONTINUATION_COLUMNS,
    CONTINUATION_RECORD_COLUMNS,
    LENSES_COLUMNS,
    TRACKED_COLUMNS,
    pure_header,
)
from layers_core.lens.protocol import Lens
from layers_core.lens.views import LENS_CHOICES, LOGIT, NORM_VIEWS, resolve_entry, view
from layers_core.model.lens_model import LensModel
from layers_core.pipeline import probes
from layers_core.pipeline.analysis import PromptAnalysis, add_lens_views, analyse_prompt
from layers_core.pipeline.lens_table import norm_lenses
from layers_core.pipeline.prompts import (
    DEFAULT_ANSWER,
    DEFAULT_PROMPT,
    Control,
    chat_text,
    default_control,
)
from layers_core.pipeline.sweep import SweepSettings, check_sublayers
from layers_core.results import outputs, pictures
from layers_core.results.document import provenance, single_prompt_document, with_timing
from layers_core.results.plots import HEATMAP_WINDOW
from layers_core.results.tables import frame_from_rows
from layers_core.run_dir import output_paths


def _answer_for(prompt: str, answer: str | None) -> str | None:
    """The default prompt's answer is Berlin; another prompt without one gets the lens rows with
    the answer columns empty."""
    if answer is None and prompt == DEFAULT_PROMPT:
        return DEFAULT_ANSWER
    return answer


@dataclass
class Sweep:
    """One prompt through the lens: tables, diagnostics, the run document and pictures."""

    lm: LensModel
    analysis: PromptAnalysis
    prompt: str
    answer: str
    settings: SweepSettings
    started_at: datetime = field(default_factory=datetime.now)
    timing: dict = field(default_factory=dict)
    clock_start: float | None = None  # perf_counter() at the start of the run, for total_s
    heatmap_window: int | None = HEATMAP_WINDOW  # the heatmap's last positions (None: all)

    @cached_property
    def pure(self) -> pd.DataFrame:
        """The pure next-token table: one row per layer at the last position (CSV columns; with
        ``sublayers`` also each block's read after attention, in depth order)."""
        _, rows, _, columns = outputs.prompt_table_rows(self.analysis.result)
        return frame_from_rows(rows, columns)

    @cached_property
    def records(self) -> pd.DataFrame:
        """The records table: one row per (layer, position), layer-major (CSV columns)."""
        rows, _, columns, _ = outputs.prompt_table_rows(self.analysis.result)
        return frame_from_rows(rows, columns)

    @cached_property
    def comparison(self) -> pd.DataFrame:
        """The pure rows under the other standard lens (``final`` for ``arch``, else ``arch``)."""
        return frame_from_rows(self.analysis.comparison.pure_rows, pure_header())

    @cached_property
    def attribution(self) -> pd.DataFrame:
        """The answer's logit split into parts at the last position (``layer, component, logit,
        cumulative``, and ``logit_vs_control``, ``cumulative_vs_control`` with a control); empty
        where the model does not decompose (``document["attribution"]["note"]`` says why)."""
        return outputs.attribution_frame(self.analysis.attribution)

    @cached_property
    def lenses(self) -> pd.DataFrame:
        """Every lens at the last position (``compare_lenses=True``): ``lens, layer, entropy,
        top1, p_answer, answer_rank, kl_to_final_bits``."""
        if self.analysis.lens_rows is None:
            raise ValueError("no lens comparison: sweep(..., compare_lenses=True)")
        return pd.DataFrame(self.analysis.lens_rows, columns=LENSES_COLUMNS)

    @cached_property
    def tracked(self) -> pd.DataFrame:
        """Each tracked token's rank and probability per lens and layer (``track=[...]``)."""
        if self.analysis.tracked_rows is None:
            raise ValueError("no tracked tokens: sweep(..., track=[' Paris'])")
        return pd.DataFrame(self.analysis.tracked_rows, columns=TRACKED_COLUMNS)

    @cached_property
    def continuation(self) -> pd.DataFrame:
        """Each continuation token per lens: ``pos, token, token_id, p_final, commit_layer`` (the
        first layer from which it is top-1 through the last), ``first_top5_layer``,
        ``first_p_over_half_layer`` (``settings.continuation`` or ``generate``)."""
        if self.analysis.continuation is None:
            raise ValueError("no continuation: sweep(..., settings=SweepSettings(generate=20))")
        return pd.DataFrame(self.analysis.continuation.rows, columns=CONTINUATION_COLUMNS)

    @cached_property
    def continuation_records(self) -> pd.DataFrame:
        """Each continuation token's rank and probability at every layer, per lens (long)."""
        if self.analysis.continuation is None:
            raise ValueError("no continuation: sweep(..., settings=SweepSettings(generate=20))")
        return pd.DataFrame(self.analysis.continuation.records, columns=CONTINUATION_RECORD_COLUMNS)

    @cached_property
    def concepts(self) -> pd.DataFrame:
        """Each concept's summed probability and best rank per lens and layer (``concepts={...}``):
        ``lens, layer, concept, p, best_rank``."""
        if self.analysis.concept_rows is None:
            raise ValueError("no concepts: sweep(..., settings=SweepSettings(concepts={'de': ['Buch']}))")
        return pd.DataFrame(self.analysis.concept_rows, columns=CONCEPT_COLUMNS)

    @property
    def residuals(self):
        """The chosen lens's normalised residual stream ``[layers, positions, d_model]``
        (``keep_residuals=True``)."""
        import torch

        if not (self.settings.keep_residuals and self.analysis.result.resid_normed):
            raise ValueError("no residuals: sweep(..., keep_residuals=True)")
        return torch.stack(self.analysis.result.resid_normed)

    @property
    def diagnostics(self) -> dict:
        """The ``diagnostics`` block: collapse layers, milestones, norms, last-layer check."""
        return self.analysis.blocks["diagnostics"]

    @cached_property
    def test_prompts(self) -> list[dict]:
        """The 14 legacy test prompts through the model (batched by length, on first use)."""
        started = time.perf_counter()
        entries = probes.test_prompt_entries(self.lm.bridge, self.lm.decoder)
        self.timing["forward_s"] = self.timing.get("forward_s", 0.0) + time.perf_counter() - started
        return entries

    @property
    def document(self) -> dict:
        """The whole JSON document of a run of this prompt (``timing`` as measured so far)."""
        body = single_prompt_document(self.lm, self.analysis, self.prompt, self.answer,
                                      self.test_prompts, provenance(self.lm, self.prompt,
                                                                    self.started_at, analysis=self.analysis,
                                                                    lens=self.settings.lens))
        return with_timing(body, self.timing, total_seconds(self))

    def title(self) -> str:
        """Model name, lens and prompt, for pictures."""
        return (f"{self.lm.source.clean_name} — {view(self.settings.view).label} — "
                f"{self.prompt!r}")

    def picture_rows(self) -> dict:
        """The plain data the pictures and the HTML report are drawn from."""
        first_id = self.analysis.result.gold["first_id"]
        answer = None if first_id is None else self.lm.decoder.decode_many([first_id])[first_id]
        rows = pictures.picture_rows(self.analysis, self.heatmap_window, answer)
        rows["provenance"] = provenance(self.lm, self.prompt, self.started_at, analysis=self.analysis,
                                        lens=self.settings.lens)
        return rows

    def report_data(self) -> dict:
        """The HTML report's data (plain JSON-ready values): what its page and the explorer draw."""
        from layers_core.results import html_report

        return html_report.prompt_report_data(self.picture_rows(), self.title())

    def html(self) -> str:
        """The interactive report of this prompt as one self-contained HTML page."""
        from layers_core.results import html_report

        return html_report.render(self.report_data())

    def save_html(self, path: str) -> str:
        """Writes the interactive report to ``path`` (atomically); returns ``path``."""
        from layers_core.run_dir import atomic_write

        atomic_write(path, self.html())
        return path

    def _repr_html_(self) -> str:
        """The report embedded in a notebook cell (an isolated iframe)."""
        from layers_core.results import html_report

        return html_report.embedded(self.report_data())

    def lens_figure(self):
        """The logit-lens heatmap (layers × positions, top-1 token per cell) as a ``Figure``."""
        return pictures.prompt_lens_figure(self.picture_rows(), self.title())

    def curves_figure(self):
        """Entropy, p(answer), answer rank and KL per layer, both lenses, as a ``Figure``."""
        return pictures.prompt_curves_figure(self.picture_rows(), self.title())

    def draw_pictures(self, directory: str, name: str | None = None,
                      worker: pictures.PictureWorker | None = None) -> None:
        """Draws the two PNGs into ``directory``: in ``worker`` if given (then ``save`` waits
        for it), else now."""
        paths = output_paths(directory, name or self.lm.source.clean_name)
        args = (paths, self.picture_rows(), self.title())
        if worker is None:
            pictures.write_prompt_pictures(*args)
            return
        for write in pictures.PROMPT_PICTURES:  # side by side in the worker's processes
            worker.submit(write, *args)

    def save(self, directory: str, *, name: str | None = None, plots: bool = True,
             keep_residuals: bool = False, worker: pictures.PictureWorker | None = None) -> dict[str, str]:
        """Writes run.py's files for this prompt into ``directory``; returns their paths.

        ``worker``: a picture worker already drawing them (``draw_pictures``); ``save`` waits for it.
        """
        os.makedirs(directory, exist_ok=True)
        paths = output_paths(directory, name or self.lm.source.clean_name)
        if plots and worker is None:
            with timed(self.timing, "plots_s"):
                self.draw_pictures(directory, name)
        document = self.document  # the test prompts' forward counts before the writes
        with timed(self.timing, "write_s"):
            outputs.write_prompt_tables(paths, self.analysis)
            outputs.write_attribution(paths, self.analysis.attribution)
            outputs.write_lens_views(paths, self.analysis)
            if keep_residuals:
                outputs.write_residuals(directory, paths["name"], self.analysis.result.resid_normed)
        if worker is not None:
            with timed(self.timing, "plots_s"):  # only the wait the pictures add to the run
                worker.wait()
        with timed(self.timing, "write_s"):
            outputs.write_json(paths["json"], with_timing(document, self.timing, total_seconds(self)))
        return paths


def total_seconds(result: Any) -> float:
    """A ``Sweep``'s or ``SweepSet``'s seconds since ``clock_start`` (a ``perf_counter`` value) if
    set, else the sum of its stages."""
    if result.clock_start is not None:
        return time.perf_counter() - result.clock_start
    return sum(result.timing.values())


class timed:  # noqa: N801 - used as a context manager, like contextlib's lower-case helpers
    """Adds the seconds spent inside the block to ``timing[key]``."""

    def __init__(self, timing: dict, key: str):
        self.timing, self.key = timing, key

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timing[self.key] = self.timing.get(self.key, 0.0) + time.perf_counter() - self.started


def resolve_lens(lm: LensModel, lens: Any, lens_path: str | None = None,
                 allow_foreign: bool = False) -> Lens | None:
    """The lens object for ``lens``: None for ``logit`` (the logit lens under ``norm``); a fitted
    lens's name loads it through its registry row (from ``lens_path``, default its cache for
    this model); any object with ``name`` and ``transform`` is used as it is. A lens with
    ``bind(model)`` is bound to this model. A lens with a ``fingerprint`` must have been fitted
    to this model (``ForeignLensError`` otherwise, unless ``allow_foreign``); one whose
    fingerprint is None loads with a warning."""
    if lens == LOGIT:
        return None
    if isinstance(lens, str):
        loader = view(lens).loader
        if loader is None:
            raise ValueError(f"unknown lens {lens!r}; expected one of {LENS_CHOICES} or a Lens object")
        lens = resolve_entry(loader)(lens_path, lm)
    if not isinstance(lens, Lens):
        raise TypeError(f"lens {lens!r} is not a Lens: it needs a name and transform(residual, layer)")
    bind = getattr(lens, "bind", None)
    lens = lens if bind is None else bind(lm.bridge)
    if hasattr(lens, "fingerprint"):
        _check_fingerprint(lens, lm, allow_foreign)
    return lens


def _check_fingerprint(lens: Any, lm: LensModel, allow_foreign: bool) -> None:
    from layers_core.lens import fingerprint

    if lens.fingerprint is None:
        warnings.warn(fingerprint.UNFINGERPRINTED.format(path=getattr(lens, "path", None) or "memory"),
                      fingerprint.UnfingerprintedLensWarning, stacklevel=3)
        return
    differing = fingerprint.mismatch(lens.fingerprint, fingerprint.model_fingerprint(lm),
                                     ("config_hash", "unembed_hash"))
    if differing and not allow_foreign:
        raise fingerprint.ForeignLensError(
            fingerprint.foreign_lens_message(getattr(lens, "path", None) or "memory", differing))


def cached_fitted_lenses(lm: LensModel, skip: Sequence[str] = (), allow_foreign: bool = False,
                         left_out: Callable[[str, str, Exception], None] | None = None) -> dict[str, Lens]:
    """Each fitted lens (not named in ``skip``) whose files are in the model's lens cache; one that
    does not load, or belongs to another model, is left out and ``left_out(name, directory,
    error)`` is told (default: a warning)."""
    from layers_core.lens.views import FITTED_VIEWS

    found: dict[str, Lens] = {}
    for name in FITTED_VIEWS:
        directory = resolve_entry(view(name).default_dir)(lm.source.clean_name)
        if name in skip or not os.path.exists(directory):
            continue
        try:
            found[name] = resolve_lens(lm, name, None, allow_foreign)
        except (ValueError, OSError) as error:
            if left_out is None:
                warnings.warn(f"the {name} lens in {directory} is left out: {error}", stacklevel=3)
            else:
                left_out(name, directory, error)
    return found


def available_lenses(lm: LensModel, settings: SweepSettings) -> dict[str, Lens]:
    """Every lens a comparison decodes besides the chosen and comparison ones: the logit lens
    under each other norm strategy, and each fitted lens in the model's lens cache
    (``cached_fitted_lenses``; one that does not load is left out with a warning)."""
    shown = (settings.view, settings.comparison_view)

    def warn(name: str, directory: str, error: Exception) -> None:
        warnings.warn(f"compare_lenses: the {name} lens in {directory} is left out: {error}", stacklevel=4)

    return {**norm_lenses(lm.bridge, shown),
            **cached_fitted_lenses(lm, shown, settings.allow_foreign_lens, warn)}


def resolve_settings(lm: LensModel, lens: Any, settings: SweepSettings | None) -> SweepSettings:
    """``settings`` (default ``SweepSettings()``) checked, with the lens resolved (``resolve_lens``,
    from ``settings.lens_path``) and the model's unembedding precision."""
    base = settings or SweepSettings()
    if base.norm_strategy not in NORM_VIEWS:
        raise ValueError(f"unknown norm_strategy {base.norm_strategy!r}; expected one of {NORM_VIEWS}")
    if base.truncate not in (None, "left"):
        raise ValueError(f"truncate={base.truncate!r}: expected None or 'left'")
    return replace(base, fp32_unembed=lm.unembed.force_fp32,
                   lens=resolve_lens(lm, lens, base.lens_path, base.allow_foreign_lens))


def _continuation(lm: LensModel, settings: SweepSettings, text: str, others: dict | None) -> Any:
    """The lens over the continuation (``settings.continuation`` or ``generate``), under the
    chosen and the comparison lens (and every further lens with ``compare_lenses``)."""
    from layers_core.pipeline.continuation import ContinuationSpec, analyse_continuation

    if settings.continuation is not None and settings.generate:
        raise ValueError("continuation and generate exclude each other: give text, or a token count")
    if settings.temperature < 0:
        raise ValueError(f"temperature must be at least 0, got {settings.temperature}")
    chosen, comparison = settings.lenses(lm.bridge)
    lenses = {settings.view: chosen, settings.comparison_view: comparison, **(others or {})}
    spec = ContinuationSpec(settings.continuation, settings.generate, settings.temperature, settings.seed)
    return analyse_continuation(lm, text, spec, lenses, settings.budget_bytes)


def sweep(
    lm: LensModel,
    prompt: str = DEFAULT_PROMPT,
    answer: str | None = None,
    *,
    lens: Any = "logit",
    control: Control = None,
    settings: SweepSettings | None = None,
) -> Sweep:
    """Sweeps one prompt: every layer decoded, both standard lenses, raw check and control.

    Args:
        answer: the gold answer (default prompt: ``Berlin``); None: no answer, the rows without
            answer columns and no answer milestones. Leading/trailing whitespace is ignored.
        lens: ``logit`` (the logit lens under ``settings.norm_strategy``), ``tuned`` or
            ``jacobian`` (a lens fitted by ``layers-and-logits fit``, read from
            ``settings.lens_path`` or the model's lens cache), or any ``Lens`` object (``name`` and
            ``transform(residual, layer)``, e.g. a ``TunedLens``). Beside a fitted or user lens,
            the logit lens under the norm strategy is the comparison lens.
        control: None = France → Paris for the legacy prompt, none otherwise; False = none;
            or a ``(control_prompt, control_answer)`` pair.
        settings: every other switch (``SweepSettings``): ``norm_strategy`` (``final``, ``arch``,
            ``none``); the copy rule; ``chat`` (the prompt as one user turn of the tokenizer's
            chat template, the answer as the assistant's first tokens; ``ValueError`` without a
            template); ``sublayers`` (each block's residual after its attention, as ``attn`` rows
            at layer b+1; ``ValueError`` for parallel blocks); ``truncate`` (None: a prompt longer
            than the context raises ``PromptTooLong`` before any forward; ``"left"``: its last
            tokens are kept); ``compare_lenses`` (every available lens at the last position,
            ``s.lenses``); ``track`` (tokens followed per layer under every lens, ``s.tracked``);
            ``keep_residuals`` (``s.residuals`` ``[layers, positions, d_model]``); ``lens_path``
            and ``allow_foreign_lens`` (which fitted lens, and whether one of another model
            applies).
    """
    settings = replace(resolve_settings(lm, lens, settings), attribution=True)
    if settings.sublayers:
        check_sublayers(lm.bridge)
    answer = _answer_for(prompt, answer)
    started = time.perf_counter()
    control = default_control(prompt, control)
    text = prompt
    if settings.chat:  # one user turn, then the assistant's turn begins: the answer is its first token(s)
        tokenizer = lm.bridge.tokenizer
        text = chat_text(tokenizer, prompt)
        control = None if control is None else (chat_text(tokenizer, control[0]), control[1])
    with lm.thread_scope():
        analysis = analyse_prompt(lm, settings, text, answer, control)
        others = available_lenses(lm, settings) if settings.compare_lenses else None
        if settings.compare_lenses or settings.track:
            add_lens_views(lm, analysis, settings, others, list(settings.track))
        if settings.continuation is not None or settings.generate:
            analysis.continuation = _continuation(lm, settings, text, others)
            analysis.blocks["continuation"] = analysis.continuation.block
    forward_s = analysis.result.timing["forward_s"]
    timing = {"forward_s": forward_s, "lens_s": time.perf_counter() - started - forward_s}
    return Sweep(lm, analysis, prompt, answer, settings, timing=timing)
