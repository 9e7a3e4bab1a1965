"""Writing a run's files: CSVs, residual dumps, pictures and the JSON document.

The single place where analysed prompts become files (all writes atomic, via ``run_dir``).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from layers_core.csv_io import (
    CONCEPT_COLUMNS,
    CONTINUATION_COLUMNS,
    CONTINUATION_RECORD_COLUMNS,
    LENSES_COLUMNS,
    TRACKED_COLUMNS,
    in_depth_order,
    pure_header,
    records_header,
    render_csv,
    with_sublayer_column,
    write_pure_csv,
)
from layers_core.results.outcome import PromptOutcome
from layers_core.results.plots import HEATMAP_WINDOW
from layers_core.results.report import error_document, to_strict_json
from layers_core.run_dir import atomic_write, comparison_csv_path, residual_path


def write_json(path: str, document: Mapping[str, Any]) -> None:
    """Strict JSON (non-finite numbers → null), atomically."""
    atomic_write(path, to_strict_json(dict(document)) + "\n")


def prompt_table_rows(result: Any) -> tuple[list[dict], list[dict], list[str], list[str]]:
    """(records rows, pure rows, records header, pure header) of one prompt as its CSVs hold them:
    with ``--sublayers`` the mid-block reads interleaved by depth and a ``sublayer`` column."""
    if not result.mid_pure_rows:
        return result.records, result.pure_rows, records_header(), pure_header()
    records = in_depth_order(result.records, result.mid_records, per_layer=len(result.str_tokens))
    pure = in_depth_order(result.pure_rows, result.mid_pure_rows)
    return records, pure, with_sublayer_column(records_header()), with_sublayer_column(pure_header())


def write_prompt_tables(paths: Mapping[str, str], analysis: Any) -> None:
    """One prompt's records (where every position was decoded), pure and comparison-lens CSVs."""
    records, pure, records_columns, pure_columns = prompt_table_rows(analysis.result)
    if records:
        atomic_write(paths["records"], render_csv(records, records_columns))
    atomic_write(paths["pure"], render_csv(pure, pure_columns))
    write_pure_csv(analysis.comparison.pure_rows,
                   comparison_csv_path(paths["dir"], paths["name"], analysis.comparison.strategy))


ATTRIBUTION_COLUMNS = ["layer", "component", "logit", "cumulative"]
ATTRIBUTION_CONTROL_COLUMNS = ["logit_vs_control", "cumulative_vs_control"]


def _attribution_table(attribution: Any) -> tuple[list[dict], list[str]]:
    from layers_core.results.attribution import attribution_rows

    if attribution is None:
        return [], ATTRIBUTION_COLUMNS
    rows = attribution_rows(attribution)
    with_control = attribution.head_logit_vs_control is not None
    return rows, ATTRIBUTION_COLUMNS + (ATTRIBUTION_CONTROL_COLUMNS if with_control else [])


def write_attribution(paths: Mapping[str, str], attribution: Any) -> None:
    """``output-<name>-attribution.csv`` (none where the model does not decompose)."""
    if attribution is not None:
        rows, columns = _attribution_table(attribution)
        atomic_write(paths["attribution"], render_csv(rows, columns))


def write_lens_views(paths: Mapping[str, str], analysis: Any) -> None:
    """``output-<name>-lenses.csv`` (with ``compare_lenses``), ``-tracked.csv`` (with ``track``) and
    ``-concepts.csv`` (with ``concepts``)."""

    if analysis.lens_rows is not None:
        atomic_write(paths["lenses"], render_csv(analysis.lens_rows, LENSES_COLUMNS))
    if analysis.tracked_rows is not None:
        atomic_write(paths["tracked"], render_csv(analysis.tracked_rows, TRACKED_COLUMNS))
    if analysis.concept_rows is not None:
        atomic_write(paths["concepts"], render_csv(analysis.concept_rows, CONCEPT_COLUMNS))
    if getattr(analysis, "continuation", None) is not None:
        atomic_write(paths["continuation"], render_csv(analysis.continuation.rows, CONTINUATION_COLUMNS))
        atomic_write(paths["continuation_records"],
                     render_csv(analysis.continuation.records, CONTINUATION_RECORD_COLUMNS))


