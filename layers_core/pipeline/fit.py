"""Fitting and evaluating a lens on a loaded model: capture residuals in batches, solve (or let
TransformerLens fit its Jacobian lens), and compare with the logit lens on held-out text (what
``layers-and-logits fit`` runs). Every forward goes through ``pipeline.capture``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from layers_core.hooks import residual_hook_names
from layers_core.lens.fingerprint import model_fingerprint
from layers_core.lens.tuned import NormalEquations, TunedLens, solve_translators
from layers_core.model.lens_model import LensModel
from layers_core.norm_utils import apply_norm_or_skip
from layers_core.numerics import kl_bits_from_log_probs
from layers_core.pipeline.capture import capture

EVAL_ROWS_PER_BLOCK = 256


def capture_chunks(lm: LensModel, chunks: Sequence[list[int]], batch_size: int,
                   progress: Callable[[int], None] | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """For each batch of equal-length chunks: (residuals ``[L+1, B, T, d]`` float32 on the lens
    device, tokens ``[B, T]``). ``progress(n)`` is called with the tokens done."""
    bridge = lm.bridge
    names = residual_hook_names(lm.n_layers)
    device = lm.unembed.W_U.device
    for start in range(0, len(chunks), batch_size):
        tokens = torch.tensor(chunks[start : start + batch_size], device=bridge.cfg.device)
        cache = capture(bridge, tokens, names, device=device).activations
        yield torch.stack([cache.pop(name).float() for name in names]), tokens
        if progress is not None:
            progress(int(tokens.numel()))


def fit(lm: LensModel, train: Sequence[list[int]], heldout: Sequence[list[int]], batch_size: int = 8,
        progress: Callable[[int], None] | None = None) -> tuple[TunedLens, list[float]]:
    """The closed-form tuned lens (position 0 excluded) and the ridge chosen for each layer."""
    n_layers, d_model = lm.n_layers, int(lm.bridge.cfg.d_model)
    statistics = {"train": NormalEquations(n_layers, d_model), "heldout": NormalEquations(n_layers, d_model)}
    for split, chunks in (("train", train), ("heldout", heldout)):
        for residuals, _ in capture_chunks(lm, chunks, batch_size, progress):
            statistics[split].add(residuals[:, :, 1:].reshape(n_layers + 1, -1, d_model).cpu())
    weights, biases, ridges = solve_translators(statistics["train"], statistics["heldout"])
    return TunedLens(weights, biases, lm.source.path or lm.model_id,
                     fingerprint=model_fingerprint(lm)), ridges


def _token_bytes(tokenizer: Any, ids: Tensor) -> int:
    return sum(len(text.encode("utf-8")) for text in tokenizer.batch_decode([[i] for i in ids.tolist()]))


def evaluate(lm: LensModel, lens: Any, chunks: Sequence[list[int]], batch_size: int = 8,
             progress: Callable[[int], None] | None = None) -> list[dict]:
    """Per layer ℓ < L on held-out text, for the logit lens (``ln_final``) and a fitted lens
    (``lens.translate(h, ℓ)`` then ``ln_final``: the tuned or the Jacobian lens, keyed by its name):
    KL(final ‖ lens) in bits per token and per byte, cross-entropy to the next token in bits, and
    top-1 agreement with the model. Positions 1..T−2 (the next token is known there)."""
    n_layers = lm.n_layers
    unembed, ln_final = lm.unembed, getattr(lm.bridge, "ln_final", None)
    kinds = ("logit", lens.name)
    sums = {kind: torch.zeros((n_layers, 3), dtype=torch.float64) for kind in kinds}
    rows_total, bytes_total = 0, 0
    for residuals, tokens in capture_chunks(lm, chunks, batch_size, progress):
        d_model = residuals.shape[-1]
        resid = residuals[:, :, 1:-1].reshape(n_layers + 1, -1, d_model)  # [L+1, rows, d]
        targets = tokens[:, 2:].reshape(-1).to(resid.device)
        rows_total += len(targets)
        bytes_total += _token_bytes(lm.bridge.tokenizer, targets)
        for start in range(0, len(targets), EVAL_ROWS_PER_BLOCK):
            block = slice(start, start + EVAL_ROWS_PER_BLOCK)
            with torch.inference_mode():
                final = torch.log_softmax(unembed.logits(apply_norm_or_skip(resid[n_layers, block], ln_final)), -1)
                final_top1 = final.argmax(-1)
                for layer in range(n_layers):
                    for kind, rows in (("logit", resid[layer, block]),
                                       (lens.name, lens.translate(resid[layer, block], layer))):
                        log_probs = torch.log_softmax(unembed.logits(apply_norm_or_skip(rows, ln_final)), -1)
                        kl = kl_bits_from_log_probs(final, log_probs).sum()
                        ce = -log_probs.gather(-1, targets[block].unsqueeze(-1)).sum() / math.log(2)
                        agree = (log_probs.argmax(-1) == final_top1).sum()
                        sums[kind][layer] += torch.stack([kl, ce, agree]).double().cpu()
    return [{"layer": layer, **{kind: {"kl_final_to_lens_bits": float(sums[kind][layer, 0]) / rows_total,
                                       "kl_final_to_lens_bpb": float(sums[kind][layer, 0]) / bytes_total,
                                       "ce_bits": float(sums[kind][layer, 1]) / rows_total,
                                       "top1_agree": float(sums[kind][layer, 2]) / rows_total}
                                for kind in kinds}}
            for layer in range(n_layers)]


def fit_jacobian(lm: LensModel, prompts: Sequence[Any], corpus: str, dim_batch: int,
                 max_seq_len: int) -> Any:
    """TransformerLens's ``JacobianLens`` fitted on ``prompts`` (its own estimator and progress
    bar: one forward and ⌈d/dim_batch⌉ backward passes per prompt), with this project's model
    fingerprint (config and W_U hashes) in its metadata."""
    from transformer_lens.tools.analysis import JacobianLens

    fingerprint = model_fingerprint(lm)
    return JacobianLens.fit(lm.bridge, prompts, corpus=corpus, dim_batch=dim_batch,
                            max_seq_len=max_seq_len, show_progress=True,
                            metadata={key: fingerprint[key] for key in ("config_hash", "unembed_hash")})
