"""One prompt through one model: forward with residual hooks, the lens, and the output rows.

``run_sweep`` is exactly what ``run.py`` does per prompt (and what ``bench_sweep.py`` times): it
returns plain rows for the CSV writers and the tensors the JSON report needs, and writes nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypedDict

import torch
from torch import Tensor

from layers_core.collapse_rules import (
    COPY_MARGIN,
    COPY_THRESHOLD,
    ENTROPY_COLLAPSE_BITS,
    PROMPT_ENDS_IN_SPACE,
    CopyRule,
    GoldAnswer,
    answer_token_ids,
    copy_collapse_flags,
    is_headline_copy,
    is_semantic_top1,
    resolve_gold_answer,
)
from layers_core.csv_io import (
    NEXT_TOKEN_LABEL,
    TOP_K_RECORD,
    TOP_K_VERBOSE,
    is_verbose_position,
)
from layers_core.hooks import mid_hook_names, residual_hook_names
from layers_core.lens.protocol import Lens, NormLens, lens_description
from layers_core.lens.stats import (
    DEFAULT_BUDGET_BYTES,
    LensStats,
    followed_by_last_position,
    lens_statistics,
    stats_from_log_probs,
)
from layers_core.lens.unembed import Unembedding
from layers_core.lens.views import comparison_of
from layers_core.model.tokens import REPLACEMENT, TokenDecoder
from layers_core.numerics import kl_bits_from_log_probs
from layers_core.pipeline.capture import ALL_POSITIONS, capture
from layers_core.pipeline.decode import LastPositionViews, decode_last_positions, gate_row, transformed_rows

CONSISTENCY_TOLERANCE_BITS = 1e-6  # float32 last-layer lens vs the model's own logits
HALF_PRECISION_TOLERANCE_BITS = 1e-2  # the same gate when the model computes in bf16/fp16
HIGH_LAST_LAYER_KL_BITS = 0.25  # warn when the lens misses the head by this much


class LastLayerConsistency(TypedDict, total=False):
    """The last layer decoded through the chosen lens against the model's own logits (the JSON's
    ``diagnostics.last_layer_consistency``, without ``post_unembed_transform``). The self-test
    decodes through ``ln_final``; a run also records ``lens`` and the pipeline's own check."""

    kl_model_to_lens_bits: float  # KL(model ‖ lens) at the last position
    tolerance_bits: float  # 1e-6 in float32, 1e-2 in half precision
    passed: bool  # kl_model_to_lens_bits <= tolerance_bits
    lens: str  # the chosen lens (a run)
    pipeline_kl_bits: float  # the same KL through ln_final: the pipeline itself (a run)
    pipeline_passed: bool  # the gate: False means no row of the run can be trusted (a run)
    top1_agree: bool
    p_top1_lens: float
    p_top1_model: float
    p_answer_lens: float | None  # None without a resolved answer
    p_answer_model: float | None
    compute_dtype: str
    warn_high_last_layer_kl: bool  # KL >= 0.25 bits


