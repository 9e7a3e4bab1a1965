"""The blocks of a run's JSON document (README, "Output files"): plain dicts, no I/O."""

from __future__ import annotations

import json
import math
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from layers_core.collapse_rules import (
    ENTROPY_COLLAPSE_BITS,
    GoldAnswer,
    compute_milestones,
    semantic_milestones,
    summarize_collapse,
)
from layers_core.errors import first_line
from layers_core.lens.views import NORM_VIEWS, view
from layers_core.model.loading import tied_embeddings
from layers_core.model.tokens import TokenDecoder
from layers_core.norm_utils import classify_norm, detect_model_architecture, unwrap_norm
from layers_core.numerics import entropy_bits_from_log_probs, get_post_unembed_transform
from layers_core.pipeline.prompts import (
    FINAL_PREDICTION_TOP_K,
    TARGET_PREDICTION,
    TEMPERATURE_TOP_K,
    TEMPERATURES,
)

if TYPE_CHECKING:
    from layers_core.model.lens_model import LensModel
    from layers_core.pipeline.sweep import LastLayerConsistency, SweepResult, SweepSettings

SEED = 316
TIMESTAMP_FORMAT = "%Y%m%d%H%M%S"


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (nested in dicts and lists too) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def to_strict_json(document: dict) -> str:
    """``ensure_ascii=False, indent=2, allow_nan=False``; non-finite numbers become null."""
    return json.dumps(finite_or_none(document), ensure_ascii=False, indent=2, allow_nan=False)


def topk_entry(log_probs: Tensor, k: int, decoder: TokenDecoder) -> tuple[float, list[list]]:
    """(entropy in bits, ``[[token, p], …]`` top-k) of one float32 log-prob row ``[V]``."""
    top = torch.topk(log_probs, k=min(k, log_probs.shape[-1]))
    ids, probs = top.indices.tolist(), top.values.exp().tolist()
    vocab = decoder.decode_many(ids)
    return float(entropy_bits_from_log_probs(log_probs)), [[vocab[i], p] for i, p in zip(ids, probs)]


def temperature_entries(model_last_logits: Tensor, decoder: TokenDecoder) -> list[dict]:
    """softmax(z/T) of the model's own last-position logits for T in (0.1, 2.0): no extra forward."""
    entries = []
    for temperature in TEMPERATURES:
        log_probs = torch.log_softmax(model_last_logits.float() / temperature, dim=-1)
        entropy, topk = topk_entry(log_probs, TEMPERATURE_TOP_K, decoder)
        entries.append({"type": "temperature_exploration", "temperature": temperature,
                        "entropy": entropy, "topk": topk})
    return entries


def final_prediction(model_last_logits: Tensor, decoder: TokenDecoder) -> dict:
    """Entropy and top-20 of P_final, the model's own last-position distribution."""
    entropy, topk = topk_entry(torch.log_softmax(model_last_logits.float(), dim=-1),
                               FINAL_PREDICTION_TOP_K, decoder)
    return {"type": "final_prediction", "entropy": entropy, "topk": topk}


def model_stats(model: Any) -> dict:
    """Shape facts of the model, and the norm architecture the ``arch`` lens assumes."""
    cfg = model.cfg
    return {"type": "model_stats", "num_layers": int(cfg.n_layers), "d_model": int(cfg.d_model),
            "n_heads": int(cfg.n_heads), "d_vocab": int(cfg.d_vocab), "n_ctx": int(cfg.n_ctx),
            "architecture": detect_model_architecture(model)}


def _norm_class(module: Any) -> str | None:
    return None if module is None else type(unwrap_norm(module)).__name__


_POST_BLOCK_LABELS = {"ln_final": "using_ln_final_for_post_block", None: "no_normalization"}


