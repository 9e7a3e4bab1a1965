"""The lens over a continuation: where in depth each token of a completion gets decided.

A continuation is teacher-forced text or the model's own generation (TransformerLens's
``generate`` without its KV cache, whose cached paths write wrong tokens under transformers 5:
see ``capture.generate_tokens``). Then one forward over the prompt and the continuation (but its
last token) gives, at each position that predicts a continuation token, every layer's residual;
every lens of the run decodes them in blocks under ``budget_bytes`` and records the token's rank
and probability per layer. Per token: ``commit_layer`` (the first layer from which it is top-1
through the last layer), the first layer it is in the top 5, the first where its probability
exceeds 0.5, and its final probability (the model's own).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from layers_core.lens.protocol import Lens
from layers_core.lens.stats import DEFAULT_BUDGET_BYTES
from layers_core.model.lens_model import LensModel
from layers_core.pipeline.capture import generate_tokens
from layers_core.pipeline.decode import transformed_rows
from layers_core.pipeline.sweep import forward_with_residuals, prompt_tokens

TOP_K_COMMIT = 5


@dataclass(frozen=True)
class ContinuationSpec:
    """What follows the prompt: ``text`` (teacher-forced) or ``generate`` new tokens (greedy at
    ``temperature`` 0, else sampled with ``seed``)."""

    text: str | None = None
    generate: int | None = None
    temperature: float = 0.0
    seed: int = 0


def generated_ids(lm: LensModel, tokens: Tensor, spec: ContinuationSpec) -> list[int]:
    """The model's own continuation of ``tokens`` ``[1, T]`` (``capture.generate_tokens``)."""
    return generate_tokens(lm.bridge, tokens, int(spec.generate), temperature=spec.temperature, seed=spec.seed)


def forced_ids(lm: LensModel, prompt: str, text: str) -> list[int]:
    """``text``'s token ids as the continuation of ``prompt`` (the prompt's own ids a prefix of
    ``prompt + text``'s; else ``text`` tokenised alone)."""
    tokenizer = lm.bridge.tokenizer
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    whole = tokenizer(prompt + text, add_special_tokens=False)["input_ids"]
    if whole[: len(head)] == head and len(whole) > len(head):
        return whole[len(head):]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def continuation_ids(lm: LensModel, prompt: str, spec: ContinuationSpec) -> list[int]:
    """The continuation's token ids (``ValueError`` for an empty one)."""
    if spec.text is not None:
        ids = forced_ids(lm, prompt, spec.text)
    else:
        ids = generated_ids(lm, prompt_tokens(lm.bridge, prompt)[0], spec)
    if not ids:
        raise ValueError("the continuation is empty: give text, or generate at least one token")
    return ids


class LayerRanks(NamedTuple):
    """A lens's reading of continuation tokens: the token's ``ranks`` and ``probs`` ``[L, P]``,
    and each cell's ``top_ids`` and ``top_probs`` ``[L, P, k]`` (the report's hover)."""

    ranks: Tensor
    probs: Tensor
    top_ids: Tensor
    top_probs: Tensor


