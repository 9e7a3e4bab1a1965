"""A model ready for the lens: the Bridge, where it came from, and how it is decoded.

``load`` is the one call a notebook needs: it takes the bundled model (None), a hub id, a local
directory, a loaded Hugging Face ``PreTrainedModel`` or a ``TransformerBridge``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from layers_core import numerics
from layers_core.device_policy import (
    bf16_supported,
    choose_dtype,
    declared_dtype,
    fp32_unembed_copy_fits,
    parse_dtype,
    resolve_device,
    should_auto_promote_unembed,
    unembed_weights_for_analysis,
    upcast_chunk_columns,
)
from layers_core.lens.unembed import Unembedding
from layers_core.model import footprint
from layers_core.model.loading import (
    LoadReport,
    ModelLoadError,
    ModelSource,
    bridge_for,
    clean_model_name,
    hub_files_only_local,
    load_model_with_report,
    peek_config,
    resolve_model_source,
    source_path,
)
from layers_core.model.tokens import TokenDecoder
from layers_core.threads import IdleCoreRule, snapshot, torch_threads


@dataclass(eq=False)  # one loaded model: compared by identity; ``threads`` may be set
class LensModel:
    """A loaded model and the fixed decoding path every sweep of it shares.

    ``bridge`` is the ``TransformerBridge``; ``unembed`` the analysis unembedding (float32 shadow
    weights where the compute dtype is not float32 or ``fp32_unembed`` was asked for).
    """

    bridge: Any
    source: ModelSource
    device: str
    dtype: torch.dtype
    unembed: Unembedding
    decoder: TokenDecoder
    load_report: LoadReport = field(default_factory=LoadReport)
    declared_dtype: torch.dtype | None = None  # what the checkpoint's config says it stores
    threads: int | str | None = "auto"  # torch threads of its sweeps: auto (idle cores), a count, None (torch's)
    _thread_rule: IdleCoreRule = field(default_factory=IdleCoreRule, repr=False)

    @contextmanager
    def thread_scope(self) -> Iterator[None]:
        """Runs a sweep with ``threads`` torch threads: ``"auto"`` gives torch one per core other
        processes leave idle (``layers_core.threads``, as the command line does), an int sets
        it, None leaves torch's count alone; torch's own count is restored after."""
        if self.threads not in ("auto", None) and not (isinstance(self.threads, int) and self.threads > 0):
            raise ValueError(f"LensModel.threads must be 'auto', a positive int or None, got {self.threads!r}")
        count = self._thread_rule.choose() if self.threads == "auto" else self.threads
        with torch_threads(count):
            yield

    @property
    def model_id(self) -> str:
        """The id or path the user named (the bundled model's name for None)."""
        return self.source.model_id

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks n (the lens has n + 1 layers, 0 = embeddings)."""
        return int(self.bridge.cfg.n_layers)

    def __repr__(self) -> str:
        cfg = self.bridge.cfg
        return (f"LensModel({self.source.clean_name!r}, {cfg.n_layers} layers, d_model {cfg.d_model}, "
                f"vocab {cfg.d_vocab}, {self.device}, {self.dtype})")


def _source_of_object(model: Any) -> ModelSource:
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return ModelSource("object", name, name, clean_model_name(name))


def _param_dtype_and_device(model: Any) -> tuple[torch.dtype, str]:
    param = next(model.parameters())
    return param.dtype, param.device.type


def _is_bridge(model: Any) -> bool:
    return type(model).__name__ == "TransformerBridge" or hasattr(model, "original_model")


def _auto_dtype(source: ModelSource, config: Any, device: str, max_memory: dict | None) -> torch.dtype:
    declared = declared_dtype(config)
    file_bytes = footprint.checkpoint_weight_bytes(source_path(source))
    float32_fits = file_bytes is None or footprint.fits(
        footprint.estimate(config, file_bytes, declared, torch.float32),
        footprint.available_bytes(device, max_memory))
    return choose_dtype(device, declared, bf16_supported=bf16_supported(device), float32_fits=float32_fits)


def check_fits(source: ModelSource, config: Any, device: str, dtype: torch.dtype,
               max_memory: dict | None = None) -> None:
    """``ModelLoadError`` (one line) when the estimated footprint exceeds the free memory."""
    file_bytes = footprint.checkpoint_weight_bytes(source_path(source))
    if file_bytes is None:
        return
    needed = footprint.estimate(config, file_bytes, declared_dtype(config), dtype)
    available = footprint.available_bytes(device, max_memory)
    if not footprint.fits(needed, available):
        raise ModelLoadError(
            f"{source.model_id} in {dtype} needs {needed.describe()} but {device} has "
            f"{available / footprint.GIB:.1f} GiB free; try --dtype bfloat16, more GPUs with "
            "--device-map auto, or a smaller model")


def analysis_unembedding(bridge: Any, dtype: torch.dtype, fp32_unembed: bool = False) -> Unembedding:
    """The lens's decoding path: float32 maths for every float compute dtype — a float32 shadow
    copy of W_U/b_U where it fits on W_U's device, else the model's own W_U upcast in chunks."""
    use_fp32 = fp32_unembed or should_auto_promote_unembed(dtype)
    W_U = bridge.unembed.W_U
    chunk = None
    if use_fp32 and W_U.is_floating_point() and W_U.dtype != torch.float32 and not fp32_unembed_copy_fits(W_U):
        chunk = upcast_chunk_columns(int(W_U.shape[0]))
    W_U, b_U = unembed_weights_for_analysis(bridge, use_fp32 and chunk is None)
    if chunk is not None and b_U is not None:
        b_U = b_U.float()  # [V]: small
    return Unembedding(W_U, b_U, numerics.output_logits_transform(bridge), force_fp32=use_fp32,
                       chunk_columns=chunk, head=prediction_head(bridge))


def prediction_head(bridge: Any) -> Any:
    """The model's layers between its final norm and ``W_U`` as a callable ``[..., d]`` →
    ``[..., d]`` in the input's dtype (the bridge's ``prediction_head``: ModernBERT-decoder's
    dense → GELU → LayerNorm), or None. The module runs in its own dtype."""
    component = getattr(bridge, "prediction_head", None)
    if component is None:
        return None
    module = getattr(component, "original_component", component)
    weight_dtype = next(module.parameters()).dtype

    def head(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x.to(weight_dtype)).to(x.dtype)

    return head


def load(
    model: Any = None,
    *,
    tokenizer: Any = None,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    fp32_unembed: bool = False,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
) -> LensModel:
    """Loads a model for the lens in one call.

    Args:
        model: None (the bundled SmolLM2-135M-Instruct), a hub id, a local model directory, a
            loaded Hugging Face ``PreTrainedModel`` (``tokenizer`` given, or loaded from its
            ``name_or_path``), or a ``TransformerBridge`` (used as it is).
        device: ``auto`` (cuda, then mps, then cpu), ``cuda``, ``mps`` or ``cpu``; ignored for
            model objects, which stay where they are.
        dtype: ``auto`` (CPU: float32; GPU: the checkpoint's declared half dtype, never fp16 for
            a bf16 checkpoint) or a dtype / its name; ignored for model objects.
        fp32_unembed: decode through float32 W_U even in float32 compute (it always is in half).
        device_map: ``auto``, ``balanced``, ``sequential`` or a dict: spread the model over
            several GPUs (default: the whole model on ``device``). ``max_memory``: per-GPU budget.

    Converted models (the bundled one, GGUF files) are cached in ``$LAYERS_CACHE_DIR`` (else
    ``$XDG_CACHE_HOME/layers_core``, else ``~/.cache/layers_core``).

    Raises:
        ModelLoadError: the model cannot be found, fits nowhere, or cannot be loaded (one line).
    """
    report, declared = LoadReport(), None
    loading_began = snapshot()  # the idle-core rule's first interval: the load itself
    if model is None or isinstance(model, str):
        source = resolve_model_source(model)
        device = resolve_device(device)
        if device_map is not None and device != "cuda":
            raise ModelLoadError(f"a device map spreads a model over CUDA GPUs; the device is {device}")
        local_only = hub_files_only_local(source)  # probes the hub once (a hub id without network)
        config = peek_config(source, local_only=local_only)
        declared = declared_dtype(config)
        dtype = _auto_dtype(source, config, device, max_memory) if dtype == "auto" else parse_dtype(dtype)
        check_fits(source, config, device, dtype, max_memory)
        bridge, report = load_model_with_report(source, device, dtype, config=config, local_only=local_only,
                                                device_map=device_map, max_memory=max_memory)
    elif _is_bridge(model):
        bridge, source = model, _source_of_object(model.original_model)
        dtype, device = _param_dtype_and_device(bridge)
    else:
        source = _source_of_object(model)
        dtype, device = _param_dtype_and_device(model)
        bridge = bridge_for(model.eval(), source.path, dtype, tokenizer)
    unembed = analysis_unembedding(bridge, dtype, fp32_unembed)
    return LensModel(bridge, source, device, dtype, unembed, TokenDecoder(bridge.tokenizer), report,
                     declared, _thread_rule=IdleCoreRule(loading_began))
