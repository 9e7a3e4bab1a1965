"""MkDocs hook: pages that cannot drift from the code are generated while the site builds.

``{{ flags: run }}`` (likewise ``fit``, ``merge``, ``self-test``) becomes that subcommand's flag
table, read from the very parser the command uses; ``{{ exit-codes }}`` the exit codes from
``layers_core.app.cli``; ``{{ include: CHANGELOG.md }}`` a file of the repository. Nothing here
imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MARKER = re.compile(r"\{\{ (flags|include): ([\w.\-]+) \}\}|\{\{ exit-codes \}\}")


def _cell(text: str) -> str:
    """One table cell: one line, pipes escaped, ``<name>`` shown as text rather than read as HTML."""
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _default(action: argparse.Action, declared: dict) -> str:
    """The default a user gets: the config field's where the flag sets one (``run``), else argparse's."""
    value = declared.get(action.dest, action.default)
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off"  # a switch is not given unless you give it
    if value in (None, (), argparse.SUPPRESS):
        return "–"
    text = str(value)
    return "the legacy prompt" if len(text) > 40 else f"`{text}`"


def flag_table(subcommand: str) -> str:
    """The subcommand's arguments as a markdown table: flag (with its choices), default, help."""
    from layers_core.app.cli import ExperimentConfig
    from layers_core.app.commands import PROG, SUBCOMMANDS

    parser = importlib.import_module(SUBCOMMANDS[subcommand].module).build_parser(f"{PROG} {subcommand}")
    declared = {f.name: f.default for f in dataclasses.fields(ExperimentConfig)} if subcommand == "run" else {}
    rows = ["| argument | default | meaning |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = ", ".join(f"`{flag}`" for flag in action.option_strings) or f"`{action.metavar or action.dest}`"
        if action.choices:
            name += " {" + ",".join(map(str, action.choices)) + "}"
        help_text = (action.help or "") % {"default": action.default}
        rows.append(f"| {_cell(name)} | {_default(action, declared)} | {_cell(help_text)} |")
    return "\n".join(rows)


def exit_codes() -> str:
    """The exit codes every subcommand shares."""
    from layers_core.app import cli

    meaning = {cli.EXIT_OK: "success", cli.EXIT_FAILED: "the run, a model or the self-test failed",
               cli.EXIT_USAGE: "usage error (one line, no traceback, nothing written)",
               cli.EXIT_INTERRUPTED: "interrupted (Ctrl-C)", cli.EXIT_TERMINATED: "terminated (SIGTERM)"}
    rows = [f"| {code} | {text} |" for code, text in meaning.items()]
    return "\n".join(["| exit | meaning |", "|---|---|", *rows])


def _replace(match: re.Match) -> str:
    kind, argument = match.group(1), match.group(2)
    if kind == "flags":
        return flag_table(argument)
    if kind == "include":
        with open(os.path.join(ROOT, argument), encoding="utf-8") as handle:
            return handle.read()
    return exit_codes()


def on_page_markdown(markdown: str, page, config, files) -> str:
    """MkDocs event: expands the markers of one page."""
    return _MARKER.sub(_replace, markdown)
