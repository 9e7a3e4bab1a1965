"""``layers-and-logits merge``: join prompt-set results (``merge.py`` is a thin wrapper).

Shards of one run (``run --prompts F --shard K/N --out_dir D_K``) become the files an unsharded
run writes; runs of several models also give ``comparison.csv`` and ``comparison.png``. Exit 0 on
success, 1 when the inputs conflict (one line naming the conflict), 2 on bad usage. No torch.
"""

from __future__ import annotations

import argparse
import os
import sys

MERGE_PROG = "merge.py"
DESCRIPTION = "Join the shards of a prompt-set run, or compare the runs of several models"


def build_parser(prog: str = MERGE_PROG) -> argparse.ArgumentParser:
    """The parser of ``merge``."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    parser.add_argument("inputs", nargs="+", metavar="DIR", help="directories holding run results")
    parser.add_argument("--out", metavar="DIR", help="where the merged files go (default: the one input DIR, "
                        "when it holds the shard-K-of-N folders of a --shard auto run)")
    parser.add_argument("--no-plots", action="store_true", help="skip the summary and comparison PNGs")
    return parser


def main(argv: list[str] | None = None, prog: str = MERGE_PROG) -> int:
    """Parses ``DIR... [--out DIR] [--no-plots]`` and merges; returns the exit code."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.out is None:
        if len(args.inputs) != 1:
            parser.error("--out is required with several input directories")
        args.out = args.inputs[0]
    from layers_core.results.merge import MergeError, merge

    try:
        merged = merge(args.inputs, args.out, plots=not args.no_plots)
    except (MergeError, OSError, ValueError, KeyError) as error:
        print(f"❌ merge failed: {error}", file=sys.stderr)
        return 1
    for name, document in merged.items():
        print(f"✅ {name}: {document['prompt_set']['count']} prompts from "
              f"{len(document['prompt_set']['merged_from'])} director(ies)")
    if len(merged) >= 2:
        print(f"   comparison of {len(merged)} models: {os.path.join(args.out, 'comparison.csv')}")
    print(args.out)
    return 0
