"""Fit a tuned lens offline: ``python 001_layers_and_logits/fit_lens.py [MODEL] [--corpus FILE ...]
[--tokens N] [--out DIR]``.

Captures the model's residuals on training text (default: Python's own documentation, on every
machine), fits one affine translator per layer in closed form, evaluates it against the logit lens
on held-out text, and writes ``config.json`` + ``params.pt`` (the tuned-lens library's format),
``eval.json`` and ``eval.png`` into DIR (default: a per-model cache directory). The last line
printed is DIR. Exit 0 on success, 1 on failure, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

DEFAULT_TOKENS = 32_768  # training tokens; a held-out eighth is added on top
CHUNK_TOKENS = 256
EVAL_TOKENS = 2_048


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fit_lens.py", description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="hub id or local directory; none = bundled model")
    parser.add_argument("--corpus", nargs="+", metavar="FILE",
                        help="training text: .txt files, or .jsonl with a 'text' field per line "
                             "(default: Python's standard-library documentation)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="training tokens")
    parser.add_argument("--out", metavar="DIR", help="where the lens goes (default: the lens cache)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    parser.add_argument("--batch-size", type=int, default=8, help="chunks of 256 tokens per forward")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tokens < 4 * CHUNK_TOKENS:
        parser.error(f"--tokens must be at least {4 * CHUNK_TOKENS}")
    for path in args.corpus or []:
        if not os.path.isfile(path):
            parser.error(f"--corpus {path}: no such file")
    from tqdm import tqdm

    from layers_core.app.runner import prepare_runtime
    from layers_core.lens import fit as lens_fit
    from layers_core.lens import tuned as tuned_lens
    from layers_core.model.lens_model import load
    from layers_core.models import ModelLoadError
    from layers_core.results.outputs import write_json
    from layers_core.results.plots import save_figure

    prepare_runtime(args.device)
    started = time.perf_counter()
    try:
        lens_model = load(args.model, device=args.device)
    except ModelLoadError as error:
        print(f"❌ {error}", file=sys.stderr)
        return 1
    texts = tuned_lens.read_corpus(args.corpus) if args.corpus else tuned_lens.stdlib_documentation()
    tokenizer = lens_model.bridge.tokenizer
    try:
        chunks = tuned_lens.token_chunks(tokenizer, texts, CHUNK_TOKENS, args.tokens * 9 // 8)
    except ValueError as error:
        print(f"❌ {error}", file=sys.stderr)
        return 1
    train, heldout = tuned_lens.split_heldout(chunks)
    if not heldout:
        print(f"❌ the corpus holds only {len(chunks) * CHUNK_TOKENS} tokens; need at least "
              f"{8 * CHUNK_TOKENS}", file=sys.stderr)
        return 1
    out = args.out or tuned_lens.default_lens_dir(lens_model.source.clean_name)
    total = (len(train) + len(heldout)) * CHUNK_TOKENS
    with tqdm(total=total, unit="tok", unit_scale=True, desc="capture + fit", file=sys.stderr) as bar:
        lens, ridges = lens_fit.fit(lens_model, train, heldout, args.batch_size, bar.update)
    fitted_s = time.perf_counter() - started
    evaluation = heldout[: max(1, EVAL_TOKENS // CHUNK_TOKENS)]
    with tqdm(total=len(evaluation) * CHUNK_TOKENS, unit="tok", unit_scale=True, desc="evaluate",
              file=sys.stderr) as bar:
        layers = lens_fit.evaluate(lens_model, lens, evaluation, args.batch_size, bar.update)
    lens.save(out)
    report = {"model": lens_model.model_id,
              "tokens": {"train": len(train) * CHUNK_TOKENS, "heldout": len(heldout) * CHUNK_TOKENS,
                         "evaluated": len(evaluation) * CHUNK_TOKENS},
              "corpus": args.corpus or "python standard-library documentation",
              "ridge": ridges, "fit_s": round(fitted_s, 1),
              "total_s": round(time.perf_counter() - started, 1), "layers": layers}
    write_json(os.path.join(out, "eval.json"), report)
    title = f"{lens_model.source.clean_name}: tuned vs logit lens on held-out text"
    save_figure(lens_fit.eval_figure(layers, title), os.path.join(out, "eval.png"))
    mean = {kind: sum(row[kind]["kl_final_to_lens_bits"] for row in layers) / len(layers) for kind in ("logit", "tuned")}
    print(f"✅ held-out mean KL: tuned {mean['tuned']:.2f} bits/token, logit {mean['logit']:.2f} "
          f"({report['total_s']:.0f} s)")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
