"""The JSON document of a prompt set: one builder for a run and for a merge of its shards
(torch-free, so ``merge`` works on files alone)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from layers_core.collapse_rules import ambiguous_first_pieces
from layers_core.lens.views import view
from layers_core.results import prompt_sets

SCHEMA_VERSION = 3  # every JSON document's; 3: the default lens is final (was arch), L_semantic_stable/_margin


def prompt_set_document(entries: Sequence[dict], summary_rows: Sequence[dict], indices: Sequence[int],
                        set_info: Mapping[str, Any], model_stats: dict, provenance_block: dict) -> dict:
    """The document of a prompt-set run, or of a merge of its shards (without ``timing``).

    ``entries`` and ``summary_rows`` are the prompts' JSON entries and summary rows in file order,
    ``indices`` their positions in the file, ``set_info`` the rest of the ``prompt_set`` block
    (path, total, shard, records, settings, merged_from). ``first_piece_ambiguous`` is computed
    here, over every prompt of the document: a merge flags what the unsharded run flags.
    """
    return {
        "prompt_set": {"path": set_info.get("path"), "count": len(entries),
                       **{k: v for k, v in set_info.items() if k != "path"}, "indices": list(indices)},
        "aggregate": prompt_sets.aggregate(summary_rows),
        "prompts": with_ambiguous_answers_flagged(entries),
        "model_stats": model_stats,
        "provenance": provenance_block,
        "schema_version": SCHEMA_VERSION,
    }


def with_ambiguous_answers_flagged(entries: Sequence[dict]) -> list[dict]:
    """Entries whose multi-token answer shares its first token with another answer of the set get
    ``gold_answer.first_piece_ambiguous`` (new dicts; the inputs stay as they are)."""
    flags = ambiguous_first_pieces([entry["gold_answer"] for entry in entries])
    return [{**entry, "gold_answer": {**entry["gold_answer"], "first_piece_ambiguous": flag}}
            for entry, flag in zip(entries, flags)]


def set_picture_title(clean_name: str, view_name: str, count: int) -> str:
    """The title of a prompt set's pictures (a run and a merge of its shards alike)."""
    return f"{clean_name} — {view(view_name).label} — {count} prompts"
