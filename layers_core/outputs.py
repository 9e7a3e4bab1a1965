"""Writing a run's files: CSVs, residual dumps, pictures and the JSON document.

The single place where analysed prompts become files (all writes atomic, via ``run_dir``).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from layers_core.csv_io import render_csv, write_csv_files, write_pure_csv
from layers_core.prompt_sets import PROMPT_ID_COLUMN, SUMMARY_COLUMNS
from layers_core.report import to_strict_json
from layers_core.run_dir import atomic_write, comparison_csv_path, residual_path

Analyses = Sequence[tuple[str, Any]]  # (prompt_id, PromptAnalysis); prompt_id "" for a single run


def write_json(path: str, document: Mapping[str, Any]) -> None:
    """Strict JSON (non-finite numbers → null), atomically."""
    atomic_write(path, to_strict_json(dict(document)) + "\n")


def _tagged(rows: Sequence[dict], prompt_id: str) -> Sequence[dict]:
    return rows if not prompt_id else [{PROMPT_ID_COLUMN: prompt_id, **row} for row in rows]


def write_tables(paths: Mapping[str, str], analyses: Analyses, clean_name: str) -> None:
    """Records, pure and comparison-lens CSVs; rows of a prompt set lead with ``prompt_id``."""
    leading = [PROMPT_ID_COLUMN] if any(pid for pid, _ in analyses) else []
    records = [row for pid, a in analyses for row in _tagged(a.result.records, pid)]
    pure = [row for pid, a in analyses for row in _tagged(a.result.pure_rows, pid)]
    other = [row for pid, a in analyses for row in _tagged(a.comparison.pure_rows, pid)]
    write_csv_files(records, pure, paths["records"], paths["pure"], leading_columns=leading)
    strategy = analyses[0][1].comparison.strategy
    write_pure_csv(other, comparison_csv_path(paths["dir"], clean_name, strategy),
                   leading_columns=leading)


def write_residuals(directory: str, clean_name: str, resid_normed: Sequence[Any]) -> None:
    """``--keep-residuals``: each layer's normalised residual ``[1, T, d]`` as ``.pt``."""
    import torch

    for layer, resid in enumerate(resid_normed):
        buffer = io.BytesIO()
        torch.save(resid.detach().cpu().unsqueeze(0).clone(), buffer)
        atomic_write(residual_path(directory, clean_name, layer), buffer.getvalue())


def write_summary(paths: Mapping[str, str], summary: Sequence[Mapping[str, Any]]) -> None:
    """The prompt-set summary CSV."""
    atomic_write(paths["summary"], render_csv(summary, SUMMARY_COLUMNS))


def write_summary_picture(paths: Mapping[str, str], summary: Sequence[Mapping[str, Any]],
                          n_layers: int, title: str) -> None:
    """The prompt-set summary picture: each prompt's milestones as fractions of depth."""
    from layers_core import plots

    plots.save_figure(plots.prompt_set_summary(summary, n_layers, title), paths["summary_png"])
