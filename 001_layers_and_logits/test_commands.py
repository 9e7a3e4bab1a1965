"""The ``layers-and-logits`` command: four subcommands behind one entry, every ``--help`` without
torch, one-line usage errors naming the subcommand, and the loose scripts as thin doors to it."""

import importlib.metadata
import os
import subprocess
import sys

import pytest

from conftest import HERE
from layers_core.app import commands

HELP_WORDS = {  # a few words each subcommand's help must show
    "run": ["--prompts", "--lens", ".gguf", "gemma-3-270m", "one per core that other processes leave idle"],
    "fit": ["--kind", "(default: tuned)", "(default: 32768)", "(default: 128)", "(default: 8)"],
    "merge": ["--out", "--no-plots", "DIR"],
    "self-test": ["1e-6", "--device"],
}


def test_every_help_answers_without_importing_torch():
    """``--help`` of the command and of each subcommand, in one process that never imports torch."""
    code = ("import sys\nfrom layers_core.app.commands import main\n"
            "for argv in (['--help'], *([name, '--help'] for name in %r)):\n"
            "    assert main(argv) == 0, argv\n"
            "assert 'torch' not in sys.modules, 'torch imported by --help'\n") % (list(HELP_WORDS),)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr
    for name, words in HELP_WORDS.items():
        assert f"usage: layers-and-logits {name}" in done.stdout
        section = done.stdout.split(f"usage: layers-and-logits {name}", 1)[1]
        for word in words:
            assert word in " ".join(section.split()), (name, word)
    assert all(f"  {name}" in done.stdout.split("usage: layers-and-logits run")[0] for name in HELP_WORDS)


def test_python_m_layers_core_is_the_same_command():
    done = subprocess.run([sys.executable, "-m", "layers_core", "--version"], capture_output=True, text=True,
                          cwd="/")
    assert done.returncode == 0 and done.stdout.strip() == f"layers-and-logits {commands.__version__}"


def test_the_version_is_the_installed_distributions():
    assert importlib.metadata.version("layers-and-logits") == commands.__version__


@pytest.mark.parametrize("argv,code,message", [
    ([], 2, "usage: layers-and-logits {run,fit,merge,evaluate,serve,self-test}"),
    (["gpt2"], 2, "unknown subcommand 'gpt2' (choose from run, fit, merge, evaluate, serve, self-test); "
                  "to run the lens on a model: layers-and-logits run gpt2"),
    (["run", "--threads", "0"], 2, "layers-and-logits run: error: --threads must be at least 1"),
    (["fit", "--tokens", "10"], 2, "layers-and-logits fit: error: --tokens must be at least 1024"),
    (["merge"], 2, "layers-and-logits merge: error: the following arguments are required: DIR"),
    (["self-test", "--device", "tpu"], 2, "layers-and-logits self-test: error: argument --device"),
])
def test_usage_errors_name_the_subcommand(capsys, argv, code, message):
    assert commands.main(argv) == code
    err = capsys.readouterr().err
    assert message in err
    if argv:
        assert err.count("\n") == 1 or "usage:" in err  # argparse's own errors print the usage line first


@pytest.mark.parametrize("script,module", [("fit_lens.py", "fit_command"), ("merge.py", "merge_command"),
                                           ("kl_sanity_test.py", "self_test")])
def test_the_loose_scripts_are_thin_doors(script, module):
    """Each script only forwards to its subcommand's module: no logic of its own to drift."""
    with open(os.path.join(HERE, script), encoding="utf-8") as handle:
        source = handle.read()
    assert f"layers_core.app.{module} import main" in source and source.count("\ndef ") == 0
    done = subprocess.run([sys.executable, os.path.join(HERE, script), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and f"usage: {script}" in done.stdout
