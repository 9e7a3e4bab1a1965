"""One prompt of a set as plain, JSON-serialisable data: every file and JSON field of a set (and
of a merge of its shards) is written from these, so checkpoints can stand in for the prompt."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class PromptOutcome:
    """A prompt's results: its position in the file, its JSON ``entry``, its summary CSV row, its
    pure rows under the chosen and the comparison lens, and its records rows (``--records``)."""

    index: int
    prompt_id: str
    entry: dict
    summary: dict
    pure: list[dict]
    comparison: list[dict]
    comparison_strategy: str
    records: list[dict] = field(default_factory=list)
    concepts: list[dict] = field(default_factory=list)  # concepts.CONCEPT_COLUMNS rows, if the prompt had any

    def to_record(self) -> dict:
        """A plain dict (a checkpoint line)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> PromptOutcome:
        """The outcome a ``to_record`` dict holds (unknown keys are an error)."""
        return cls(**record)
