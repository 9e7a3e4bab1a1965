"""Real models at real scale, on the CPU: dtype policy, float32 decoding of half-precision models,
memory footprint, device maps, split-device plumbing, non-finite activations, peak memory.

The GPU checks of the same issue are in test_gpu.py (``pytest -m gpu``).
"""

import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import run
import torch

import layers_core as lc
from conftest import RUN_PY
from layers_core.model import footprint
from layers_core.numerics import unembed_logits

PROMPT = "The capital of Germany is called simply"
PEAK_RSS_PROBE = ("import os, subprocess, sys\n"
                  "p = subprocess.Popen(sys.argv[1:])\n"
                  "_, status, usage = os.wait4(p.pid, 0)\n"
                  "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)")


def _outputs(directory, name):
    return os.path.join(directory, f"output-{name}.json"), os.path.join(
        directory, f"output-{name}-pure-next-token.csv")


# ---- dtype ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundled_float32_and_bf16(bundled_model_dir, tmp_path_factory):
    outs = {}
    for dtype in ("float32", "bfloat16"):
        out = str(tmp_path_factory.mktemp(dtype))
        assert run.main(["--device", "cpu", "--dtype", dtype, "--out_dir", out, "--quiet",
                         "--no-plots", "--no-control"]) == 0
        outs[dtype] = out
    return outs


def test_bf16_on_cpu_matches_float32_on_the_bundled_model(bundled_float32_and_bf16):
    json32, csv32 = _outputs(bundled_float32_and_bf16["float32"], "SmolLM2-135M-Instruct")
    json16, csv16 = _outputs(bundled_float32_and_bf16["bfloat16"], "SmolLM2-135M-Instruct")
    exact, half = pd.read_csv(csv32), pd.read_csv(csv16)
    assert (exact["top1"] == half["top1"]).sum() >= 27
    assert (exact["entropy"] - half["entropy"]).abs().max() <= 0.25
    provenance = json.load(open(json16))["provenance"]
    assert provenance["dtype"] == "torch.bfloat16" and provenance["unembed_dtype"] == "torch.float32"
    assert provenance["declared_dtype"] == "torch.float32"  # the dequantised GGUF is stored in float32
    check = json.load(open(json16))["diagnostics"]["last_layer_consistency"]
    assert check["passed"] is True and check["tolerance_bits"] == 1e-2 and check["kl_model_to_lens_bits"] < 1e-2


def test_chunked_upcast_equals_a_float32_copy():
    torch.manual_seed(0)
    W_U = torch.randn(64, 1000).to(torch.bfloat16)
    b_U = torch.randn(1000)
    x = torch.randn(7, 64).to(torch.bfloat16)
    copy = unembed_logits(x, W_U.float(), b_U, lambda z: z, force_fp32_unembed=True)
    chunked = unembed_logits(x, W_U, b_U, lambda z: z, force_fp32_unembed=True, chunk_columns=256)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, copy, rtol=0, atol=1e-5)
    buffer = torch.empty(7, 1000)
    assert unembed_logits(x, W_U, None, lambda z: z, True, out=buffer, chunk_columns=300).data_ptr() \
        == buffer.data_ptr()


def test_half_precision_model_decodes_through_float32(tiny_dirs, monkeypatch):
    from layers_core import device_policy

    full = lc.load(tiny_dirs["phi"], device="cpu", dtype="bfloat16")
    assert full.unembed.W_U.dtype == torch.float32 and full.unembed.chunk_columns is None
    monkeypatch.setattr(device_policy, "CPU_FP32_COPY_LIMIT_BYTES", 0)  # no copy fits: upcast chunks
    chunked = lc.load(tiny_dirs["phi"], device="cpu", dtype="bfloat16")
    assert chunked.unembed.W_U.dtype == torch.bfloat16 and chunked.unembed.chunk_columns >= 256
    assert chunked.unembed.matmul_dtype == torch.float32
    a = lc.sweep(full, PROMPT, "Berlin", control=False).pure
    b = lc.sweep(chunked, PROMPT, "Berlin", control=False).pure
    assert (a["entropy"] - b["entropy"]).abs().max() < 1e-4 and a["top1"].equals(b["top1"])


# ---- footprint --------------------------------------------------------------------------------

def test_footprint_of_an_8b_bf16_checkpoint():
    from types import SimpleNamespace

    config = SimpleNamespace(hidden_size=4096, vocab_size=128256)
    estimate = footprint.estimate(config, 16_060_000_000, torch.bfloat16, torch.bfloat16)
    assert estimate.weights_bytes == 16_060_000_000
    assert estimate.unembed_bytes == 4096 * 128256 * 4  # the float32 W_U: 2.1 GB
    assert footprint.estimate(config, 16_060_000_000, torch.bfloat16, torch.float32).weights_bytes \
        == 32_120_000_000
    assert not footprint.fits(estimate, 16 * 2**30) and footprint.fits(estimate, 24 * 2**30)
    assert footprint._bytes("70GiB") == 70 * 2**30 and footprint._bytes("80GB") == 80 * 10**9


