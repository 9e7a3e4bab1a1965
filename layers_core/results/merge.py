"""Joining prompt-set results: shards of one model into one run, several models into a comparison.

Works on the files alone (no model, no torch): each input directory holds one or more
``output-<name>.json`` prompt-set documents with their CSVs. Parts of the same name are shards of
one run; they must agree on model and settings and hold every prompt id exactly once.
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from layers_core.csv_io import render_csv
from layers_core.results import prompt_sets
from layers_core.results.outcome import PromptOutcome
from layers_core.results.set_document import prompt_set_document, set_picture_title
from layers_core.run_dir import atomic_write, comparison_csv_path, output_paths

MILESTONES = ["L_copy", "L_semantic", "L_semantic_stable", "L_semantic_margin", "first_rank_le_1",
              "first_rank_le_5", "first_rank_le_10",
              "first_kl_below_0.5", "first_kl_below_1.0"]
COMPARISON_COLUMNS = (["model", "prompt_id", "n_layers"] + MILESTONES
                      + [f"{key}_fraction" for key in MILESTONES])
_JSON_PREFIX, _JSON_SUFFIX = "output-", ".json"


class MergeError(ValueError):
    """The inputs cannot be merged; the message names the conflict."""


@dataclass(frozen=True)
class Part:
    """One prompt-set result found in an input directory."""

    directory: str
    name: str
    document: dict

    @property
    def indices(self) -> list[int]:
        return list(self.document["prompt_set"]["indices"])

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
            with open(os.path.join(directory, file_name), encoding="utf-8") as handle:
                document = json.load(handle)
            if "prompt_set" in document and "indices" in document["prompt_set"]:
                parts.append(Part(directory, file_name[len(_JSON_PREFIX):-len(_JSON_SUFFIX)], document))
    if not parts:
        raise MergeError("no prompt-set results (output-<name>.json with a prompt_set) in "
                         f"{', '.join(directories)}")
    return parts


def _check_group(name: str, parts: Sequence[Part]) -> None:
    first = parts[0]
    for part in parts[1:]:
        ours, theirs = first.identity(), part.identity()
        differing = sorted(key for key in ours if ours[key] != theirs[key])
        if differing:
            raise MergeError(f"{name}: {first.directory} and {part.directory} differ in "
                             f"{', '.join(differing)}; shards must share model and settings")
    seen: dict[str, str] = {}
    for part in parts:
        for entry in part.document["prompts"]:
            if entry["prompt_id"] in seen:
                raise MergeError(f"{name}: prompt id {entry['prompt_id']!r} appears in both "
                                 f"{seen[entry['prompt_id']]} and {part.directory}")
            seen[entry["prompt_id"]] = part.directory
    total = first.identity()["total"]
    if total is not None and len(seen) != total:
        raise MergeError(f"{name}: the shards hold {len(seen)} of the set's {total} prompts")


def _read_rows(path: str) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def _merged_csv(paths: Sequence[str], order: dict[str, int]) -> str:
    """The rows of several ``prompt_id``-led CSVs in file order, cells unchanged (bit-exact)."""
    header, rows = None, []
    for path in paths:
        this_header, these = _read_rows(path)
        if header is not None and this_header != header:
            raise MergeError(f"{path}: columns differ from the other shards'")
        header = this_header
        rows += these
    rows.sort(key=lambda row: order[row[0]])  # stable: a prompt's rows keep their layer order
    return render_csv((dict(zip(header, row)) for row in rows), header)


def _typed_summary(rows: list[dict]) -> list[dict]:
    integers = set(prompt_sets.LAYER_INDEX_COLUMNS) | set(prompt_sets.TOKEN_COUNT_COLUMNS)
    return [{key: (None if value == "" else int(value)) if key in integers
             else (None if value == "" else float(value)) if key == "final_p_answer" else value
             for key, value in row.items()} for row in rows]


def merge_model(name: str, parts: Sequence[Part], out_dir: str, plots: bool = True) -> dict:
    """Merges the shards of one model into ``out_dir`` (the files an unsharded run writes)."""
    _check_group(name, parts)
    entries = sorted(((index, entry) for part in parts for index, entry in zip(part.indices,
                                                                               part.document["prompts"])),
                     key=lambda pair: pair[0])
    order = {entry["prompt_id"]: index for index, entry in entries}
    paths = output_paths(out_dir, name)
    first = parts[0].document
    other = next(iter(first["prompts"]))["lens_comparison"]["other"]
    sources = {"pure": [output_paths(p.directory, name)["pure"] for p in parts],
               "summary": [output_paths(p.directory, name)["summary"] for p in parts],
               "other": [comparison_csv_path(p.directory, name, other) for p in parts]}
    if first["prompt_set"].get("records"):
        sources["records"] = [output_paths(p.directory, name)["records"] for p in parts]
    os.makedirs(out_dir, exist_ok=True)
    texts = {role: _merged_csv(files, order) for role, files in sources.items()}
    for role, text in texts.items():
        target = comparison_csv_path(out_dir, name, other) if role == "other" else paths[role]
        atomic_write(target, text)
    summary = _summary_dicts(texts["summary"])
    set_info = {key: value for key, value in first["prompt_set"].items() if key not in ("count", "indices")}
    set_info.update(shard=None, merged_from=sorted({p.directory for p in parts}))
    document = prompt_set_document([entry for _, entry in entries], summary, [index for index, _ in entries],
                                   set_info, first["model_stats"], first["provenance"])
    from layers_core.results.outputs import write_json  # imports torch: only when writing

    write_json(paths["json"], document)
    if plots:
        _merged_pictures(paths, name, document, summary, texts["pure"], texts["other"], other)
    return document


def _summary_dicts(text: str) -> list[dict]:
    rows = list(csv.reader(io.StringIO(text)))
    return _typed_summary([dict(zip(rows[0], row)) for row in rows[1:]])


def _merged_pictures(paths: dict, name: str, document: dict, summary: list[dict], pure_text: str,
                     other_text: str, other: str) -> None:
    import pandas as pd

    from layers_core.results import outputs
    from layers_core.results.tables import typed_frame

    def by_prompt(text: str) -> dict[str, list[dict]]:
        frame = typed_frame(pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False))
        return {pid: group.drop(columns="prompt_id").to_dict("records") for pid,
                group in frame.groupby("prompt_id", sort=False)}

    pure, comparison = by_prompt(pure_text), by_prompt(other_text)
    outcomes = [PromptOutcome(index, row["prompt_id"], {}, row, pure[row["prompt_id"]],
                              comparison[row["prompt_id"]],
                              other) for index, row in zip(document["prompt_set"]["indices"], summary)]
    n_layers = int(document["model_stats"]["num_layers"])
    title = set_picture_title(name, document["prompt_set"]["settings"]["lens"], len(summary))
    outputs.write_set_pictures(paths, outcomes, n_layers, title, document["prompt_set"]["settings"]["lens"])


def comparison_rows(models: dict[str, dict]) -> list[dict]:
    """``comparison.csv`` rows: each model's milestones per prompt, also as fractions of depth."""
    rows = []
    for model, document in models.items():
        n_layers = int(document["model_stats"]["num_layers"])
        for entry in document["prompts"]:
            diagnostics = entry["diagnostics"]
            values = {key: diagnostics["milestones"].get(key, diagnostics.get(key)) for key in MILESTONES}
            rows.append({"model": model, "prompt_id": entry["prompt_id"], "n_layers": n_layers, **values,
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
        rows = comparison_rows(merged)
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
