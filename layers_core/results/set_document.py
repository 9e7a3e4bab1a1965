"""The JSON document of a prompt set: one builder for a run and for a merge of its shards
(torch-free, so ``merge`` works on files alone)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from layers_core.lens.views import view

SCHEMA_VERSION = 4  # every JSON document's; 4: a set's entries in output-<name>-prompts.jsonl; 3: final lens


def prompt_set_document(aggregate: dict, indices: Sequence[int], set_info: Mapping[str, Any], model_stats: dict,
                        provenance_block: dict, prompts_file: str) -> dict:
    """The document of a prompt-set run, or of a merge of its shards (without ``timing``).

    The prompts' entries are not in it: they are the lines of ``prompts_file`` (beside it, in
    file order; ``set_files``), so the document stays small at any set size. ``aggregate`` is
    ``prompt_sets.aggregate`` of every summary row, ``indices`` the prompts' positions in the
    file, ``set_info`` the rest of the ``prompt_set`` block (path, total, shard, records,
    settings, merged_from).
    """
    return {
        "prompt_set": {"path": set_info.get("path"), "count": len(indices),
                       **{k: v for k, v in set_info.items() if k != "path"}, "indices": list(indices)},
        "aggregate": aggregate,
        "prompts_file": prompts_file,
        "model_stats": model_stats,
        "provenance": provenance_block,
        "schema_version": SCHEMA_VERSION,
    }


def set_picture_title(clean_name: str, view_name: str, count: int) -> str:
    """The title of a prompt set's pictures (a run and a merge of its shards alike)."""
    return f"{clean_name} — {view(view_name).label} — {count} prompts"