def test_a_model_that_fits_nowhere_fails_before_loading(tiny_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(footprint, "available_bytes", lambda device, max_memory=None: 1024)
    code = run.main(["--device", "cpu", tiny_dirs["llama"], "--out_dir", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "needs ≈" in err and "cpu has 0.0 GiB free" in err and "Traceback" not in err


# ---- device maps ------------------------------------------------------------------------------


def test_max_memory_parsing():
    from layers_core.app.cli import parse_max_memory

    assert parse_max_memory("0=70GiB, cuda:1=60GiB") == {0: "70GiB", 1: "60GiB"}


def test_residuals_move_to_the_lens_device_as_captured(load_bridge):
    """The seam for split models: each hook moves its residual to the lens device (meta here)."""
    from layers_core.hooks import residual_cache

    bridge = load_bridge("llama")
    with torch.inference_mode(), residual_cache(bridge, device="meta") as (cache, _):
        bridge(bridge.to_tokens(PROMPT))
    assert len(cache) == bridge.cfg.n_layers + 1
    assert {tensor.device.type for tensor in cache.values()} == {"meta"}


def test_norm_weights_meet_the_residual_on_its_device(load_bridge):
    """A norm of a block on another device is applied where the residual is (meta: shapes only)."""
    from layers_core.norm_utils import apply_norm_or_skip

    for family in ("llama", "phi", "gemma2"):
        norm = load_bridge(family).ln_final
        residual = torch.empty(3, load_bridge(family).cfg.d_model, device="meta")
        out = apply_norm_or_skip(residual, norm)
        assert out.device.type == "meta" and out.shape == residual.shape


def test_model_logits_and_residuals_arrive_on_the_lens_device(load_bridge):
    from layers_core.pipeline.sweep import forward_with_residuals

    bridge = load_bridge("gpt2")
    logits, residuals = forward_with_residuals(bridge, bridge.to_tokens(PROMPT), device="cpu")
    assert logits.dtype == torch.float32 and {r.device.type for r in residuals} == {"cpu"}


# ---- non-finite activations -------------------------------------------------------------------

def test_fp16_overflow_stops_the_run_naming_the_layer(tiny_dirs, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model = shutil.copytree(tiny_dirs["llama"], tmp_path / "hot-llama")
    weights = load_file(model / "model.safetensors")
    weights["model.embed_tokens.weight"] *= 1e8  # beyond float16's 65504
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    code = run.main(["--device", "cpu", "--dtype", "float16", str(model), "--out_dir",
                     str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "non-finite values (inf/NaN) in the residual stream at layer 0" in err
    assert "try --dtype bfloat16 or --dtype float32" in err and err.strip().count("\n") == 0


def test_check_finite_names_the_first_bad_layer():
    from layers_core.pipeline.sweep import NonFiniteError, check_finite

    residuals = [torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor([[0.0, float("nan")]] * 2)]
    with pytest.raises(NonFiniteError, match="layer 2"):
        check_finite(torch.zeros(5), residuals, torch.float16)
    with pytest.raises(NonFiniteError, match="the model's logits"):
        check_finite(torch.tensor([float("inf")]), residuals[:2], torch.float16)
    check_finite(torch.zeros(5), residuals[:2], torch.float32)


# ---- peak memory on the 1B-shape checkpoint ---------------------------------------------------

def test_bf16_cpu_run_of_the_1b_shape_checkpoint_peaks_below_twice_its_file(tmp_path):
    from tiny_models import build_llama_1b_shape

    model = build_llama_1b_shape(str(tmp_path / "llama-1b-shape"))
    file_bytes = os.path.getsize(os.path.join(model, "model.safetensors"))
    argv = [sys.executable, RUN_PY, model, "--device", "cpu", "--dtype", "bfloat16", "--no-plots",
            "--no-control", "--quiet", "--out_dir", str(tmp_path / "out")]
    # A child's ru_maxrss includes the image it was forked from (also with vfork), so a small
    # fresh interpreter forks the run and reports the run's own peak.
    done = subprocess.run([sys.executable, "-c", PEAK_RSS_PROBE, *argv], capture_output=True, text=True)
    rc, peak_kib = map(int, done.stdout.splitlines()[-1].split())
    assert rc == 0, done.stderr
    peak_bytes = peak_kib * 1024
    assert peak_bytes <= 2.0 * file_bytes, (peak_bytes / file_bytes)
    provenance = json.load(open(tmp_path / "out" / "output-llama-1b-shape.json"))["provenance"]
    assert (provenance["declared_dtype"], provenance["dtype"], provenance["unembed_dtype"]) == \
        ("torch.bfloat16", "torch.bfloat16", "torch.float32")
