"""``layers-and-logits`` (and ``python -m layers_core``): one command, six subcommands.

    layers-and-logits run [MODEL ...] [flags]       the logit-lens sweep (run.py's flags)
    layers-and-logits fit [MODEL] [--kind ...]      fit a tuned or Jacobian lens (fit_lens.py)
    layers-and-logits merge DIR ... [--out DIR]     join shards, compare models (merge.py)
    layers-and-logits evaluate [MODEL] [--corpus F] every lens scored on a corpus, layer by layer
    layers-and-logits serve [MODEL] [--port N]      a live explorer in the browser (token-protected)
    layers-and-logits self-test [MODEL]             the last-layer gate alone (kl_sanity_test.py)

Each subcommand is a module with ``build_parser(prog)`` and ``main(argv, prog) -> int``, imported
only when chosen; nothing here imports torch, so every ``--help`` answers at once.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import NoReturn

from layers_core import __version__
from layers_core.app.cli import EXIT_USAGE

PROG = "layers-and-logits"


@dataclass(frozen=True)
class Subcommand:
    """One subcommand: the module that implements it and one line of help."""

    module: str
    summary: str


SUBCOMMANDS: dict[str, Subcommand] = {
    "run": Subcommand("layers_core.app.main", "the logit lens over every layer of a model (the main job)"),
    "fit": Subcommand("layers_core.app.fit_command", "fit a tuned or Jacobian lens offline and evaluate it"),
    "merge": Subcommand("layers_core.app.merge_command", "join the shards of a prompt set; compare models"),
    "evaluate": Subcommand("layers_core.app.evaluate_command", "score every lens on a corpus, layer by layer"),
    "serve": Subcommand("layers_core.app.serve_command",
                         "a live explorer in the browser: type prompts, read every lens"),
    "self-test": Subcommand("layers_core.app.self_test", "check that the last-layer lens reproduces the model"),
}


def usage() -> str:
    """The top-level help: the subcommands, one line each."""
    width = max(map(len, SUBCOMMANDS))
    lines = [f"usage: {PROG} {{{','.join(SUBCOMMANDS)}}} [args ...]", "",
             "A logit lens for every layer of a causal LM.", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {each.summary}" for name, each in SUBCOMMANDS.items()]
    lines += ["", f"`{PROG} SUBCOMMAND --help` lists a subcommand's flags; `{PROG} --version` the version."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatches ``argv`` (default ``sys.argv[1:]``) to its subcommand; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else EXIT_USAGE
    if argv[0] == "--version":
        print(f"{PROG} {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"{PROG}: error: unknown subcommand {name!r} (choose from {', '.join(SUBCOMMANDS)}); "
              f"to run the lens on a model: {PROG} run {name}", file=sys.stderr)
        return EXIT_USAGE
    module = importlib.import_module(SUBCOMMANDS[name].module)
    try:
        return module.main(rest, prog=f"{PROG} {name}")
    except SystemExit as done:  # argparse's --help (0) and usage errors (2)
        return done.code if isinstance(done.code, int) else EXIT_USAGE


def script_main() -> NoReturn:
    """The console script's entry. ``run`` goes through ``app.main.script_main`` (the collector
    paused through start-up, no interpreter teardown), as ``run.py`` does."""
    argv = sys.argv[1:]
    if argv and argv[0] == "run":
        from layers_core.app.main import script_main as run_script_main

        run_script_main(argv=argv[1:], prog=f"{PROG} run")
    sys.exit(main(argv))
