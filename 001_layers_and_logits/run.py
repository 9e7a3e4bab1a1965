"""Layer-by-layer logit-lens sweep: ``python 001_layers_and_logits/run.py [MODEL ...] [flags]``.

A thin wrapper over ``layers-and-logits run`` (``layers_core.app.main``) whose managed
``run-latest/`` lives next to this file. Flags → a frozen ``ExperimentConfig`` → one call into
``layers_core`` → exit code: 0 success, 1 run or self-test failure, 2 usage error, 130
interrupted. Importing this module does nothing; torch is imported only after parsing.
``layers_core`` must be installed (``make setup`` installs the checkout with ``pip install -e .``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
RUN_BASE_DIR = HERE  # managed run-latest/ and run-*/ live next to run.py


def build_parser():
    """The argparse parser of run.py (``layers_core.app.cli.build_parser``)."""
    from layers_core.app.cli import build_parser as _build

    return _build()


def __getattr__(name: str) -> Any:
    """``run.ExperimentConfig`` and ``run.TIMING_KEYS`` for callers of this script's API."""
    if name == "ExperimentConfig":
        from layers_core.app.cli import ExperimentConfig

        return ExperimentConfig
    if name == "TIMING_KEYS":
        from layers_core.results.document import TIMING_KEYS

        return TIMING_KEYS
    raise AttributeError(f"module 'run' has no attribute {name!r}")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    from layers_core.app.main import main as cli_main

    return cli_main(argv, RUN_BASE_DIR)


if __name__ == "__main__":
    try:
        import layers_core  # noqa: F401
    except ModuleNotFoundError:
        sys.exit("run.py: layers_core is not installed in this Python; run `make setup` "
                 "(or `pip install -e .` from the repository root)")
    from layers_core.app.main import script_main

    script_main(RUN_BASE_DIR)