@dataclass(frozen=True)
class SweepSettings:
    """Every switch of a sweep or a prompt set, in one place (the standard logit lens by default;
    the legacy copy-rule thresholds).

    ``lens``: a resolved ``Lens`` decoding the main tables (None: the logit lens under
    ``norm_strategy``); ``sweep``/``sweep_set`` fill it from their ``lens`` argument. The
    comparison lens is its registry partner, or the logit lens under ``norm_strategy``.
    """

    norm_strategy: str = "final"  # final (ln_final everywhere, the standard logit lens) | arch | none
    copy_threshold: float = COPY_THRESHOLD
    copy_margin: float = COPY_MARGIN
    copy_entropy_fallback: bool = True
    fp32_unembed: bool = False
    budget_bytes: int = DEFAULT_BUDGET_BYTES  # at most this much [rows, V] float32 work at a time
    lens: Any = field(default=None, compare=False)
    lens_path: str | None = None  # a fitted lens's file or directory (None: the model's lens cache)
    allow_foreign_lens: bool = False  # apply a fitted lens whose fingerprint names another model
    chat: bool = False  # prompts are chat-templated: the answer is the assistant's first token(s)
    answer_join: str = "auto"  # how the answer follows the prompt: auto | space | none (answer_join())
    truncate: str | None = None  # "left": a prompt longer than the context keeps its end
    sublayers: bool = False  # also decode each block's residual after attention (hook_resid_mid)
    keep_residuals: bool = False  # keep every position's lens input (resid_normed) even without records
    compare_lenses: bool = False  # also every available lens at the last position (Sweep.lenses)
    track: tuple[str, ...] = ()  # tokens followed per layer under every lens (Sweep.tracked)
    concepts: Any = None  # {name: words}: each concept's summed p and best rank per layer and lens
    continuation: str | None = None  # single prompts: teacher-forced text after the prompt, through the lens
    generate: int | None = None  # single prompts: generate this many tokens, then the lens over them
    temperature: float = 0.0  # generate: 0 is greedy, else sampled with `seed`
    seed: int = 0
    records: bool | None = None  # decode every position; None: a single prompt does, a set does not
    batch_size: int | None = None  # prompts per forward in a set (None: chosen from memory)
    attribution: bool = False  # split the answer's logit into block parts (single prompts)
    capture_mids: bool = False  # the forward also captures each block's resid_mid (attribution reuses it)

    @property
    def copy_rule(self) -> CopyRule:
        """The copy rule's thresholds (``collapse_rules.CopyRule``; the entropy fallback at 1 bit)."""
        return CopyRule(self.copy_threshold, self.copy_margin, self.copy_entropy_fallback)

    @property
    def view(self) -> str:
        """The chosen lens's name: a fitted or user lens's, else the norm strategy."""
        return self.norm_strategy if self.lens is None else self.lens.name

    @property
    def comparison_view(self) -> str:
        """The lens written beside the chosen one (``lens.views.comparison_of``)."""
        return comparison_of(self.view, self.norm_strategy)

    def lenses(self, model: Any) -> tuple[Lens, Lens]:
        """(the chosen lens, the comparison lens) for ``model``."""
        chosen = self.lens if self.lens is not None else NormLens(model, self.norm_strategy)
        return chosen, NormLens(model, self.comparison_view)


@dataclass
class SweepResult:
    """Everything one sweep produced; rows are plain dicts keyed by CSV column."""

    prompt: str
    tokens: Tensor  # [1, T] on the model's device
    str_tokens: list[str]
    gold: GoldAnswer
    model_logits: Tensor  # [1, V] float32, the model's own at the last position
    records: list[dict]
    pure_rows: list[dict]
    norm_per_layer: list[dict]
    resid_normed: list[Tensor]  # L × [T, d], the lens's output in the compute dtype (records only)
    last_position_resid: Tensor  # [L, d], the raw residual of every layer at T−1
    views: LastPositionViews | None  # every last-position view, decoded once (a set drops them once analysed)
    truncated_from: int | None = None  # --truncate left: the prompt's full length in tokens
    answer_log_prob: float | None = None  # ln Π p(answer_k | prompt, answer_<k), teacher-forced
    mid_records: list[dict] = field(default_factory=list)  # --sublayers: the attn rows (layer b+1)
    mid_pure_rows: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    last_position_mids: Tensor | None = None  # [n, d]: each block's resid_mid at T−1, where captured


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
    model: Any, tokens: Tensor, last_logits_only: bool = True, device: Any = None, mids: list | None = None,
    keep_last: int = 1,
) -> tuple[Tensor, list[Tensor]]:
    """One forward pass with the n+1 residual hooks → (model logits float32, L × ``[T, d]``).

    The logits are the model's own, ``[keep_last, V]`` at the last positions when
    ``last_logits_only`` (HF's ``logits_to_keep`` skips the other rows of the head's matmul),
    else ``[T, V]``. With
    ``device`` (the lens device) residuals move there as they are captured, and the logits too.
    ``mids``: a list that receives the n mid-block residuals ``[T, d]`` (``--sublayers``).
    Raises ``NonFiniteError`` if any of them holds inf/NaN.
    """
    n_layers = int(model.cfg.n_layers)
    points = residual_hook_names(n_layers) + (mid_hook_names(n_layers) if mids is not None else [])
    captured = capture(model, tokens, points, logits_to_keep=keep_last if last_logits_only else ALL_POSITIONS,
                       device=device)
    logits, cache = captured.logits, captured.activations
    logits = logits[0].float() if device is None else logits[0].to(device=device, dtype=torch.float32)
    residuals = [cache.pop(name)[0] for name in residual_hook_names(n_layers)]
    if mids is not None:
        mids.extend(cache.pop(name)[0] for name in mid_hook_names(n_layers))
    check_finite(logits, residuals, residuals[0].dtype)
    return logits, residuals


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
                  verbose: Sequence[bool] | None = None, first_layer: int = 0) -> list[dict]:
    """Records rows, layer-major: top-20 at verbose positions, top-5 elsewhere."""
    n_layers, seq_len = stats.entropy_bits.shape
    verbose = verbose_positions(str_tokens) if verbose is None else verbose
    entropy, ids, probs = (stats.entropy_bits.tolist(), stats.topk_ids.tolist(),
                           stats.topk_probs.tolist())
    rows = []
    for layer in range(n_layers):
        for pos in range(seq_len):
            k = TOP_K_VERBOSE if verbose[pos] else TOP_K_RECORD
            row = {"layer": first_layer + layer, "pos": pos, "token": str_tokens[pos],
                   "entropy": entropy[layer][pos]}
            row.update(_topk_cells(ids[layer][pos], probs[layer][pos], k, vocab))
            rows.append(row)
    return rows


