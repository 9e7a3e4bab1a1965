"""One prompt through one model: forward with residual hooks, the lens, and the output rows.

``run_sweep`` is exactly what ``run.py`` does per prompt (and what ``bench_sweep.py`` times): it
returns plain rows for the CSV writers and the tensors the JSON report needs, and writes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from layers_core.collapse_rules import (
    COPY_MARGIN,
    COPY_THRESHOLD,
    ENTROPY_COLLAPSE_BITS,
    copy_collapse_flags,
    is_semantic_top1,
    resolve_gold_answer,
)
from layers_core.csv_io import (
    NEXT_TOKEN_LABEL,
    TOP_K_RECORD,
    TOP_K_VERBOSE,
    is_verbose_position,
)
from layers_core.hooks import residual_cache, residual_hook_names
from layers_core.lens.stats import (
    DEFAULT_BUDGET_BYTES,
    LensStats,
    lens_statistics,
    normalise_layers,
    stats_from_log_probs,
)
from layers_core.norm_utils import apply_norm_or_skip, classify_norm, lens_norm_plan
from layers_core.numerics import kl_bits_from_log_probs, unembed_logits

CONSISTENCY_TOLERANCE_BITS = 1e-6  # float32 last-layer lens vs the model's own logits
HALF_PRECISION_TOLERANCE_BITS = 1e-2  # the same gate when the model computes in bf16/fp16
HIGH_LAST_LAYER_KL_BITS = 0.25  # warn when the lens misses the head by this much


@dataclass(frozen=True)
class SweepSettings:
    """The knobs of one sweep; defaults are the legacy ones."""

    norm_strategy: str = "arch"
    copy_threshold: float = COPY_THRESHOLD
    copy_margin: float = COPY_MARGIN
    copy_entropy_fallback: bool = True
    fp32_unembed: bool = False
    budget_bytes: int = DEFAULT_BUDGET_BYTES
    tuned_lens: Any = field(default=None, compare=False)  # a TunedLens: decode translated residuals

    @property
    def view(self) -> str:
        """The chosen lens: ``tuned``, or the logit lens's norm strategy."""
        return "tuned" if self.tuned_lens is not None else self.norm_strategy

    def translated(self, residuals: Sequence[Tensor]) -> list[Tensor]:
        """Layer ℓ's rows through the tuned lens's translator ℓ (unchanged for the logit lens)."""
        if self.tuned_lens is None:
            return list(residuals)
        return [self.tuned_lens.translate(resid, layer) for layer, resid in enumerate(residuals)]


@dataclass
class UnembedPath:
    """The decoding half of the lens: weights for analysis and the post-unembed transform."""

    W_U: Tensor
    b_U: Tensor | None
    transform: Callable[[Tensor], Tensor]
    force_fp32: bool = False
    chunk_columns: int | None = None  # upcast a half-precision W_U this many columns at a time

    @property
    def matmul_dtype(self) -> torch.dtype:
        """The dtype the unembedding's matmul runs in."""
        if self.force_fp32 and self.W_U.is_floating_point():
            return torch.float32
        return self.W_U.dtype

    def logits(self, resid_normed: Tensor) -> Tensor:
        """``[..., d]`` → float32 lens logits ``[..., V]``."""
        return unembed_logits(resid_normed, self.W_U, self.b_U, self.transform, self.force_fp32,
                              chunk_columns=self.chunk_columns)


@dataclass
class SweepResult:
    """Everything one sweep produced; rows are plain dicts keyed by CSV column."""

    prompt: str
    tokens: Tensor  # [1, T] on the model's device
    str_tokens: list[str]
    gold: dict
    model_logits: Tensor  # [1, V] float32, the model's own at the last position
    records: list[dict]
    pure_rows: list[dict]
    norm_per_layer: list[dict]
    resid_normed: list[Tensor]  # L × [T, d] in the compute dtype
    last_block_resid: Tensor  # [d], blocks.{n-1}.hook_resid_post at T−1
    last_position_resid: Tensor  # [L, d], the raw residual of every layer at T−1
    warnings: list[str] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)


class NonFiniteError(ValueError):
    """The model produced inf/NaN: usually fp16 overflow."""


