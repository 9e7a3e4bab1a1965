"""Which model a fitted lens belongs to: hashes of the model's ``config.json`` and of its
unembedding, saved with the lens (the tuned-lens format's ``unembed_hash``) and checked before
the lens is used, so a lens is never silently applied to another model.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

# config.json keys that change with how a copy was saved, not with the model itself
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}
_UNEMBED_COLUMNS = 4096  # the W_U hash reads this many evenly spaced columns (fast on 128k vocabularies)


class ForeignLensError(ValueError):
    """A fitted lens's fingerprint differs from the model it is applied to."""


class UnfingerprintedLensWarning(UserWarning):
    """A fitted lens that records no model fingerprint (older or published lenses)."""


def config_hash(model_dir: str) -> str | None:
    """sha256 of the model's ``config.json`` (parsed, volatile keys dropped, keys sorted), or None
    when the directory has none."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        config = {k: v for k, v in json.load(handle).items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def unembed_hash(W_U: Any) -> str:
    """sha256 of ``W_U`` ``[d, V]`` rounded to bfloat16 (so float32 and bf16 copies of one model
    agree) at evenly spaced columns, with its shape."""
    import torch

    step = max(1, int(W_U.shape[-1]) // _UNEMBED_COLUMNS)
    sample = W_U.detach()[:, ::step].to(device="cpu", dtype=torch.bfloat16).view(torch.int16)
    digest = hashlib.sha256(str(tuple(W_U.shape)).encode())
    digest.update(sample.contiguous().numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(lm: Any) -> dict:
    """``{config_hash, unembed_hash}`` of a loaded ``LensModel``."""
    from layers_core.model.loading import source_path

    directory = source_path(lm.source) if lm.source.kind != "object" else ""
    return {"config_hash": config_hash(directory) if directory else None,
            "unembed_hash": unembed_hash(lm.bridge.unembed.W_U)}


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weight_files_hash(model_dir: str) -> str | None:
    """sha256 over the name, size and mtime of every weight file in ``model_dir`` (None without
    any): weights rewritten at the same path change it, without reading gigabytes."""
    if not os.path.isdir(model_dir):
        return None
    facts = []
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(WEIGHT_SUFFIXES) and os.path.isfile(os.path.join(model_dir, name)):
            stat = os.stat(os.path.join(model_dir, name))
            facts.append(f"{name}|{stat.st_size}|{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(facts).encode()).hexdigest() if facts else None


def run_fingerprint(lm: Any) -> dict:
    """What a resumed prompt set must find unchanged: ``model_fingerprint`` and the weight files'
    ``weight_files_hash``."""
    from layers_core.model.loading import source_path

    directory = source_path(lm.source) if lm.source.kind != "object" else ""
    return {**model_fingerprint(lm), "weights_hash": weight_files_hash(directory) if directory else None}


def mismatch(recorded: dict | None, actual: dict, keys: tuple[str, ...]) -> list[str]:
    """The fingerprint keys on which a lens and a model both have a value and differ."""
    recorded = recorded or {}
    return [key for key in keys if recorded.get(key) and actual.get(key) and recorded[key] != actual[key]]


def foreign_lens_message(lens_path: str, keys: list[str]) -> str:
    return (f"the lens in {lens_path} was fitted to another model (its {' and '.join(keys)} differ); "
            "--allow-foreign-lens applies it anyway")


UNFINGERPRINTED = "the lens in {path} records no model fingerprint (an older or published lens): it is not checked"