class CopySource(NamedTuple):
    """What the copy rule compares a layer's top-1 with: the prompt's token ids, and with tied
    embeddings the current token (``echo_id``), which no copy flag counts (``copy_collapse_flags``)."""

    prompt_ids: Sequence[int]
    echo_id: int | None = None


def build_pure_rows(
    stats: LensStats,
    source: CopySource,
    gold: GoldAnswer,
    vocab: dict[int, str],
    settings: SweepSettings,
    position: int | None = None,
    first_layer: int = 0,
) -> list[dict]:
    """One row per layer at the last position: top-5, flags and metrics .

    ``position`` labels the rows' ``pos`` when ``stats`` holds only the last position.
    """
    prompt_ids, echo_id = source
    last = stats.entropy_bits.shape[1] - 1
    entropy = stats.entropy_bits[:, last]
    ids, probs = stats.topk_ids[:, last], stats.topk_probs[:, last]
    copy, strict, copy_prompt = copy_collapse_flags(ids[:, 0], probs[:, 0], probs[:, 1], entropy, prompt_ids,
                                                    settings.copy_rule, echo_id)
    resolved = gold["first_id"] is not None
    prompt_set = set(prompt_ids) - {echo_id}
    p_answer = stats.p_answer[:, last].tolist() if resolved else [None] * len(entropy)
    ranks = stats.answer_rank.tolist() if resolved else [None] * len(entropy)
    rows = []
    for layer, (h, top_ids, top_p, kl) in enumerate(zip(
            entropy.tolist(), ids.tolist(), probs.tolist(), stats.kl_to_final_bits.tolist())):
        row = {"layer": first_layer + layer, "pos": last if position is None else position,
               "token": NEXT_TOKEN_LABEL, "entropy": h}
        row.update(_topk_cells(top_ids, top_p, TOP_K_RECORD, vocab))
        rank = ranks[layer]
        is_answer = rank == 1 if resolved else is_semantic_top1(vocab[top_ids[0]], gold["string"])
        row.update(copy_collapse=bool(copy[layer]), copy_strict=bool(strict[layer]),
                   copy_collapse_prompt=bool(copy_prompt[layer]),
                   copy_headline=is_headline_copy(top_ids[0], vocab[top_ids[0]], top_p[0], top_p[1], prompt_set,
                                                  gold["first_id"], settings.copy_rule),
                   entropy_collapse=h <= ENTROPY_COLLAPSE_BITS, is_answer=is_answer,
                   p_top1=top_p[0], p_top5=sum(top_p[:TOP_K_RECORD]), p_answer=p_answer[layer],
                   answer_rank=rank, kl_to_final_bits=kl)
        rows.append(row)
    return rows