def _legacy_norm_labels(model: Any, strategy: str, per_layer: Sequence[dict]) -> dict:
    """The legacy label keys, each describing what this run applied (``per_layer``, from the lens):
    ``layer0_norm_fix`` by the norm of layer 0, ``norm_alignment_fix`` by that after block 0."""
    block0 = model.blocks[0]
    ln1 = getattr(block0, "ln1", None)
    after_block0 = per_layer[1]["norm"] if len(per_layer) > 1 else None
    if after_block0 is not None and after_block0.endswith(".ln2"):
        kind = "rmsnorm" if per_layer[1]["kind"].startswith("rmsnorm") else "layernorm"
        alignment = f"using_ln2_{kind}_for_post_block"
    elif after_block0 is not None and after_block0.endswith(".ln1"):
        alignment = "using_next_ln1_for_post_block"
    else:
        alignment = _POST_BLOCK_LABELS.get(after_block0, "user_lens")
    layer0 = view(strategy).layer0_norm_fix
    if strategy in NORM_VIEWS:  # what layer 0 was decoded through
        layer0 = {"ln_final": "using_ln_final_on_embeddings", None: "no_normalization"}.get(
            per_layer[0]["norm"], "using_real_ln1_on_embeddings")
    return {
        "first_block_ln1_type": _norm_class(ln1),
        "final_ln_type": _norm_class(getattr(model, "ln_final", None)),
        "layernorm_bias_fix": ("active" if ln1 is not None and classify_norm(ln1) == "layernorm"
                               else "not_needed_rms_model"),
        "norm_alignment_fix": alignment,
        "layer0_norm_fix": layer0,
    }


def diagnostics(lm: LensModel, result: SweepResult, settings: SweepSettings,
                consistency: LastLayerConsistency) -> dict:
    """The legacy diagnostics keys in order, then the new ones: of ``lm``'s sweep ``result`` under
    ``settings``, with the last-layer ``consistency`` block."""
    model = lm.bridge
    has_pos_embed = getattr(model.cfg, "positional_embedding_type", None) == "standard"
    tied = tied_embeddings(model)
    summary = summarize_collapse(result.pure_rows, skip_layer0_copy=tied,
                                 headline=uses_headline_copy(settings.view))
    gold = result.gold
    document = {
        "type": "diagnostics",
        "model": lm.model_id,
        "device": lm.device,
        "use_norm_lens": settings.view != "none",
        "use_fp32_unembed": settings.fp32_unembed,
        "unembed_dtype": str(lm.unembed.matmul_dtype),
        **_legacy_norm_labels(model, settings.view, result.norm_per_layer),
        "mixed_precision_fix": "casting_to_fp32_before_unembed",
        "layer0_position_info": ("additive_pos_embed_included" if has_pos_embed
                                 else "token_only_rotary_model"),
        "context_prompt": result.prompt,
        "target_prediction": TARGET_PREDICTION.format(answer=gold["string"] or "no answer given"),
        "L_copy": summary["L_copy"],
        "L_copy_H": summary["L_copy_H"],
        "L_semantic": summary["L_semantic"],
        "delta_layers": summary["delta_layers"],
        "L_copy_strict": summary["L_copy_strict"],
        "copy_rule": {"threshold": settings.copy_threshold, "margin": settings.copy_margin,
                      "entropy_fallback": settings.copy_entropy_fallback,
                      "entropy_fallback_threshold_bits": ENTROPY_COLLAPSE_BITS,
                      "match": "id_in_prompt_set",
                      "headline": "headline" if uses_headline_copy(settings.view) else "seed"},
        "norm_strategy": {"name": settings.view,
                          "architecture": detect_model_architecture(model),
                          "per_layer": result.norm_per_layer, "warnings": result.warnings},
        "gold_alignment": {key: gold[key] for key in
                           ("ok", "status", "variant", "first_id", "answer_ids", "pieces", "warnings")},
        "milestones": compute_milestones(result.pure_rows),
        "last_layer_consistency": {**consistency, "post_unembed_transform": get_post_unembed_transform(model)},
        "L_copy_prompt": summary["L_copy_prompt"],
        "tied_embeddings": tied,
        "copy_collapse_excludes_layer0": tied,
        **semantic_milestones(result.pure_rows),
        "truncation": None if result.truncated_from is None else {
            "side": "left", "prompt_tokens": result.truncated_from, "kept_tokens": len(result.str_tokens)},
    }
    return document


def uses_headline_copy(view_name: str) -> bool:
    """``L_copy`` follows the headline copy rule, except under the seed's ``arch`` rule (legacy parity)."""
    return view_name != "arch"


