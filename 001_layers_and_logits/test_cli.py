"""The command line: every usage error in one table, the launcher's flag round trip, and
``python -m layers_core run`` as the same CLI as run.py (from outside the repository too)."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import run

from conftest import HERE, assert_clean_failure
from layers_core.app.cli import ExperimentConfig, build_parser, child_argv, flag_of, parse_config

BATTERY = os.path.join(HERE, "facts", "capitals.jsonl")

USAGE_ERRORS = [
    (["--device", "cpu", "--answer", "Paris"], "--answer requires --prompt"),
    (["--prompt", "  ", "--answer", "x"], "must not be empty"),
    (["--copy-threshold", "1.5"], "--copy-threshold must be in (0, 1]"),
    (["--copy-threshold", "0"], "--copy-threshold must be in (0, 1]"),
    (["--norm", "bogus"], "invalid choice"),
    (["--lens", "bogus"], "invalid choice"),
    (["--lens-path", "somewhere"], "--lens-path goes with a fitted lens"),
    (["--no-control", "--control-prompt", "a", "--control-answer", "b"], "exclude each other"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--keep-runs", "-1"], "--keep-runs must be at least 0"),
    (["--shard", "0/2"], "--shard applies to a prompt set"),
    (["--prompts", BATTERY, "--shard", "0/2"], "--shard requires --out_dir"),
    (["--prompts", BATTERY, "--shard", "2/2", "--out_dir", "x"], "expected K/N with 0 <= K < N"),
    (["--prompts", BATTERY, "--resume"], "--resume requires --out_dir"),
    (["--prompts", BATTERY, "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--records"], "--records applies to a prompt set"),
    (["--prompts", BATTERY, "--prompt", "x", "--answer", "y"], "--prompts and --prompt exclude each other"),
    (["--prompts", BATTERY, "--keep-residuals"], "--prompts and --keep-residuals exclude each other"),
    (["--prompts", BATTERY, "--self-test"], "--prompts and --self-test exclude each other"),
    (["--prompts", BATTERY, "--chat"], "--prompts and --chat exclude each other"),
    (["--prompts", BATTERY, "--sublayers"], "--prompts and --sublayers exclude each other"),
    (["--device", "cpu", "--device-map", "auto"], "spreads a model over CUDA GPUs"),
    (["--max-memory", "0=10GiB"], "--max-memory goes with --device-map"),
    (["--device-map", "auto", "--max-memory", "0=70GiB,cpu=100GiB"], "GPU entries only"),
    (["--device-map", "auto", "--max-memory", "zero"], "expected GPU=SIZE"),
]


@pytest.mark.parametrize("argv,message", USAGE_ERRORS)
def test_usage_errors_exit_2_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        run.main(argv)
    captured = capsys.readouterr()
    assert_clean_failure(captured, info.value.code, 2)
    assert message in captured.err and captured.err.count("\n") == 1


# Every field child_argv forwards, each away from its default (the launcher must lose none).
NON_DEFAULT = ExperimentConfig(
    device="cpu", dtype="bfloat16", norm_strategy="none", lens="tuned", lens_path="/lenses/x",
    copy_threshold=0.75, copy_margin=0.125, keep_runs=3, fp32_unembed=True, keep_residuals=False,
    copy_entropy_fallback=False, self_test=False, quiet=True, plots=False, control=True,
    control_prompt="The capital of France is", control_answer="Paris", allow_lens_mismatch=True,
    threads=3, prompts_file=BATTERY, batch_size=4, records=True, shard="1/3", resume=True,
    out_dir="/results", prompt=ExperimentConfig().prompt, answer=ExperimentConfig().answer, chat=False)
NOT_FORWARDED = {"out_dir", "output_name"}  # the launcher passes its own --out_dir and --name
DEFAULTS = ExperimentConfig()
# what each setting needs beside it to be valid on its own (a usage rule ties them)
COMPANIONS = {
    "answer": {"prompt": "The capital of Peru is"},
    "max_memory": {"device": "cuda", "device_map": "auto"},
    "device_map": {"device": "cuda"},
    "lens_path": {"lens": "tuned"},
    "control_prompt": {"control_answer": "Paris"},
    "control_answer": {"control_prompt": "The capital of France is"},
    "batch_size": {"prompts_file": BATTERY},
    "records": {"prompts_file": BATTERY},
    "aliases": {"prompt": "The largest city of the US is", "answer": "New York"},
    "temperature": {"generate": 3},
    "seed": {"generate": 3},
    "shard": {"prompts_file": BATTERY, "out_dir": "/results"},
    "resume": {"prompts_file": BATTERY, "out_dir": "/results"},
}


def _another_value(config_field):
    """A valid value of the field other than its default."""
    flag, default = flag_of(config_field), config_field.default
    if isinstance(default, bool):
        return not default
    if flag.choices:
        return next(choice for choice in flag.choices if choice != default)
    special = {"copy_threshold": 0.75, "copy_margin": 0.125, "max_memory": "0=70GiB,1=70GiB", "shard": "1/3",
               "prompts_file": BATTERY, "track": (" Paris", " Munich"), "concepts": '{"de": ["Buch"]}',
               "lens_path": "LENS", "aliases": ("NYC", "New York City"), "temperature": 0.7}
    if config_field.name in special:
        return special[config_field.name]
    if flag.type is int:
        return (default or 1) + 2
    return "The capital of Peru is" if config_field.name != "answer" else "Lima"


@pytest.mark.parametrize("config", [
    ExperimentConfig(),
    NON_DEFAULT,
    dataclasses.replace(NON_DEFAULT, prompts_file=None, batch_size=None, records=False, shard=None,
                        resume=False, keep_residuals=True, prompt="Paris is the capital of", answer="France",
                        control=False, control_prompt=None, control_answer=None, self_test=True,
                        lens="logit", lens_path=None, threads=None, plots=True, chat=True, sublayers=True),
    dataclasses.replace(ExperimentConfig(), device="cuda", device_map="auto", max_memory="0=70GiB,1=70GiB"),
    dataclasses.replace(ExperimentConfig(), prompt="The capital of Peru is", answer=None),
], ids=["defaults", "every-flag", "single-prompt", "device-map", "no-answer"])
def test_every_forwarded_setting_survives_the_round_trip(config, tmp_path, monkeypatch):
    """``parse_config(child_argv(c))[1]`` equals ``c`` on everything ``child_argv`` forwards."""
    monkeypatch.setattr("layers_core.app.cli.check_writable_dir", lambda path: None)
    if config.lens_path is not None:  # the lens files must exist: a usage check before loading
        (tmp_path / "config.json").write_text("{}")
        (tmp_path / "params.pt").write_bytes(b"")
        config = dataclasses.replace(config, lens_path=str(tmp_path))
    argv = child_argv(config) + (["--out_dir", config.out_dir] if config.out_dir else [])
    _, parsed = parse_config(argv)
    for field in dataclasses.fields(ExperimentConfig):
        if field.name not in NOT_FORWARDED:
            assert getattr(parsed, field.name) == getattr(config, field.name), field.name


FORWARDED = [f.name for f in dataclasses.fields(ExperimentConfig) if f.name not in NOT_FORWARDED]


@pytest.mark.parametrize("name", FORWARDED)
def test_every_flag_survives_parse_child_argv_parse(name, tmp_path, monkeypatch):
    """Each setting away from its default, alone (with what a usage rule needs beside it), goes
    through ``child_argv`` and back unchanged: the launcher's children lose nothing."""
    monkeypatch.setattr("layers_core.app.cli.check_writable_dir", lambda path: None)
    config_field = next(f for f in dataclasses.fields(ExperimentConfig) if f.name == name)
    changes = {**COMPANIONS.get(name, {}), name: _another_value(config_field)}
    if changes.get("lens_path") == "LENS":  # the lens files must exist: a usage check before loading
        (tmp_path / "config.json").write_text("{}")
        (tmp_path / "params.pt").write_bytes(b"")
        changes["lens_path"] = str(tmp_path)
    config = dataclasses.replace(DEFAULTS, **changes)
    argv = child_argv(config) + (["--out_dir", config.out_dir] if config.out_dir else [])
    _, parsed = parse_config(argv)
    assert dataclasses.replace(parsed, out_dir=config.out_dir) == config


