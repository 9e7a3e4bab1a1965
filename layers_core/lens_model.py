"""A model ready for the lens: the Bridge, where it came from, and how it is decoded.

``load`` is the one call a notebook needs: it takes the bundled model (None), a hub id, a local
directory, a loaded Hugging Face ``PreTrainedModel`` or a ``TransformerBridge``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from layers_core.device_policy import (
    choose_dtype,
    parse_dtype,
    resolve_device,
    should_auto_promote_unembed,
    unembed_weights_for_analysis,
)
from layers_core.models import (
    LoadReport,
    ModelSource,
    bridge_for,
    clean_model_name,
    load_model_with_report,
    peek_model_type,
    resolve_model_source,
)
from layers_core import numerics
from layers_core.pipeline import TokenDecoder, UnembedPath


@dataclass(frozen=True)
class LensModel:
    """A loaded model and the fixed decoding path every sweep of it shares.

    ``bridge`` is the ``TransformerBridge``; ``unembed`` the analysis unembedding (float32 shadow
    weights where the compute dtype is not float32 or ``fp32_unembed`` was asked for).
    """

    bridge: Any
    source: ModelSource
    device: str
    dtype: torch.dtype
    unembed: UnembedPath
    decoder: TokenDecoder
    load_report: LoadReport = field(default_factory=LoadReport)

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


def load(
    model: Any = None,
    *,
    tokenizer: Any = None,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    fp32_unembed: bool = False,
    cache_dir: str | None = None,
) -> LensModel:
    """Loads a model for the lens in one call.

    Args:
        model: None (the bundled SmolLM2-135M-Instruct), a hub id, a local model directory, a
            loaded Hugging Face ``PreTrainedModel`` (``tokenizer`` given, or loaded from its
            ``name_or_path``), or a ``TransformerBridge`` (used as it is).
        device: ``auto`` (cuda, then mps, then cpu), ``cuda``, ``mps`` or ``cpu``; ignored for
            model objects, which stay where they are.
        dtype: ``auto`` (the device's default policy) or a dtype / its name; ignored for objects.
        fp32_unembed: decode through float32 shadow copies of W_U/b_U even in float32 compute.

    Raises:
        ModelLoadError: the model cannot be found or loaded (one-line message).
    """
    report = LoadReport()
    if model is None or isinstance(model, str):
        source = resolve_model_source(model)
        device = resolve_device(device)
        if dtype == "auto":
            dtype = choose_dtype(device, source.model_id,
                                 peek_model_type(source) if device != "cpu" else None)
        dtype = parse_dtype(dtype)
        bridge, report = load_model_with_report(source, device, dtype, cache_dir)
    elif _is_bridge(model):
        bridge, source = model, _source_of_object(model.original_model)
        dtype, device = _param_dtype_and_device(bridge)
    else:
        source = _source_of_object(model)
        dtype, device = _param_dtype_and_device(model)
        bridge = bridge_for(model.eval(), source.path, dtype, tokenizer)
    use_fp32 = fp32_unembed or should_auto_promote_unembed(dtype)
    W_U, b_U = unembed_weights_for_analysis(bridge, use_fp32)
    unembed = UnembedPath(W_U, b_U, numerics.output_logits_transform(bridge), force_fp32=use_fp32)
    return LensModel(bridge, source, device, dtype, unembed, TokenDecoder(bridge.tokenizer), report)