def layer_ranks(lm: LensModel, lens: Lens, residuals: Sequence[Tensor], targets: Tensor,
                budget_bytes: int = DEFAULT_BUDGET_BYTES, top_k: int = TOP_K_COMMIT) -> LayerRanks:
    """The ranks and probabilities of ``targets`` ``[P]`` under ``lens`` at ``residuals``
    (L × ``[P, d]``), and each cell's top ``top_k``, decoded in row blocks (ties favour the
    target)."""
    n_layers, n_rows = len(residuals), int(targets.numel())
    block = max(1, budget_bytes // (n_layers * int(lm.unembed.W_U.shape[-1]) * 4 * 2))
    parts: list[tuple[Tensor, ...]] = []
    with torch.inference_mode():
        for start in range(0, n_rows, block):
            part = [resid[start : start + block] for resid in residuals]
            wanted = targets[start : start + block].to(part[0].device)
            rows = torch.cat(transformed_rows(lens, part))  # [L·rows, d], layer-major
            log_probs = lm.unembed.log_probs(rows).view(n_layers, len(wanted), -1)
            own = log_probs.gather(-1, wanted.expand(n_layers, -1).unsqueeze(-1))
            top = log_probs.topk(top_k, dim=-1)
            parts.append(((log_probs > own).sum(-1) + 1, own.squeeze(-1).exp(), top.indices, top.values.exp()))
    return LayerRanks(*(torch.cat([part[i] for part in parts], dim=1).cpu() for i in range(4)))


def _first_from(flags: list[bool], through_last: bool = False) -> int | None:
    """The first layer where ``flags`` holds (``through_last``: and at every later layer)."""
    if through_last:
        if not flags[-1]:
            return None
        layer = len(flags) - 1
        while layer > 0 and flags[layer - 1]:
            layer -= 1
        return layer
    return next((layer for layer, flag in enumerate(flags) if flag), None)


@dataclass
class ContinuationResult:
    """A continuation through the lens: its ``ids`` and whether they were ``generated``, the
    per-token ``rows`` (``CONTINUATION_COLUMNS``), the long per-layer ``records``
    (``CONTINUATION_RECORD_COLUMNS``), the JSON ``block``, and per lens each token's top-k tokens
    (decoded) and probabilities at every layer (``top[lens]["tokens"|"probs"]``, ``[P][L][k]``: the
    report's strip)."""

    ids: list[int]
    generated: bool
    rows: list[dict]
    records: list[dict]
    block: dict
    top: dict[str, dict]


def analyse_continuation(lm: LensModel, prompt: str, spec: ContinuationSpec, lenses: Mapping[str, Lens],
                         budget_bytes: int = DEFAULT_BUDGET_BYTES) -> ContinuationResult:
    """The continuation's tokens, then one forward over the prompt and them (but the last), and
    every lens's ranks of each token at each layer (see the module doc)."""
    ids = continuation_ids(lm, prompt, spec)
    tokens, _ = prompt_tokens(lm.bridge, prompt)
    follow = torch.tensor([ids[:-1]], dtype=tokens.dtype, device=tokens.device)
    logits, residuals = forward_with_residuals(lm.bridge, torch.cat([tokens, follow], dim=1),
                                               device=lm.unembed.W_U.device, keep_last=len(ids))
    targets = torch.tensor(ids)
    p_final = torch.log_softmax(logits.float(), -1).gather(-1, targets.to(logits.device).unsqueeze(-1))
    p_final = p_final.squeeze(-1).exp().tolist()
    at = [resid[-len(ids):] for resid in residuals]  # the positions that predict each token
    texts = lm.decoder.decode_many(ids)
    first_pos = int(tokens.shape[1]) - 1
    rows, records, block = [], [], {"text": lm.bridge.tokenizer.decode(ids), "token_ids": ids,
                                    "source": "generated" if spec.text is None else "teacher_forced",
                                    "lenses": {}}
    if spec.text is None:
        block.update(temperature=spec.temperature, seed=spec.seed if spec.temperature > 0 else None)
    n_layers = len(residuals) - 1
    top: dict[str, dict] = {}
    for name, lens in lenses.items():
        reading = layer_ranks(lm, lens, at, targets, budget_bytes)
        rank_lists, prob_lists = reading.ranks.T.tolist(), reading.probs.T.tolist()  # [P][L]
        top_ids = reading.top_ids.transpose(0, 1).tolist()  # [P][L][k]
        top_texts = lm.decoder.decode_many(sorted({i for layers in top_ids for cell in layers for i in cell}))
        top[name] = {"tokens": [[[top_texts[i] for i in cell] for cell in layers] for layers in top_ids],
                     "probs": reading.top_probs.transpose(0, 1).tolist()}
        commits = []
        for index, (token_id, own_ranks, own_probs) in enumerate(zip(ids, rank_lists, prob_lists)):
            commit = _first_from([rank == 1 for rank in own_ranks], through_last=True)
            commits.append(commit)
            rows.append({"lens": name, "pos": first_pos + index, "token": texts[token_id], "token_id": token_id,
                         "p_final": p_final[index], "commit_layer": commit,
                         "first_top5_layer": _first_from([rank <= TOP_K_COMMIT for rank in own_ranks]),
                         "first_p_over_half_layer": _first_from([p > 0.5 for p in own_probs])})
            records += [{"lens": name, "layer": layer, "pos": first_pos + index, "token": texts[token_id],
                         "rank": rank, "p": p} for layer, (rank, p) in enumerate(zip(own_ranks, own_probs))]
        decided = [commit for commit in commits if commit is not None]
        block["lenses"][name] = {
            "mean_commit_depth": None if not decided else round(sum(decided) / len(decided) / n_layers, 3),
            "share_decided_at_last_layer": round(sum(commit == n_layers for commit in commits) / len(commits), 3),
            "share_never_top1": round(sum(commit is None for commit in commits) / len(commits), 3)}
    return ContinuationResult(ids, spec.text is None, rows, records, block, top)
