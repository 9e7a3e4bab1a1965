"""The batch engine of a prompt set: prompts sorted by length and forwarded in right-padded
batches (a batch's control prompts in one more), the last positions of a batch's prompts decoded
together a memory-bounded group at a time into one reused buffer (W_U read once per group), then
each prompt analysed from its own views and slices. ``api.prompt_set`` wraps what it yields into
``Sweep``s and plain outcomes; nothing here writes files.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from layers_core.collapse_rules import resolve_gold_answer
from layers_core.model.lens_model import LensModel
from layers_core.pipeline.analysis import PromptAnalysis, analyse_prompt
from layers_core.pipeline.decode import decode_views, transformed_rows, view_rows
from layers_core.pipeline.prompts import chat_text, default_control
from layers_core.pipeline.sweep import Forwarded, PromptTooLong, SweepSettings, forward_batch, too_long_prompts
from layers_core.results.prompt_sets import PromptItem

MAX_BATCH = 32
BATCH_MEMORY_BYTES = 1 * 2**30  # residuals and activations of one batch, at most
ACTIVATION_FACTOR = 4  # activations of a forward per residual-stream copy (attention, MLP, cache)


def check_prompt_lengths(lm: LensModel, items: Sequence[PromptItem], truncate: str | None) -> None:
    """``PromptTooLong`` naming the set's prompts (and control prompts) longer than the context,
    before any forward, unless ``truncate="left"`` (each keeps its last tokens)."""
    if truncate == "left":
        return
    texts = [(item.prompt_id, "", item.prompt) for item in items]
    texts += [(item.prompt_id, "the control prompt of ", item.control_prompt) for item in items
              if item.control_prompt is not None]
    found = too_long_prompts(lm.bridge, [text for _, _, text in texts])
    if found:
        position, length = found[0]
        prompt_id, which, _ = texts[position]
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        cfg = lm.bridge.cfg
        raise PromptTooLong(f"{which}prompt {prompt_id!r} is {length} tokens and {cfg.model_name} reads at most "
                            f"{int(cfg.n_ctx)}{more}; shorten it, or --truncate left keeps the last tokens of "
                            "every long prompt")


def as_analysed(lm: LensModel, settings: SweepSettings, item: PromptItem) -> PromptItem:
    """The item as the model reads it: with ``settings.chat`` its prompt (and control prompt) as
    one user turn of the chat template, as ``sweep`` does; else the item itself."""
    if not settings.chat:
        return item
    tokenizer = lm.bridge.tokenizer
    control = None if item.control_prompt is None else chat_text(tokenizer, item.control_prompt)
    return replace(item, prompt=chat_text(tokenizer, item.prompt), control_prompt=control)


def item_settings(settings: SweepSettings, item: PromptItem) -> SweepSettings:
    """The set's settings with the item's own ``answer_join`` and ``concepts``, where it names them."""
    own = {key: value for key, value in (("answer_join", item.answer_join), ("concepts", item.concepts))
           if value is not None}
    return replace(settings, **own) if own else settings


def default_batch_size(lm: LensModel, items: Sequence[PromptItem]) -> int:
    """As many prompts as keep a batch's residuals and activations under ``BATCH_MEMORY_BYTES``
    (at most ``MAX_BATCH``): (n+1) layers × longest prompt × d_model × dtype size × factor each."""
    cfg = lm.bridge.cfg
    longest = max(len(item.prompt) for item in items) // 2 + 2  # ≥ tokens for BPE vocabularies
    per_prompt = (int(cfg.n_layers) + 1) * longest * int(cfg.d_model) * lm.dtype.itemsize
    return max(1, min(MAX_BATCH, BATCH_MEMORY_BYTES // (per_prompt * ACTIVATION_FACTOR)))


@dataclass
class AnalysedPrompt:
    """One prompt of a batch, analysed: its position in the file, its item, its analysis and its
    own timing (``forward_s``: only where it had a forward of its own, batch size 1)."""

    index: int
    item: PromptItem
    analysis: PromptAnalysis
    timing: dict[str, float] = field(default_factory=dict)


@dataclass
class AnalysedBatch:
    """A finished batch: its prompts in analysis order, and its forward and lens seconds."""

    prompts: list[AnalysedPrompt]
    forward_s: float
    lens_s: float


def length_sorted_batches(lm: LensModel, todo: list[tuple[int, PromptItem]], batch_size: int):
    """Batches of (index, item), prompts of similar length together (sorted by token count)."""
    lengths = {index: len(lm.bridge.tokenizer(item.prompt)["input_ids"]) for index, item in todo}
    ordered = sorted(todo, key=lambda pair: (lengths[pair[0]], pair[0]))
    return [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]


def analyse_batches(lm: LensModel, todo: Sequence[tuple[int, PromptItem]], settings: SweepSettings,
                    batch_size: int) -> Iterator[AnalysedBatch]:
    """Analyses ``todo`` ((index, item) pairs) ``batch_size`` prompts per forward, yielding each
    batch once it is done. Batch size 1 is the single-prompt path exactly (its own forward, every
    position decoded when ``settings.records``). A prompt keeps its rows, not its ``[L, V]`` views."""
    device = lm.unembed.W_U.device
    group, buffer = _view_groups(lm, settings, batch_size)
    typed = dict(todo)  # the items as given: their outcomes keep the prompt the user wrote
    analysed = [(index, as_analysed(lm, settings, item)) for index, item in todo]
    for batch in length_sorted_batches(lm, analysed, batch_size):
        started = time.perf_counter()
        answers = [resolve_gold_answer(lm.bridge.tokenizer, item.prompt, item.answer,
                                       join=item_settings(settings, item).answer_join)["answer_ids"]
                   for _, item in batch]  # carried by the same forward: p_sequence needs no other
        prompts = [item.prompt for _, item in batch]
        forwarded = (forward_batch(lm.bridge, prompts, device, answers, settings.truncate)
                     if batch_size > 1 else [None])  # batch size 1: sweep's own forward
        controls = _control_forwards(lm, batch, device, settings.truncate) if batch_size > 1 else {}
        forward_s = time.perf_counter() - started
        done = []
        pairs = list(zip(batch, forwarded))
        for first in range(0, len(pairs), group):
            part = pairs[first : first + group]
            if batch_size > 1:
                _attach_views(lm, settings, [passed for _, passed in part], buffer)
            for (index, item), passed in part:
                analysis, timing = _analyse(lm, item, settings, passed, controls.get(index))
                if passed is None:
                    forward_s += timing["forward_s"]
                else:
                    passed.views = None
                analysis.result.views = None  # [L, V] log-probs (in the buffer, reused next group)
                done.append(AnalysedPrompt(index, typed[index], analysis, timing))
        yield AnalysedBatch(done, forward_s, time.perf_counter() - started - forward_s)


def _analyse(lm: LensModel, item: PromptItem, settings: SweepSettings, forwarded: Forwarded | None,
             control_forwarded: Forwarded | None) -> tuple[PromptAnalysis, dict[str, float]]:
    """One prompt of a batch through ``analyse_prompt``, timed as ``sweep`` times a prompt."""
    control = False if item.control_prompt is None else (item.control_prompt, item.control_answer)
    started = time.perf_counter()
    analysis = analyse_prompt(lm, item_settings(settings, item), item.prompt, item.answer,
                              default_control(item.prompt, control), forwarded, control_forwarded)
    forward_s = analysis.result.timing["forward_s"] if forwarded is None else 0.0
    return analysis, {"forward_s": forward_s, "lens_s": time.perf_counter() - started - forward_s}


def _view_groups(lm: LensModel, settings: SweepSettings, batch_size: int) -> tuple[int, Any]:
    """(prompts whose views are decoded together, the float32 buffer they are decoded into): as
    many as keep ``[rows, V]`` under ``settings.budget_bytes``. No buffer for batch size 1 (each
    prompt is decoded alone, as ``sweep`` does) or where the unembedding's matmul is not float32."""
    rows, vocab = view_rows(lm.n_layers + 1), int(lm.unembed.W_U.shape[-1])
    group = max(1, min(batch_size, settings.budget_bytes // (rows * vocab * 4)))
    if batch_size == 1 or lm.unembed.matmul_dtype != torch.float32:
        return group, None
    return group, torch.empty((group * rows, vocab), dtype=torch.float32, device=lm.unembed.W_U.device)


def _attach_views(lm: LensModel, settings: SweepSettings, forwarded: Sequence[Forwarded],
                 buffer: Any = None) -> None:
    """Decodes the last-position views of several forwarded prompts in one unembedding
    (``decode.decode_views``, into ``buffer`` if given) and attaches each prompt's (``views``)."""
    chosen, other = settings.lenses(lm.bridge)
    with torch.inference_mode():
        last = torch.stack([torch.stack([resid[-1] for resid in passed.residuals]) for passed in forwarded])
        chosen_rows = torch.stack(transformed_rows(chosen, list(last.transpose(0, 1))), dim=1)
        views = decode_views(lm.bridge, last, chosen_rows, other, lm.unembed, buffer)
    for passed, own in zip(forwarded, views):
        passed.views = own


def _control_forwards(lm: LensModel, batch: Sequence[tuple[int, PromptItem]], device: Any,
                      truncate: str | None = None) -> dict:
    """The control prompts of a batch in one right-padded forward: ``{index: Forwarded}``."""
    with_control = [(index, item.control_prompt) for index, item in batch if item.control_prompt is not None]
    if not with_control:
        return {}
    forwarded = forward_batch(lm.bridge, [prompt for _, prompt in with_control], device, truncate=truncate)
    return {index: passed for (index, _), passed in zip(with_control, forwarded)}