def lens_comparison_block(result: SweepResult, comparison: Any, chosen: str, skip_layer0_copy: bool) -> dict:
    """The chosen lens vs the other standard view at the last position of every layer."""
    return {
        "chosen": chosen,
        "other": comparison.strategy,
        "per_layer": comparison.per_layer,
        "top1_agreement_fraction": (sum(r["top1_agree"] for r in comparison.per_layer)
                                    / max(1, len(comparison.per_layer))),
        "milestones": {chosen: compute_milestones(result.pure_rows),
                       comparison.strategy: compute_milestones(comparison.pure_rows)},
        "summary": {chosen: summarize_collapse(result.pure_rows, skip_layer0_copy, uses_headline_copy(chosen)),
                    comparison.strategy: summarize_collapse(comparison.pure_rows, skip_layer0_copy,
                                                            uses_headline_copy(comparison.strategy))},
    }


def gold_answer_block(gold: GoldAnswer, p_sequence: float | None = None,
                      alias_p_sequence: Sequence[float | None] = ()) -> dict:
    """The top-level ``gold_answer`` record: the resolved answer, its token count, the model's
    teacher-forced probability of all of it (``p_sequence``), and ``first_piece_ambiguous``
    (False here; a prompt set sets it when another answer shares the first token). An answer of
    aliases also records each alias (with its own ``p_sequence``; ``p_sequence`` is their sum),
    the first ids the answer columns follow, and ``best_alias``, the one the model most writes."""
    block = {key: gold[key] for key in ("string", "pieces", "first_id", "answer_ids", "variant")}
    block = {**block, "n_tokens": len(gold["answer_ids"]), "p_sequence": p_sequence,
             "first_piece_ambiguous": False}
    if gold.get("aliases"):
        aliases = [{**alias, "p_sequence": p} for alias, p in zip(gold["aliases"], alias_p_sequence)]
        scored = [alias for alias in aliases if alias["p_sequence"] is not None]
        block.update(aliases=aliases, first_ids=list(gold["first_ids"]),
                     best_alias=max(scored, key=lambda alias: alias["p_sequence"])["string"] if scored else None)
    return block


@dataclass(frozen=True)
class RunFacts:
    """What provenance records of a run besides versions and platform; unknown facts are None.
    ``gguf``: a GGUF source's file, sha256, architecture and quantisation."""

    device: str | None = None
    dtype: torch.dtype | None = None
    declared_dtype: torch.dtype | None = None
    unembed_dtype: torch.dtype | None = None
    model_source: str | None = None
    model_path: str | None = None
    bos_prepended: bool | None = None
    n_tokens: int | None = None
    started_at: datetime | None = None
    argv: Sequence[str] = ()
    lens: dict | None = None
    gguf: dict | None = None


def provenance_block(facts: RunFacts) -> dict:
    """The JSON ``provenance`` block: versions, platform, seed and ``facts`` (null where unknown)."""
    import transformer_lens
    import transformers

    def name(dtype: torch.dtype | None) -> str | None:
        return None if dtype is None else str(dtype)

    return {
        "torch_version": str(torch.__version__),  # a plain str: TorchVersion would import torch where unpickled
        "transformers_version": transformers.__version__,
        "transformer_lens_version": getattr(transformer_lens, "__version__", None)
        or _dist_version("transformer-lens"),
        "python_version": sys.version.split()[0],
        "platform": platform.platform(),
        "device": facts.device,
        "dtype": name(facts.dtype),
        "declared_dtype": name(facts.declared_dtype),
        "unembed_dtype": name(facts.unembed_dtype),
        "seed": SEED,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "model_source": facts.model_source,
        "model_path": facts.model_path,
        "bos_prepended": facts.bos_prepended,
        "n_tokens": facts.n_tokens,
        "started_at": None if facts.started_at is None else facts.started_at.isoformat(),
        "argv": list(facts.argv),
        "lens": facts.lens,
        "gguf": facts.gguf,
    }


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def error_document(
    error: BaseException, stage: str, model_id: str, now: datetime, known_provenance: dict
) -> dict:
    """The strict-JSON failure document: ``{"error": {type, message, stage, model, timestamp}, "provenance"}``."""
    return {
        "error": {"type": type(error).__name__, "message": first_line(error), "stage": stage,
                  "model": model_id, "timestamp": now.strftime(TIMESTAMP_FORMAT)},
        "provenance": known_provenance,
    }