def shown_tokens(model: Any, tokens: Tensor, decoder: TokenDecoder) -> list[str]:
    """The prompt's tokens as the records show them: ``to_str_tokens``, with a piece of a UTF-8
    character shown by its bytes (``<0xE6>``) as the top-k cells show it, not as ``�``."""
    shown = list(model.to_str_tokens(tokens))
    broken = [int(tokens[pos]) for pos, text in enumerate(shown) if REPLACEMENT in text]
    if not broken:
        return shown
    vocab = decoder.decode_many(broken)
    return [vocab[int(tokens[pos])] if REPLACEMENT in text else text for pos, text in enumerate(shown)]


def echo_token(model: Any, tokens: Tensor) -> int | None:
    """The current (last) input token where the embeddings are tied, else None: the token a
    residual close to its own embedding decodes to, which is never a copy."""
    from layers_core.model.loading import tied_embeddings

    return int(tokens[0, -1]) if tied_embeddings(model) else None


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
    mids: list[Tensor] | None = None  # --sublayers: n × [T, d], each block's residual after attention
    truncated_from: int | None = None  # --truncate left: the prompt's full length in tokens
    answer_log_prob: float | None = None  # ln Π p(answer_k | prompt, answer_<k), teacher-forced
    views: LastPositionViews | None = None  # decoded with the other prompts of its batch (sets)


class PromptTooLong(ValueError):
    """The prompt has more tokens than the model's context."""


def prompt_tokens(model: Any, prompt: str, truncate: str | None = None) -> tuple[Tensor, int | None]:
    """(tokens ``[1, T]``, the full length if cut). Never cut silently: a prompt longer than the
    context raises ``PromptTooLong`` naming both lengths, unless ``truncate="left"``, which keeps
    its end (the question) after the BOS token, if any."""
    tokens = model.to_tokens(prompt, truncate=False)
    length, context = int(tokens.shape[1]), int(model.cfg.n_ctx)
    if length <= context:
        return tokens, None
    if truncate != "left":
        raise PromptTooLong(f"the prompt is {length} tokens and {model.cfg.model_name} reads at most {context}; "
                            "shorten it, or --truncate left keeps its last tokens")
    bos = model.tokenizer.bos_token_id
    keep_bos = bos is not None and int(tokens[0, 0]) == bos
    tail = tokens[:, length - (context - int(keep_bos)):]
    return (torch.cat([tokens[:, :1], tail], dim=1) if keep_bos else tail), length


def too_long_prompts(model: Any, prompts: Sequence[str]) -> list[tuple[int, int]]:
    """(position, token count) of each prompt longer than the model's context, found with one
    batched tokenizer call (a prompt near the limit is measured exactly, BOS included)."""
    context = int(model.cfg.n_ctx)
    counts = [len(ids) for ids in model.tokenizer(list(prompts))["input_ids"]] if prompts else []
    near = [index for index, count in enumerate(counts) if count + 2 > context]
    lengths = {index: int(model.to_tokens(prompts[index], truncate=False).shape[1]) for index in near}
    return [(index, length) for index, length in lengths.items() if length > context]


def _fits(model: Any, prompt_length: int, answer_ids: Sequence[int]) -> bool:
    """Whether the answer's tokens but the last fit after the prompt in the model's context."""
    return bool(answer_ids) and prompt_length + len(answer_ids) - 1 <= int(model.cfg.n_ctx)


