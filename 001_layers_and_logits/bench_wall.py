"""Benchmark: the wall time of a whole ``run.py`` on the bundled model against the stack's floor.

``venv/bin/python 001_layers_and_logits/bench_wall.py [--runs 5]``

Each contender is a fresh process (warm caches: the bundled model is converted before timing),
run ``--runs`` times round-robin, and the median wall time is reported:

- ``hf_floor_s``: import torch and transformers, load the model with ``from_pretrained``, one
  forward of the legacy prompt: what any tool built on Hugging Face pays;
- ``tl_floor_s``: the same through TransformerLens (``TransformerBridge.boot_transformers``), the
  loader run.py uses: the floor for this project;
- ``run_no_plots_s`` and ``run_s``: ``run.py --quiet [--no-plots]`` end to end, with the medians
  of its JSON ``timing`` split and ``exit_s`` (wall − ``total_s``: interpreter start, argument
  parsing and interpreter teardown). The floors end with ``gc.freeze()`` as run.py does, so
  that none of them pays the interpreter's ≈ 1 s final garbage collection.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RUN_PY = os.path.join(HERE, "run.py")
MODEL_NAME = "SmolLM2-135M-Instruct"

_HF_FLOOR = """
import gc
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({path!r}, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained({path!r})
with torch.inference_mode():
    model(**tokenizer({prompt!r}, return_tensors="pt"))
gc.freeze()  # the fast exit run.py takes too
"""
_TL_FLOOR = """
import gc
import torch
from transformer_lens.model_bridge import TransformerBridge
model = TransformerBridge.boot_transformers({path!r}, device="cpu", dtype=torch.float32)
with torch.inference_mode():
    model(model.to_tokens({prompt!r}))
gc.freeze()
"""


def _wall_s(command: list[str]) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - started


def _timing(out_dir: str) -> dict[str, float]:
    with open(os.path.join(out_dir, f"output-{MODEL_NAME}.json"), encoding="utf-8") as handle:
        return json.load(handle)["timing"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per contender (median)")
    args = parser.parse_args(argv)
    from layers_core.model.loading import ensure_default_model
    from layers_core.pipeline.prompts import DEFAULT_PROMPT

    path = ensure_default_model()
    python = sys.executable
    with tempfile.TemporaryDirectory() as out_dir:
        run = [python, RUN_PY, "--quiet", "--out_dir", out_dir]
        contenders = {
            "hf_floor_s": [python, "-c", _HF_FLOOR.format(path=path, prompt=DEFAULT_PROMPT)],
            "tl_floor_s": [python, "-c", _TL_FLOOR.format(path=path, prompt=DEFAULT_PROMPT)],
            "run_no_plots_s": run + ["--no-plots"],
            "run_s": run,
        }
        walls: dict[str, list[float]] = {name: [] for name in contenders}
        splits: list[dict[str, float]] = []
        for command in contenders.values():  # warm-up: page cache, matplotlib's font cache
            _wall_s(command)
        for index in range(args.runs):
            for name, command in contenders.items():
                walls[name].append(_wall_s(command))
                if name == "run_s":
                    splits.append({**_timing(out_dir), "exit_s": walls[name][-1]})
                    splits[-1]["exit_s"] -= splits[-1]["total_s"]
            print(f"run {index + 1}/{args.runs}: "
                  + ", ".join(f"{name} {values[-1]:.2f}" for name, values in walls.items()), flush=True)
    report = {name: round(statistics.median(values), 2) for name, values in walls.items()}
    report["run_split"] = {key: round(statistics.median(split[key] for split in splits), 2)
                           for key in splits[0]}
    report["runs"] = args.runs
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
