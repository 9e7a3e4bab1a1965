"""Every lens scored on your text, layer by layer (``lc.evaluate``), as the tuned-lens paper does.

    ev = lc.evaluate(lm, ["some text", ...])          # final, arch, none and any fitted lens
    ev.table                                          # lens, layer, ce_bits (+ band), kl_bits, top1_agree
    ev.figure()                                       # bits per token per layer, one line per lens
    ev.save("my-eval")                                # output-<name>-eval.csv / .json / .png
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from layers_core.lens.protocol import Lens, NormLens
from layers_core.lens.views import NORM_VIEWS
from layers_core.model.lens_model import LensModel
from layers_core.pipeline.evaluation import ChunkScores, score_chunks
from layers_core.results.curves import bootstrap_band

EVAL_COLUMNS = ["lens", "layer", "ce_bits", "ce_bits_low", "ce_bits_high", "ce_bits_per_byte", "kl_bits",
                "kl_bits_low", "kl_bits_high", "top1_agree", "top1_agree_low", "top1_agree_high"]
DEFAULT_MAX_SEQ_LEN = 512
DEFAULT_MAX_TOKENS = 65_536
_METRICS = ("ce_bits", "kl_bits", "top1_agree")


@dataclass
class Evaluation:
    """The lenses' scores on a corpus: ``table`` (one row per lens and layer, ``EVAL_COLUMNS``;
    each value with its bootstrap interval over chunks), the raw per-chunk ``scores``, and the
    ``corpus`` facts (sha256 of the text as tokenised, tokens scored, chunks, chunk length)."""

    lm: LensModel
    table: pd.DataFrame
    scores: ChunkScores
    corpus: dict
    timing: dict = field(default_factory=dict)

    @property
    def document(self) -> dict:
        """The JSON document: model, corpus, lenses, timing and the table's rows."""
        from layers_core.results.report import finite_or_none

        return {"model": self.lm.model_id, "n_layers": self.lm.n_layers, "corpus": self.corpus,
                "lenses": list(self.scores.lenses), "timing": {k: round(v, 3) for k, v in self.timing.items()},
                "layers": finite_or_none(self.table.to_dict("records"))}

    def figure(self):
        """Cross-entropy to the next token and KL to the model, bits per token per layer, one
        line per lens with its band (the tuned-lens paper's figure)."""
        from layers_core.results.plots import eval_figure

        return eval_figure(self.table, f"{self.lm.source.clean_name} — {self.corpus['tokens']:,} tokens")

    def save(self, directory: str, *, name: str | None = None, plots: bool = True) -> dict[str, str]:
        """Writes ``output-<name>-eval.csv``, ``.json`` and (with ``plots``) ``.png``; returns the paths."""
        from layers_core.csv_io import render_csv
        from layers_core.results.outputs import write_json
        from layers_core.results.plots import save_figure
        from layers_core.run_dir import atomic_write

        os.makedirs(directory, exist_ok=True)
        stem = os.path.join(directory, f"output-{name or self.lm.source.clean_name}-eval")
        paths = {"csv": f"{stem}.csv", "json": f"{stem}.json"}
        atomic_write(paths["csv"], render_csv(self.table.to_dict("records"), EVAL_COLUMNS))
        write_json(paths["json"], self.document)
        if plots:
            paths["png"] = f"{stem}.png"
            save_figure(self.figure(), paths["png"])
        return paths


def eval_table(scores: ChunkScores, ci: float = 0.95) -> pd.DataFrame:
    """Per lens and layer: each metric over every scored token (sums over chunks ÷ tokens) with
    the percentile bootstrap interval of the chunks' own values (chunks are equal in length)."""
    totals, tokens, size = scores.sums.sum(0), float(scores.tokens.sum()), float(scores.bytes.sum())
    per_chunk = (scores.sums / scores.tokens.view(-1, 1, 1, 1)).numpy()  # [chunks, lenses, layers, 3]
    rows = []
    for index, lens in enumerate(scores.lenses):
        bands = [bootstrap_band(per_chunk[:, index, :, metric], ci) for metric in range(len(_METRICS))]
        for layer in range(totals.shape[1]):
            row = {"lens": lens, "layer": layer, "ce_bits_per_byte": float(totals[index, layer, 0]) / size}
            for metric, name in enumerate(_METRICS):
                row[name] = float(totals[index, layer, metric]) / tokens
                row[f"{name}_low"], row[f"{name}_high"] = (float(bands[metric][0][layer]),
                                                            float(bands[metric][1][layer]))
            rows.append(row)
    return pd.DataFrame(rows, columns=EVAL_COLUMNS)


