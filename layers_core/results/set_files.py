"""A prompt set's files, streamed: one prompt at a time in, one set of files out, at any size.

``SetFileWriter`` appends each finished prompt (in file order) to the set's CSVs and to
``output-<name>-prompts.jsonl`` (one JSON entry per line), through temporary files renamed into
place on ``close``; nothing per prompt stays in memory but its index and answer ids.
``finish_set_files`` then reads the written files back, streaming, for the JSON document (the
aggregate and provenance; the entries stay in the JSONL) and the pictures, which show the first
``REPORT_PROMPTS`` prompts in detail. A run and a merge of its shards both end in
``finish_set_files``, so a merge writes what the unsharded run writes, heatmaps included.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from layers_core.collapse_rules import ambiguous_first_pieces
from layers_core.csv_io import CONCEPT_COLUMNS, csv_header_line, csv_lines, pure_header, records_header
from layers_core.results import prompt_sets
from layers_core.results.outcome import PromptOutcome
from layers_core.results.prompt_sets import PROMPT_ID_COLUMN, SUMMARY_COLUMNS
from layers_core.run_dir import AtomicFile, atomic_write, comparison_csv_path

REPORT_PROMPTS = 200  # prompts whose curves (and heatmaps) the HTML report and the curves picture show
TABLE_ROWS = 5000  # summary rows in the HTML report's table (the CSV holds every prompt)
PROMPTS_SUFFIX = "-prompts.jsonl"


class SetFileError(ValueError):
    """A set's files disagree with each other (a truncated or foreign file); names the file."""


def prompts_path(paths: Mapping[str, str]) -> str:
    """``output-<name>-prompts.jsonl``: one JSON entry per prompt, in file order."""
    return os.path.join(paths["dir"], f"output-{paths['name']}{PROMPTS_SUFFIX}")


def entry_line(entry: Mapping[str, Any]) -> str:
    """One strict-JSON line (non-finite numbers → null)."""
    from layers_core.results.report import finite_or_none

    return json.dumps(finite_or_none(dict(entry)), ensure_ascii=False, allow_nan=False,
                      separators=(",", ":")) + "\n"


@dataclass
class SetFileWriter:
    """Appends finished prompts, in file order, to a set's files (see the module doc)."""

    paths: Mapping[str, str]
    records: bool
    indices: list[int] = field(default_factory=list)
    answers: list[dict] = field(default_factory=list)  # each entry's gold first_id and answer_ids
    _streams: dict[str, AtomicFile] = field(default_factory=dict)
    comparison_strategy: str | None = None

    def _open(self, strategy: str) -> None:
        self.comparison_strategy = strategy
        leading = [PROMPT_ID_COLUMN]
        targets = {"pure": (self.paths["pure"], [*leading, *pure_header()]),
                   "comparison": (comparison_csv_path(self.paths["dir"], self.paths["name"], strategy),
                                  [*leading, *pure_header()]),
                   "summary": (self.paths["summary"], SUMMARY_COLUMNS),
                   "prompts": (prompts_path(self.paths), None)}
        if self.records:
            targets["records"] = (self.paths["records"], [*leading, *records_header()])
        self._headers = {}
        for role, (path, header) in targets.items():
            self._streams[role] = AtomicFile(path)
            self._headers[role] = header
            if header is not None:
                self._streams[role].handle.write(csv_header_line(header))

    def add(self, outcome: PromptOutcome) -> None:
        """Appends one prompt (the next in file order)."""
        if not self._streams:
            self._open(outcome.comparison_strategy)
        if outcome.concepts and "concepts" not in self._streams:  # the first prompt with concepts opens it
            self._streams["concepts"] = AtomicFile(self.paths["concepts"])
            self._headers["concepts"] = [PROMPT_ID_COLUMN, *CONCEPT_COLUMNS]
            self._streams["concepts"].handle.write(csv_header_line(self._headers["concepts"]))
        tagged = {PROMPT_ID_COLUMN: outcome.prompt_id}
        tables = (("pure", outcome.pure), ("comparison", outcome.comparison), ("records", outcome.records),
                  ("concepts", outcome.concepts))
        for role, rows in tables:
            if role in self._streams:
                lines = csv_lines(({**tagged, **row} for row in rows), self._headers[role])
                self._streams[role].handle.write(lines)
        self._streams["summary"].handle.write(csv_lines([outcome.summary], SUMMARY_COLUMNS))
        gold = outcome.entry["gold_answer"]
        self._streams["prompts"].handle.write(entry_line({**outcome.entry, "gold_answer": {
            **gold, "first_piece_ambiguous": False}}))
        self.indices.append(outcome.index)
        self.answers.append({"first_id": gold.get("first_id"), "answer_ids": gold.get("answer_ids")})

    def close(self) -> list[int]:
        """Renames every file into place (flagging answers that share a first piece); returns the
        prompts' indices in file order."""
        if not self._streams:
            raise SetFileError("a prompt set with no prompts has no files")
        for stream in self._streams.values():
            stream.commit()
        flag_ambiguous_answers(prompts_path(self.paths), ambiguous_first_pieces(self.answers))
        return self.indices

    def discard(self) -> None:
        for stream in self._streams.values():
            stream.discard()


