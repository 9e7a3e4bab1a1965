"""Standalone last-layer sanity check: ``python 001_layers_and_logits/kl_sanity_test.py [MODEL]``.

The same gate as ``run.py --self-test``: in float32, the lens at the last layer
(``ln_final`` → unembedding → the model's post-unembed transform) must reproduce the model's own
last-position distribution within 1e-6 bits of KL. Exit 0 on pass, 1 on failure, 2 on bad usage.
Imports only from ``layers_core``; writes nothing.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Parses ``[MODEL] [--device D]``, runs the gate and prints the one-line verdict."""
    parser = argparse.ArgumentParser(prog="kl_sanity_test.py", description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="hub id or local directory; none = bundled model")
    parser.add_argument("--device", default="cpu", choices=["auto", "cuda", "mps", "cpu"])
    args = parser.parse_args(argv)
    import torch

    from layers_core.app.runner import prepare_runtime
    from layers_core.model.lens_model import load
    from layers_core.models import ModelLoadError
    from layers_core.pipeline.prompts import DEFAULT_ANSWER, DEFAULT_PROMPT
    from layers_core.pipeline.sweep import self_test, self_test_verdict

    prepare_runtime(args.device)  # seeded and deterministic, exactly like run.py
    try:
        lens_model = load(args.model, device=args.device, dtype=torch.float32)
    except ModelLoadError as error:
        print(f"❌ {error}", file=sys.stderr)
        return 1
    consistency = self_test(lens_model.bridge, DEFAULT_PROMPT, DEFAULT_ANSWER, lens_model.unembed)
    passed, line = self_test_verdict(consistency)
    print(line)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
