"""Benchmark: the project's sweep against the arithmetic floor and a legacy-style loop.

``venv/bin/python 001_layers_and_logits/bench_sweep.py [--runs 5] [--skip-long]``

Per model (the bundled SmolLM2-135M-Instruct, and a synthetic Llama-shaped model with a
128,256-token vocabulary), on the legacy prompt, CPU float32, medians over ``--runs`` taken
round-robin after a warm-up, all in one process:

- ``floor_s``: HF forward with hidden states + one batched unembedding of all (n+1)·T rows + one
  log-softmax: the arithmetic no logit lens can avoid;
- ``sweep_s``: ``layers_core.pipeline.sweep.run_sweep`` exactly as run.py calls it (hooks, norms, unembedding,
  post-unembed transform, every metric of the records and pure rows, token decoding);
- ``loop_s``: a legacy-style implementation of the same outputs (per-layer unembedding, then a
  Python loop per position with its own softmaxes, top-k, one ``decode`` and ``.item()`` per value).

The sweep and the loop must agree (entropies, top-k ids and probabilities). Then the time per
(layer, position) row is measured from 16 to 512 tokens, and (unless ``--skip-long``) the peak
memory a 2,000-token prompt adds over its forward pass, in a child process. The last line printed
is one JSON object: ``{"models": [...], "scaling": [...], "long_prompt": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # tiny_models beside this file
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SYNTHETIC_VOCAB = 128_256
LONG_PROMPT_TOKENS = 2_000
SCALING_LENGTHS = (16, 64, 256, 512)


def _median_s(fn, runs: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def _interleaved_medians_s(fns, runs: int) -> list[float]:
    """Medians of ``runs`` timings per function, taken round-robin after one warm-up each, so
    that drifts in machine load hit every contender alike."""
    for fn in fns:
        fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, out in zip(fns, samples):
            started = time.perf_counter()
            fn()
            out.append(time.perf_counter() - started)
    return [statistics.median(out) for out in samples]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build_synthetic_llama(out_dir: str) -> str:
    """A random Llama-shaped model (d_model 1024, 8 layers, V = 128,256) with a local tokenizer."""
    import torch
    from tiny_models import train_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=8, vocab_size=SYNTHETIC_VOCAB,
                         max_position_embeddings=4096, bos_token_id=0, eos_token_id=1,
                         pad_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    train_tokenizer(out_dir)
    return out_dir


def floor(model, tokens):
    """HF forward with hidden states, one batched unembedding, one log-softmax."""
    import torch

    hf = model.original_model
    with torch.inference_mode():
        hidden = hf(tokens, output_hidden_states=True).hidden_states
        rows = torch.cat([h[0] for h in hidden], dim=0)  # [(n+1)·T, d]
        return torch.log_softmax(hf.get_output_embeddings()(rows).float(), dim=-1)


def legacy_loop(model, prompt, answer, unembed, norms):
    """The legacy shape: per layer a [T, V] unembedding, then per position its own softmaxes,
    top-k, one ``decode`` and ``.item()`` per value; the last position adds the pure-row metrics."""
    import torch

    from layers_core.collapse_rules import COPY_MARGIN, COPY_THRESHOLD, resolve_gold_answer
    from layers_core.csv_io import TOP_K_RECORD, TOP_K_VERBOSE, is_verbose_position
    from layers_core.norm_utils import apply_norm_or_skip
    from layers_core.numerics import bits_entropy_from_logits, kl_bits
    from layers_core.pipeline.sweep import forward_with_residuals

    tokens = model.to_tokens(prompt)
    str_tokens = model.to_str_tokens(prompt)
    answer_id = resolve_gold_answer(model.tokenizer, prompt, answer)["first_id"]
    prompt_ids = set(model.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    hf = model.original_model  # tied embeddings: the current token read back is never a copy
    if hf.get_input_embeddings().weight.data_ptr() == hf.get_output_embeddings().weight.data_ptr():
        prompt_ids.discard(int(tokens[0, -1]))
    final_logits, residuals = forward_with_residuals(model, tokens)
    rows, pure = [], []
    with torch.inference_mode():
        for layer, resid in enumerate(residuals):
            logits = unembed.logits(apply_norm_or_skip(resid, norms[layer]))
            for pos in range(logits.shape[0]):
                probs = torch.softmax(logits[pos], dim=-1)
                entropy = bits_entropy_from_logits(logits[pos]).item()
                verbose = is_verbose_position(str_tokens[pos], pos, len(str_tokens))
                k = TOP_K_VERBOSE if verbose else TOP_K_RECORD
                top = torch.topk(probs, k)
                ids = [i.item() for i in top.indices]
                values = [v.item() for v in top.values]
                texts = [model.tokenizer.decode([i]) for i in ids]
                rows.append({"entropy": entropy, "ids": ids, "probs": values, "texts": texts})
                if pos == logits.shape[0] - 1:
                    p_answer = probs[answer_id].item()
                    pure.append({
                        "p_answer": p_answer,
                        "answer_rank": int((probs > probs[answer_id]).sum().item()) + 1,
                        "kl_to_final_bits": kl_bits(logits[pos], final_logits[-1]).item(),
                        "copy": (ids[0] in prompt_ids and values[0] > COPY_THRESHOLD
                                 and values[0] - values[1] > COPY_MARGIN),
                    })
    return rows, pure


def _same_tokens_up_to_ties(ours: list[str], theirs: list[str], probs: list[float]) -> bool:
    """Rank by rank; where probabilities tie (a softcap saturates), tokens of equal probability
    may come in either order and the tied group at the cut-off may have other members."""
    if len(set(probs)) == len(probs):
        return ours == theirs
    groups: dict[float, tuple[list[str], list[str]]] = {}
    for mine, other, p in zip(ours, theirs, probs):
        groups.setdefault(p, ([], []))
        groups[p][0].append(mine)
        groups[p][1].append(other)
    return all(sorted(a) == sorted(b) for p, (a, b) in groups.items() if p != probs[-1])


def _as_decoded(text: str) -> str:
    """A cell as ``decode`` would spell it: ``<0xE6>`` byte names back to bytes, invalid UTF-8 as
    U+FFFD (the sweep names the bytes of a partial character; the loop's ``decode`` cannot)."""
    import re

    raw = b"".join(bytes([int(part[3:5], 16)]) if re.fullmatch(r"<0x[0-9A-F]{2}>", part) else part.encode()
                   for part in re.split(r"(<0x[0-9A-F]{2}>)", text) if part)
    return raw.decode("utf-8", errors="replace")


def _check_agreement(sweep_records, sweep_pure, loop_rows, loop_pure) -> None:
    assert len(sweep_records) == len(loop_rows), (len(sweep_records), len(loop_rows))
    for ours, theirs in zip(sweep_records, loop_rows):
        k = len(theirs["ids"])
        assert abs(ours["entropy"] - theirs["entropy"]) < 1e-3, (ours["entropy"], theirs["entropy"])
        probs = [ours[f"prob{i + 1}"] for i in range(k)]
        assert all(abs(a - b) < 1e-6 for a, b in zip(probs, theirs["probs"])), (probs, theirs)
        assert _same_tokens_up_to_ties([_as_decoded(ours[f"top{i + 1}"]) for i in range(k)], theirs["texts"],
                                       theirs["probs"]), (ours, theirs)
    for ours, theirs in zip(sweep_pure, loop_pure, strict=True):
        assert abs(ours["p_answer"] - theirs["p_answer"]) < 1e-6
        assert abs(ours["kl_to_final_bits"] - theirs["kl_to_final_bits"]) < 1e-3
        assert ours["copy_strict"] == theirs["copy"]
        # a near-tie can round differently in probability space (loop) and log space (sweep):
        # seen once, 37686 vs 37687 at p = 3.1e-6 on the bundled model
        assert abs(ours["answer_rank"] - theirs["answer_rank"]) <= 1, (ours, theirs)


def _arch():
    """The seed's arch rule, which the legacy-style loop applies (the default lens is final)."""
    from layers_core.pipeline.sweep import SweepSettings

    return SweepSettings(norm_strategy="arch")


def _sweep_setup(model):
    from layers_core.device_policy import unembed_weights_for_analysis
    from layers_core.lens.protocol import lens_norm_plan
    from layers_core.lens.unembed import Unembedding
    from layers_core.numerics import output_logits_transform

    W_U, b_U = unembed_weights_for_analysis(model, use_fp32=True)
    unembed = Unembedding(W_U, b_U, output_logits_transform(model), force_fp32=True)
    return unembed, [module for module, _ in lens_norm_plan(model, "arch")]


def bench_model(name: str, path: str, runs: int) -> dict:
    import torch

    from layers_core.model.loading import load_model, resolve_model_source
    from layers_core.pipeline.prompts import DEFAULT_ANSWER, DEFAULT_PROMPT
    from layers_core.pipeline.sweep import TokenDecoder, run_sweep

    model = load_model(resolve_model_source(path), "cpu", torch.float32)
    unembed, norms = _sweep_setup(model)
    tokens = model.to_tokens(DEFAULT_PROMPT)
    result = run_sweep(model, DEFAULT_PROMPT, DEFAULT_ANSWER, unembed, _arch())
    _check_agreement(result.records, result.pure_rows,
                     *legacy_loop(model, DEFAULT_PROMPT, DEFAULT_ANSWER, unembed, norms))
    # a fresh decoder per run: decoding is part of the sweep's cost, not amortised across runs
    floor_s, sweep_s, loop_s = _interleaved_medians_s([
        lambda: floor(model, tokens),
        lambda: run_sweep(model, DEFAULT_PROMPT, DEFAULT_ANSWER, unembed, _arch(),
                          decoder=TokenDecoder(model.tokenizer)),
        lambda: legacy_loop(model, DEFAULT_PROMPT, DEFAULT_ANSWER, unembed, norms),
    ], runs)
    return {"model": name, "floor_s": round(floor_s, 4), "sweep_s": round(sweep_s, 4),
            "loop_s": round(loop_s, 4), "sweep_over_floor": round(sweep_s / floor_s, 3),
            "loop_over_sweep": round(loop_s / sweep_s, 3), "peak_rss_mb": round(_peak_rss_mb(), 1)}


def bench_next_token(path: str, runs: int, threads: int = 1) -> dict:
    """A single sweep of the legacy prompt through the notebook API, side by side with
    TransformerLens's own ``logit_lens`` (the same bridge, ``threads`` torch threads):

    - ``tl_all_s``: TL over every position, top-20; ``tl_last_s``: TL at the last position, top-20;
    - ``tl_last_checks_s``: TL's last position plus the checks a run asks for, done with TL: the
      raw residual (``apply_ln=False``) and the control prompt's read-out;
    - ``sweep_s``: ``lc.sweep`` (every position: records, pure rows, comparison lens, raw check,
      gate, control, attribution); ``no_records_s``: the same with ``records=False``;
      ``no_records_bare_s``: ``records=False`` without the control prompt.

    The pure rows of ``records=False`` are checked equal to the full sweep's first.
    """
    import torch
    from transformer_lens.tools.analysis.logit_lens import logit_lens

    import layers_core as lc
    from layers_core.pipeline.prompts import DEFAULT_CONTROL_PROMPT, DEFAULT_PROMPT
    from layers_core.pipeline.sweep import SweepSettings

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        lm = lc.load(path, device="cpu", dtype="float32")
        lm.threads = threads
        model, last_only = lm.bridge, SweepSettings(records=False)
        full, last = lc.sweep(lm), lc.sweep(lm, settings=last_only)
        for ours, theirs in zip(last.analysis.result.pure_rows, full.analysis.result.pure_rows, strict=True):
            close = abs(ours["p_answer"] - theirs["p_answer"]) <= 1e-5 * max(theirs["p_answer"], 1e-30)
            assert close, (ours["p_answer"], theirs["p_answer"])
        times = _interleaved_medians_s([
            lambda: logit_lens(model, DEFAULT_PROMPT, positions=None, top_k=20),
            lambda: logit_lens(model, DEFAULT_PROMPT, top_k=20),
            lambda: (logit_lens(model, DEFAULT_PROMPT, top_k=20), logit_lens(model, DEFAULT_PROMPT, top_k=20,
                                                                             apply_ln=False),
                     logit_lens(model, DEFAULT_CONTROL_PROMPT, top_k=20)),
            lambda: lc.sweep(lm),
            lambda: lc.sweep(lm, settings=last_only),
            lambda: lc.sweep(lm, control=False, settings=last_only),
        ], runs)
    finally:
        torch.set_num_threads(before)
    names = ("tl_all_s", "tl_last_s", "tl_last_checks_s", "sweep_s", "no_records_s", "no_records_bare_s")
    row = {name: round(seconds, 4) for name, seconds in zip(names, times)}
    row.update(threads=threads, no_records_over_tl_checks=round(times[4] / times[2], 3),
               bare_over_tl_last=round(times[5] / times[1], 3), sweep_over_tl_all=round(times[3] / times[0], 3))
    return row


def _prompt_of_length(model, n_tokens: int) -> str:
    words = ("Berlin is the capital of Germany and Paris is the capital of France . " * n_tokens)
    ids = model.tokenizer(words, add_special_tokens=False)["input_ids"][: n_tokens - 1]
    return model.tokenizer.decode(ids)


def bench_scaling(path: str, runs: int) -> list[dict]:
    """Seconds per (layer, position) row of the sweep for prompts of 16 to 512 tokens."""
    import torch

    from layers_core.model.loading import load_model, resolve_model_source
    from layers_core.pipeline.sweep import run_sweep

    model = load_model(resolve_model_source(path), "cpu", torch.float32)
    unembed, _ = _sweep_setup(model)
    out = []
    for length in SCALING_LENGTHS:
        prompt = _prompt_of_length(model, length)
        n_rows = (model.cfg.n_layers + 1) * model.to_tokens(prompt).shape[1]
        seconds = _median_s(lambda p=prompt: run_sweep(model, p, "Berlin", unembed, _arch()),
                            max(3, runs // 2))
        out.append({"tokens": int(model.to_tokens(prompt).shape[1]), "rows": n_rows,
                    "us_per_row": round(1e6 * seconds / n_rows, 1)})
    return out


def long_prompt_child(path: str) -> None:
    """Child process: peak RSS after the forward alone, then after the whole sweep."""
    import torch

    from layers_core.model.loading import load_model, resolve_model_source
    from layers_core.pipeline.sweep import forward_with_residuals, run_sweep

    model = load_model(resolve_model_source(path), "cpu", torch.float32)
    unembed, _ = _sweep_setup(model)
    prompt = _prompt_of_length(model, LONG_PROMPT_TOKENS)
    forward_with_residuals(model, model.to_tokens(prompt))
    after_forward = _peak_rss_mb()
    run_sweep(model, prompt, "Berlin", unembed, _arch())
    print(json.dumps({"tokens": int(model.to_tokens(prompt).shape[1]),
                      "peak_rss_after_forward_mb": round(after_forward, 1),
                      "peak_rss_after_sweep_mb": round(_peak_rss_mb(), 1),
                      "added_mb": round(_peak_rss_mb() - after_forward, 1)}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--skip-long", action="store_true", help="skip the 2,000-token memory check")
    parser.add_argument("--long-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.long_child:
        long_prompt_child(args.long_child)
        return 0
    from layers_core.model.loading import ensure_default_model

    report: dict = {"models": []}
    with tempfile.TemporaryDirectory() as tmp:
        synthetic = build_synthetic_llama(os.path.join(tmp, "synthetic-llama-128k"))
        for name, path in (("SmolLM2-135M-Instruct", ensure_default_model()),
                           ("synthetic-llama-128k", synthetic)):
            row = bench_model(name, path, args.runs)
            print(row, flush=True)
            report["models"].append(row)
        report["next_token"] = bench_next_token(ensure_default_model(), args.runs)
        print("next token:", report["next_token"], flush=True)
        report["scaling"] = bench_scaling(synthetic, args.runs)
        print("scaling:", report["scaling"], flush=True)
        if not args.skip_long:
            child = subprocess.run([sys.executable, __file__, "--long-child", synthetic],
                                   capture_output=True, text=True, check=True)
            report["long_prompt"] = json.loads(child.stdout.strip().splitlines()[-1])
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
