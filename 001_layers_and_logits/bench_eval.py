"""Benchmark: scoring the logit lens on a corpus (``lc.evaluate``'s engine) against its floor.

``venv/bin/python 001_layers_and_logits/bench_eval.py [--runs 3] [--tokens 4096] [--model gemma-3-270m]``

On the bundled model (or ``--model``), CPU float32, Python's own documentation cut into chunks of
``--max-seq-len`` tokens, medians over ``--runs`` taken round-robin after a warm-up, in one
process:

- ``floor_s``: the forward pass with the residual hooks (``pipeline.capture``) plus, per layer,
  ``ln_final`` and one unembedding of every scored position, then a log-softmax: the arithmetic
  no per-layer lens evaluation can avoid;
- ``evaluate_s``: ``pipeline.evaluation.score_chunks`` with the ``final`` lens alone (the same
  forward, the model's own distribution, cross-entropy, KL and agreement per layer).

The last line printed is one JSON object with both times, tokens per second and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from bench_sweep import _interleaved_medians_s  # the same round-robin medians

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def floor(lm, chunks, batch_size: int) -> None:
    """Hooks + forward, then per layer the final norm and one unembedding of the scored rows."""
    import torch

    from layers_core.norm_utils import apply_norm_or_skip
    from layers_core.pipeline.evaluation import capture_chunks

    ln_final = lm.bridge.ln_final
    with torch.inference_mode():
        for residuals, _ in capture_chunks(lm, chunks, batch_size):
            rows = residuals[:, :, 1:-1].reshape(residuals.shape[0], -1, residuals.shape[-1])
            for layer_rows in rows:
                torch.log_softmax(lm.unembed.logits(apply_norm_or_skip(layer_rows, ln_final)), dim=-1)


def bench(model: str | None, tokens: int, max_seq_len: int, batch_size: int, runs: int) -> dict:
    import torch

    import layers_core as lc
    from layers_core.api.evaluate import corpus_chunks
    from layers_core.lens.protocol import NormLens
    from layers_core.lens.tuned import stdlib_documentation
    from layers_core.pipeline.evaluation import score_chunks

    lm = lc.load(model, device="cpu", dtype="float32")
    chunks, _ = corpus_chunks(lm.bridge.tokenizer, stdlib_documentation(), max_seq_len, tokens)
    lenses = {"final": NormLens(lm.bridge, "final")}
    scored = len(chunks) * (max_seq_len - 2)
    floor_s, evaluate_s = _interleaved_medians_s([lambda: floor(lm, chunks, batch_size),
                                                  lambda: score_chunks(lm, lenses, chunks, batch_size)], runs)
    return {"model": lm.source.clean_name, "tokens": scored, "max_seq_len": max_seq_len,
            "threads": torch.get_num_threads(), "floor_s": round(floor_s, 3), "evaluate_s": round(evaluate_s, 3),
            "floor_tokens_per_s": round(scored / floor_s, 1),
            "evaluate_tokens_per_s": round(scored / evaluate_s, 1),
            "evaluate_over_floor": round(evaluate_s / floor_s, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model id, directory or packaged name (default: the bundled one)")
    parser.add_argument("--tokens", type=int, default=4096, help="corpus tokens (default: %(default)s)")
    parser.add_argument("--max-seq-len", type=int, default=256, help="tokens per chunk (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="chunks per forward (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs (median; default: %(default)s)")
    args = parser.parse_args(argv)
    row = bench(args.model, args.tokens, args.max_seq_len, args.batch_size, args.runs)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
