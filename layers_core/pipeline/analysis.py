"""Everything one prompt gets, as plain data: the sweep, the checks and the JSON blocks.

Shared by the single-prompt run and prompt sets, so that a prompt in a set yields exactly the
numbers it yields alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from layers_core.collapse_rules import answer_token_ids, resolve_gold_answer
from layers_core.model.lens_model import LensModel
from layers_core.pipeline.attribution import (
    Attribution,
    attribute,
    has_residual_mids,
    not_decomposable,
)
from layers_core.pipeline.checks import (
    LensComparison,
    answer_sequence_probability,
    compare_lenses,
    control_margins,
    raw_lens_check,
)
from layers_core.pipeline.concepts import Concept, concept_rows, concepts_block, resolve_concepts
from layers_core.pipeline.lens_table import (
    last_position_log_probs,
    lens_milestones,
    lens_rows,
    track_token_ids,
    tracked_rows,
)
from layers_core.pipeline.sweep import (
    Forwarded,
    LastLayerConsistency,
    SweepResult,
    SweepSettings,
    lens_consistency,
    run_sweep,
)
from layers_core.results import report
from layers_core.results.attribution import attribution_block

DEPTH_FRACTION_DECIMALS = 3


@dataclass
class PromptAnalysis:
    """One prompt's sweep, its comparison lens and the JSON blocks derived from them."""

    result: SweepResult
    comparison: LensComparison
    consistency: LastLayerConsistency
    blocks: dict  # diagnostics, gold_answer, lens_comparison, raw_lens_check, control_*, attribution
    attribution: Attribution | None = None  # single prompts: the answer logit split into block parts
    lens_rows: list[dict] | None = None  # compare_lenses: every lens at the last position
    tracked_rows: list[dict] | None = None  # track: each tracked token per lens and layer
    concepts: list[Concept] | None = None  # settings.concepts, resolved to token ids
    concept_rows: list[dict] | None = None  # each concept's p and best rank per lens and layer
    continuation: Any = None  # continuation.ContinuationResult: the lens over a completion


def add_lens_views(lm: LensModel, analysis: PromptAnalysis, settings: SweepSettings,
                   others: dict[str, Any] | None, track: list[str] | None) -> None:
    """``compare_lenses`` (``others``: every further lens, by name) and ``track``: the lens table
    and its milestones block, and the tracked tokens under every lens of the run."""
    result = analysis.result
    log_probs = last_position_log_probs(result, settings.view, settings.comparison_view, others or {}, lm.unembed)
    if others is not None:
        final = torch.log_softmax(result.model_logits[-1].float(), dim=-1)
        analysis.lens_rows = lens_rows(log_probs, final, answer_token_ids(result.gold), lm.decoder)
        analysis.blocks["lenses"] = lens_milestones(analysis.lens_rows)
    if track:
        analysis.tracked_rows = tracked_rows(log_probs, track_token_ids(lm.bridge.tokenizer, track))
    if analysis.concepts:  # every lens of the comparison now, not only the two decoded with the prompt
        analysis.concept_rows = concept_rows(log_probs, analysis.concepts)


def depth_fractions(diagnostics: dict, n_layers: int) -> dict:
    """Every collapse index and milestone as a fraction of depth (L / n, 3 decimals)."""
    indices = {key: diagnostics[key] for key in ("L_copy", "L_copy_strict", "L_copy_H", "L_semantic",
                                                  "L_semantic_stable", "L_semantic_margin")}
    indices.update(diagnostics["milestones"])
    return {key: None if value is None else round(value / n_layers, DEPTH_FRACTION_DECIMALS)
            for key, value in indices.items()}