def check_finite(model_logits: Tensor, residuals: Sequence[Tensor], dtype: torch.dtype) -> None:
    """Raises ``NonFiniteError`` naming the first layer whose residual holds inf/NaN (one sync)."""
    finite = torch.stack([torch.isfinite(resid).all() for resid in residuals]
                         + [torch.isfinite(model_logits).all()]).tolist()
    if all(finite):
        return
    first = finite.index(False)
    where = "the model's logits" if first == len(residuals) else f"the residual stream at layer {first}"
    raise NonFiniteError(f"non-finite values (inf/NaN) in {where} computing in {dtype}; "
                         "try --dtype bfloat16 or --dtype float32")


def forward_with_residuals(
    model: Any, tokens: Tensor, last_logits_only: bool = True, device: Any = None
) -> tuple[Tensor, list[Tensor]]:
    """One forward pass with the n+1 residual hooks → (model logits float32, L × ``[T, d]``).

    The logits are the model's own, ``[1, V]`` at the last position when ``last_logits_only``
    (HF's ``logits_to_keep=1`` skips T−1 rows of the head's matmul), else ``[T, V]``. With
    ``device`` (the lens device) residuals move there as they are captured, and the logits too.
    Raises ``NonFiniteError`` if any of them holds inf/NaN.
    """
    names = residual_hook_names(int(model.cfg.n_layers))
    with torch.inference_mode(), residual_cache(model, device) as (cache, _):
        logits = model(tokens, logits_to_keep=1) if last_logits_only else model(tokens)
    logits = logits[0].float() if device is None else logits[0].to(device=device, dtype=torch.float32)
    residuals = [cache.pop(name)[0] for name in names]
    check_finite(logits, residuals, residuals[0].dtype)
    return logits, residuals


