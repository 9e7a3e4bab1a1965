"""Prompt sets at speed: ``python 001_layers_and_logits/bench_prompts.py [--prompts 200] [--model DIR]``.

Times three ways through the same facts (the bundled battery, cycled with fresh ids up to
``--prompts``), in one process, after the model is loaded:

- ``floor_s``: a few lines of plain transformers: batched forwards (32, hidden states), then at
  each prompt's last position both standard lenses (norm, unembedding, float32 log-softmax,
  entropy, top-5, answer rank);
- ``set_s``: the project's prompt-set path (batched; no control, no records, no pictures);
- ``sequential_s``: the per-prompt path (``--batch-size 1 --records``; no control, no pictures);
- ``set_controls_s``: the set path with each fact's control prompt too, as ``run.py --prompts``
  runs the battery (no target: the floor has no control pass).

The last line is one JSON object: ``{"model", "prompts", "tokens", "floor_s", "set_s",
"sequential_s", "set_controls_s", "<contender>_tokens_per_s", "set_over_floor",
"sequential_over_set", "set_controls_over_floor"}`` (tokens: the prompts' tokens, BOS included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BATTERY = os.path.join(HERE, "facts", "capitals.jsonl")
FLOOR_BATCH = 32


def cycled_items(count: int, path: str = BATTERY, controls: bool = False) -> list[dict]:
    """``count`` facts from the battery, cycled with fresh ids (``Germany``, ``Germany#2``, …);
    with ``controls``, each with its control prompt and answer."""
    from layers_core.results.prompt_sets import load_prompt_set

    facts = load_prompt_set(path)
    items = []
    for index in range(count):
        fact = facts[index % len(facts)]
        suffix = "" if index < len(facts) else f"#{index // len(facts) + 1}"
        item = {"id": fact.prompt_id + suffix, "prompt": fact.prompt, "answer": fact.answer}
        if controls and fact.control_prompt is not None:
            item.update(control_prompt=fact.control_prompt, control_answer=fact.control_answer)
        items.append(item)
    return items


def floor(hf_model, tokenizer, items: list[dict]) -> list[dict]:
    """The plain-transformers floor; returns per-prompt final-lens entropy/top-5 for a check."""
    import torch

    decoder = hf_model.model
    norms = [layer.input_layernorm for layer in decoder.layers] + [decoder.norm]
    head = hf_model.lm_head.weight.float().T  # [d, V]
    out = []
    with torch.inference_mode():
        for start in range(0, len(items), FLOOR_BATCH):
            chunk = items[start : start + FLOOR_BATCH]
            encoded = [tokenizer(item["prompt"])["input_ids"] for item in chunk]
            if tokenizer.bos_token_id is not None:
                encoded = [[tokenizer.bos_token_id] + ids for ids in encoded]
            width = max(map(len, encoded))
            batch = torch.tensor([ids + [0] * (width - len(ids)) for ids in encoded])
            hidden = hf_model(batch, output_hidden_states=True, logits_to_keep=1).hidden_states
            last = torch.tensor([len(ids) - 1 for ids in encoded])
            for row, item in enumerate(chunk):
                resid = torch.stack([h[row, last[row]] for h in hidden]).float()  # [L, d]
                answer = tokenizer(" " + item["answer"], add_special_tokens=False)["input_ids"][0]
                for normed in (torch.stack([norms[min(i, len(norms) - 1)](resid[i]) for i in range(len(resid))]),
                               decoder.norm(resid)):  # the arch lens, then the final lens
                    log_probs = torch.log_softmax(normed @ head, dim=-1)
                    entropy = -(log_probs.exp() * log_probs).sum(-1) / torch.log(torch.tensor(2.0))
                    top = log_probs.topk(5, dim=-1)
                    rank = (log_probs > log_probs[:, answer : answer + 1]).sum(-1) + 1
                out.append({"entropy": entropy.tolist(), "top": top.indices.tolist(), "rank": rank.tolist()})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_prompts.py", description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--model", help="local Llama-family directory (default: the bundled model)")
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import layers_core as lc
    from layers_core.api.prompt_set import sweep_set
    from layers_core.model.loading import ensure_default_model
    from layers_core.pipeline.sweep import SweepSettings

    torch.manual_seed(316)
    directory = args.model or ensure_default_model()
    hf_model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    lens_model = lc.load(args.model, device="cpu")
    items = cycled_items(args.prompts)
    floor(hf_model, tokenizer, items[:FLOOR_BATCH])  # warm-up
    sweep_set(lens_model, items[:FLOOR_BATCH])
    tokens = sum(int(lens_model.bridge.to_tokens(item["prompt"]).shape[1]) for item in items)  # BOS included
    timings = {}
    controlled = cycled_items(args.prompts, controls=True)
    one_at_a_time = SweepSettings(batch_size=1, records=True)
    for name, run in (("floor_s", lambda: floor(hf_model, tokenizer, items)),
                      ("set_s", lambda: sweep_set(lens_model, items)),
                      ("sequential_s", lambda: sweep_set(lens_model, items, settings=one_at_a_time)),
                      ("set_controls_s", lambda: sweep_set(lens_model, controlled))):
        started = time.perf_counter()
        run()
        timings[name] = round(time.perf_counter() - started, 3)
        print(f"{name:14s} {timings[name]:8.2f} s  {tokens / timings[name]:8.0f} tokens/s", flush=True)
    result = {"model": lens_model.source.clean_name, "prompts": len(items), "tokens": tokens, **timings,
              **{name.replace("_s", "_tokens_per_s"): round(tokens / seconds, 1) for name,
                 seconds in timings.items()},
              "set_over_floor": round(timings["set_s"] / timings["floor_s"], 3),
              "sequential_over_set": round(timings["sequential_s"] / timings["set_s"], 3),
              "set_controls_over_floor": round(timings["set_controls_s"] / timings["floor_s"], 3)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
