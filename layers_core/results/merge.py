"""Joining prompt-set results: shards of one model into one run, several models into a comparison.

Works on the files alone (no model, no torch), streaming: each input directory holds one or more
``output-<name>.json`` prompt-set documents with their CSVs and ``-prompts.jsonl``. Parts of the
same name are shards of one run; they must agree on model and settings, hold every prompt id
exactly once, and each be complete (its files agree with its document, row by row). The merged
files are the shards' rows in file order, cells unchanged (bit-exact), written through
``set_files`` as an unsharded run writes them, pictures and HTML report included.
"""

from __future__ import annotations

import csv
import heapq
import json
import os
import statistics
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from layers_core.collapse_rules import ambiguous_first_pieces
from layers_core.csv_io import csv_row_line, render_csv
from layers_core.errors import first_line
from layers_core.results import prompt_sets, set_files
from layers_core.results.set_document import SCHEMA_VERSION, set_picture_title
from layers_core.run_dir import AtomicFile, atomic_write, comparison_csv_path, output_paths

MILESTONES = ["L_copy", "L_semantic", "L_semantic_stable", "L_semantic_margin", "first_rank_le_1",
              "first_rank_le_5", "first_rank_le_10",
              "first_kl_below_0.5", "first_kl_below_1.0"]
COMPARISON_COLUMNS = (["model", "prompt_id", "n_layers"] + MILESTONES
                      + [f"{key}_fraction" for key in MILESTONES])
_JSON_PREFIX, _JSON_SUFFIX = "output-", ".json"


class MergeError(ValueError):
    """The inputs cannot be merged; the message names the conflict (and the file)."""


@dataclass(frozen=True)
class Part:
    """One prompt-set result found in an input directory."""

    directory: str
    name: str
    document: dict

    @property
    def indices(self) -> list[int]:
        return list(self.document["prompt_set"]["indices"])

    @property
    def paths(self) -> dict[str, str]:
        return output_paths(self.directory, self.name)

    @property
    def comparison_strategy(self) -> str:
        return self.document["prompt_set"]["comparison"]

    def identity(self) -> dict:
        """What shards of one run must share."""
        prompt_set, provenance = self.document["prompt_set"], self.document.get("provenance", {})
        return {"model": provenance.get("model_path"), "dtype": provenance.get("dtype"),
                "settings": prompt_set.get("settings"), "records": prompt_set.get("records"),
                "total": prompt_set.get("total")}


def expand_shard_dirs(directories: Sequence[str]) -> list[str]:
    """Each directory, or, for one that holds ``shard-K-of-N`` folders (``--shard auto``), those."""
    expanded = []
    for directory in directories:
        shards = prompt_sets.shard_dirs(directory) if os.path.isdir(directory) else []
        expanded += shards or [directory]
    return expanded