class TokenDecoder:
    """``tokenizer.decode([id])`` with a cache, filled in one batch per call of ``decode_many``."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def decode_many(self, ids: Iterable[int]) -> dict[int, str]:
        """Decodes every not-yet-seen id in one ``batch_decode`` call; returns the cache."""
        missing = sorted(set(ids) - self._cache.keys())
        if missing:
            texts = self._tokenizer.batch_decode([[i] for i in missing])
            self._cache.update(zip(missing, texts))
        return self._cache


def _topk_cells(ids: Sequence[int], probs: Sequence[float], k: int, vocab: dict[int, str]) -> dict:
    cells: dict[str, Any] = {}
    for rank in range(k):
        cells[f"top{rank + 1}"] = vocab[ids[rank]]
        cells[f"prob{rank + 1}"] = probs[rank]
    cells["rest_mass"] = max(0.0, 1.0 - sum(probs[:k]))
    return cells


def verbose_positions(str_tokens: Sequence[str]) -> list[bool]:
    """Which positions record the top-20."""
    return [is_verbose_position(tok, pos, len(str_tokens)) for pos, tok in enumerate(str_tokens)]


def build_records(stats: LensStats, str_tokens: Sequence[str], vocab: dict[int, str],
                  verbose: Sequence[bool] | None = None) -> list[dict]:
    """Records rows, layer-major: top-20 at verbose positions, top-5 elsewhere."""
    n_layers, seq_len = stats.entropy_bits.shape
    verbose = verbose_positions(str_tokens) if verbose is None else verbose
    entropy, ids, probs = (stats.entropy_bits.tolist(), stats.topk_ids.tolist(),
                           stats.topk_probs.tolist())
    rows = []
    for layer in range(n_layers):
        for pos in range(seq_len):
            k = TOP_K_VERBOSE if verbose[pos] else TOP_K_RECORD
            row = {"layer": layer, "pos": pos, "token": str_tokens[pos],
                   "entropy": entropy[layer][pos]}
            row.update(_topk_cells(ids[layer][pos], probs[layer][pos], k, vocab))
            rows.append(row)
    return rows


def build_pure_rows(
    stats: LensStats,
    prompt_ids: Iterable[int],
    gold: dict,
    vocab: dict[int, str],
    settings: SweepSettings,
    position: int | None = None,
) -> list[dict]:
    """One row per layer at the last position: top-5, flags and metrics .

    ``position`` labels the rows' ``pos`` when ``stats`` holds only the last position.
    """
    last = stats.entropy_bits.shape[1] - 1
    entropy = stats.entropy_bits[:, last]
    ids, probs = stats.topk_ids[:, last], stats.topk_probs[:, last]
    copy, strict, copy_prompt = copy_collapse_flags(
        ids[:, 0], probs[:, 0], probs[:, 1], entropy, prompt_ids, settings.copy_threshold,
        settings.copy_margin, settings.copy_entropy_fallback, ENTROPY_COLLAPSE_BITS)
    resolved = gold["first_id"] is not None
    p_answer = stats.p_answer[:, last].tolist() if resolved else [None] * len(entropy)
    ranks = stats.answer_rank.tolist() if resolved else [None] * len(entropy)
    rows = []
    for layer, (h, top_ids, top_p, kl) in enumerate(zip(
            entropy.tolist(), ids.tolist(), probs.tolist(), stats.kl_to_final_bits.tolist())):
        row = {"layer": layer, "pos": last if position is None else position,
               "token": NEXT_TOKEN_LABEL, "entropy": h}
        row.update(_topk_cells(top_ids, top_p, TOP_K_RECORD, vocab))
        rank = ranks[layer]
        is_answer = rank == 1 if resolved else is_semantic_top1(vocab[top_ids[0]], gold["string"])
        row.update(copy_collapse=bool(copy[layer]), copy_strict=bool(strict[layer]),
                   copy_collapse_prompt=bool(copy_prompt[layer]),
                   entropy_collapse=h <= ENTROPY_COLLAPSE_BITS, is_answer=is_answer,
                   p_top1=top_p[0], p_top5=sum(top_p[:TOP_K_RECORD]), p_answer=p_answer[layer],
                   answer_rank=rank, kl_to_final_bits=kl)
        rows.append(row)
    return rows


def classify_plan_warnings(plan: Sequence[tuple[Any, str | None]], warnings: list[str]) -> None:
    """The warnings ``normalise_layers`` would append for this plan (unknown norm kinds)."""
    for module, label in plan:
        if module is not None and classify_norm(module) == "unknown":
            warnings.append(f"unknown norm type {type(module).__name__} at {label or '?'}: "
                            "normalisation skipped")


def describe_norm_plan(plan: Sequence[tuple[Any, str | None]]) -> list[dict]:
    """``[{layer, norm, kind}]`` for the JSON from a ``lens_norm_plan``: which norm decodes each
    layer and with what maths."""
    return [
        {"layer": layer, "norm": label,
         "kind": None if module is None else classify_norm(module)}
        for layer, (module, label) in enumerate(plan)
    ]


def prompt_token_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's ids without special tokens (the copy rule's candidate set)."""
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


@dataclass
class Forwarded:
    """One prompt's forward pass: tokens ``[1, T]``, the model's own last-position logits
    ``[1, V]`` float32 and the n+1 residuals ``L × [T, d]``, both on the lens device."""

    tokens: Tensor
    model_logits: Tensor
    residuals: list[Tensor]
    forward_s: float = 0.0


def forward_prompt(model: Any, prompt: str, device: Any = None) -> Forwarded:
    """One prompt through the model with the residual hooks."""
    started = time.perf_counter()
    tokens = model.to_tokens(prompt)
    model_logits, residuals = forward_with_residuals(model, tokens, device=device)
    return Forwarded(tokens, model_logits, residuals, time.perf_counter() - started)


def right_padded_batch(model: Any, prompts: Sequence[str]) -> tuple[list[Tensor], Tensor, Tensor]:
    """(each prompt's tokens, the right-padded batch ``[B, T_max]``, lengths ``[B]``).

    Under causal attention a real token never attends to the padding after it and positions are
    unchanged, so each prompt's real positions get its single-prompt numbers (up to float32
    reordering); read each prompt at its own last real position, never at a pad.
    """
    rows = [model.to_tokens(prompt)[0] for prompt in prompts]
    lengths = torch.tensor([len(row) for row in rows])
    pad_id = model.tokenizer.pad_token_id
    batch = torch.full((len(rows), int(lengths.max())), 0 if pad_id is None else pad_id,
                       dtype=rows[0].dtype, device=rows[0].device)
    for index, row in enumerate(rows):
        batch[index, : len(row)] = row
    return rows, batch, lengths


