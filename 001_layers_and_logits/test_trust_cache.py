"""Trust, round 4 (#31): the model cache is never used once it no longer matches what was
converted, GGUF files are read once, and a killed conversion leaves nothing behind."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import run

from conftest import assert_clean_failure
from layers_core.model import gguf_models
from layers_core.model.loading import ModelLoadError, load_model, resolve_model_source
from layers_core.run_dir import host_name

BUNDLED = gguf_models.PACKAGED_MODELS["SmolLM2-135M-Instruct"]


@pytest.fixture
def cache_copy(bundled_model_dir, tmp_path):
    """A model cache holding a copy of the converted bundled model (a copy: it gets damaged)."""
    root = tmp_path / "cache"
    shutil.copytree(bundled_model_dir, root / BUNDLED.cache_subdir, copy_function=shutil.copy2)
    return root


def _overwrite_in_place(path, offset, length):
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(bytes(length))


def test_a_converted_entry_records_every_file(bundled_model_dir, tmp_path):
    manifest = json.loads((open(os.path.join(bundled_model_dir, gguf_models.CACHE_MANIFEST)).read()))
    files = manifest["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    weights = os.path.join(bundled_model_dir, "model.safetensors")
    assert files["model.safetensors"]["size"] == os.path.getsize(weights)
    assert manifest["source_sha256"] == gguf_models.cached_sha256(BUNDLED.locate(BUNDLED, ""), str(tmp_path))
    assert gguf_models.cache_problem(bundled_model_dir) is None


def test_zeros_written_in_place_or_a_truncation_are_found(cache_copy):
    """64 MiB of zeros in place gave exit 0, ✅, L_semantic None instead of 30 and another top-1 at
    9 of 31 layers; a truncated file failed without naming it, and nothing repaired it."""
    entry = cache_copy / BUNDLED.cache_subdir
    weights = entry / "model.safetensors"
    stat = os.stat(weights)
    _overwrite_in_place(weights, 1 << 20, 1 << 20)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert gguf_models.cache_problem(str(entry)) == ("model.safetensors was changed after it was converted "
                                                     "(its sha256 differs)")
    os.truncate(weights, stat.st_size - 4096)
    assert gguf_models.cache_problem(str(entry)) == (f"model.safetensors is {stat.st_size - 4096} bytes, "
                                                     f"{stat.st_size} when converted")


def test_a_copy_with_new_mtimes_but_the_same_bytes_is_used_and_remembered(cache_copy, monkeypatch):
    entry = cache_copy / BUNDLED.cache_subdir
    for name in os.listdir(entry):
        os.utime(entry / name)  # a touch: new mtime, same bytes
    assert gguf_models.cache_problem(str(entry)) is None
    monkeypatch.setattr(gguf_models, "sha256_of", lambda path: pytest.fail(f"hashed {path} again"))
    assert gguf_models.cache_problem(str(entry)) is None


def test_a_damaged_entry_is_converted_again_and_the_run_is_right(cache_copy, tmp_path, capsys, monkeypatch):
    entry = cache_copy / BUNDLED.cache_subdir
    recorded = json.loads((entry / gguf_models.CACHE_MANIFEST).read_text())["files"]["model.safetensors"]
    _overwrite_in_place(entry / "model.safetensors", 1 << 20, 64 << 20)
    monkeypatch.setenv("LAYERS_CACHE_DIR", str(cache_copy))
    assert run.main(["--device", "cpu", "--out_dir", str(tmp_path / "out"), "--quiet", "--no-plots",
                     "--no-control"]) == 0
    err = capsys.readouterr().err
    assert f"⚠️  model cache entry {entry}: model.safetensors was changed after it was converted" in err
    assert "converting it again" in err
    document = json.loads((tmp_path / "out" / "output-SmolLM2-135M-Instruct.json").read_text())
    assert document["diagnostics"]["L_semantic"] == 30
    again = json.loads((entry / gguf_models.CACHE_MANIFEST).read_text())["files"]["model.safetensors"]
    assert again["sha256"] == recorded["sha256"]  # the conversion is deterministic
    assert sorted(name for name in os.listdir(cache_copy) if name.startswith(".")) == []


def test_the_bundled_models_gguf_given_by_path_reuses_its_conversion(bundled_model_dir, monkeypatch):
    """It was converted a second time (27 s, 517 MB more)."""
    root = os.path.dirname(bundled_model_dir)
    gguf_path = BUNDLED.locate(BUNDLED, root)
    monkeypatch.setattr(gguf_models, "dequantise", lambda *a: pytest.fail("converted again"))
    directory, provenance = gguf_models.ensure_gguf(gguf_path, root)
    assert directory == bundled_model_dir
    assert provenance["gguf_quantization"] == "MOSTLY_Q4_1" and provenance["gguf_architecture"] == "llama"


def test_a_gguf_header_is_parsed_once_per_file_version(bundled_model_dir, tmp_path, monkeypatch):
    """``GGUFReader(path).fields`` ran on every run: 14.3 s of Gemma's 14.7 s load."""
    source = BUNDLED.locate(BUNDLED, "")
    gguf_path = tmp_path / "model.gguf"
    os.link(source, gguf_path) if os.stat(source).st_dev == os.stat(tmp_path).st_dev else shutil.copy(source,
                                                                                                    gguf_path)
    calls = []
    real = gguf_models.gguf_metadata
    monkeypatch.setattr(gguf_models, "gguf_metadata", lambda path: calls.append(path) or real(path))
    first = gguf_models.cached_gguf_facts(str(gguf_path), str(tmp_path / "cache"))
    assert gguf_models.cached_gguf_facts(str(gguf_path), str(tmp_path / "cache")) == first
    assert len(calls) == 1 and first["architecture"] == "llama"


