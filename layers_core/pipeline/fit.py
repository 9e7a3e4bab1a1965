"""Fitting and evaluating a lens on a loaded model: capture residuals in batches, solve (or let
TransformerLens fit its Jacobian lens), and compare with the logit lens on held-out text (what
``layers-and-logits fit`` runs; the scores are ``pipeline.evaluation``'s). Every forward goes
through ``pipeline.capture``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from layers_core.lens.fingerprint import model_fingerprint
from layers_core.lens.protocol import NormLens
from layers_core.lens.tuned import NormalEquations, TunedLens, solve_translators
from layers_core.model.lens_model import LensModel
from layers_core.pipeline.evaluation import capture_chunks, score_chunks

EVAL_TOKENS = 2_048  # the held-out text every fit is evaluated on: the corpus's first tokens
EVAL_CHUNK_TOKENS = 256


def evaluation_split(tokenizer: Any, texts: Iterable[str], eval_tokens: int = EVAL_TOKENS,
                     chunk_tokens: int = EVAL_CHUNK_TOKENS) -> tuple[list[list[int]], Iterator[int]]:
    """(the held-out chunks, the rest of the corpus as a token stream): the corpus's first
    ``eval_tokens`` tokens are the evaluation text of every fit, tuned and Jacobian alike, and
    never train one, so their ``eval.json`` compare on the same tokens. ``ValueError`` if the
    corpus is shorter."""
    from layers_core.lens.tuned import take_chunks, token_stream

    stream = token_stream(tokenizer, texts)
    heldout = take_chunks(tokenizer, stream, chunk_tokens, eval_tokens)
    if len(heldout) * chunk_tokens < eval_tokens:
        raise ValueError(f"the corpus holds only {len(heldout) * chunk_tokens} tokens; the held-out text alone "
                         f"takes the first {eval_tokens}")
    return heldout, stream


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


def evaluate(lm: LensModel, lens: Any, chunks: Sequence[list[int]], batch_size: int = 8,
             progress: Callable[[int], None] | None = None) -> list[dict]:
    """``eval.json``'s rows: per layer ℓ < L, for the logit lens (``ln_final``, keyed ``logit``) and a
    fitted lens (keyed by its name), KL(final ‖ lens) in bits per token and per byte, cross-entropy
    to the next token in bits, and top-1 agreement with the model — ``pipeline.evaluation``'s
    scores (positions 1..T−2), the same engine as ``layers-and-logits evaluate``."""
    scores = score_chunks(lm, {"logit": NormLens(lm.bridge, "final"), lens.name: lens}, chunks, batch_size,
                          progress)
    totals, tokens, size = scores.sums.sum(0), float(scores.tokens.sum()), float(scores.bytes.sum())
    return [{"layer": layer, **{name: {"kl_final_to_lens_bits": float(totals[index, layer, 1]) / tokens,
                                       "kl_final_to_lens_bpb": float(totals[index, layer, 1]) / size,
                                       "ce_bits": float(totals[index, layer, 0]) / tokens,
                                       "top1_agree": float(totals[index, layer, 2]) / tokens}
                                for index, name in enumerate(scores.lenses)}}
            for layer in range(lm.n_layers)]


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
