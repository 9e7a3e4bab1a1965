"""Checks a researcher needs before believing a collapse layer: the other standard lens, the raw
(un-normalised) residual, and a control prompt. All work from residuals the sweep already holds
(the control needs one extra forward pass), at the last position of every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from layers_core.collapse_rules import resolve_gold_answer
from layers_core.csv_io import TOP_K_VERBOSE
from layers_core.lens.stats import normalise_layers, row_log_probs, stats_from_log_probs
from layers_core.norm_utils import apply_norm_or_skip, lens_norm_plan
from layers_core.numerics import kl_bits_from_log_probs
from layers_core.pipeline.sweep import (
    SweepResult,
    SweepSettings,
    TokenDecoder,
    UnembedPath,
    build_pure_rows,
    forward_with_residuals,
    prompt_token_ids,
)

RAW_CHECK_KL_HIGH_BITS = 1.0  # max KL(norm ‖ raw) at or above this: high lens-artifact risk
RAW_CHECK_KL_MEDIUM_BITS = 0.5


COMPARISON_STRATEGY = {"arch": "final", "final": "arch", "none": "final"}


def comparison_view(settings: SweepSettings) -> str:
    """The lens shown beside the chosen one: the other standard view (arch ↔ final, none → final),
    or, beside a tuned lens, the logit lens under the chosen ``--norm``."""
    return settings.norm_strategy if settings.view == "tuned" else COMPARISON_STRATEGY[settings.norm_strategy]


@dataclass
class LensComparison:
    """The other standard lens at the last position, and how it differs from the chosen one."""

    strategy: str
    pure_rows: list[dict]
    per_layer: list[dict]  # {layer, top1_agree, kl_bits}: KL(chosen ‖ other) in bits


def compare_lenses(
    model: Any,
    result: SweepResult,
    unembed: UnembedPath,
    settings: SweepSettings,
    decoder: TokenDecoder,
    chosen_log_probs: Tensor,
    strategy: str | None = None,
    other_log_probs: Tensor | None = None,
) -> LensComparison:
    """Decodes the last position of every layer with a second norm strategy (default: the other
    standard view, arch ↔ final) from the residuals the sweep kept: no extra forward pass.

    ``chosen_log_probs`` ``[L, V]`` is the chosen lens at the same rows
    (``last_position_lens_log_probs``); the per-layer KL is KL(chosen ‖ other). ``other_log_probs``
    ``[L, V]``: the other lens's rows if already decoded (``last_position_views``).
    """
    other = strategy or comparison_view(settings)
    final_lp = torch.log_softmax(result.model_logits[-1], dim=-1)
    with torch.inference_mode():
        if other_log_probs is None:
            normed = _normalised_rows(model, result.last_position_resid, other, settings)
            other_log_probs = row_log_probs(torch.cat(normed), unembed.W_U, unembed.b_U, unembed.transform,
                                            unembed.force_fp32, unembed.chunk_columns)
        other_lp = other_log_probs
        stats = stats_from_log_probs(other_lp, final_lp, result.gold["first_id"], TOP_K_VERBOSE)
        kl = kl_bits_from_log_probs(chosen_log_probs, other_lp).tolist()
        agree = (chosen_log_probs.argmax(-1) == other_lp.argmax(-1)).tolist()
    vocab = decoder.decode_many(stats.topk_ids.flatten().tolist())
    rows = build_pure_rows(stats, prompt_token_ids(model.tokenizer, result.prompt), result.gold,
                           vocab, replace(settings, norm_strategy=other),
                           position=int(result.tokens.shape[1]) - 1)
    per_layer = [{"layer": layer, "top1_agree": bool(a), "kl_bits": k}
                 for layer, (a, k) in enumerate(zip(agree, kl))]
    return LensComparison(other, rows, per_layer)


def _normalised_rows(model: Any, last_resid: Tensor, view: str, settings: SweepSettings) -> list[Tensor]:
    """Layer ℓ's norm (under ``view``) applied to row ℓ of ``last_resid`` ``[L, d]``; the tuned
    view translates each row first."""
    plan = lens_norm_plan(model, view)
    rows = [row.unsqueeze(0) for row in last_resid]
    if view == "tuned":
        rows = settings.translated(rows)
    return normalise_layers(rows, [m for m, _ in plan], [lb for _, lb in plan])


def last_position_lens_log_probs(model: Any, last_resid: Tensor, unembed: UnembedPath,
                                 settings: SweepSettings) -> Tensor:
    """Float32 chosen-lens log-probs ``[L, V]`` of each layer's last-position residual ``[L, d]``."""
    with torch.inference_mode():
        normed = _normalised_rows(model, last_resid, settings.view, settings)
        return torch.log_softmax(unembed.logits(torch.cat(normed)), dim=-1)


