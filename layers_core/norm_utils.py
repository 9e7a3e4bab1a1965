"""Architecture-aware normalisation for the logit lens.

A residual snapshot is decoded through the norm the model itself would apply next (``arch``), the
final norm (``final``, the standard logit lens) or none. Norm maths is re-implemented here in
float32 (legacy defect 4: x**2 overflows fp16) and dispatched by class name (legacy defect 5: an
``isinstance(nn.LayerNorm)`` check gave TransformerLens's LayerNorm RMS maths).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

NORM_STRATEGIES = ("arch", "final", "none")

LAYERNORM = "layernorm"
LAYERNORM_PRE = "layernorm_pre"
RMSNORM = "rmsnorm"
RMSNORM_PRE = "rmsnorm_pre"
RMSNORM_ONE_PLUS = "rmsnorm_one_plus"
LAYERNORM_ONE_PLUS = "layernorm_one_plus"
UNKNOWN = "unknown"

# Exact class names first; suffix/prefix rules in classify_norm cover the HF families.
_EXACT_KINDS = {
    "LayerNormPre": LAYERNORM_PRE,
    "LayerNormPreBridge": LAYERNORM_PRE,
    "RMSNormPre": RMSNORM_PRE,
    "RMSNormPreBridge": RMSNORM_PRE,
    "LayerNorm": LAYERNORM,
    "RMSNorm": RMSNORM,
    # scale stored as an offset from 1: y = norm(x) · (1 + w)
    "GemmaRMSNorm": RMSNORM_ONE_PLUS,
    "Gemma2RMSNorm": RMSNORM_ONE_PLUS,
    "Gemma3RMSNorm": RMSNORM_ONE_PLUS,
    "VaultGemmaRMSNorm": RMSNORM_ONE_PLUS,
    "RecurrentGemmaRMSNorm": RMSNORM_ONE_PLUS,
    "Qwen3NextRMSNorm": RMSNORM_ONE_PLUS,
    "Qwen3_5RMSNorm": RMSNORM_ONE_PLUS,
    "Qwen3_5MoeRMSNorm": RMSNORM_ONE_PLUS,
    "NemotronLayerNorm1P": LAYERNORM_ONE_PLUS,
    # LayerNorm without parameters, ε fixed in its forward (OLMo v1)
    "OlmoLayerNorm": LAYERNORM_PRE,
}
# ε of classes that hard-code it in ``forward`` instead of holding an attribute.
_FIXED_EPSILON = {"OlmoLayerNorm": 1e-5}
_RMS_SCALE_NAMES = ("w", "weight", "scale", "gamma")


def unwrap_norm(module: nn.Module) -> nn.Module:
    """Returns the Hugging Face module inside a TransformerBridge wrapper, else ``module``."""
    inner = getattr(module, "original_component", None)
    return inner if isinstance(inner, nn.Module) else module


def _epsilon(module: nn.Module) -> float | None:
    """ε from ``eps`` or ``variance_epsilon`` (None-valued means float32's machine ε), or the
    class's hard-coded one."""
    fixed = _FIXED_EPSILON.get(type(module).__name__)
    if fixed is not None:
        return fixed
    for name in ("eps", "variance_epsilon"):
        if hasattr(module, name):
            value = getattr(module, name)
            return float(torch.finfo(torch.float32).eps) if value is None else float(value)
    return None


def classify_norm(norm_module: nn.Module) -> str:
    """Names the maths a norm module needs, by class name after unwrapping.

    Returns one of ``layernorm``, ``layernorm_pre``, ``layernorm_one_plus`` (Nemotron's
    ``1 + w``), ``rmsnorm``, ``rmsnorm_pre``, ``rmsnorm_one_plus`` (Gemma-1/2/3, VaultGemma,
    Qwen3-Next/3.5: ``1 + w``) or ``unknown``. Classes whose scale is an offset from 1 are listed
    by name: Gemma-3n's and Gemma-4's ``RMSNorm`` scale by ``w`` itself.
    """
    module = unwrap_norm(norm_module)
    name = type(module).__name__
    kind = _EXACT_KINDS.get(name)
    if kind is None:
        if isinstance(module, nn.LayerNorm) or name.endswith("LayerNorm"):
            kind = LAYERNORM
        elif name.endswith("RMSNorm"):
            kind = RMSNORM
        else:
            return UNKNOWN
    if kind in (LAYERNORM, LAYERNORM_ONE_PLUS, RMSNORM, RMSNORM_ONE_PLUS) and _epsilon(module) is None:
        return UNKNOWN
    return kind


def _get_rms_scale(norm_mod: nn.Module) -> Tensor | None:
    """The RMS scale: first of ``w``, ``weight``, ``scale``, ``gamma``; else a lone parameter."""
    for name in _RMS_SCALE_NAMES:
        value = getattr(norm_mod, name, None)
        if isinstance(value, Tensor):
            return value
    params = list(norm_mod.parameters(recurse=False))
    return params[0] if len(params) == 1 else None


def _affine_params(module: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    weight = getattr(module, "weight", None)
    if weight is None:
        weight = getattr(module, "w", None)
    bias = getattr(module, "bias", None)
    if bias is None:
        bias = getattr(module, "b", None)
    return weight, bias


def _layernorm_f32(x: Tensor, eps: float, kind: str, module: nn.Module) -> Tensor:
    centred = x - x.mean(dim=-1, keepdim=True)
    variance = centred.pow(2).mean(dim=-1, keepdim=True)  # biased, as LayerNorm defines it
    y = centred * torch.rsqrt(variance + eps)
    if kind == LAYERNORM_PRE:
        return y
    weight, bias = _affine_params(module)
    if weight is not None:
        weight = weight.to(device=x.device, dtype=torch.float32)  # the block may sit on another GPU
        y = y * (1.0 + weight if kind == LAYERNORM_ONE_PLUS else weight)
    if bias is not None:
        y = y + bias.to(device=x.device, dtype=torch.float32)
    return y


def _rmsnorm_f32(x: Tensor, eps: float, kind: str, module: nn.Module) -> Tensor:
    y = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    if kind == RMSNORM_PRE:
        return y
    scale = _get_rms_scale(module)
    if scale is None:
        return y
    scale = scale.to(device=x.device, dtype=torch.float32)  # the block may sit on another GPU
    return y * (1.0 + scale if kind == RMSNORM_ONE_PLUS else scale)


def apply_norm_or_skip(
    residual: Tensor,
    norm_module: nn.Module | None,
    warnings: list[str] | None = None,
    label: str | None = None,
) -> Tensor:
    """Normalises ``residual`` (``[..., d]``) the way ``norm_module`` would.

    Statistics are taken in float32 (ε inside the square root) and the result is cast back to the
    input's dtype and device. ``None`` returns the input. An unknown norm kind returns the input
    unchanged and appends ``unknown norm type <Class> at <label>: normalisation skipped`` to
    ``warnings``: never the wrong maths.
    """
    if norm_module is None:
        return residual
    kind = classify_norm(norm_module)
    module = unwrap_norm(norm_module)
    if kind == UNKNOWN:
        if warnings is not None:
            where = label or "?"
            warnings.append(
                f"unknown norm type {type(module).__name__} at {where}: normalisation skipped"
            )
        return residual
    eps = _epsilon(module)
    eps = 1e-5 if eps is None else eps  # *_pre kinds may carry no ε attribute
    x = residual.float()
    if kind in (LAYERNORM, LAYERNORM_PRE, LAYERNORM_ONE_PLUS):
        y = _layernorm_f32(x, eps, kind, module)
    else:
        y = _rmsnorm_f32(x, eps, kind, module)
    return y.to(dtype=residual.dtype, device=residual.device)


LINEAR_NORM_KINDS = (LAYERNORM, LAYERNORM_PRE, LAYERNORM_ONE_PLUS, RMSNORM, RMSNORM_PRE, RMSNORM_ONE_PLUS)


def frozen_norm_readout(ln_final: nn.Module | None, final_resid: Tensor,
                        direction: Tensor) -> tuple[Tensor, float]:
    """(u ``[d]``, bias) with ``norm(x) · direction = x · u + bias`` when the norm's scale is frozen
    at ``final_resid``: a part ``p`` contributes ``p · u`` (centring folded into u for a LayerNorm)."""
    if ln_final is None:
        return direction, 0.0
    kind, module = classify_norm(ln_final), unwrap_norm(ln_final)
    eps = _epsilon(module)
    eps = 1e-5 if eps is None else eps
    x = final_resid.float()
    if kind in (LAYERNORM, LAYERNORM_PRE, LAYERNORM_ONE_PLUS):
        scale = torch.rsqrt((x - x.mean()).pow(2).mean() + eps)
        weight, bias = (None, None) if kind == LAYERNORM_PRE else _affine_params(module)
    else:
        scale = torch.rsqrt(x.pow(2).mean() + eps)
        weight, bias = (None if kind == RMSNORM_PRE else _get_rms_scale(module)), None
    gain = torch.ones_like(x) if weight is None else weight.detach().float().to(x.device)
    if kind in (RMSNORM_ONE_PLUS, LAYERNORM_ONE_PLUS) and weight is not None:
        gain = 1.0 + gain
    u = scale * gain * direction
    if kind in (LAYERNORM, LAYERNORM_PRE, LAYERNORM_ONE_PLUS):
        u = u - u.mean()  # (p − mean p) · v = p · (v − mean v)
    beta = 0.0 if bias is None else float(bias.detach().float().to(x.device) @ direction)
    return u, beta


POST_SUBLAYER_NORM = "post_sublayer_norm"  # OLMo-2/OLMo-3: norms only on the sublayers' outputs


def detect_model_architecture(model: nn.Module) -> Literal["pre_norm", "post_norm", "post_sublayer_norm"]:
    """``post_norm`` iff block 0 has ``ln2`` and ``mlp`` children with ``ln2`` after ``mlp``;
    ``post_sublayer_norm`` when block 0 has no ``ln1``/``ln2`` but ``ln1_post``/``ln2_post`` (the
    residual stream itself meets no norm before ``ln_final``); else ``pre_norm``."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        return "pre_norm"
    children = [name for name, _ in blocks[0].named_children()]
    if "ln1" not in children and "ln2" not in children and {"ln1_post", "ln2_post"} & set(children):
        return POST_SUBLAYER_NORM
    if "ln2" in children and "mlp" in children:
        return "post_norm" if children.index("ln2") > children.index("mlp") else "pre_norm"
    return "pre_norm"


def _norm_location(
    model: nn.Module, layer_idx: int, probe_after_block: bool, strategy: str
) -> tuple[int | None, str] | None:
    """(block index or None for the top level, attribute) of the norm to apply, or None."""
    if strategy not in NORM_STRATEGIES:
        raise ValueError(f"unknown norm strategy {strategy!r}; expected one of {NORM_STRATEGIES}")
    if strategy == "none":
        return None
    if strategy == "final":
        return (None, "ln_final")
    if not probe_after_block:
        return (layer_idx, "ln1")
    if detect_model_architecture(model) == "post_norm":
        return (layer_idx, "ln2")
    n_layers = len(model.blocks)
    return (None, "ln_final") if layer_idx >= n_layers - 1 else (layer_idx + 1, "ln1")


def get_correct_norm_module(
    model: nn.Module, layer_idx: int, probe_after_block: bool, strategy: str = "arch"
) -> nn.Module | None:
    """The norm for a residual probed before (``False``) or after (``True``) block ``layer_idx``.

    ``arch``: pre-norm → the next block's ``ln1`` (``ln_final`` after the last block); post-norm →
    this block's ``ln2``; before a block → its ``ln1``. ``final``: ``ln_final``. ``none``: None.
    A missing attribute gives None.
    """
    location = _norm_location(model, layer_idx, probe_after_block, strategy)
    if location is None:
        return None
    block_idx, attr = location
    try:
        owner = model if block_idx is None else model.blocks[block_idx]
    except (AttributeError, IndexError, TypeError):
        return None
    return getattr(owner, attr, None)


def norm_module_label(
    model: nn.Module, layer_idx: int, probe_after_block: bool, strategy: str = "arch"
) -> str | None:
    """A readable name for the chosen norm, e.g. ``blocks[1].ln1`` or ``ln_final``; None if none."""
    location = _norm_location(model, layer_idx, probe_after_block, strategy)
    if location is None or get_correct_norm_module(model, layer_idx, probe_after_block, strategy) is None:
        return None
    block_idx, attr = location
    return attr if block_idx is None else f"blocks[{block_idx}].{attr}"