def flag_ambiguous_answers(path: str, flags: Sequence[bool]) -> None:
    """Sets ``gold_answer.first_piece_ambiguous`` on the flagged lines of a prompts JSONL (a
    rewrite only where some answer is flagged)."""
    if not any(flags):
        return
    stream = AtomicFile(path)
    try:
        with open(path, encoding="utf-8") as source:
            for line, flag in zip(source, flags):
                if flag:
                    entry = json.loads(line)
                    entry["gold_answer"]["first_piece_ambiguous"] = True
                    line = entry_line(entry)
                stream.handle.write(line)
    except BaseException:
        stream.discard()
        raise
    stream.commit()


def read_prompt_entries(path: str) -> Iterator[dict]:
    """The entries of a prompts JSONL, one at a time."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                yield json.loads(line)
            except ValueError as error:
                raise SetFileError(f"{path}:{number}: not a JSON entry ({error}); the file is truncated "
                                   "or damaged") from error


# ---- reading the files back ------------------------------------------------------------------------

FLOAT_COLUMNS = ("final_p_answer", "p_sequence")


def typed_summary_row(row: Mapping[str, str]) -> dict:
    """A summary CSV row (cells) with the types the writer was given."""
    integers = set(prompt_sets.LAYER_INDEX_COLUMNS) | set(prompt_sets.TOKEN_COUNT_COLUMNS)
    return {key: (None if value == "" else int(value)) if key in integers
            else (None if value == "" else float(value)) if key in FLOAT_COLUMNS else value
            for key, value in row.items()}


def read_summary(path: str) -> Iterator[dict]:
    """The summary CSV's rows, typed, one at a time."""
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            yield typed_summary_row(row)


@dataclass
class SummaryDigest:
    """What the document and the pictures need of a summary CSV, gathered in one pass."""

    count: int = 0
    resolved: int = 0
    layer_indices: dict[str, list[int]] = field(
        default_factory=lambda: {key: [] for key in prompt_sets.LAYER_INDEX_COLUMNS})
    first_rows: list[dict] = field(default_factory=list)  # the first TABLE_ROWS rows

    def add(self, row: Mapping[str, Any]) -> None:
        self.count += 1
        self.resolved += row["gold_status"] == "ok"
        for key, values in self.layer_indices.items():
            if row[key] is not None:
                values.append(int(row[key]))
        if len(self.first_rows) < TABLE_ROWS:
            self.first_rows.append(dict(row))

    def aggregate(self) -> dict:
        """``prompt_sets.aggregate`` of every row, without holding them."""
        spreads = {key: prompt_sets.quartiles(values) for key, values in self.layer_indices.items()}
        return {"count": self.count, "fraction_resolved": self.resolved / max(1, self.count),
                "layer_indices": spreads}


def digest_summary(rows: Iterable[Mapping[str, Any]]) -> SummaryDigest:
    digest = SummaryDigest()
    for row in rows:
        digest.add(row)
    return digest


