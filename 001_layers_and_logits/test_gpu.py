"""The GPU tier: ``pytest -m gpu 001_layers_and_logits`` on a machine with CUDA.

Deselected by default (``-m "not gpu"`` in pyproject's pytest options); each test skips at run
time without CUDA. The references are float32 lenses on the CPU.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from tiny_models import FAMILIES

import layers_core as lc
from conftest import RUN_PY

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
PROMPT = "The capital of Germany is called simply"
GIB = 2**30


def _declared_bf16_copy(directory, destination):
    """The fixture with its config declaring bfloat16, so that ``auto`` computes in bf16."""
    shutil.copytree(directory, destination)
    path = os.path.join(destination, "config.json")
    config = json.load(open(path))
    config["dtype"] = "bfloat16"
    json.dump(config, open(path, "w"))
    return str(destination)


def _agree(reference, candidate, margin_bits=1e-2, entropy_bits=0.05):
    """Top-1 equal wherever the reference's top-1/top-2 log-probability margin exceeds 1e-2."""
    import numpy as np

    margin = np.log(reference["prob1"]) - np.log(reference["prob2"])
    decided = margin > margin_bits
    assert (reference["top1"][decided] == candidate["top1"][decided]).all()
    assert (reference["entropy"] - candidate["entropy"]).abs().max() <= entropy_bits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_in_auto_dtype_matches_the_float32_cpu_lens(tiny_dirs, tmp_path, family):
    reference = lc.sweep(lc.load(tiny_dirs[family], device="cpu"), PROMPT, "Berlin", control=False).pure
    lens_model = lc.load(_declared_bf16_copy(tiny_dirs[family], tmp_path / family), device="cuda")
    assert lens_model.dtype == torch.bfloat16 and lens_model.unembed.matmul_dtype == torch.float32
    result = lc.sweep(lens_model, PROMPT, "Berlin", control=False)
    _agree(reference, result.pure)
    assert result.diagnostics["last_layer_consistency"]["passed"] is True


def test_self_test_passes_on_cuda(tiny_dirs):
    done = subprocess.run([sys.executable, RUN_PY, tiny_dirs["gemma2"], "--device", "cuda",
                           "--self-test"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "✅ Self-test passed" in done.stdout and "CUBLAS" not in done.stderr


def test_bundled_model_bf16_on_cuda_matches_float32_on_cpu(bundled_model_dir):
    reference = lc.sweep(lc.load(device="cpu")).pure
    candidate = lc.sweep(lc.load(device="cuda", dtype="bfloat16")).pure
    assert (reference["top1"] == candidate["top1"]).sum() >= 27
    assert (reference["entropy"] - candidate["entropy"]).abs().max() <= 0.25


def test_a_2000_token_prompt_adds_little_gpu_memory_over_the_forward(bundled_model_dir):
    from layers_core.pipeline.sweep import forward_with_residuals

    lens_model = lc.load(device="cuda", dtype="bfloat16")
    prompt = " ".join(["The capital of Germany is Berlin."] * 300)
    tokens = lens_model.bridge.to_tokens(prompt)
    assert tokens.shape[1] >= 2000
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    forward_with_residuals(lens_model.bridge, tokens, device=lens_model.unembed.W_U.device)
    forward_peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    lc.sweep(lens_model, prompt, "Berlin", control=False)
    assert torch.cuda.max_memory_allocated() - forward_peak <= 1.5 * GIB


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_device_map_gives_the_single_device_rows(tiny_dirs):
    single = lc.sweep(lc.load(tiny_dirs["llama"], device="cuda"), PROMPT, "Berlin", control=False).pure
    split_model = lc.load(tiny_dirs["llama"], device="cuda", device_map="sequential",
                          max_memory={0: "1MiB", 1: "10GiB"})
    assert len({p.device for p in split_model.bridge.parameters()}) == 2
    split = lc.sweep(split_model, PROMPT, "Berlin", control=False).pure
    _agree(single, split, entropy_bits=1e-4)
