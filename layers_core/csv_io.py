"""CSV schemas and writers for the records and pure next-token files (no torch import).

Dialect (README, "Output files"): UTF-8, ``,`` delimiter, ``"`` quote char, QUOTE_MINIMAL with doubled quotes,
no escapechar (legacy defect 10), ``\\n`` line terminator; what ``csv.reader`` and ``pandas.read_csv``
read back by default. Floats are written with ``repr`` so they
parse back bit-exact; booleans as ``True``/``False``; absent values as empty strings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from layers_core.run_dir import atomic_write

TOP_K_RECORD = 5
TOP_K_VERBOSE = 20
IMPORTANT_WORDS = ["Germany", "Berlin", "capital", "Answer", "word", "simply"]
NEXT_TOKEN_LABEL = "⟨NEXT⟩"

LEADING_COLUMNS = ["layer", "pos", "token", "entropy"]
REST_MASS_COLUMN = "rest_mass"
FLAG_COLUMNS = ["copy_collapse", "entropy_collapse", "is_answer"]
METRIC_COLUMNS = ["p_top1", "p_top5", "p_answer", "answer_rank", "kl_to_final_bits"]
EXTRA_FLAG_COLUMNS = ["copy_collapse_prompt", "copy_headline"]  # after the legacy 48 + 5 columns
_VERBOSE_STRIP = ".,!?;:"
_NEEDS_QUOTES = (",", '"', "\n", "\r")


def _topk_columns(top_k: int) -> list[str]:
    columns: list[str] = []
    for rank in range(1, top_k + 1):
        columns += [f"top{rank}", f"prob{rank}"]
    return columns


def records_header(top_k: int = TOP_K_VERBOSE) -> list[str]:
    """Records CSV header: layer,pos,token,entropy, k (top, prob) pairs, rest_mass (45 for k=20)."""
    return LEADING_COLUMNS + _topk_columns(top_k) + [REST_MASS_COLUMN]


def pure_header(top_k: int = TOP_K_VERBOSE) -> list[str]:
    """Pure next-token CSV header: the records header, flags, metrics, then ``copy_collapse_prompt``
    and ``copy_headline`` (55 for k=20)."""
    return records_header(top_k) + FLAG_COLUMNS + METRIC_COLUMNS + EXTRA_FLAG_COLUMNS


SUBLAYER_COLUMN = "sublayer"  # --sublayers only: "attn" (after attention) or "block" (after the block)
ATTN, BLOCK = "attn", "block"  # the values of SUBLAYER_COLUMN
LENSES_COLUMNS = ["lens", "layer", "entropy", "top1", "p_answer", "answer_rank", "kl_to_final_bits"]  # lenses.csv
TRACKED_COLUMNS = ["token", "token_id", "lens", "layer", "rank", "prob"]  # --track
CONCEPT_COLUMNS = ["lens", "layer", "concept", "p", "best_rank"]  # --concepts (a set's lead with prompt_id)
CONTINUATION_COLUMNS = ["lens", "pos", "token", "token_id", "p_final", "commit_layer", "first_top5_layer",
                        "first_p_over_half_layer"]  # --generate / --continuation: one row per token and lens
CONTINUATION_RECORD_COLUMNS = ["lens", "layer", "pos", "token", "rank", "p"]  # ... and per layer


def with_sublayer_column(header: Sequence[str]) -> list[str]:
    """``header`` with the ``sublayer`` column after ``layer`` (records and pure CSVs of
    ``--sublayers`` runs)."""
    return [header[0], SUBLAYER_COLUMN, *header[1:]]


def is_verbose_position(
    token_str: str, pos: int, seq_len: int, important_words: Sequence[str] = IMPORTANT_WORDS
) -> bool:
    """True at the last position, or where the stripped, lowercased token contains a key word."""
    if pos == seq_len - 1:
        return True
    cleaned = token_str.strip(_VERBOSE_STRIP).lower()
    return any(word.lower() in cleaned for word in important_words)


def format_value(value: Any) -> str:
    """One CSV cell: floats via ``repr``, ``True``/``False``, ints plain, ``None`` → ``""``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _row_cells(row: Mapping[str, Any], header: Sequence[str]) -> list[str]:
    return [format_value(row.get(column)) for column in header]


def _quote(cell: str) -> str:
    """QUOTE_MINIMAL with doubled quotes. ``\r`` is quoted too: csv.writer with a ``\n``
    terminator leaves it bare, and every reader then splits the row there."""
    if any(char in cell for char in _NEEDS_QUOTES):
        return '"' + cell.replace('"', '""') + '"'
    return cell


def csv_header_line(header: Sequence[str]) -> str:
    """The header line of a CSV, ``\n``-terminated."""
    return ",".join(_quote(column) for column in header) + "\n"


def csv_lines(rows: Iterable[Mapping[str, Any]], header: Sequence[str]) -> str:
    """The lines of ``rows`` (no header), each ``\n``-terminated: appended to a streamed CSV."""
    return "".join(",".join(_quote(cell) for cell in _row_cells(row, header)) + "\n" for row in rows)


def csv_row_line(cells: Sequence[str]) -> str:
    """One row of cells as they were read (``csv.reader``), re-quoted: the line they came from."""
    return ",".join(_quote(cell) for cell in cells) + "\n"


def render_csv(rows: Iterable[Mapping[str, Any]], header: Sequence[str]) -> str:
    """The CSV text (header + one ``\n``-terminated line per row) for column → value dicts.

    Columns a row does not carry (e.g. top6..top20 of a non-verbose row) are empty strings.
    """
    return csv_header_line(header) + csv_lines(rows, header)


def write_pure_csv(pure_records: Iterable[Mapping[str, Any]], path: str,
                   top_k: int = TOP_K_VERBOSE, leading_columns: Sequence[str] = ()) -> None:
    """Writes one pure next-token CSV (e.g. the comparison lens's) atomically."""
    atomic_write(path, render_csv(pure_records, [*leading_columns, *pure_header(top_k)]))


def write_csv_files(
    records: Iterable[Mapping[str, Any]],
    pure_records: Iterable[Mapping[str, Any]],
    records_path: str,
    pure_path: str,
    top_k: int = TOP_K_VERBOSE,
    leading_columns: Sequence[str] = (),
) -> None:
    """Writes both CSV files atomically. ``leading_columns`` (e.g. ``prompt_id``) go first."""
    atomic_write(records_path, render_csv(records, [*leading_columns, *records_header(top_k)]))
    atomic_write(pure_path, render_csv(pure_records, [*leading_columns, *pure_header(top_k)]))


def in_depth_order(block_rows: Sequence[dict], mid_rows: Sequence[dict], per_layer: int = 1) -> list[dict]:
    """Block and mid-block rows interleaved by depth (layer 0, then for each layer ℓ ≥ 1 its attn
    read, then its block read), each tagged with ``sublayer``; ``per_layer`` rows per read (T for
    records). Without mid rows, the block rows unchanged."""
    if not mid_rows:
        return list(block_rows)
    tagged_blocks = [{**row, SUBLAYER_COLUMN: BLOCK} for row in block_rows]
    tagged_mids = [{**row, SUBLAYER_COLUMN: ATTN} for row in mid_rows]
    ordered = tagged_blocks[:per_layer]
    for start in range(0, len(tagged_mids), per_layer):
        ordered += tagged_mids[start : start + per_layer]
        ordered += tagged_blocks[per_layer + start : 2 * per_layer + start]
    return ordered