def raw_check_layers(n_layers: int) -> list[int]:
    """The sampled layers {0, ⌊n/4⌋, ⌊n/2⌋, ⌊3n/4⌋, n}, without repeats."""
    return sorted({0, n_layers // 4, n_layers // 2, (3 * n_layers) // 4, n_layers})


def _rank(log_probs: Tensor, answer_id: int | None) -> list[int | None]:
    if answer_id is None:
        return [None] * log_probs.shape[0]
    return ((log_probs > log_probs[:, answer_id : answer_id + 1]).sum(-1) + 1).tolist()


def last_position_views(model: Any, last_resid: Tensor, last_block_resid: Tensor, unembed: UnembedPath,
                        settings: SweepSettings) -> dict[str, Tensor]:
    """Every last-position view the checks need, decoded in one unembedding (W_U read once):
    ``chosen`` and ``other`` ``[L, V]`` (the chosen and the comparison lens), ``raw`` (the raw
    residual at ``raw_check_layers``) and ``consistency`` ``[1, V]`` (``ln_final`` of the last
    block's output); float32 log-probs."""
    n_rows = last_resid.shape[0]
    with torch.inference_mode():
        rows = [*_normalised_rows(model, last_resid, settings.view, settings),
                *_normalised_rows(model, last_resid, comparison_view(settings), settings),
                last_resid[raw_check_layers(n_rows - 1)],
                apply_norm_or_skip(last_block_resid.unsqueeze(0), model.ln_final)]
        log_probs = row_log_probs(torch.cat(rows), unembed.W_U, unembed.b_U, unembed.transform,
                                  unembed.force_fp32, unembed.chunk_columns)
    raw_stop = 2 * n_rows + len(raw_check_layers(n_rows - 1))
    return {"chosen": log_probs[:n_rows], "other": log_probs[n_rows : 2 * n_rows],
            "raw": log_probs[2 * n_rows : raw_stop], "consistency": log_probs[raw_stop:]}


def raw_lens_check(result: SweepResult, unembed: UnembedPath, strategy: str,
                   chosen_log_probs: Tensor, raw_log_probs: Tensor | None = None) -> dict:
    """The chosen lens vs the raw residual at the sampled layers (issue 5's ``raw_lens_check``).

    ``chosen_log_probs`` ``[L, V]`` is the chosen lens at every layer's last position.

    ``lens_artifact_risk`` is ``high`` if a sampled layer has the answer at rank 1 only under the
    norm, or max KL(norm ‖ raw) ≥ 1 bit; ``medium`` if ≥ 0.5 bit; else ``low``.
    """
    layers = raw_check_layers(len(result.last_position_resid) - 1)
    norm_lp = chosen_log_probs[layers]
    if raw_log_probs is None:
        with torch.inference_mode():  # no norm at all
            raw_log_probs = torch.log_softmax(unembed.logits(result.last_position_resid[layers]), dim=-1)
    raw_lp = raw_log_probs
    kl = kl_bits_from_log_probs(norm_lp, raw_lp).tolist()
    answer_id = result.gold["first_id"]
    norm_rank, raw_rank = _rank(norm_lp, answer_id), _rank(raw_lp, answer_id)
    agree = (norm_lp.argmax(-1) == raw_lp.argmax(-1)).tolist()
    rows = [{"layer": layer, "kl_norm_vs_raw_bits": k, "top1_agree": bool(a),
             "answer_rank_norm": nr, "answer_rank_raw": rr}
            for layer, k, a, nr, rr in zip(layers, kl, agree, norm_rank, raw_rank)]
    norm_only_semantic = any(r["answer_rank_norm"] == 1 and r["answer_rank_raw"] != 1 for r in rows)
    max_kl = max(kl)
    if norm_only_semantic or max_kl >= RAW_CHECK_KL_HIGH_BITS:
        risk = "high"
    elif max_kl >= RAW_CHECK_KL_MEDIUM_BITS:
        risk = "medium"
    else:
        risk = "low"
    return {"mode": "sample", "norm": strategy, "layers": rows, "max_kl_norm_vs_raw_bits": max_kl,
            "norm_only_semantic_layer": norm_only_semantic, "lens_artifact_risk": risk}


def control_margins(model: Any, control_prompt: str, control_answer: str, main_answer: str,
                    unembed: UnembedPath, settings: SweepSettings) -> dict:
    """A control pass: per layer, p(control answer) − p(main answer) at the control prompt's last
    position under the chosen lens, and the first layer where the margin is positive."""
    _, residuals = forward_with_residuals(model, model.to_tokens(control_prompt), device=unembed.W_U.device)
    last_resid = torch.stack([resid[-1] for resid in residuals])
    probs = last_position_lens_log_probs(model, last_resid, unembed, settings).exp()
    control = resolve_gold_answer(model.tokenizer, control_prompt, control_answer)
    main = resolve_gold_answer(model.tokenizer, control_prompt, main_answer)
    if control["first_id"] is None or main["first_id"] is None:
        return {"control_prompt": control_prompt, "control_answer": control_answer,
                "status": "unresolved", "per_layer": [], "first_control_margin_pos": None,
                "max_control_margin": None}
    margins = (probs[:, control["first_id"]] - probs[:, main["first_id"]]).tolist()
    positive = [layer for layer, margin in enumerate(margins) if margin > 0]
    return {"control_prompt": control_prompt, "control_answer": control_answer, "status": "ok",
            "per_layer": [{"layer": layer, "control_margin": m} for layer, m in enumerate(margins)],
            "first_control_margin_pos": positive[0] if positive else None,
            "max_control_margin": max(margins)}


def answer_sequence_probability(model: Any, tokens: Tensor, answer_ids: list[int], model_last_logits: Tensor) -> float | None:
    """The model's teacher-forced probability of the whole answer after the prompt ``[1, T]``:
    Π_k p(answer_k | prompt, answer_<k) at the final layer (one extra forward for answers of
    several tokens; None for an unresolved answer)."""
    if not answer_ids:
        return None
    first = float(torch.log_softmax(model_last_logits.float(), dim=-1)[answer_ids[0]])
    if len(answer_ids) == 1:
        return float(torch.tensor(first).exp())
    follow = torch.tensor([answer_ids[:-1]], dtype=tokens.dtype, device=tokens.device)
    with torch.inference_mode():
        logits = model(torch.cat([tokens, follow], dim=1))[0, tokens.shape[1] :].float()
    rest = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(answer_ids[1:], device=logits.device)
                                                     .unsqueeze(-1)).sum()
    return float((first + rest.cpu()).exp())