def last_position_logits(model: Any, batch: Tensor, lengths: Tensor) -> Tensor:
    """The model's logits ``[B, V]`` at each row's last real position; the head runs only at the
    distinct last positions (``logits_to_keep``)."""
    last_positions = torch.unique(lengths - 1)  # sorted
    logits = model(batch, logits_to_keep=last_positions.to(batch.device))
    column = torch.searchsorted(last_positions, lengths - 1).to(logits.device)
    return logits[torch.arange(len(lengths), device=logits.device), column]


def forward_batch(model: Any, prompts: Sequence[str], device: Any = None) -> list[Forwarded]:
    """Several prompts in one right-padded forward pass (``right_padded_batch``); each prompt's
    residuals are cut to its own length and its logits read at its own last real position."""
    started = time.perf_counter()
    rows, batch, lengths = right_padded_batch(model, prompts)
    names = residual_hook_names(int(model.cfg.n_layers))
    with torch.inference_mode(), residual_cache(model, device) as (cache, _):
        last = last_position_logits(model, batch, lengths).to(device=device, dtype=torch.float32)
    layers = [cache.pop(name) for name in names]
    share = (time.perf_counter() - started) / len(rows)
    forwarded = []
    for index, length in enumerate(lengths.tolist()):
        residuals = [layer[index, :length] for layer in layers]
        check_finite(last[index], residuals, residuals[0].dtype)
        forwarded.append(Forwarded(rows[index].unsqueeze(0), last[index : index + 1], residuals, share))
    return forwarded


def run_sweep(
    model: Any,
    prompt: str,
    answer: str,
    unembed: UnembedPath,
    settings: SweepSettings = SweepSettings(),
    decoder: TokenDecoder | None = None,
    forwarded: Forwarded | None = None,
    records: bool = True,
    last_log_probs: Tensor | None = None,
) -> SweepResult:
    """Forward once with hooks (unless ``forwarded`` is given), decode every layer and build the
    records and pure rows. Without ``records`` only the last position is decoded: the pure rows
    are the same, the records empty; ``last_log_probs`` ``[L, V]`` are those rows if already
    decoded (``lens_checks.last_position_views``)."""
    tokenizer = model.tokenizer
    decoder = decoder or TokenDecoder(tokenizer)
    forwarded = forwarded or forward_prompt(model, prompt, unembed.W_U.device)
    started = time.perf_counter()
    tokens, model_logits, residuals = forwarded.tokens, forwarded.model_logits, forwarded.residuals
    str_tokens = list(model.to_str_tokens(prompt))
    gold = resolve_gold_answer(tokenizer, prompt, answer)

    warnings: list[str] = []
    plan = lens_norm_plan(model, settings.view)
    last_block_resid = residuals[-1][-1]
    last_position_resid = torch.stack([resid[-1] for resid in residuals])
    decoded = settings.translated(residuals if records else [resid[-1:] for resid in residuals])
    with torch.inference_mode():
        final_log_probs = torch.log_softmax(model_logits[-1], dim=-1)
        if last_log_probs is not None and not records:
            resid_normed: list[Tensor] = []
            classify_plan_warnings(plan, warnings)
            stats = stats_from_log_probs(last_log_probs, final_log_probs, gold["first_id"], TOP_K_VERBOSE)
        else:
            resid_normed = normalise_layers(decoded, [m for m, _ in plan], [lb for _, lb in plan], warnings)
            stats = lens_statistics(resid_normed, unembed.W_U, unembed.b_U, unembed.transform,
                                    final_log_probs, gold["first_id"], TOP_K_VERBOSE,
                                    unembed.force_fp32, settings.budget_bytes, unembed.chunk_columns)
    if records:
        verbose = verbose_positions(str_tokens)
        needed = torch.cat([stats.topk_ids[:, :, :TOP_K_RECORD].flatten(),
                            stats.topk_ids[:, torch.tensor(verbose)].flatten()])  # ids in a CSV cell
    else:
        needed = stats.topk_ids[:, :, :TOP_K_RECORD].flatten()
    vocab = decoder.decode_many(torch.unique(needed).tolist())
    record_rows = build_records(stats, str_tokens, vocab, verbose) if records else []
    pure = build_pure_rows(stats, prompt_token_ids(tokenizer, prompt), gold, vocab, settings,
                           position=int(tokens.shape[1]) - 1)
    finished = time.perf_counter()
    return SweepResult(
        prompt=prompt, tokens=tokens, str_tokens=str_tokens, gold=gold, model_logits=model_logits,
        records=record_rows, pure_rows=pure,
        norm_per_layer=describe_norm_plan(plan),
        resid_normed=resid_normed, last_block_resid=last_block_resid,
        last_position_resid=last_position_resid, warnings=warnings,
        timing={"forward_s": forwarded.forward_s, "lens_s": finished - started},
    )