def _answer_log_prob(logits: Tensor, answer_ids: Sequence[int]) -> float:
    """ln Π p(answer_k): ``logits`` ``[len(answer), V]`` are the model's at the prompt's last
    position and at each answer token but the last (teacher forcing)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(list(answer_ids), device=log_probs.device).unsqueeze(-1)
    return float(log_probs.gather(-1, ids).sum())


def forward_prompt(model: Any, prompt: str, device: Any = None, sublayers: bool = False,
                   truncate: str | None = None, answer_ids: Sequence[int] = ()) -> Forwarded:
    """One prompt through the model with the residual hooks (and the mid-block ones).

    With ``answer_ids``, the same forward also carries the answer's tokens but the last: under
    causal attention no prompt position changes, and the logits after them give the answer's
    teacher-forced probability (``answer_log_prob``) without a second forward.
    """
    started = time.perf_counter()
    tokens, full_length = prompt_tokens(model, prompt, truncate)
    length = int(tokens.shape[1])
    answer_ids = list(answer_ids) if _fits(model, length, answer_ids) else []
    if len(answer_ids) > 1:
        follow = torch.tensor([answer_ids[:-1]], dtype=tokens.dtype, device=tokens.device)
        tokens = torch.cat([tokens, follow], dim=1)
    mids: list | None = [] if sublayers else None
    logits, residuals = forward_with_residuals(model, tokens, device=device, mids=mids,
                                               keep_last=max(1, len(answer_ids)))
    tokens, residuals = tokens[:, :length], [resid[:length] for resid in residuals]
    mids = None if mids is None else [mid[:length] for mid in mids]
    answer_log_prob = _answer_log_prob(logits, answer_ids) if answer_ids else None
    last_logits = logits[:1].clone() if len(logits) > 1 else logits  # its own [1, V], not the answer's rows
    return Forwarded(tokens, last_logits, residuals, time.perf_counter() - started, mids, full_length,
                     answer_log_prob)


PARALLEL_BLOCK = "ParallelBlockBridge"  # attention and MLP read one residual and add once


def check_sublayers(model: Any) -> None:
    """``ValueError`` (one line) unless every block has a residual between attention and MLP."""
    parallel = any(type(block).__name__ == PARALLEL_BLOCK for block in model.blocks)
    if parallel or mid_hook_names(1)[0] not in model.hook_dict:
        architecture = getattr(model.original_model.config, "architectures", None) or [type(model).__name__]
        raise ValueError(f"--sublayers: {architecture[0]} has parallel blocks (attention and MLP read the "
                         "same residual and are added together), so there is no read between them")


PER_FORWARD_TOKENS = 16  # what one more forward costs, in padded positions (≈ 45 ms vs 2.4 ms a row here)


def padding_groups(lengths: Sequence[int], per_forward: int = PER_FORWARD_TOKENS) -> list[list[int]]:
    """Indices of ``lengths`` in groups of similar length, each group one right-padded forward:
    the runs of the sorted lengths that minimise Σ (rows · longest + ``per_forward``)."""
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    ascending = [lengths[index] for index in order]
    best, cut = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)
    for stop in range(1, len(order) + 1):
        for start in range(stop):
            cost = best[start] + (stop - start) * ascending[stop - 1] + per_forward
            if cost < best[stop]:
                best[stop], cut[stop] = cost, start
    groups, stop = [], len(order)
    while stop:
        groups.append(order[cut[stop] : stop])
        stop = cut[stop]
    return groups[::-1]


def right_padded_batches(model: Any, prompts: Sequence[str]) -> list[tuple[list[int], Tensor, Tensor]]:
    """The prompts as right-padded batches of similar length (``padding_groups``): for each,
    (the prompts' indices, the batch ``[B, T_max]``, their lengths ``[B]``).

    Under causal attention a real token never attends to the padding after it and positions are
    unchanged, so each prompt's real positions get its single-prompt numbers (up to float32
    reordering); read each prompt at its own last real position, never at a pad.
    """
    rows = [prompt_tokens(model, prompt)[0][0] for prompt in prompts]
    batches = []
    for group in padding_groups([len(row) for row in rows]):
        members = [rows[index] for index in group]
        batches.append((group, pad_right(model, members), torch.tensor([len(row) for row in members])))
    return batches


def pad_right(model: Any, rows: Sequence[Tensor]) -> Tensor:
    """Token rows ``[T_i]`` as one right-padded batch ``[B, T_max]`` (the tokenizer's pad id)."""
    pad_id = model.tokenizer.pad_token_id
    batch = torch.full((len(rows), max(len(row) for row in rows)), 0 if pad_id is None else pad_id,
                       dtype=rows[0].dtype, device=rows[0].device)
    for index, row in enumerate(rows):
        batch[index, : len(row)] = row
    return batch


def last_position_logits(model: Any, batch: Tensor, lengths: Tensor) -> Tensor:
    """The model's logits ``[B, V]`` at each row's last real position; the head runs only at the
    distinct last positions (``logits_to_keep``)."""
    last_positions = torch.unique(lengths - 1)  # sorted
    logits = capture(model, batch, logits_to_keep=last_positions.to(batch.device)).logits
    column = torch.searchsorted(last_positions, lengths - 1).to(logits.device)
    return logits[torch.arange(len(lengths), device=logits.device), column]


def forward_batch(model: Any, prompts: Sequence[str], device: Any = None,
                  answers: Sequence[Sequence[int]] | None = None, truncate: str | None = None) -> list[Forwarded]:
    """Several prompts in one right-padded forward pass; each prompt's residuals are cut to its
    own length and its logits read at its own last real position. With ``answers`` (token ids per
    prompt) each row also carries its answer's tokens but the last, and the same forward gives
    every answer's teacher-forced probability (as ``forward_prompt`` does for one prompt).
    ``truncate``: as for ``prompt_tokens``."""
    started = time.perf_counter()
    tokenized = [prompt_tokens(model, prompt, truncate) for prompt in prompts]
    prompt_rows = [tokens[0] for tokens, _ in tokenized]
    answers = [list(a) if _fits(model, len(row), a) else []
               for row, a in zip(prompt_rows, answers or [[]] * len(prompts))]
    batch = pad_right(model, [torch.cat([row, torch.tensor(a[:-1], dtype=row.dtype, device=row.device)])
                              for row, a in zip(prompt_rows, answers)])
    lengths = [len(row) for row in prompt_rows]
    # the head runs only where some row needs it: a prompt's last position and its answer's
    wanted = sorted({pos for length, a in zip(lengths, answers)
                     for pos in range(length - 1, length - 1 + max(1, len(a)))})
    names = residual_hook_names(int(model.cfg.n_layers))
    keep = torch.tensor(wanted, device=batch.device)
    captured = capture(model, batch, names, logits_to_keep=keep, device=device)
    logits, cache = captured.logits.to(device=device, dtype=torch.float32), captured.activations
    layers = [cache.pop(name) for name in names]
    column = {pos: index for index, pos in enumerate(wanted)}
    share = (time.perf_counter() - started) / len(prompt_rows)
    forwarded = []
    for index, (length, answer) in enumerate(zip(lengths, answers)):
        residuals = [layer[index, :length] for layer in layers]
        last = logits[index, column[length - 1]].unsqueeze(0).clone()  # not a view: frees the batch's logits
        check_finite(last, residuals, residuals[0].dtype)
        log_prob = None
        if answer:
            answer_columns = [column[length - 1 + k] for k in range(len(answer))]
            log_prob = _answer_log_prob(logits[index, answer_columns], answer)
        forwarded.append(Forwarded(prompt_rows[index].unsqueeze(0), last, residuals, share,
                                   answer_log_prob=log_prob, truncated_from=tokenized[index][1]))
    return forwarded


def run_sweep(
    model: Any,
    prompt: str,
    answer: str,
    unembed: Unembedding,
    settings: SweepSettings = SweepSettings(),
    decoder: TokenDecoder | None = None,
    forwarded: Forwarded | None = None,
) -> SweepResult:
    """Forward once with hooks (unless ``forwarded`` is given), decode every layer through the
    chosen lens and build the records and pure rows.

    The last position of every layer is decoded once, with every other view the prompt needs
    (``decode.decode_last_positions``; a batch's prompts come with theirs, ``Forwarded.views``);
    with ``settings.records`` (None counts as on) the other positions are decoded in
    memory-bounded blocks. Without records the pure rows are the same and the records empty.
    """
    records = settings.records is not False
    decoder = decoder or TokenDecoder(model.tokenizer)
    gold = resolve_gold_answer(model.tokenizer, prompt, answer, join=settings.answer_join)
    if settings.chat:  # the template's own newline ends the text: nothing the user typed
        gold = {**gold, "warnings": [w for w in gold["warnings"] if w != PROMPT_ENDS_IN_SPACE]}
    forwarded = forwarded or forward_prompt(model, prompt, unembed.W_U.device,
                                            settings.sublayers or settings.capture_mids,
                                            settings.truncate, gold["answer_ids"])
    started = time.perf_counter()
    str_tokens = shown_tokens(model, forwarded.tokens[0], decoder)
    lens, other = settings.lenses(model)
    residuals = forwarded.residuals
    last_position_resid = torch.stack([resid[-1] for resid in residuals])
    with torch.inference_mode():
        every_position = records or settings.keep_residuals
        lens_rows = []
        if every_position or forwarded.views is None:
            lens_rows = transformed_rows(lens, residuals if every_position
                                         else [resid[-1:] for resid in residuals])
        views = forwarded.views
        if views is None:
            views = decode_last_positions(model, last_position_resid, torch.cat([r[-1:] for r in lens_rows]),
                                          other, unembed)
        final_log_probs = torch.log_softmax(forwarded.model_logits[-1], dim=-1)
        # the last position's top-20 only where a verbose records row shows it; pure rows show 5
        followed = answer_token_ids(gold)
        stats = stats_from_log_probs(views.chosen, final_log_probs, followed,
                                     TOP_K_VERBOSE if records else TOP_K_RECORD)
        if records and len(str_tokens) > 1:
            earlier = lens_statistics([rows[:-1] for rows in lens_rows], unembed, None, followed,
                                      TOP_K_VERBOSE, settings.budget_bytes)
            stats = followed_by_last_position(earlier, stats)
        mid_stats = None
        if settings.sublayers:  # block b's mid read is the first half of the step to layer b+1
            mid_rows = transformed_rows(lens, [mid if records else mid[-1:] for mid in forwarded.mids],
                                        first_layer=1)
            mid_stats = lens_statistics(mid_rows, unembed, final_log_probs, followed, TOP_K_VERBOSE,
                                        settings.budget_bytes)
    shown = [_ids_shown(s, str_tokens, records) for s in (stats, mid_stats) if s is not None]
    vocab = decoder.decode_many(torch.unique(torch.cat(shown)).tolist())
    position = int(forwarded.tokens.shape[1]) - 1
    prompt_ids = prompt_token_ids(model.tokenizer, prompt)
    echo = echo_token(model, forwarded.tokens)
    mid_records, mid_pure = [], []
    if mid_stats is not None:
        mid_records = build_records(mid_stats, str_tokens, vocab, first_layer=1) if records else []
        mid_pure = build_pure_rows(mid_stats, CopySource(prompt_ids, echo), gold, vocab, settings, position,
                                   first_layer=1)
    return SweepResult(
        prompt=prompt, tokens=forwarded.tokens, str_tokens=str_tokens, gold=gold,
        model_logits=forwarded.model_logits,
        records=build_records(stats, str_tokens, vocab) if records else [],
        pure_rows=build_pure_rows(stats, CopySource(prompt_ids, echo), gold, vocab, settings, position=position),
        norm_per_layer=lens_description(lens, len(residuals) - 1),
        resid_normed=lens_rows if every_position else [], last_position_resid=last_position_resid, views=views,
        warnings=list(getattr(lens, "warnings", [])),
        timing={"forward_s": forwarded.forward_s, "lens_s": time.perf_counter() - started},
        mid_records=mid_records, mid_pure_rows=mid_pure, truncated_from=forwarded.truncated_from,
        last_position_mids=None if forwarded.mids is None else torch.stack([mid[-1] for mid in forwarded.mids]),
        answer_log_prob=forwarded.answer_log_prob,
    )


def _ids_shown(stats: LensStats, str_tokens: Sequence[str], records: bool) -> Tensor:
    """The token ids some CSV cell shows: top-5 everywhere, top-20 at verbose positions."""
    shown = stats.topk_ids[:, :, :TOP_K_RECORD].flatten()
    if not records:
        return shown
    return torch.cat([shown, stats.topk_ids[:, torch.tensor(verbose_positions(str_tokens))].flatten()])


def last_layer_consistency(
    gate_log_probs: Tensor,
    model_last_logits: Tensor,
    answer_id: int | Sequence[int] | None,
    unembed: Unembedding,
    compute_dtype: torch.dtype,
    tolerance_bits: float | None = None,
) -> LastLayerConsistency:
    """The lens at the last layer through ``ln_final`` vs the model's own logits.

    ``gate_log_probs`` ``[V]`` is that lens row (``LastPositionViews.consistency``: ``ln_final`` of
    ``blocks.{n-1}.hook_resid_post`` at the last position) and ``model_last_logits`` ``[V]`` the
    model's own logits there. ``passed`` = KL(model ‖ lens) ≤ the tolerance: 1e-6 bits when both
    the compute dtype and the unembedding are float32 (the pipeline must then be exact), 1e-2
    bits in half precision.
    """
    with torch.inference_mode():
        lens_lp = gate_log_probs.reshape(-1)
        model_lp = torch.log_softmax(model_last_logits.float(), dim=-1)
        kl = float(kl_bits_from_log_probs(model_lp, lens_lp))
    exact = compute_dtype == torch.float32 and unembed.matmul_dtype == torch.float32
    if tolerance_bits is None:
        tolerance_bits = CONSISTENCY_TOLERANCE_BITS if exact else HALF_PRECISION_TOLERANCE_BITS
    return {
        "kl_model_to_lens_bits": kl,
        "tolerance_bits": tolerance_bits,
        "passed": bool(kl <= tolerance_bits),
        "top1_agree": int(lens_lp.argmax()) == int(model_lp.argmax()),
        "p_top1_lens": float(lens_lp.max().exp()),
        "p_top1_model": float(model_lp.max().exp()),
        "p_answer_lens": None if answer_id is None else float(lens_lp[answer_id].exp().sum()),
        "p_answer_model": None if answer_id is None else float(model_lp[answer_id].exp().sum()),
        "compute_dtype": str(compute_dtype),
        "warn_high_last_layer_kl": kl >= HIGH_LAST_LAYER_KL_BITS,
    }


def lens_consistency(views: LastPositionViews, model_last_logits: Tensor, answer_id: int | Sequence[int] | None,
                     unembed: Unembedding, compute_dtype: torch.dtype, lens_name: str) -> LastLayerConsistency:
    """``last_layer_consistency`` through the chosen lens's last row, with the pipeline's own
    check (``ln_final``, the gate) beside it: a lens that changes the last layer fails here while
    the pipeline passes."""
    checked = last_layer_consistency(views.chosen[-1], model_last_logits, answer_id, unembed, compute_dtype)
    pipeline = last_layer_consistency(views.consistency, model_last_logits, answer_id, unembed, compute_dtype)
    return {**checked, "lens": lens_name, "pipeline_kl_bits": pipeline["kl_model_to_lens_bits"],
            "pipeline_passed": pipeline["passed"]}


def self_test(model: Any, prompt: str, answer: str, unembed: Unembedding) -> dict:
    """The self-test gate: one forward, then ``last_layer_consistency`` in the model's dtype."""
    tokens, _ = prompt_tokens(model, prompt)
    model_logits, residuals = forward_with_residuals(model, tokens, device=unembed.W_U.device)
    gold = resolve_gold_answer(model.tokenizer, prompt, answer)
    gate = unembed.log_probs(gate_row(model, residuals[-1][-1]))
    return last_layer_consistency(gate, model_logits[-1], gold["first_id"], unembed, _param_dtype(model))


def _param_dtype(model: Any) -> torch.dtype:
    return next(model.parameters()).dtype


def self_test_verdict(consistency: dict) -> tuple[bool, str]:
    """(passed, the one-line verdict) for a consistency record."""
    measured = (f"KL(model‖lens) = {consistency['kl_model_to_lens_bits']:.3e} bits "
                f"(tolerance {consistency['tolerance_bits']:g})")
    if consistency["passed"]:
        return True, f"✅ Self-test passed: {measured}"
    return False, (f"❌ Self-test FAILED: {measured}, top-1 agree = {consistency['top1_agree']}, "
                   f"compute {consistency['compute_dtype']}")