def test_every_setting_is_a_flag_and_every_flag_a_setting():
    """The parser is generated from the config: one option per field, nothing else but the model."""
    options = {action.dest for action in build_parser()._actions
               if action.option_strings and action.dest != "help"}
    assert options == {f.name for f in dataclasses.fields(ExperimentConfig)}


def test_each_help_states_the_real_default():
    """``--threads`` once said "torch's own choice" while the default was one thread per idle core:
    every option whose setting has a default value names it in its help, as the config holds it."""
    fields = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
    for action in build_parser()._actions:
        config_field = fields.get(action.dest)
        if config_field is None or isinstance(config_field.default, bool):
            continue
        text = " ".join((action.help or "").split())
        default = config_field.default
        if default in (None, ()):
            continue
        shown = "the legacy prompt" if config_field.name == "prompt" else str(default)
        assert re.search(rf"default( prompt)?:? {re.escape(shown)}\b", text), (action.dest, text)
    threads = next(a for a in build_parser()._actions if a.dest == "threads")
    assert "one per core that other processes leave idle" in " ".join(threads.help.split())


def test_python_m_layers_core_run_help_is_the_cli_without_torch():
    code = ("import runpy, sys; sys.argv = ['layers_core', 'run', '--help']\n"
            "try:\n    runpy.run_module('layers_core', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0\n"
            "assert 'torch' not in sys.modules, 'torch imported by --help'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr
    assert "Layer-by-layer logit-lens sweep" in done.stdout and "--lens" in done.stdout


def test_two_models_through_python_m_layers_core_from_outside_the_repo(tiny_dirs, tmp_path):
    """The launcher spawns ``python -m layers_core run`` children: nothing depends on the checkout's
    layout or the working directory."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "layers_core", "run", tiny_dirs["llama"], tiny_dirs["gpt2"],
                           "--device",
                           "cpu", "--out_dir", str(out), "--no-plots", "--quiet"],
                          capture_output=True, text=True, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "✅ llama: SUCCESS (exit 0)" in done.stdout and "✅ gpt2: SUCCESS (exit 0)" in done.stdout
    for name in ("llama", "gpt2"):
        document = json.loads((out / f"output-{name}.json").read_text())
        assert document["diagnostics"]["last_layer_consistency"]["passed"] is True


def test_managed_run_latest_lives_next_to_run_py_in_a_checkout():
    from layers_core.app.main import default_base_dir

    assert default_base_dir() == HERE