def first_prompts_rows(path: str, limit: int) -> dict[str, list[dict]]:
    """The rows of the first ``limit`` prompts of a ``prompt_id``-led CSV, typed, by prompt id."""
    import pandas as pd

    from layers_core.results.tables import typed_frame

    cells: list[list[str]] = []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        seen: list[str] = []
        for row in reader:
            if not seen or row[0] != seen[-1]:
                if len(seen) == limit:
                    break
                seen.append(row[0])
            cells.append(row)
    frame = typed_frame(pd.DataFrame(cells, columns=header, dtype=str))
    return {pid: group.drop(columns=PROMPT_ID_COLUMN).to_dict("records")
            for pid, group in frame.groupby(PROMPT_ID_COLUMN, sort=False)}


def report_outcomes(paths: Mapping[str, str], strategy: str, summary_rows: Sequence[dict],
                    indices: Sequence[int], records: bool) -> list[PromptOutcome]:
    """The first ``REPORT_PROMPTS`` prompts as outcomes read back from the files (the pictures'
    and the HTML report's input)."""
    shown = summary_rows[:REPORT_PROMPTS]
    pure = first_prompts_rows(paths["pure"], len(shown))
    other = first_prompts_rows(comparison_csv_path(paths["dir"], paths["name"], strategy), len(shown))
    kept = first_prompts_rows(paths["records"], len(shown)) if records else {}
    return [PromptOutcome(index, row["prompt_id"], {}, row, pure[row["prompt_id"]], other[row["prompt_id"]],
                          strategy, kept.get(row["prompt_id"], []))
            for index, row in zip(indices, shown)]


@dataclass(frozen=True)
class SetFacts:
    """What a set's document says beyond its files: the prompts' ``indices`` in the source file,
    the comparison lens (``strategy``), whether ``records`` were written, the rest of the
    ``prompt_set`` block (``set_info``), ``model_stats``, ``provenance``, the pictures' ``title``
    and the chosen lens's name (``lens_name``)."""

    indices: Sequence[int]
    strategy: str
    records: bool
    set_info: Mapping[str, Any]
    model_stats: dict
    provenance: dict
    title: str
    lens_name: str


def write_layer_curves(paths: Mapping[str, str], lens_name: str) -> Any:
    """``output-<name>-layers.csv``: ``curves.layer_curves`` of the written pure rows (and
    concepts) under the chosen lens, every default column; returns the frame."""
    from layers_core.csv_io import render_csv
    from layers_core.results import curves

    concepts = paths["concepts"] if os.path.exists(paths["concepts"]) else None
    values = curves.read_layer_values(paths["pure"], concepts, lens_name)
    frame = curves.layer_curves(values, curves.default_columns(values))
    atomic_write(paths["layers"], render_csv(frame.to_dict("records"), curves.CURVE_COLUMNS))
    return frame


def finish_set_files(paths: Mapping[str, str], facts: SetFacts, *, plots: bool,
                     timing: Mapping[str, Any] | None = None, total_s: float = 0.0) -> dict:
    """The JSON document (and, with ``plots``, the pictures and HTML report) of a set whose CSVs
    and prompts JSONL are written; returns the document."""
    from layers_core.results import outputs
    from layers_core.results.set_document import prompt_set_document

    digest = digest_summary(read_summary(paths["summary"]))
    curves = write_layer_curves(paths, facts.lens_name)
    if plots:
        outcomes = report_outcomes(paths, facts.strategy, digest.first_rows, facts.indices, facts.records)
        outputs.write_set_pictures(paths, outcomes, int(facts.model_stats["num_layers"]), facts.title,
                                   facts.lens_name, outputs.SetOverview(digest.first_rows, digest.count, curves,
                                                                       facts.provenance))
    set_info = {**facts.set_info, "comparison": facts.strategy}
    document = prompt_set_document(digest.aggregate(), facts.indices, set_info, facts.model_stats,
                                   facts.provenance, os.path.basename(prompts_path(paths)))
    if timing is not None:
        from layers_core.results.document import with_timing

        document = with_timing(document, timing, total_s)
    outputs.write_json(paths["json"], document)
    return document