def attribution_frame(attribution: Any):
    """The attribution table as a DataFrame (empty, with its columns, where there is none)."""
    import pandas as pd

    rows, columns = _attribution_table(attribution)
    return pd.DataFrame(rows, columns=columns)


def write_residuals(directory: str, clean_name: str, resid_normed: Sequence[Any]) -> None:
    """``--keep-residuals``: each layer's normalised residual ``[1, T, d]`` as ``.pt``."""
    import torch

    for layer, resid in enumerate(resid_normed):
        buffer = io.BytesIO()
        torch.save(resid.detach().cpu().unsqueeze(0).clone(), buffer)
        atomic_write(residual_path(directory, clean_name, layer), buffer.getvalue())


@dataclass(frozen=True)
class SetOverview:
    """What a set's pictures show beyond the prompts drawn in detail: the table's ``summary``
    rows (None: the detailed prompts'), ``total`` prompts in all, and the per-layer curves over
    every prompt (``results.curves.layer_curves``, None: none drawn), and the run's JSON
    ``provenance`` block (the page's header)."""

    summary: Sequence[Mapping[str, Any]] | None = None
    total: int | None = None
    layer_curves: Any = None
    provenance: Mapping[str, Any] | None = None


def write_set_pictures(paths: Mapping[str, str], outcomes: Sequence[PromptOutcome], n_layers: int, title: str,
                       lens_name: str, overview: SetOverview = SetOverview()) -> None:
    """The prompt-set summary picture (milestones as fractions of depth), the small multiples
    of every prompt's answer rank per layer, the per-layer curves with their bands, and the HTML
    report (the prompt table).

    ``outcomes``: the prompts shown in detail (curves, heatmaps). A picture or table that shows
    only the first of the set's prompts says so in its title.
    """
    from layers_core.results import html_report, plots

    summary = [o.summary for o in outcomes] if overview.summary is None else list(overview.summary)
    total = overview.total or len(summary)
    pictured = summary[:PICTURE_ROWS]
    plots.save_figure(plots.prompt_set_summary(pictured, n_layers, title + _first_of(len(pictured), total)),
                      paths["summary_png"])
    plots.save_figure(plots.prompt_set_curves(_set_curves(outcomes), title, total=total), paths["curves_png"])
    if overview.layer_curves is not None:
        plots.save_figure(plots.layer_bands(overview.layer_curves, title), paths["layers_png"])
    atomic_write(paths["html"], html_report.render(set_report_page(outcomes, n_layers, title, lens_name,
                                                                   replace(overview, summary=summary))))


PICTURE_ROWS = 60  # prompts in a set's summary picture (one row each): the first, in file order


def _first_of(shown: int, total: int) -> str:
    return f" — first {shown} of {total} prompts" if total > shown else ""


def _set_curves(outcomes: Sequence[PromptOutcome]) -> dict[str, tuple]:
    """Each prompt's pure rows under the chosen and the comparison lens (and that lens's name)."""
    return {o.prompt_id: (o.pure, o.comparison, o.comparison_strategy) for o in outcomes}


def set_report_page(outcomes: Sequence[PromptOutcome], n_layers: int, title: str, lens_name: str,
                    overview: SetOverview = SetOverview()) -> dict:
    """The data of a prompt set's HTML report (its heatmaps too where the set kept records):
    the overview's summary rows in the table (default: the outcomes'), details for the
    ``outcomes``, and the per-layer curves with their bands."""
    from layers_core.results import html_report

    summary = [o.summary for o in outcomes] if overview.summary is None else list(overview.summary)
    records = {o.prompt_id: o.records for o in outcomes if o.records}
    title += _first_of(len(summary), overview.total or len(summary))
    data = html_report.set_report_data(summary, _set_curves(outcomes), n_layers, title, records, HEATMAP_WINDOW,
                                       lens_name)
    if overview.layer_curves is not None:
        data["layer_curves"] = html_report.band_series(overview.layer_curves)
    data["provenance"] = html_report.page_provenance(overview.provenance)
    return data


def write_error_document(path: str, error: BaseException, stage: str, model: str,
                         known_provenance: dict) -> None:
    """The strict-JSON failure document of one model."""
    write_json(path, error_document(error, stage, model, datetime.now(), known_provenance))
