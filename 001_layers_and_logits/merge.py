"""Join prompt-set results: ``python 001_layers_and_logits/merge.py DIR... --out DIR``.

Shards of one run (``run.py --prompts F --shard K/N --out_dir D_K``) become the files an unsharded
run writes; runs of several models also give ``comparison.csv`` and ``comparison.png``. Exit 0 on
success, 1 when the inputs conflict (one line naming the conflict), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    """Parses ``DIR... [--out DIR] [--no-plots]`` and merges; returns the exit code."""
    parser = argparse.ArgumentParser(prog="merge.py", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", metavar="DIR", help="directories holding run.py results")
    parser.add_argument("--out", metavar="DIR", help="where the merged files go (default: the one input DIR, "
                        "when it holds the shard-K-of-N folders of a --shard auto run)")
    parser.add_argument("--no-plots", action="store_true", help="skip the summary and comparison PNGs")
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


if __name__ == "__main__":
    sys.exit(main())
