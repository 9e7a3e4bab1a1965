"""Every lens side by side at the last position, and any token followed through the layers.

The chosen and the comparison lens were decoded with the prompt (``SweepResult.views``); their
rows are reused as they are. Every other lens of the comparison (``none``, the third norm
strategy, fitted lenses whose files exist) is decoded here, all of them in one unembedding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from layers_core.collapse_rules import compute_milestones
from layers_core.lens.protocol import Lens, NormLens
from layers_core.lens.stats import stats_from_log_probs
from layers_core.lens.unembed import Unembedding
from layers_core.lens.views import NORM_VIEWS
from layers_core.model.tokens import TokenDecoder
from layers_core.pipeline.decode import transformed_rows


def norm_lenses(model: Any, skip: Sequence[str]) -> dict[str, Lens]:
    """The logit lens under every norm strategy not in ``skip``."""
    return {name: NormLens(model, name) for name in NORM_VIEWS if name not in skip}


def last_position_log_probs(result: Any, chosen: str, comparison: str, others: Mapping[str, Lens],
                            unembed: Unembedding) -> dict[str, Tensor]:
    """``{lens name: [L, V] float32 log-probs}`` at the last position: the chosen and comparison
    lenses' rows as decoded with the prompt, the ``others`` decoded together here."""
    decoded = {chosen: result.views.chosen, comparison: result.views.other}
    extra = {name: lens for name, lens in others.items() if name not in decoded}
    if extra:
        last = list(result.last_position_resid.unsqueeze(1))  # L × [1, d]
        with torch.inference_mode():
            rows = torch.cat([torch.cat(transformed_rows(lens, last)) for lens in extra.values()])
            log_probs = unembed.log_probs(rows)
        n_rows = len(last)
        for index, name in enumerate(extra):
            decoded[name] = log_probs[index * n_rows : (index + 1) * n_rows]
    return decoded


def lens_rows(log_probs: Mapping[str, Tensor], final_log_probs: Tensor, answer_id: int | Sequence[int] | None,
              decoder: TokenDecoder) -> list[dict]:
    """One row per (lens, layer): ``csv_io.LENSES_COLUMNS``."""
    rows = []
    for name, table in log_probs.items():
        stats = stats_from_log_probs(table, final_log_probs, answer_id, top_k=1)
        top1 = decoder.decode_many(stats.topk_ids[:, 0, 0].tolist())
        for layer in range(table.shape[0]):
            rows.append({
                "lens": name, "layer": layer, "entropy": float(stats.entropy_bits[layer, 0]),
                "top1": top1[int(stats.topk_ids[layer, 0, 0])],
                "p_answer": None if stats.p_answer is None else float(stats.p_answer[layer, 0]),
                "answer_rank": None if stats.answer_rank is None else int(stats.answer_rank[layer]),
                "kl_to_final_bits": float(stats.kl_to_final_bits[layer]),
            })
    return rows


def lens_milestones(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict]:
    """The JSON's ``lenses`` block: each lens's milestones (first rank ≤ 1/5/10, first KL ≤ 0.5/1)."""
    names = list(dict.fromkeys(row["lens"] for row in rows))
    return {name: compute_milestones([row for row in rows if row["lens"] == name]) for name in names}


def track_token_ids(tokenizer: Any, tokens: Sequence[str]) -> list[tuple[str, int]]:
    """Each tracked string's token id (``" Paris"`` keeps its space). ``ValueError`` for a string
    that is not exactly one token: a tracked row follows one token, never a word's first piece
    under the word's name (a concept follows every token that starts a word)."""
    ids = []
    for text in tokens:
        pieces = tokenizer.encode(text, add_special_tokens=False)
        if len(pieces) != 1:
            spelled = "·".join(tokenizer.convert_ids_to_tokens(pieces)) if pieces else "no token"
            raise ValueError(f"track: {text!r} is {len(pieces)} tokens ({spelled}), and a tracked token is one; "
                             f"to follow every token that starts it, use concepts "
                             f"(--concepts '{{\"{text.strip()}\": [\"{text.strip()}\"]}}')")
        ids.append((text, int(pieces[0])))
    return ids


def tracked_rows(log_probs: Mapping[str, Tensor], tracked: Sequence[tuple[str, int]]) -> list[dict]:
    """Each tracked token's rank (1-based, ties favour it) and probability per lens and layer."""
    rows = []
    for text, token_id in tracked:
        for name, table in log_probs.items():
            own = table[:, token_id : token_id + 1]
            ranks = ((table > own).sum(dim=-1) + 1).tolist()
            probs = own[:, 0].exp().tolist()
            rows += [{"token": text, "token_id": token_id, "lens": name, "layer": layer, "rank": rank,
                      "prob": prob}
                     for layer, (rank, prob) in enumerate(zip(ranks, probs))]
    return rows