def resolve_lenses(lm: LensModel, lenses: Iterable[Any] | None) -> dict[str, Lens]:
    """``{name: Lens}``: names (``final``, ``arch``, ``none``, ``tuned``, ``jacobian``) or ``Lens``
    objects; None: the logit lens under every norm strategy and each fitted lens in the model's
    lens cache (one that does not load is left out with a warning)."""
    from layers_core.api.prompt import cached_fitted_lenses, resolve_lens

    if lenses is not None:
        chosen = {}
        for entry in lenses:
            lens = NormLens(lm.bridge, entry) if entry in NORM_VIEWS else resolve_lens(lm, entry)
            chosen[lens.name] = lens
        return chosen
    return {**{name: NormLens(lm.bridge, name) for name in NORM_VIEWS}, **cached_fitted_lenses(lm)}


def corpus_chunks(tokenizer: Any, texts: Iterable[str], max_seq_len: int,
                  max_tokens: int) -> tuple[list[list[int]], str]:
    """(chunks of ``max_seq_len`` tokens, sha256 of the text they were cut from, as tokenised:
    each text followed by a blank line, UTF-8)."""
    from layers_core.lens.tuned import token_chunks

    digest = hashlib.sha256()

    def hashed() -> Iterable[str]:
        for text in texts:
            digest.update((text + "\n\n").encode("utf-8"))
            yield text

    chunks = token_chunks(tokenizer, hashed(), max_seq_len, max_tokens)
    return chunks, digest.hexdigest()


def evaluate(lm: LensModel, texts: Iterable[str], *, lenses: Sequence[Any] | None = None,
             max_seq_len: int = DEFAULT_MAX_SEQ_LEN, max_tokens: int = DEFAULT_MAX_TOKENS, batch_size: int = 8,
             progress: Callable[[int], None] | None = None) -> Evaluation:
    """Scores every lens on ``texts``, layer by layer (see ``pipeline.evaluation``).

    The texts are tokenised together and cut into chunks of ``max_seq_len`` tokens (BOS first),
    up to ``max_tokens``; ``batch_size`` chunks go through one forward. ``progress(n)`` is
    called with the tokens done. ``ValueError`` if the texts make no whole chunk."""
    if max_seq_len < 3:
        raise ValueError(f"max_seq_len must be at least 3, got {max_seq_len}")
    if max_seq_len > int(lm.bridge.cfg.n_ctx):
        raise ValueError(f"max_seq_len {max_seq_len} is longer than {lm.source.clean_name}'s context "
                         f"({int(lm.bridge.cfg.n_ctx)} tokens)")
    started = time.perf_counter()
    chosen = resolve_lenses(lm, lenses)
    chunks, sha256 = corpus_chunks(lm.bridge.tokenizer, texts, max_seq_len, max_tokens)
    if not chunks:
        raise ValueError(f"the corpus holds fewer than {max_seq_len} tokens: no chunk to score "
                         "(lower max_seq_len, or give more text)")
    with lm.thread_scope():
        scores = score_chunks(lm, chosen, chunks, batch_size, progress)
    corpus = {"sha256": sha256, "tokens": int(scores.tokens.sum()), "chunks": len(chunks),
              "max_seq_len": max_seq_len, "bytes": int(scores.bytes.sum())}
    return Evaluation(lm, eval_table(scores), scores, corpus, {"evaluate_s": time.perf_counter() - started})
