"""``layers-and-logits self-test``: the last-layer gate alone (``kl_sanity_test.py`` is a thin wrapper).

The same gate as ``run --self-test``: in float32, the lens at the last layer (``ln_final`` →
unembedding → the model's post-unembed transform) must reproduce the model's own last-position
distribution within 1e-6 bits of KL. Exit 0 on pass, 1 on failure, 2 on bad usage; writes
nothing. For a model split over GPUs use ``run --self-test --device-map auto``.
"""

from __future__ import annotations

import argparse
import sys

from layers_core.app.cli import DEVICE_CHOICES, ONE_MODEL_HELP

SELF_TEST_PROG = "kl_sanity_test.py"
DESCRIPTION = "Check that the last-layer lens reproduces the model's own logits (KL <= 1e-6 bits, float32)"


def build_parser(prog: str = SELF_TEST_PROG) -> argparse.ArgumentParser:
    """The parser of ``self-test``."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    parser.add_argument("model", nargs="?", help=ONE_MODEL_HELP)
    parser.add_argument("--device", default="cpu", choices=DEVICE_CHOICES,
                        help="compute device (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None, prog: str = SELF_TEST_PROG) -> int:
    """Parses ``[MODEL] [--device D]``, runs the gate and prints the one-line verdict."""
    args = build_parser(prog).parse_args(argv)
    import torch

    from layers_core.app.runner import prepare_runtime
    from layers_core.model.lens_model import load
    from layers_core.model.loading import ModelLoadError
    from layers_core.pipeline.prompts import DEFAULT_ANSWER, DEFAULT_PROMPT
    from layers_core.pipeline.sweep import self_test, self_test_verdict

    prepare_runtime(args.device)  # seeded and deterministic, exactly like run
    try:
        lm = load(args.model, device=args.device, dtype=torch.float32)
    except ModelLoadError as error:
        print(f"❌ {error}", file=sys.stderr)
        return 1
    consistency = self_test(lm.bridge, DEFAULT_PROMPT, DEFAULT_ANSWER, lm.unembed)
    passed, line = self_test_verdict(consistency)
    print(line)
    return 0 if passed else 1
