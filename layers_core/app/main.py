"""The command line's entry: flags → a frozen config → one model in-process, or the launcher for
several → exit code (0 success, 1 run or self-test failure, 2 usage error, 130 interrupted).

``run.py`` and ``layers-and-logits run`` (``python -m layers_core run``) both call ``main``;
nothing here imports torch before the flags are parsed, so ``--help`` and usage errors stay fast.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from typing import NoReturn

from layers_core.app import collector
from layers_core.app.cli import EXIT_INTERRUPTED, EXIT_TERMINATED, RUN_PROG, build_parser, parse_config
from layers_core.errors import Terminated

__all__ = ["build_parser", "main", "script_main", "default_base_dir"]  # build_parser: the run subcommand's

SCRIPT_DIR_NAME = "001_layers_and_logits"


def default_base_dir() -> str:
    """Where managed ``run-latest/`` lives: next to ``run.py`` when ``layers_core`` sits in a
    checkout (an editable install included), else the current working directory."""
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script_dir = os.path.join(checkout, SCRIPT_DIR_NAME)
    return script_dir if os.path.isfile(os.path.join(script_dir, "run.py")) else os.getcwd()


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def script_main(base_dir: str | None = None, argv: list[str] | None = None, prog: str = RUN_PROG) -> NoReturn:
    """The process entry of ``run.py`` and ``layers-and-logits run``: ``main`` with the garbage
    collector paused through start-up (``collector``), then exit with its code, without the
    interpreter's teardown."""
    collector.pause()
    exit_code = main(argv, base_dir=base_dir, prog=prog)
    # Everything the run wrote is closed. The interpreter's teardown would now destroy the
    # millions of objects of torch, transformers and TransformerLens one by one (≈ 0.2 s here);
    # the OS frees them at once. The exit handlers still run (multiprocessing's, logging's).
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def main(argv: list[str] | None = None, base_dir: str | None = None, prog: str = RUN_PROG) -> int:
    """Parses ``argv`` (default ``sys.argv[1:]``) and runs the invocation; returns the exit code.

    Ctrl-C ends it with one line (``interrupted``), exit 130; SIGTERM likewise (``terminated``),
    exit 143: checkpoints kept, no staging directory left, ``run-latest/`` untouched.
    """
    models, config = parse_config(argv, prog)
    base_dir = base_dir or default_base_dir()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        if len(models) >= 2:
            from layers_core.app.launcher import launch

            return launch(models, config, base_dir)
        from layers_core.app.runner import run_in_process

        return run_in_process(models[0] if models else None, config, base_dir)
    except Terminated:
        print("terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
