"""``layers-and-logits fit``: fit a lens offline (``fit_lens.py`` is a thin wrapper).

``--kind tuned`` (default) captures the model's residuals on training text (default: Python's own
documentation, on every machine), fits one affine translator per layer in closed form and writes
``config.json`` + ``params.pt`` (the tuned-lens library's format). ``--kind jacobian`` fits
TransformerLens's ``JacobianLens`` on ``--prompts`` prompts of ``--max-seq-len`` tokens from the
same corpus and writes ``<model>_jacobian_lens.pt`` (the reference artifact format, float16).
Either is then evaluated against the logit lens on held-out text (``eval.json``, ``eval.png``).
Everything goes into DIR (default: a per-model cache directory); the last line printed is DIR.
Exit 0 on success, 1 on failure, 2 on bad usage. Nothing here imports torch before parsing.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time

from layers_core.app.cli import DEVICE_CHOICES, ONE_MODEL_HELP

DEFAULT_TOKENS = 32_768  # tuned lens: training tokens; a held-out eighth is added on top
DEFAULT_PROMPTS = 100  # Jacobian lens: the reference reports fits usable from ~100 prompts of 128 tokens
DEFAULT_MAX_SEQ_LEN = 128
DEFAULT_DIM_BATCH = 8  # output dimensions per backward pass (memory × this, same FLOPs)
MIN_SEQ_LEN = 18  # JacobianLens.fit skips the first 16 positions and the last: 18 leaves one
CHUNK_TOKENS = 256


FIT_PROG = "fit_lens.py"
DESCRIPTION = "Fit a tuned or Jacobian lens offline and evaluate it against the logit lens on held-out text"


def build_parser(prog: str = FIT_PROG) -> argparse.ArgumentParser:
    """The parser of ``fit``; every default is shown in ``--help``."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    parser.add_argument("model", nargs="?", help=ONE_MODEL_HELP)
    parser.add_argument("--kind", choices=("tuned", "jacobian"), default="tuned",
                        help="which lens to fit (default: %(default)s)")
    parser.add_argument("--corpus", nargs="+", metavar="FILE",
                        help="training text: .txt files, or .jsonl with a 'text' field per line "
                             "(default: Python's standard-library documentation)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                        help="tuned: training tokens (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=DEFAULT_PROMPTS,
                        help="jacobian: prompts to average (default: %(default)s)")
    parser.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN,
                        help="jacobian: tokens per prompt (default: %(default)s)")
    parser.add_argument("--dim-batch", type=int, default=DEFAULT_DIM_BATCH,
                        help="jacobian: output dimensions per backward pass (default: %(default)s)")
    parser.add_argument("--out", metavar="DIR", help="where the lens goes (default: the lens cache)")
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                        help="compute device (default: %(default)s = cuda, then mps, then cpu)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="chunks of 256 tokens per forward (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None, prog: str = FIT_PROG) -> int:
    """Parses the flags, fits and evaluates the lens; returns the exit code."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.tokens < 4 * CHUNK_TOKENS:
        parser.error(f"--tokens must be at least {4 * CHUNK_TOKENS}")
    for flag, value, least in (("--prompts", args.prompts, 1), ("--max-seq-len", args.max_seq_len, MIN_SEQ_LEN),
                               ("--dim-batch", args.dim_batch, 1)):
        if value < least:
            parser.error(f"{flag} must be at least {least}, got {value}")
    for path in args.corpus or []:
        if not os.path.isfile(path):
            parser.error(f"--corpus {path}: no such file")
    from tqdm import tqdm

    from layers_core.app.runner import prepare_runtime
    from layers_core.lens import tuned as tuned_lens
    from layers_core.model.lens_model import load
    from layers_core.model.loading import ModelLoadError
    from layers_core.pipeline import fit as lens_fit
    from layers_core.results.outputs import write_json
    from layers_core.results.plots import lens_eval_figure, save_figure

    prepare_runtime(args.device)
    started = time.perf_counter()
    try:
        lm = load(args.model, device=args.device)
    except ModelLoadError as error:
        print(f"❌ {error}", file=sys.stderr)
        return 1
    texts = tuned_lens.read_corpus(args.corpus) if args.corpus else tuned_lens.stdlib_documentation()
    fit = _fit_jacobian if args.kind == "jacobian" else _fit_tuned
    try:
        lens, evaluation, out, report = fit(args, lm, texts)
    except ValueError as error:
        print(f"❌ {error}", file=sys.stderr)
        return 1
    fitted_s = time.perf_counter() - started
    layers = None
    for each in [lens, *_other_fitted_lenses(lm, args.kind)]:
        with tqdm(total=len(evaluation) * len(evaluation[0]), unit="tok", unit_scale=True,
                  desc=f"evaluate {each.name}", file=sys.stderr) as bar:
            rows = lens_fit.evaluate(lm, each, evaluation, args.batch_size, bar.update)
        layers = rows if layers is None else [{**row, each.name: new[each.name]} for row, new in zip(layers, rows)]
    report = {"model": lm.model_id, "kind": args.kind, **report,
              "corpus": args.corpus or "python standard-library documentation",
              "fit_s": round(fitted_s, 1), "total_s": round(time.perf_counter() - started, 1), "layers": layers}
    report["tokens"]["evaluated"] = len(evaluation) * len(evaluation[0])
    report["heldout"] = {"text": f"the corpus's first {report['tokens']['evaluated']} tokens, used by no fit",
                         "sha256": hashlib.sha256(json.dumps(evaluation).encode()).hexdigest()}
    write_json(os.path.join(out, "eval.json"), report)
    title = f"{lm.source.clean_name}: {args.kind} vs logit lens on held-out text"
    save_figure(lens_eval_figure(layers, title), os.path.join(out, "eval.png"))
    mean = {kind: sum(row[kind]["kl_final_to_lens_bits"] for row in layers) / len(layers)
            for kind in ("logit", args.kind)}
    print(f"✅ held-out mean KL: {args.kind} {mean[args.kind]:.2f} bits/token, logit {mean['logit']:.2f} "
          f"({report['total_s']:.0f} s)")
    print(out)
    return 0


def _other_fitted_lenses(lm, kind: str) -> list:
    """The model's other fitted lens, where one is in its lens cache: eval.json compares it too."""
    from layers_core.api.prompt import cached_fitted_lenses

    def say(name: str, directory: str, error: Exception) -> None:
        print(f"⚠️  the {name} lens in the cache is left out of eval.json: {error}", file=sys.stderr)

    return list(cached_fitted_lenses(lm, (kind,), left_out=say).values())


