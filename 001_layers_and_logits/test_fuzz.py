"""Property-based fuzz tests (hypothesis) of the readers a user's files reach first: the prompt-set
JSONL and a tuned lens's config.json. Any bytes give a valid result or one line naming the file,
never a traceback."""

import json
import os

import pytest
import run
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from layers_core.lens.tuned import TunedLens, read_lens_config
from layers_core.results.prompt_sets import load_prompt_set

KEYS = ["prompt", "answer", "id", "control_prompt", "control_answer", "promt", "control_promt", "x"]
SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner,
                                                                                                max_size=3),
                           max_leaves=8)
LENS_KEYS = ["num_hidden_layers", "d_model", "base_model_name_or_path", "unembed_hash", "config_hash", "lens_type"]
RECORDS = st.dictionaries(st.sampled_from(KEYS), st.text(max_size=12) | JSON_VALUES, max_size=5)
LINES = st.lists(st.one_of(RECORDS.map(json.dumps), st.text(max_size=20), st.just(""), st.just("[" * 5000)),
                 min_size=0, max_size=6)
FILES = st.one_of(st.binary(max_size=300), LINES.map(lambda lines: "\n".join(lines).encode()),
                  LINES.map(lambda lines: "\r\n".join(lines).encode("utf-16")))
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _one_line(error, path):
    message = str(error)
    assert "\n" not in message and str(path) in message, message


def _read_or_refuse(reader, path, data):
    """``reader(path)`` of a file holding ``data``, or None after checking it refused in one line
    naming the file (any other exception fails the test)."""
    path.write_bytes(data)
    try:
        return reader(str(path))
    except ValueError as error:
        _one_line(error, path)
        return None


@FUZZ
@given(data=FILES)
def test_any_bytes_are_a_prompt_set_or_one_line_naming_the_file(tmp_path, data):
    items = _read_or_refuse(load_prompt_set, tmp_path / "facts.jsonl", data)
    if items is None:
        return
    assert items and all(item.prompt.strip() and item.answer.strip() for item in items)
    assert len({item.prompt_id for item in items}) == len(items)


@FUZZ
@given(data=st.one_of(st.binary(max_size=200), JSON_VALUES.map(lambda v: json.dumps(v).encode()),
                      st.dictionaries(st.sampled_from(LENS_KEYS), JSON_VALUES, max_size=4).map(
                          lambda d: json.dumps(d).encode())))
def test_any_lens_config_is_read_or_refused_in_one_line(tmp_path, data):
    config = _read_or_refuse(read_lens_config, tmp_path / "config.json", data)
    assert config is None or isinstance(config, dict)


@pytest.fixture(scope="module")
def saved_lens(tmp_path_factory):
    import torch

    directory = tmp_path_factory.mktemp("lens")
    TunedLens(torch.zeros(2, 4, 4), torch.zeros(2, 4), "tiny").save(str(directory))
    return directory


@FUZZ
@example(config={"num_hidden_layers": 10**18})  # found by this test: a list of 10**18 names, then the OOM killer
@given(config=st.dictionaries(st.sampled_from(LENS_KEYS), JSON_VALUES, max_size=5))
def test_any_config_beside_a_valid_lens_loads_or_is_refused_in_one_line(saved_lens, tmp_path, config):
    import shutil

    directory = tmp_path / "lens"
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(saved_lens, directory)
    (directory / "config.json").write_text(json.dumps({**json.loads((saved_lens / "config.json").read_text()),
                                                       **config}))
    try:
        lens = TunedLens.load(str(directory))
    except ValueError as error:
        _one_line(error, directory)
        return
    assert lens.n_translators >= 1


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=FILES)
def test_run_py_on_any_prompt_file_runs_or_fails_in_one_line(tiny_dirs, tmp_path, capsys, data):
    path = tmp_path / "facts.jsonl"
    path.write_bytes(data)
    out = tmp_path / "out"
    try:
        code = run.main(["--device", "cpu", tiny_dirs["llama"], "--prompts", str(path), "--out_dir", str(out),
                         "--quiet", "--no-plots", "--no-control"])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if code == 0:
        assert (out / "output-llama-summary.csv").exists()
        return
    assert code == 2 and len([line for line in captured.err.splitlines() if line.strip()]) == 1
    assert str(path) in captured.err
    assert not os.path.exists(out / "output-llama.json")