def test_an_old_hash_index_entry_gains_the_header_facts(tmp_path, monkeypatch):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF" + bytes(64))
    stat = os.stat(path)
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    (tmp_path / gguf_models.HASH_INDEX).write_text(json.dumps({key: "ab" * 32}))
    monkeypatch.setattr(gguf_models, "gguf_metadata", lambda p: {"architecture": "llama", "quantization": None})
    assert gguf_models.cached_gguf_facts(str(path), str(tmp_path))["architecture"] == "llama"


def test_a_truncated_gguf_is_one_line_naming_it(bundled_model_dir, tmp_path):
    """It was ``IndexError: index 0 is out of bounds``."""
    gguf_path = tmp_path / "cut.gguf"
    with open(BUNDLED.locate(BUNDLED, ""), "rb") as handle:
        gguf_path.write_bytes(handle.read(1 << 20))
    with pytest.raises(ModelLoadError) as refused:
        load_model(resolve_model_source(str(gguf_path)), "cpu", None, cache_dir=str(tmp_path / "cache"))
    message = str(refused.value)
    assert message.startswith(f"{gguf_path} is not a readable GGUF file (truncated or damaged: ")
    assert "\n" not in message


def test_a_conversion_killed_outright_is_swept_by_the_next(tmp_path):
    """SIGKILL during a conversion left a 514 MB hidden directory that was never removed."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".gguf-0123.converting-{host_name()}-{dead}-x1y2"
    live = tmp_path / f".gguf-0123.converting-{host_name()}-{os.getpid()}-x1y2"
    other_host = tmp_path / f".gguf-0123.converting-elsewhere-{dead}-x1y2"
    for directory in (stale, live, other_host):
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(bytes(1024))
    assert gguf_models.remove_stale_conversions(str(tmp_path)) == [str(stale)]
    assert live.exists() and other_host.exists() and not stale.exists()


def test_a_model_cache_that_is_a_file_is_named_as_the_cache(tmp_path, monkeypatch, capsys):
    """``LAYERS_CACHE_DIR`` pointing at a file was not named as the cache."""
    cache = tmp_path / "cache"
    cache.write_text("not a directory")
    monkeypatch.setenv("LAYERS_CACHE_DIR", str(cache))
    code = run.main(["--device", "cpu", "--out_dir", str(tmp_path / "out"), "--quiet"])
    captured = capsys.readouterr()
    assert_clean_failure(captured, code, 1)
    assert f"the model cache {cache} ($LAYERS_CACHE_DIR) cannot be a directory: {cache} is a file" in captured.err
