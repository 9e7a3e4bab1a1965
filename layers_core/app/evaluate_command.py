"""``layers-and-logits evaluate``: every lens scored on a corpus, layer by layer (``lc.evaluate``).

Reads ``--corpus`` files (plain text, or ``.jsonl`` with a ``text`` field per line; default:
Python's own documentation, on every machine), cuts them into chunks of ``--max-seq-len`` tokens
and writes ``output-<name>-eval.csv``, ``.json`` (with the corpus's sha256 and token count) and
``.png`` into ``--out_dir`` (default ``eval-<name>``). Exit 0 on success, 1 on failure, 2 on bad
usage; nothing here imports torch before the flags are checked.
"""

from __future__ import annotations

import argparse
import os
import sys

from layers_core.app.cli import DEVICE_CHOICES, ONE_MODEL_HELP, OneLineParser

EVALUATE_PROG = "layers-and-logits evaluate"
DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_TOKENS = 512, 65_536  # lc.evaluate's defaults (test_evaluate checks they agree)
DESCRIPTION = "Score every lens (final, arch, none, fitted ones) on a corpus: bits per token per layer"


def build_parser(prog: str = EVALUATE_PROG) -> argparse.ArgumentParser:
    """The parser of ``evaluate``; every default is shown in ``--help``."""
    parser = OneLineParser(prog=prog, description=DESCRIPTION)  # usage errors: one line, exit 2
    parser.add_argument("model", nargs="?", help=ONE_MODEL_HELP)
    parser.add_argument("--corpus", nargs="+", metavar="FILE",
                        help="text to score: .txt files, or .jsonl with a 'text' field per line "
                             "(default: Python's standard-library documentation)")
    parser.add_argument("--lens", nargs="+", metavar="NAME", dest="lenses",
                        help="lenses to score: final, arch, none, tuned, jacobian (default: the three logit "
                             "lenses and every lens fitted for the model)")
    parser.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN,
                        help="tokens per chunk (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help="tokens of the corpus to score at most (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="chunks per forward (default: %(default)s)")
    parser.add_argument("--out_dir", metavar="DIR", help="where the files go (default: eval-<name>)")
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                        help="compute device (default: %(default)s = cuda, then mps, then cpu)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG")
    return parser


def _usage_error(args: argparse.Namespace) -> str | None:
    from layers_core.lens.views import LENS_CHOICES, NORM_VIEWS

    for flag, value, least in (("--max-seq-len", args.max_seq_len, 3), ("--max-tokens", args.max_tokens, 3),
                               ("--batch-size", args.batch_size, 1)):
        if value < least:
            return f"{flag} must be at least {least}, got {value}"
    known = set(NORM_VIEWS) | set(LENS_CHOICES[1:])
    for name in args.lenses or []:
        if name not in known:
            return f"--lens {name}: expected one of {', '.join(sorted(known))}"
    for path in args.corpus or []:
        if not os.path.isfile(path):
            return f"--corpus {path}: no such file"
    return None


def main(argv: list[str] | None = None, prog: str = EVALUATE_PROG) -> int:
    """Parses the flags, scores the lenses and writes the files; returns the exit code."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    problem = _usage_error(args)
    if problem:
        parser.error(problem)
    from tqdm import tqdm

    from layers_core.api.evaluate import evaluate
    from layers_core.app.runner import prepare_runtime
    from layers_core.lens import tuned as tuned_lens
    from layers_core.model.lens_model import load
    from layers_core.model.loading import ModelLoadError

    prepare_runtime(args.device)
    try:
        lm = load(args.model, device=args.device)
        texts = tuned_lens.read_corpus(args.corpus) if args.corpus else tuned_lens.stdlib_documentation()
        with tqdm(total=args.max_tokens, unit="tok", unit_scale=True, desc="evaluate", file=sys.stderr) as bar:
            result = evaluate(lm, texts, lenses=args.lenses, max_seq_len=args.max_seq_len,
                              max_tokens=args.max_tokens, batch_size=args.batch_size, progress=bar.update)
    except (ModelLoadError, ValueError, OSError) as error:
        print(f"❌ {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    result.corpus["files"] = list(args.corpus or ["python standard-library documentation"])
    out = args.out_dir or f"eval-{lm.source.clean_name}"
    paths = result.save(out, plots=args.plots)
    last = result.table[result.table.layer == result.table.layer.max()]
    summary = ", ".join(f"{row.lens} {row.ce_bits:.2f}" for row in last.itertuples())
    print(f"✅ {result.corpus['tokens']:,} tokens; last-layer cross-entropy (bits/token): {summary}")
    print(paths["csv"])
    return 0
