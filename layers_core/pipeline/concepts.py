"""Concepts: named token sets (``model.tokens.token_set``) scored per layer and per lens.

A concept is what papers measure instead of one token: every token that starts a word, with and
without its leading space, often over several words (``{"de": ["Buch"], "en": ["book"]}``). Its
scores come from the last-position distributions a prompt already decoded (``SweepResult.views``,
the lens table's further lenses): one gather per concept, no second pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from layers_core.lens.stats import set_scores
from layers_core.model.tokens import TokenDecoder, token_set
from layers_core.results.prompt_sets import check_concepts


@dataclass(frozen=True)
class Concept:
    """A named token set: the words it was made from and the token ids that start them."""

    name: str
    words: tuple[str, ...]
    token_ids: tuple[int, ...]


def resolve_concepts(tokenizer: Any, concepts: Mapping[str, Sequence[str]]) -> list[Concept]:
    """Each concept's token ids (``token_set`` with prefixes and spaces), in the given order;
    ``ValueError`` naming a concept no token starts."""
    resolved = []
    for name, words in check_concepts(concepts).items():
        try:
            ids = token_set(tokenizer, words)
        except ValueError as error:
            raise ValueError(f"concept {name!r}: {error}") from None
        resolved.append(Concept(name, words, tuple(ids)))
    return resolved


def concept_rows(log_probs: Mapping[str, Tensor], concepts: Sequence[Concept]) -> list[dict]:
    """One row per (lens, layer, concept) (``csv_io.CONCEPT_COLUMNS``): the concept's summed
    probability and best rank in each lens's ``[L, V]`` last-position log-probs."""
    rows = []
    for lens, table in log_probs.items():
        scores = [set_scores(table, concept.token_ids) for concept in concepts]
        p = torch.stack([summed for summed, _ in scores], dim=1).tolist()  # [L, C], one copy to the CPU
        rank = torch.stack([best for _, best in scores], dim=1).tolist()
        rows += [{"lens": lens, "layer": layer, "concept": concept.name, "p": p[layer][column],
                  "best_rank": int(rank[layer][column])}
                 for layer in range(table.shape[0]) for column, concept in enumerate(concepts)]
    return rows


def concepts_block(concepts: Sequence[Concept], decoder: TokenDecoder) -> dict:
    """The JSON's ``concepts``: each concept's words, token ids and the tokens they spell."""
    shown = decoder.decode_many(token_id for concept in concepts for token_id in concept.token_ids)
    return {concept.name: {"words": list(concept.words), "token_ids": list(concept.token_ids),
                           "tokens": [shown[token_id] for token_id in concept.token_ids]}
            for concept in concepts}
