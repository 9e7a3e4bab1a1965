"""Every lens scored on a corpus (``lc.evaluate``): cross-entropy, KL and agreement per layer,
checked against the Hugging Face model alone (its own decoder layers, final norm and head)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hf_reference import final_norm, hf_all_residuals, hf_head, load_hf

import layers_core as lc
from layers_core.api.evaluate import DEFAULT_MAX_TOKENS, EVAL_COLUMNS, corpus_chunks

TEXTS = ["The capital of France is Paris. The capital of Germany is Berlin. " * 6,
         "One, two, three, four, five, six, seven, eight, nine, ten. " * 6]


class ShiftedLens:
    """A lens of your own: layer ℓ's residual moved by a fixed random vector, then ``ln_final``."""

    name = "shifted"

    def __init__(self, lm, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.shift = torch.randn((lm.n_layers + 1, int(lm.bridge.cfg.d_model)), generator=generator)
        self.norm = lm.bridge.ln_final

    def transform(self, residual, layer):
        return self.norm(residual + self.shift[layer])


def _hf_scores(path, chunks, shift):
    """Per layer (CE bits, KL(model ‖ lens) bits, top-1 agreement) summed over positions 1..T−2 of
    every chunk, for the logit lens through the HF final norm (and, with ``shift``, the shifted
    lens), from the HF model's own residuals (forward hooks) and its own logits."""
    hf = load_hf(path)
    head, norm = hf_head(hf), final_norm(hf)
    totals = {"final": np.zeros((hf.config.num_hidden_layers + 1, 3)),
              "shifted": np.zeros((hf.config.num_hidden_layers + 1, 3))}
    for chunk in chunks:
        captured, logits = hf_all_residuals(hf, chunk)
        model = torch.log_softmax(logits.double(), -1)[1:-1]
        targets = torch.tensor(chunk[2:])
        with torch.no_grad():
            for layer, resid in enumerate(captured):
                for name, rows in (("final", resid), ("shifted", resid + shift[layer])):
                    lens = head(norm(rows))[1:-1]
                    ce = -lens.gather(-1, targets.unsqueeze(-1)).sum() / math.log(2)
                    kl = (model.exp() * (model - lens)).sum() / math.log(2)
                    agree = (lens.argmax(-1) == model.argmax(-1)).sum()
                    totals[name][layer] += [float(ce), float(kl), float(agree)]
    return totals


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ce_kl_and_agreement_equal_the_hf_models_own_within_1e_5_bits(tiny_dirs, family):
    lm = lc.load(tiny_dirs[family], device="cpu", dtype="float32")
    mine = ShiftedLens(lm)
    ev = lc.evaluate(lm, TEXTS, lenses=["final", mine], max_seq_len=24, batch_size=2)
    chunks, _ = corpus_chunks(lm.bridge.tokenizer, TEXTS, 24, DEFAULT_MAX_TOKENS)
    expected = _hf_scores(tiny_dirs[family], chunks, mine.shift)
    tokens = len(chunks) * (24 - 2)
    assert ev.corpus["tokens"] == tokens and ev.corpus["chunks"] == len(chunks) >= 4
    for name in ("final", "shifted"):
        part = ev.table[ev.table.lens == name].sort_values("layer")
        np.testing.assert_allclose(part.ce_bits, expected[name][:, 0] / tokens, atol=1e-5)
        np.testing.assert_allclose(part.kl_bits, expected[name][:, 1] / tokens, atol=1e-5)
        np.testing.assert_allclose(part.top1_agree, expected[name][:, 2] / tokens, atol=1e-9)
        assert (part.ce_bits_low <= part.ce_bits + 1e-12).all()
        assert (part.ce_bits <= part.ce_bits_high + 1e-12).all()
    final = ev.table[ev.table.lens == "final"].iloc[-1]
    assert final.kl_bits < 1e-5 and final.top1_agree == 1.0  # the last layer is the model


@pytest.mark.parametrize("budget_rows,blocks", [(4, (4, 1)), (44, (22, 2)), (66, (22, 3))])
def test_row_blocks_and_layer_groups_under_a_small_budget_give_the_same_sums(tiny_dirs, budget_rows, blocks):
    """A budget of a few ``[rows, V]`` blocks: several row blocks one layer at a time, or every
    row with layers unembedded two or three at a time (``_blocks``): the same sums as one
    block of everything."""
    from layers_core.lens.protocol import NormLens
    from layers_core.pipeline.evaluation import _LIVE_COPIES, _blocks, score_chunks

    lm = lc.load(tiny_dirs["llama"], device="cpu", dtype="float32")
    chunks, _ = corpus_chunks(lm.bridge.tokenizer, TEXTS, 24, DEFAULT_MAX_TOKENS)
    lenses = {"final": NormLens(lm.bridge, "final"), "shifted": ShiftedLens(lm)}
    vocab = int(lm.unembed.W_U.shape[-1])
    budget = budget_rows * vocab * 4 * _LIVE_COPIES
    assert _blocks(lm.n_layers + 1, 22, vocab, budget) == blocks  # 22 scored rows per chunk of 24
    small = score_chunks(lm, lenses, chunks, batch_size=2, budget_bytes=budget)
    whole = score_chunks(lm, lenses, chunks, batch_size=2)
    # float32 unembeddings of other shapes round differently: 1e-4 bits over a chunk's 22 tokens
    torch.testing.assert_close(small.sums[..., :2], whole.sums[..., :2], rtol=0, atol=1e-4)
    assert torch.equal(small.sums[..., 2], whole.sums[..., 2])  # the same top-1 everywhere


def test_every_norm_lens_by_default_and_the_files(tiny_dirs, tmp_path):
    lm = lc.load(tiny_dirs["llama"], device="cpu", dtype="float32")
    ev = lc.evaluate(lm, TEXTS, max_seq_len=32)
    assert list(dict.fromkeys(ev.table.lens)) == ["final", "arch", "none"]
    paths = ev.save(str(tmp_path))
    table = lc.read_csv(paths["csv"])
    assert table.columns.tolist() == EVAL_COLUMNS and len(table) == 3 * (lm.n_layers + 1)
    document = json.loads(open(paths["json"]).read())
    assert document["corpus"]["sha256"] == corpus_chunks(lm.bridge.tokenizer, TEXTS, 32, 10**9)[1]
    assert document["corpus"]["tokens"] == ev.corpus["tokens"] and len(document["layers"]) == len(table)
    with pytest.raises(ValueError, match="fewer than 24 tokens"):
        lc.evaluate(lm, ["short"], max_seq_len=24)
    with pytest.raises(ValueError, match="longer than"):
        lc.evaluate(lm, TEXTS, max_seq_len=int(lm.bridge.cfg.n_ctx) + 1)


def test_the_command_scores_a_corpus_file_and_refuses_bad_flags_in_one_line(tiny_dirs, tmp_path, capsys):
    from conftest import assert_clean_failure
    from layers_core.api import evaluate as api
    from layers_core.app import commands, evaluate_command

    assert (evaluate_command.DEFAULT_MAX_SEQ_LEN, evaluate_command.DEFAULT_MAX_TOKENS) == \
        (api.DEFAULT_MAX_SEQ_LEN, api.DEFAULT_MAX_TOKENS)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    out = tmp_path / "out"
    assert commands.main(["evaluate", tiny_dirs["llama"], "--corpus", str(corpus), "--max-seq-len", "32",
                          "--lens", "final", "none", "--out_dir", str(out), "--device", "cpu"]) == 0
    table = lc.read_csv(str(out / "output-llama-eval.csv"))
    assert set(table.lens) == {"final", "none"} and (out / "output-llama-eval.png").stat().st_size > 10_000
    document = json.loads((out / "output-llama-eval.json").read_text())
    assert document["corpus"]["files"] == [str(corpus)] and len(document["corpus"]["sha256"]) == 64
    capsys.readouterr()
    for bad in (["--lens", "tunde"], ["--max-seq-len", "2"], ["--corpus", str(tmp_path / "missing.txt")]):
        code = commands.main(["evaluate", tiny_dirs["llama"], *bad])
        assert_clean_failure(capsys.readouterr(), code, 2)


def test_a_tuned_lens_beats_the_logit_lens_on_text_it_never_saw(bundled_model_dir):
    """The bundled model, a tuned lens fitted on 2,048 tokens of Python's documentation (after the
    held-out text), scored on 254 tokens of this repository's docs: lower cross-entropy than the
    logit lens at every layer but the last, where both are the model (measured margins: 4.8 to
    146 bits; 4,096 training tokens and 510 scored gave 4.8 to 147)."""
    import glob
    import os

    from layers_core.lens import tuned as tuned_lens
    from layers_core.pipeline import fit as lens_fit

    lm = lc.load(bundled_model_dir, device="cpu", dtype="float32")
    _, rest = lens_fit.evaluation_split(lm.bridge.tokenizer, tuned_lens.stdlib_documentation())
    train, validation = tuned_lens.split_heldout(tuned_lens.take_chunks(lm.bridge.tokenizer, rest, 256, 2304))
    lens, _ = lens_fit.fit(lm, train, validation)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    texts = [open(path, encoding="utf-8").read() for path in sorted(glob.glob(os.path.join(root, "docs", "*.md")))]
    ev = lc.evaluate(lm, texts, lenses=["final", lens.bind(lm.bridge)], max_seq_len=256, max_tokens=256)
    ce = ev.table.pivot(index="layer", columns="lens", values="ce_bits")
    assert (ce["tuned"] < ce["final"] - 1.0)[:-1].all()
    assert ce["tuned"].iloc[-1] == pytest.approx(ce["final"].iloc[-1], abs=1e-5)

