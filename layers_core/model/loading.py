"""Model sources (bundled default, local directory, hub id), the bundled model cache, and loading."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from layers_core.errors import first_line
from layers_core.model import gguf_models, upstream

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
CACHE_ENV = "LAYERS_CACHE_DIR"
HUB_PROBE_TIMEOUT_S = 3.0

# packaged: a real model shipped as a package, by name; gguf: a .gguf file; object: a loaded model
SourceKind = Literal["bundled_default", "packaged", "local_dir", "gguf", "hf_id", "object"]


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message is one line that says why."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``path`` is the directory or hub id handed to the loader."""

    kind: SourceKind
    model_id: str
    path: str | None
    clean_name: str


ERROR_LINE_LIMIT = 240  # characters of an underlying error quoted in a load failure


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
    """None → the bundled default; a packaged real model's name (``gemma-3-270m``) → packaged;
    a ``.gguf`` file, or a directory holding exactly one and no ``config.json`` → gguf; an
    existing (or path-shaped) directory → local_dir; else hf_id."""
    if arg is None:
        return ModelSource("bundled_default", DEFAULT_MODEL_ID, None, DEFAULT_MODEL_ID)
    packaged = gguf_models.packaged_model(arg)
    if packaged is not None:
        return ModelSource("packaged", packaged.name, None, packaged.name)
    expanded = os.path.expanduser(arg)
    try:
        gguf_file = gguf_models.gguf_file_of(expanded)
    except gguf_models.GGUFError as error:
        raise ModelLoadError(str(error)) from error
    if gguf_file is not None:
        path = os.path.abspath(gguf_file)
        return ModelSource("gguf", arg, path, clean_model_name(path).removesuffix(gguf_models.GGUF_SUFFIX))
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


def model_cache_root(cache_dir: str | None = None) -> str:
    """``cache_dir`` or ``default_cache_root()``, checked to be (or to be creatable as) a directory."""
    root = cache_dir or default_cache_root()
    existing = root
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        origin = f"${CACHE_ENV}" if not cache_dir and os.environ.get(CACHE_ENV) else "the model cache"
        raise ModelLoadError(f"the model cache {root} ({origin}) cannot be a directory: "
                             f"{existing} is a file")
    return root


def ensure_packaged_model(name: str, cache_dir: str | None = None) -> str:
    """A packaged real model's float32 HF directory (``gemma-3-270m``, the bundled SmolLM2),
    converted once into the model cache on first use."""
    model = gguf_models.packaged_model(name)
    if model is None:
        raise ModelLoadError(f"no packaged model named {name!r}; known: {', '.join(gguf_models.PACKAGED_MODELS)}")
    root = model_cache_root(cache_dir)
    try:
        return gguf_models.ensure_packaged(model, root)
    except gguf_models.GGUFError as error:
        raise ModelLoadError(str(error)) from error


def ensure_default_model(cache_dir: str | None = None) -> str:
    """The bundled model's float32 HF directory, converting the GGUF on first use (~30 s).

    The conversion writes into a temporary sibling directory that is renamed into place, so an
    interrupted conversion leaves no broken cache and a process that loses a race keeps the
    winner's copy.
    """
    return ensure_packaged_model(DEFAULT_MODEL_ID, cache_dir)


@lru_cache(maxsize=8)
def _gguf_directory(path: str, mtime_ns: int, size: int, cache_root: str) -> tuple[str, tuple]:
    directory, provenance = gguf_models.ensure_gguf(path, cache_root)
    return directory, tuple(provenance.items())


def gguf_source(source: ModelSource, cache_dir: str | None = None) -> tuple[str, dict]:
    """A gguf source's float32 directory and its provenance (file, sha256, architecture,
    quantisation); hashed and converted once per file version and process."""
    stat = os.stat(source.path)
    root = model_cache_root(cache_dir)
    try:
        directory, provenance = _gguf_directory(source.path, stat.st_mtime_ns, stat.st_size, root)
    except gguf_models.GGUFError as error:
        raise ModelLoadError(str(error)) from error
    return directory, dict(provenance)


def _first_line(error: BaseException) -> str:
    return first_line(error, ERROR_LINE_LIMIT)


def _check_local_dir(path: str) -> None:
    if not os.path.exists(path):
        raise ModelLoadError(f"model directory not found: {path}")
    if not os.path.isdir(path):
        raise ModelLoadError(f"not a directory: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelLoadError(f"not a Hugging Face model directory (no config.json): {path}")


def source_path(source: ModelSource, cache_dir: str | None = None) -> str:
    """The directory or hub id to load ``source`` from (materialising a packaged model or a
    GGUF file's float32 directory)."""
    if source.kind == "bundled_default":
        return ensure_default_model(cache_dir)
    if source.kind == "packaged":
        return ensure_packaged_model(source.model_id, cache_dir)
    if source.kind == "gguf":
        return gguf_source(source, cache_dir)[0]
    if source.kind == "local_dir":
        _check_local_dir(source.path)
    return source.path


def _offline_error(source: ModelSource, why: str) -> ModelLoadError:
    return ModelLoadError(
        f"model {source.model_id!r} is not in the local Hugging Face cache and {why}; "
        "download it once with network access or pass a local model directory")


def _hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One TCP connection to the hub endpoint: fails in seconds, where the hub client's own
    retries take half a minute."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def hub_files_only_local(source: ModelSource) -> bool:
    """For a hub id: True when the load must use the local cache only (offline or unreachable).

    Raises ``ModelLoadError`` at once when the hub cannot be used and the model is not cached.
    """
    if source.kind != "hf_id":
        return False
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    if not offline and _hub_reachable():
        return False
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source.path, "config.json")
    if not isinstance(cached, str):
        raise _offline_error(source, "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached")
    return True