def _p_sequence(model: Any, result: SweepResult) -> tuple[float | None, list[float | None]]:
    """The answer's teacher-forced probability: from the prompt's own forward, which carried the
    answer (``forward_prompt``), or by a forward of its own where it did not fit. With aliases,
    (their sum over distinct token sequences, each alias's own; a further alias of several
    tokens costs one more forward)."""
    gold, last = result.gold, result.model_logits[-1]
    if result.answer_log_prob is not None:
        primary = math.exp(result.answer_log_prob)
    else:
        primary = answer_sequence_probability(model, result.tokens, gold["answer_ids"], last)
    if not gold["aliases"]:
        return primary, []
    known = {tuple(gold["answer_ids"]): primary}
    for alias in gold["aliases"]:
        ids = tuple(alias["answer_ids"])
        if alias["ok"] and ids not in known:
            known[ids] = answer_sequence_probability(model, result.tokens, list(ids), last)
    own = [known[tuple(alias["answer_ids"])] if alias["ok"] else None for alias in gold["aliases"]]
    return (None if primary is None else sum(known.values())), own


def analyse_prompt(
    lm: LensModel,
    settings: SweepSettings,
    prompt: str,
    answer: str,
    control: tuple[str, str] | None = None,
    forwarded: Forwarded | None = None,
    control_forwarded: Forwarded | None = None,
) -> PromptAnalysis:
    """Sweep one prompt, then the comparison lens, the raw-residual check and the control.

    ``forwarded``: the prompt's forward pass if already done (a batch), ``control_forwarded`` the
    control prompt's. ``settings.records``: decode every position (else only the last: the same
    pure rows, no records); ``settings.attribution``: also split the answer's logit into block
    parts (single prompts).
    """
    attribution = settings.attribution
    model = lm.bridge
    if attribution and forwarded is None and has_residual_mids(model):  # the lens forward captures the parts
        settings = replace(settings, capture_mids=True)
    result = run_sweep(model, prompt, answer, lm.unembed, settings, lm.decoder, forwarded)
    consistency = lens_consistency(result.views, result.model_logits[-1], answer_token_ids(result.gold),
                                   lm.unembed, lm.dtype, settings.view)
    comparison = compare_lenses(model, result, settings, lm.decoder)
    diagnostics = report.diagnostics(lm, result, settings, consistency)
    diagnostics["depth_fractions"] = depth_fractions(diagnostics, int(model.cfg.n_layers))
    margins = None if control is None else control_margins(
        model, control[0], control[1], answer, lm.unembed, settings, control_forwarded)
    blocks = {
        "diagnostics": diagnostics,
        "gold_answer": report.gold_answer_block(result.gold, *_p_sequence(model, result)),
        "lens_comparison": report.lens_comparison_block(result, comparison, settings.view,
                                                        diagnostics["tied_embeddings"]),
        "raw_lens_check": raw_lens_check(result, settings.view),
        "control_summary": None if margins is None else {
            key: margins[key] for key in ("control_prompt", "control_answer", "status",
                                          "first_control_margin_pos", "max_control_margin")},
        "control_margins": None if margins is None else margins["per_layer"],
    }
    concepts = resolve_concepts(model.tokenizer, settings.concepts) if settings.concepts else None
    rows = None
    if concepts:
        rows = concept_rows({settings.view: result.views.chosen, settings.comparison_view: result.views.other},
                            concepts)
        blocks["concepts"] = concepts_block(concepts, lm.decoder)
    split = None
    if attribution:
        split, blocks["attribution"] = _attribution(model, result, answer, control, settings.answer_join)
    return PromptAnalysis(result, comparison, consistency, blocks, split, concepts=concepts, concept_rows=rows)


def _attribution(model: Any, result: SweepResult, answer: str | None, control: tuple[str, str] | None,
                 join: str = "auto") -> tuple[Attribution | None, dict]:
    """The answer logit's split (against the control answer where there is one) and its block."""
    answer_id = result.gold["first_id"]
    note = "no attribution: no answer" if answer_id is None else not_decomposable(model)
    if note is not None:
        return None, attribution_block(None, note, answer, None)
    control_id = None
    if control is not None:
        control_id = resolve_gold_answer(model.tokenizer, control[0], control[1], join=join)["first_id"]
    snapshots = None
    if result.last_position_mids is not None:
        snapshots = (result.last_position_resid, result.last_position_mids)
    split = attribute(model, result.tokens, answer_id, control_id, snapshots)
    return split, attribution_block(split, None, answer, None if control_id is None else control[1])