def last_layer_consistency(
    model: Any,
    last_block_resid: Tensor,
    model_last_logits: Tensor,
    answer_id: int | None,
    unembed: UnembedPath,
    compute_dtype: torch.dtype,
    tolerance_bits: float | None = None,
    lens_log_probs: Tensor | None = None,
) -> dict:
    """Lens at the last layer through ``ln_final`` vs the model's own logits.

    ``last_block_resid`` ``[d]`` is ``blocks.{n-1}.hook_resid_post`` at the last position and
    ``model_last_logits`` ``[V]`` the model's own logits there. ``passed`` = KL(model ‖ lens) ≤
    the tolerance: 1e-6 bits when both the compute dtype and the unembedding are float32 (the
    pipeline must then be exact), 1e-2 bits in half precision. ``lens_log_probs`` ``[V]``: the
    lens row if already decoded.
    """
    with torch.inference_mode():
        if lens_log_probs is None:
            lens_logits = unembed.logits(apply_norm_or_skip(last_block_resid, model.ln_final))
            lens_log_probs = torch.log_softmax(lens_logits, dim=-1)
        lens_lp = lens_log_probs.reshape(-1)
        model_lp = torch.log_softmax(model_last_logits.float(), dim=-1)
        kl = float(kl_bits_from_log_probs(model_lp, lens_lp))
    exact = compute_dtype == torch.float32 and unembed.matmul_dtype == torch.float32
    if tolerance_bits is None:
        tolerance_bits = CONSISTENCY_TOLERANCE_BITS if exact else HALF_PRECISION_TOLERANCE_BITS
    return {
        "kl_bits": kl,
        "tolerance_bits": tolerance_bits,
        "passed": kl <= tolerance_bits,
        "top1_agree": int(lens_lp.argmax()) == int(model_lp.argmax()),
        "p_top1_lens": float(lens_lp.max().exp()),
        "p_top1_model": float(model_lp.max().exp()),
        "p_answer_lens": None if answer_id is None else float(lens_lp[answer_id].exp()),
        "p_answer_model": None if answer_id is None else float(model_lp[answer_id].exp()),
        "compute_dtype": str(compute_dtype),
        "warn_high_last_layer_kl": kl >= HIGH_LAST_LAYER_KL_BITS,
    }


def self_test(model: Any, prompt: str, answer: str, unembed: UnembedPath) -> dict:
    """The self-test gate: one forward, then ``last_layer_consistency`` in the model's dtype."""
    tokens = model.to_tokens(prompt)
    model_logits, residuals = forward_with_residuals(model, tokens, device=unembed.W_U.device)
    gold = resolve_gold_answer(model.tokenizer, prompt, answer)
    return last_layer_consistency(model, residuals[-1][-1], model_logits[-1], gold["first_id"],
                                  unembed, _param_dtype(model))


def _param_dtype(model: Any) -> torch.dtype:
    return next(model.parameters()).dtype


def self_test_verdict(consistency: dict) -> tuple[bool, str]:
    """(passed, the one-line verdict) for a consistency record."""
    measured = (f"KL(model‖lens) = {consistency['kl_bits']:.3e} bits "
                f"(tolerance {consistency['tolerance_bits']:g})")
    if consistency["passed"]:
        return True, f"✅ Self-test passed: {measured}"
    return False, (f"❌ Self-test FAILED: {measured}, top-1 agree = {consistency['top1_agree']}, "
                   f"compute {consistency['compute_dtype']}")