def peek_config(source: ModelSource, cache_dir: str | None = None, local_only: bool | None = None) -> Any:
    """The HF config alone (no weights), or raise ``ModelLoadError`` with a one-line reason.

    ``local_only``: ``hub_files_only_local(source)`` if already known (it may probe the network).
    """
    path = source_path(source, cache_dir)
    from transformers import AutoConfig

    if local_only is None:
        local_only = hub_files_only_local(source)
    try:
        return AutoConfig.from_pretrained(path, local_files_only=local_only)
    except OSError as error:
        if source.kind == "hf_id":
            raise _offline_error(source, "it could not be fetched") from error
        raise ModelLoadError(f"could not load {path}: {_first_line(error)}") from error
    except (ValueError, KeyError) as error:  # unknown model_type
        raise ModelLoadError(f"cannot load {source.model_id}: {_first_line(error)}") from error


def check_causal_lm(config: Any, name: str) -> None:
    """Refuses encoder-only and encoder-decoder checkpoints before any weight is read."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = {cls for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
              for cls in ((value,) if isinstance(value, str) else value)}
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures:
        is_causal = any(arch in causal for arch in architectures)
    else:
        is_causal = getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if getattr(config, "is_encoder_decoder", False) or not is_causal:
        kind = ", ".join(architectures) or getattr(config, "model_type", "?")
        raise ModelLoadError(f"{name} ({kind}) is not a decoder-only causal LM")


def check_lensable(config: Any, name: str) -> None:
    """Refuses, in one line, a family whose bridge has no single residual stream per layer."""
    why = upstream.refusal(config)
    if why:
        raise ModelLoadError(f"{name} ({upstream.architecture_of(config)}) cannot be lensed: {why}")


def _names(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


@dataclass(frozen=True)
class LoadReport:
    """What loading said: checkpoint keys the model did not use (warnings, not failures)."""

    unexpected_keys: tuple[str, ...] = ()

    def warnings(self) -> list[str]:
        """One-line warnings for the console."""
        if not self.unexpected_keys:
            return []
        return [f"⚠️  checkpoint keys not used by the model: {_names(list(self.unexpected_keys))}"]


def load_hf_model(
    source: ModelSource,
    dtype: Any,
    device_map: Any = None,
    max_memory: dict | None = None,
    cache_dir: str | None = None,
    config: Any = None,
    local_only: bool | None = None,
) -> tuple[Any, LoadReport]:
    """Loads the Hugging Face causal LM itself, weights straight to their devices.

    ``device_map`` (e.g. ``{"": "cuda:0"}`` or ``"auto"``) places each weight from the
    memory-mapped checkpoint on its device; None loads on the CPU. A checkpoint that leaves any
    parameter missing or shape-mismatched (so that transformers would initialise it randomly)
    raises ``ModelLoadError`` naming them; unused checkpoint keys are reported in the
    ``LoadReport``. ``config`` and ``local_only``: the model's HF config and
    ``hub_files_only_local`` if already known (so that the hub is probed once).
    """
    local_only = hub_files_only_local(source) if local_only is None else local_only
    config = config if config is not None else peek_config(source, cache_dir, local_only)
    check_causal_lm(config, source.model_id)
    check_lensable(config, source.model_id)
    from transformer_lens.model_bridge.sources._hf_format import determine_architecture_from_hf_config
    from transformer_lens.model_bridge.sources.transformers.helpers import (
        get_hf_model_class_for_architecture,
    )

    path = source_path(source, cache_dir)
    try:
        architecture = upstream.bridge_architecture(config) or determine_architecture_from_hf_config(config)
        model_class = get_hf_model_class_for_architecture(architecture)
    except (ValueError, KeyError) as error:  # an architecture TransformerLens lacks
        raise ModelLoadError(f"cannot load {source.model_id}: {_first_line(error)}") from error
    if "pad_token_id" not in config.__dict__:  # transformers 5 reads it unconditionally
        eos = getattr(config, "eos_token_id", None)
        config.pad_token_id = eos[0] if isinstance(eos, list) and eos else eos
    try:
        model, info = model_class.from_pretrained(
            path, config=config, dtype=dtype, device_map=device_map, max_memory=max_memory,
            attn_implementation="eager", output_loading_info=True, local_files_only=local_only)
    except OSError as error:
        if source.kind == "hf_id":
            raise _offline_error(source, "its weights could not be fetched") from error
        raise ModelLoadError(f"could not load {path}: {_first_line(error)}") from error
    except RuntimeError as error:
        if "ignore_mismatched_sizes" not in str(error):
            raise
        raise ModelLoadError(f"{source.model_id}: {shape_mismatch(model_class, config, path)}") from error
    fresh = sorted(set(info.get("missing_keys", ())) | {m[0] for m in info.get("mismatched_keys", ())})
    if fresh:
        raise ModelLoadError(f"{source.model_id}: the checkpoint lacks {len(fresh)} weight(s) that "
                             f"would be randomly initialised: {_names(fresh)}")
    return model.eval(), LoadReport(tuple(sorted(info.get("unexpected_keys", ()))))


def shape_mismatch(model_class: Any, config: Any, path: str) -> str:
    """Why a checkpoint's tensors do not fit the model its ``config.json`` describes, naming the
    first mismatched tensor (the checkpoint's safetensors headers against the model built on the
    meta device: no weight is read)."""
    import glob

    import torch
    from safetensors import safe_open

    with torch.device("meta"):
        built = model_class.from_config(config) if hasattr(model_class, "from_config") else model_class(config)
        expected = {name: tuple(tensor.shape) for name, tensor in built.state_dict().items()}
    mismatched = []
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) else []:
        with safe_open(file, framework="pt") as checkpoint:
            for name in checkpoint.keys():
                shape = tuple(checkpoint.get_slice(name).get_shape())
                if name in expected and expected[name] != shape:
                    mismatched.append(f"{name} is {list(shape)} in the checkpoint, {list(expected[name])} "
                                      "by config.json")
    first = f"{mismatched[0]}{f' (and {len(mismatched) - 1} more)' if len(mismatched) > 1 else ''}; " \
        if mismatched else ""
    return (f"the checkpoint's tensor shapes do not match its config.json: {first}"
            "config.json was edited or belongs to another model")


def bridge_for(hf_model: Any, name_or_path: str, dtype: Any, tokenizer: Any = None) -> Any:
    """Wraps a loaded HF model in a ``TransformerBridge`` (raw weights, eval mode).

    ``tokenizer`` None loads the tokenizer from ``name_or_path``. Never calls
    ``enable_compatibility_mode`` (it folds γ into W_U and breaks the lens). The family's
    workaround for a bridge gap (``model.upstream``), if any, is applied to ``hf_model`` first.
    """
    from transformer_lens.model_bridge import TransformerBridge

    check_lensable(hf_model.config, name_or_path)
    upstream.fix_model(hf_model)
    try:
        bridge = TransformerBridge.boot_transformers(name_or_path, hf_model=hf_model, tokenizer=tokenizer,
                                                     dtype=dtype,
                                                     hf_config_overrides=upstream.bridge_overrides(hf_model.config))
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"cannot load {name_or_path}: {_first_line(error)}") from error
    return bridge.eval()


def _current_cuda() -> str:
    """``cuda:<current device>``: 0 unless a launcher chose this process's GPU (torchrun's LOCAL_RANK)."""
    import torch

    return f"cuda:{torch.cuda.current_device()}"


def load_model(source: ModelSource, device: str, dtype: Any, cache_dir: str | None = None,
               **placement: Any) -> Any:
    """Loads a ``TransformerBridge`` with raw HF weights (no folding, no centring), in eval mode.

    ``placement``: ``device_map``/``max_memory`` (see ``load_model_with_report``); by default the
    whole model goes to ``device``. Failures raise ``ModelLoadError`` with a one-line reason;
    never silently reloads on another device.
    """
    return load_model_with_report(source, device, dtype, cache_dir, **placement)[0]


def load_model_with_report(
    source: ModelSource,
    device: str,
    dtype: Any,
    cache_dir: str | None = None,
    *,
    config: Any = None,
    local_only: bool | None = None,
    **placement: Any,
) -> tuple[Any, LoadReport]:
    """``load_model`` plus the ``LoadReport`` of the HF load (``config``, ``local_only``: see
    ``load_hf_model``). ``placement``: ``device_map`` (default: the whole model on ``device``) and
    ``max_memory`` (a per-GPU budget)."""
    device_map, max_memory = placement.get("device_map"), placement.get("max_memory")
    unknown = set(placement) - {"device_map", "max_memory"}
    if unknown:
        raise TypeError(f"unknown placement argument(s) {sorted(unknown)}; expected device_map, max_memory")
    if device_map is None and device != "cpu":
        device_map = {"": _current_cuda() if device == "cuda" else device}
    hf_model, report = load_hf_model(source, dtype, device_map, max_memory, cache_dir, config, local_only)
    return bridge_for(hf_model, source_path(source, cache_dir), dtype), report


def tied_embeddings(bridge: Any) -> bool:
    """Whether the unembedding is the embedding matrix (tied): then layer 0 decoded through any
    norm predicts the current input token itself."""
    hf_model = getattr(bridge, "original_model", bridge)
    config = getattr(hf_model, "config", None)
    if getattr(config, "tie_word_embeddings", None) is False:
        return False
    embedding, head = hf_model.get_input_embeddings(), hf_model.get_output_embeddings()
    return bool(embedding is not None and head is not None
                and embedding.weight.data_ptr() == head.weight.data_ptr())
