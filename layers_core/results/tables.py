"""The CSV tables as pandas DataFrames, typed the same way whether built in memory or read back.

``layer``/``pos`` are int64, probabilities, entropies and KL float64, ``answer_rank`` and the
layer indices of a summary nullable ``Int64``, flags bool, tokens str (a token such as ``NaN`` or
``null`` stays a string); a top-k slot a row does not record is NaN in both its columns.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from layers_core.csv_io import EXTRA_FLAG_COLUMNS, FLAG_COLUMNS, SUBLAYER_COLUMN, format_value

TEXT_COLUMNS = {"token", "prompt_id", "prompt", "answer", "final_top1", "gold_status", "meta", "lens", "concept",
                SUBLAYER_COLUMN}
INT_COLUMNS = {"layer", "pos", "prompt_tokens", "answer_tokens", "best_rank"}
_TOP = re.compile(r"top(\d+)$")
_NULLABLE_INT = re.compile(r"(answer_rank|L_.*|first_rank_le_\d+|first_kl_below_.*)$")
_FLAGS = set(FLAG_COLUMNS) | set(EXTRA_FLAG_COLUMNS) | {"copy_strict"}


def _typed_column(name: str, cells: pd.Series, frame: pd.DataFrame) -> pd.Series:
    top = _TOP.match(name)
    if top:
        return cells.where(frame[f"prob{top.group(1)}"] != "")  # absent slot → NaN
    if name in TEXT_COLUMNS:
        return cells
    if name in INT_COLUMNS:
        return cells.astype("int64")
    if name in _FLAGS:
        return cells.map({"True": True, "False": False}).astype(bool)
    numbers = pd.to_numeric(cells.replace("", None))
    return numbers.astype("Int64") if _NULLABLE_INT.match(name) else numbers.astype("float64")


def typed_frame(cells: pd.DataFrame) -> pd.DataFrame:
    """Types a frame of CSV cells (all str, absent values ``""``) column by column."""
    return pd.DataFrame({name: _typed_column(name, cells[name], cells) for name in cells.columns})


def frame_from_rows(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    """Row dicts (as the CSV writers take them) → a typed DataFrame with exactly ``columns``.

    Values pass through the CSV cell format first, so the frame equals ``read_csv`` of the file.
    """
    cells = [[format_value(row.get(column)) for column in columns] for row in rows]
    return typed_frame(pd.DataFrame(cells, columns=list(columns), dtype=str))


def read_csv(path: str) -> pd.DataFrame:
    """Reads a records, pure next-token or summary CSV with the same types as ``Sweep.pure``."""
    return typed_frame(pd.read_csv(path, dtype=str, keep_default_na=False))