def _fit_tuned(args, lm, texts):
    """(the tuned lens, the held-out chunks to evaluate on, DIR, eval.json facts), the lens saved.
    It trains on the tokens after the held-out text; every eighth of its chunks validates the
    ridge."""
    from tqdm import tqdm

    from layers_core.lens import tuned as tuned_lens
    from layers_core.pipeline import fit as lens_fit

    heldout, stream = lens_fit.evaluation_split(lm.bridge.tokenizer, texts)
    wanted = max(args.tokens * 9 // 8, 8 * CHUNK_TOKENS)  # a validation eighth: at least one chunk of eight
    chunks = tuned_lens.take_chunks(lm.bridge.tokenizer, stream, CHUNK_TOKENS, wanted)
    train, validation = tuned_lens.split_heldout(chunks)
    if not validation:
        raise ValueError(f"the corpus holds only {len(chunks) * CHUNK_TOKENS} tokens after the held-out text; "
                         f"need at least {8 * CHUNK_TOKENS}")
    out = args.out or tuned_lens.default_lens_dir(lm.source.clean_name)
    total = (len(train) + len(validation)) * CHUNK_TOKENS
    with tqdm(total=total, unit="tok", unit_scale=True, desc="capture + fit", file=sys.stderr) as bar:
        lens, ridges = lens_fit.fit(lm, train, validation, args.batch_size, bar.update)
    lens.save(out)
    facts = {"tokens": {"train": len(train) * CHUNK_TOKENS, "validation": len(validation) * CHUNK_TOKENS},
             "ridge": ridges}
    return lens.bind(lm.bridge), heldout, out, facts


def _fit_jacobian(args, lm, texts):
    """(the Jacobian lens, the held-out chunks to evaluate on, DIR, eval.json facts), the
    artifact saved. TransformerLens's ``JacobianLens.fit`` does the fitting (its progress bar
    shows the time left) on prompts after the held-out text; the artifact also records this
    project's model fingerprint."""
    from layers_core.lens import jacobian
    from layers_core.pipeline.fit import evaluation_split, fit_jacobian
    from layers_core.run_dir import atomic_write

    length = args.max_seq_len
    heldout, stream = evaluation_split(lm.bridge.tokenizer, texts)
    prompts = jacobian.fit_prompts(lm.bridge.tokenizer, stream, args.prompts, length)
    corpus = ",".join(args.corpus) if args.corpus else "python standard-library documentation"
    lens = fit_jacobian(lm, prompts, corpus, args.dim_batch, length)
    out = args.out or jacobian.default_lens_dir(lm.source.clean_name)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, jacobian.artifact_name(lm.source.clean_name))
    buffer = io.BytesIO()
    lens.save(buffer)
    atomic_write(path, buffer.getvalue())
    reader = jacobian.JacobianLensReader.load(path).bind(lm.bridge)
    facts = {"tokens": {"train": lens.n_prompts * length}, "prompts": lens.n_prompts, "max_seq_len": length,
             "dim_batch": args.dim_batch, "artifact": path, "storage_dtype": "float16"}
    return reader, heldout, out, facts