def _read_document(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except (OSError, ValueError) as error:
        raise MergeError(f"{path}: not a readable JSON document ({type(error).__name__}: {first_line(error)}); "
                         "the file is truncated or damaged") from error
    if not isinstance(document, dict):
        raise MergeError(f"{path}: not a JSON object")
    return document


def find_parts(directories: Sequence[str]) -> list[Part]:
    """Every prompt-set document in ``directories`` (error documents and single runs skipped); a
    directory of ``shard-K-of-N`` folders stands for its shards."""
    parts = []
    for directory in expand_shard_dirs(directories):
        if not os.path.isdir(directory):
            raise MergeError(f"not a directory: {directory}")
        for file_name in sorted(os.listdir(directory)):
            if not (file_name.startswith(_JSON_PREFIX) and file_name.endswith(_JSON_SUFFIX)):
                continue
            path = os.path.join(directory, file_name)
            document = _read_document(path)
            if "prompt_set" not in document or "indices" not in document.get("prompt_set", {}):
                continue
            if "prompts_file" not in document:
                raise MergeError(f"{path}: a prompt-set document of schema {document.get('schema_version')} "
                                 f"(its entries inside it); merge reads schema {SCHEMA_VERSION}: re-run that set")
            parts.append(Part(directory, file_name[len(_JSON_PREFIX):-len(_JSON_SUFFIX)], document))
    if not parts:
        raise MergeError("no prompt-set results (output-<name>.json with a prompt_set) in "
                         f"{', '.join(directories)}")
    return parts


# ---- completeness: every shard's files agree with its document, row by row ---------------------

def _csv_rows(path: str) -> Iterator[list[str]]:
    """The data rows of a CSV (a missing file is named)."""
    try:
        handle = open(path, newline="", encoding="utf-8")
    except OSError as error:
        raise MergeError(f"{path}: missing ({error.strerror}); the shard is incomplete") from error
    with handle:
        reader = csv.reader(handle)
        next(reader, None)
        yield from reader


def _rows_per_prompt(path: str) -> Iterator[tuple[str, int]]:
    """(prompt id, its row count) for each run of rows of one prompt, in file order."""
    current, count = None, 0
    for row in _csv_rows(path):
        if row[0] != current:
            if current is not None:
                yield current, count
            current, count = row[0], 0
        count += 1
    if current is not None:
        yield current, count


@dataclass
class PartContents:
    """What the completeness check read of a shard: its prompt ids in file order, each prompt's
    answer ids (for the ambiguity flags), the prompts' token counts."""

    ids: list[str]
    answers: list[dict]


def check_part(part: Part, n_layers: int) -> PartContents:
    """``MergeError`` naming the file unless each of the shard's files holds exactly the prompts
    its document counts, in the same order, each with its full rows: ``n_layers + 1`` pure and
    comparison rows, ``prompt_tokens × (n_layers + 1)`` records rows."""
    paths, expected = part.paths, len(part.indices)
    if not os.path.exists(paths["summary"]):
        raise MergeError(f"{paths['summary']}: missing; the shard is incomplete")
    prompts = [(row["prompt_id"], row["prompt_tokens"]) for row in set_files.read_summary(paths["summary"])]
    ids = [prompt_id for prompt_id, _ in prompts]
    if len(ids) != expected:
        raise MergeError(f"{paths['summary']}: {len(ids)} prompts, its document {expected}; the shard is "
                         "truncated or incomplete")
    rows = n_layers + 1
    tables = {paths["pure"]: [rows] * expected,
              comparison_csv_path(part.directory, part.name, part.comparison_strategy): [rows] * expected}
    if part.document["prompt_set"].get("records"):
        tables[paths["records"]] = [int(tokens) * rows for _, tokens in prompts]
    for path, counts in tables.items():
        found = list(_rows_per_prompt(path))
        if [pid for pid, _ in found] != ids or [count for _, count in found] != counts:
            have = sum(count for _, count in found)
            raise MergeError(f"{path}: {have} rows for {len(found)} prompts where its document needs "
                             f"{sum(counts)} for {expected}; the shard is truncated or incomplete")
    answers = []
    jsonl = set_files.prompts_path(paths)
    if not os.path.exists(jsonl):
        raise MergeError(f"{jsonl}: missing; the shard is incomplete")
    try:
        for number, entry in enumerate(set_files.read_prompt_entries(jsonl)):
            if number >= expected or entry.get("prompt_id") != ids[number]:
                raise MergeError(f"{jsonl}: line {number + 1} is not prompt {ids[min(number, expected - 1)]!r}; "
                                 "the file does not match its document")
            answers.append({key: entry["gold_answer"].get(key) for key in ("first_id", "answer_ids")})
    except set_files.SetFileError as error:
        raise MergeError(str(error)) from error
    if len(answers) != expected:
        raise MergeError(f"{jsonl}: {len(answers)} entries, its document {expected}; the shard is truncated")
    return PartContents(ids, answers)


def _check_group(name: str, parts: Sequence[Part]) -> list[PartContents]:
    first = parts[0]
    for part in parts[1:]:
        ours, theirs = first.identity(), part.identity()
        differing = sorted(key for key in ours if ours[key] != theirs[key])
        if differing:
            raise MergeError(f"{name}: {first.directory} and {part.directory} differ in "
                             f"{', '.join(differing)}; shards must share model and settings")
    n_layers = int(first.document["model_stats"]["num_layers"])
    contents = [check_part(part, n_layers) for part in parts]
    seen: dict[str, str] = {}
    for part, held in zip(parts, contents):
        for prompt_id in held.ids:
            if prompt_id in seen:
                raise MergeError(f"{name}: prompt id {prompt_id!r} appears in both "
                                 f"{seen[prompt_id]} and {part.directory}")
            seen[prompt_id] = part.directory
    total = first.identity()["total"]
    if total is not None and len(seen) != total:
        raise MergeError(f"{name}: the shards hold {len(seen)} of the set's {total} prompts")
    return contents


# ---- the merge, streaming ---------------------------------------------------------------------

def _merged_rows(paths: Sequence[str], order: Mapping[str, int], out: str) -> None:
    """The rows of several ``prompt_id``-led CSVs (each in file order) merged by prompt order
    into ``out``, cells unchanged."""
    headers = []
    for path in paths:
        with open(path, newline="", encoding="utf-8") as handle:
            headers.append(next(csv.reader(handle)))
    for path, header in zip(paths, headers):
        if header != headers[0]:
            raise MergeError(f"{path}: columns differ from the other shards'")
    stream = AtomicFile(out)
    try:
        stream.handle.write(csv_row_line(headers[0]))
        for row in heapq.merge(*(_csv_rows(path) for path in paths), key=lambda row: order[row[0]]):
            stream.handle.write(csv_row_line(row))
    except BaseException:
        stream.discard()
        raise
    stream.commit()


def _merged_entries(parts: Sequence[Part], contents: Sequence[PartContents], order: Mapping[str, int],
                    flags: Mapping[str, bool], out: str) -> None:
    def keyed(part: Part, held: PartContents) -> Iterator[tuple[int, str]]:
        with open(set_files.prompts_path(part.paths), encoding="utf-8") as handle:
            for prompt_id, line in zip(held.ids, handle):
                yield order[prompt_id], line

    stream = AtomicFile(out)
    try:
        for _, line in heapq.merge(*(keyed(p, c) for p, c in zip(parts, contents)), key=lambda pair: pair[0]):
            entry = json.loads(line)
            if entry["gold_answer"].get("first_piece_ambiguous") != flags[entry["prompt_id"]]:
                entry["gold_answer"]["first_piece_ambiguous"] = flags[entry["prompt_id"]]
                line = set_files.entry_line(entry)
            stream.handle.write(line)
    except BaseException:
        stream.discard()
        raise
    stream.commit()


def merge_model(name: str, parts: Sequence[Part], out_dir: str, plots: bool = True) -> dict:
    """Merges the shards of one model into ``out_dir`` (the files an unsharded run writes)."""
    contents = _check_group(name, parts)
    order = {prompt_id: index for part, held in zip(parts, contents)
             for prompt_id, index in zip(held.ids, part.indices)}
    merged_ids = sorted(order, key=order.__getitem__)
    answers = {pid: answer for held in contents for pid, answer in zip(held.ids, held.answers)}
    flags = dict(zip(merged_ids, ambiguous_first_pieces([answers[pid] for pid in merged_ids])))
    first = parts[0].document
    strategy = parts[0].comparison_strategy
    records = bool(first["prompt_set"].get("records"))
    os.makedirs(out_dir, exist_ok=True)
    paths = output_paths(out_dir, name)
    roles = ["pure", "summary"] + (["records"] if records else [])
    for role in roles:
        _merged_rows([p.paths[role] for p in parts], order, paths[role])
    _merged_rows([comparison_csv_path(p.directory, name, strategy) for p in parts], order,
                 comparison_csv_path(out_dir, name, strategy))
    with_concepts = [p.paths["concepts"] for p in parts if os.path.exists(p.paths["concepts"])]
    if with_concepts:  # only shards some of whose items had concepts hold the file
        _merged_rows(with_concepts, order, paths["concepts"])
    _merged_entries(parts, contents, order, flags, set_files.prompts_path(paths))
    set_info = {key: value for key, value in first["prompt_set"].items() if key not in ("count", "indices")}
    set_info.update(shard=None, merged_from=sorted({p.directory for p in parts}))
    lens_name = first["prompt_set"]["settings"]["lens"]
    facts = set_files.SetFacts([order[pid] for pid in merged_ids], strategy, records, set_info,
                               first["model_stats"], first["provenance"],
                               set_picture_title(name, lens_name, len(merged_ids)), lens_name)
    return set_files.finish_set_files(paths, facts, plots=plots)


def comparison_rows(models: Mapping[str, tuple[int, Iterable[Mapping]]]) -> list[dict]:
    """``comparison.csv`` rows: each model's milestones per prompt, also as fractions of depth.
    ``models``: name → (its layer count, its summary rows)."""
    rows = []
    for model, (n_layers, summary) in models.items():
        for row in summary:
            values = {key: row.get(key) for key in MILESTONES}
            rows.append({"model": model, "prompt_id": row["prompt_id"], "n_layers": n_layers, **values,
                         **{f"{key}_fraction": None if value is None else round(value / n_layers, 3)
                            for key, value in values.items()}})
    return rows


def comparison_stats(rows: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """Per model and milestone: median and quartiles of the depth fraction over prompts."""
    stats: dict[str, dict[str, dict]] = {}
    for model in dict.fromkeys(row["model"] for row in rows):
        stats[model] = {}
        for key in MILESTONES:
            values = [row[f"{key}_fraction"] for row in rows if row["model"] == model
                      and row[f"{key}_fraction"] is not None]
            if len(values) >= 2:
                q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
            else:
                q1 = q3 = values[0] if values else None
            stats[model][key] = {"n": len(values), "median": statistics.median(values) if values else None,
                                 "q1": q1, "q3": q3}
    return stats


def merge(directories: Sequence[str], out_dir: str, plots: bool = True) -> dict[str, dict]:
    """Merges every model found in ``directories`` into ``out_dir``; with two or more models,
    also writes ``comparison.csv`` (and ``comparison.png``, ``comparison.html``). Returns the merged
    documents."""
    groups: dict[str, list[Part]] = {}
    for part in find_parts(directories):
        groups.setdefault(part.name, []).append(part)
    merged = {name: merge_model(name, parts, out_dir, plots) for name, parts in groups.items()}
    if len(merged) >= 2:
        rows = comparison_rows({name: (int(document["model_stats"]["num_layers"]),
                                       set_files.read_summary(output_paths(out_dir, name)["summary"]))
                                for name, document in merged.items()})
        atomic_write(os.path.join(out_dir, "comparison.csv"), render_csv(rows, COMPARISON_COLUMNS))
        if plots:
            from layers_core.results import plots as plotting

            stats = comparison_stats(rows)
            plotting.save_figure(plotting.comparison_figure(stats, MILESTONES),
                                 os.path.join(out_dir, "comparison.png"))
            from layers_core.results import html_report

            page = html_report.comparison_report_data(rows, stats, f"{len(merged)} models")
            atomic_write(os.path.join(out_dir, "comparison.html"), html_report.render(page))
    return merged
