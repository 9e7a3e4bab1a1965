"""Gaps in the pinned TransformerLens (4.3) bridge, worked around here, one row per family.

Each entry names the architecture (the HF config's ``architectures[0]``) and the upstream gap.
The README's family table lists the same rows. Nothing here changes a weight: the fixes only
route what the bridge misreads (a class name, a rotary buffer, a block's output type).

- ``ARCHITECTURE_ALIASES``: transformers 5.24 names the class differently from the bridge's
  registry; the bridge is told the name it knows (``hf_config_overrides``).
- ``MODEL_FIXES``: small, exact patches to the loaded HF model before it is bridged.
- ``REFUSED``: families the bridge cannot lens, refused at load in one line that says why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ARCHITECTURE_ALIASES = {
    # TransformerLens registers Phi-MoE as PhiMoEForCausalLM; transformers 5.24 names it PhimoeForCausalLM.
    "PhimoeForCausalLM": "PhiMoEForCausalLM",
}

REFUSED = {
    "DeepseekV4ForCausalLM": "DeepSeek-V4 keeps several residual streams between blocks "
                             "(hyper-connections), so no layer has one residual stream to decode",
    "HrmTextForCausalLM": "HRM-Text runs its two layer stacks in nested recurrent cycles, so a "
                          "block's hooks fire once per cycle and there is no layer order to decode",
}


def _codegen_attention_attributes(hf_model: Any) -> None:
    """The bridge's CodeGen attention reads transformers 4's ``attn.embed_positions`` (moved to
    ``transformer.rotary_emb`` in transformers 5) and ``attn.scale_attn`` (√head_dim, now the
    reciprocal ``attn.scaling``): each attention module gets them back, the same values."""
    import torch

    table = hf_model.transformer.rotary_emb.embed_positions
    for block in hf_model.transformer.h:
        block.attn.embed_positions = table
        block.attn.scale_attn = torch.tensor(block.attn.scaling ** -1, dtype=torch.float32,
                                             device=table.device)


def _blocks_return_tuples(hf_model: Any) -> None:
    """OpenAI GPT's blocks return a list, which the bridge's block hook does not see (it hooks
    tuples and tensors), so ``hook_resid_post`` never fires: each block returns a tuple instead."""
    for block in hf_model.transformer.h:
        forward = block.forward
        block.forward = lambda *args, _forward=forward, **kwargs: tuple(_forward(*args, **kwargs))


MODEL_FIXES: dict[str, Callable[[Any], None]] = {
    "CodeGenForCausalLM": _codegen_attention_attributes,
    "OpenAIGPTLMHeadModel": _blocks_return_tuples,
}


def architecture_of(config: Any) -> str | None:
    """The HF config's first declared architecture, if any."""
    architectures = getattr(config, "architectures", None) or []
    return architectures[0] if architectures else None


def bridge_architecture(config: Any) -> str | None:
    """The name the bridge's registry knows this config's architecture by."""
    architecture = architecture_of(config)
    return ARCHITECTURE_ALIASES.get(architecture, architecture)


def refusal(config: Any) -> str | None:
    """Why this architecture cannot be lensed, or None."""
    return REFUSED.get(architecture_of(config) or "")


def bridge_overrides(config: Any) -> dict[str, str] | None:
    """``hf_config_overrides`` for ``boot_transformers`` (an alias), or None."""
    architecture = architecture_of(config)
    if architecture in ARCHITECTURE_ALIASES:
        return {"original_architecture": ARCHITECTURE_ALIASES[architecture]}
    return None


def fix_model(hf_model: Any) -> None:
    """Applies this architecture's fix (if any) to a loaded HF model, in place."""
    fix = MODEL_FIXES.get(architecture_of(hf_model.config) or "")
    if fix is not None:
        fix(hf_model)
