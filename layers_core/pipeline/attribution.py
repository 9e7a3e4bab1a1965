"""Direct logit attribution on the raw model: which block wrote the answer's logit.

At the last position the residual after the last block is a sum of parts: the embedding (with
positional embedding), then for each block its attention part ``resid_mid − resid_pre`` and its
MLP part ``resid_post − resid_mid`` (differences of residual snapshots, so the parts add up
exactly whatever norms a block applies inside: Gemma's sandwich norms, OLMo-2's post-norms).
Parallel blocks have no ``resid_mid``: their attention and MLP output hooks give the parts.

Each part is projected through the final norm with its scale frozen at the final residual, onto
``W_U[:, answer]``: for an RMSNorm ``p · (s w ⊙ u)``, for a LayerNorm the part is centred first
and the norm's bias β adds ``β · u``, which no block writes (``norm_bias``). The parts, the bias
and ``b_U[answer]`` add up to the answer's logit from the model's own head before its transform
(softcap, logit scaling); ``residual_error`` says by how much they miss. TransformerLens's own
``direct_logit_attribution`` needs compatibility mode, which this project's raw Bridge never
enters; the test suite compares the two on a separate folded copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from layers_core.hooks import RESID_MID, RESID_POST, RESID_PRE_0
from layers_core.norm_utils import LINEAR_NORM_KINDS, classify_norm, frozen_norm_readout, unwrap_norm
from layers_core.pipeline.capture import capture
from layers_core.pipeline.sweep import PARALLEL_BLOCK

EMBED, ATTN, MLP, NORM_BIAS = "embed", "attn", "mlp", "norm_bias"
ATTN_OUT, MLP_OUT = "blocks.{}.hook_attn_out", "blocks.{}.hook_mlp_out"


@dataclass(frozen=True)
class Attribution:
    """One prompt's split of the answer logit: ``parts`` ``[(layer, component, logit,
    logit_vs_control or None)]`` in depth order (layer 0 = the embedding, layer b+1 = block b's
    parts, ``norm_bias`` last at layer n), ``head_logit`` (the model's own, before the head
    transform), ``bias`` (``b_U[answer]``) and ``residual_error`` = head_logit − Σparts − bias."""

    parts: list[tuple[int, str, float, float | None]]
    head_logit: float
    bias: float
    residual_error: float
    head_logit_vs_control: float | None = None
    bias_vs_control: float | None = None


def not_decomposable(model: Any) -> str | None:
    """Why the answer logit cannot be split into block parts here, or None."""
    from transformer_lens.tools.analysis._model_state import hybrid_block_types

    hybrid = hybrid_block_types(model)
    if hybrid:
        return (f"no attribution: hybrid blocks ({', '.join(hybrid)}) are not the attention + MLP "
                "layout that attribution splits")
    if getattr(model, "prediction_head", None) is not None:
        return "no attribution: the head holds layers between the final norm and W_U (not linear)"
    ln_final = getattr(model, "ln_final", None)
    if ln_final is not None and classify_norm(ln_final) not in LINEAR_NORM_KINDS:
        return f"no attribution: unknown final norm {type(unwrap_norm(ln_final)).__name__}"
    hooks = model.hook_dict  # built on each access: read once
    missing = [name for name in _part_hooks(model, hooks) if name not in hooks]
    if missing:
        return f"no attribution: the model has no hook point {missing[0]}"
    return None


def _parallel_blocks(model: Any, hooks: Any = None) -> list[bool]:
    """For each block: no ``resid_mid`` between its attention and MLP (a parallel block)."""
    hooks = model.hook_dict if hooks is None else hooks  # built on each access: read once
    return [type(model.blocks[block]).__name__ == PARALLEL_BLOCK or RESID_MID.format(block) not in hooks
            for block in range(int(model.cfg.n_layers))]


def _part_hooks(model: Any, hooks: Any = None) -> list[str]:
    names = [RESID_PRE_0]
    for block, parallel in enumerate(_parallel_blocks(model, hooks)):
        if parallel:
            names += [ATTN_OUT.format(block), MLP_OUT.format(block)]
        else:
            names.append(RESID_MID.format(block))
        names.append(RESID_POST.format(block))
    return names


def has_residual_mids(model: Any) -> bool:
    """Whether every block has a ``resid_mid`` (no parallel block): then the parts come from
    residual snapshots the lens forward can capture (``SweepSettings.capture_mids``)."""
    return not any(_parallel_blocks(model))


def parts_from_snapshots(residuals: Tensor, mids: Tensor) -> tuple[Tensor, Tensor, list[tuple[int, str]]]:
    """The parts from the residual stream at the last position: ``residuals`` ``[n+1, d]``
    (layer 0 = embeddings, layer b+1 = block b's output) and ``mids`` ``[n, d]``."""
    residuals, mids = residuals.float(), mids.float()
    attn, mlp = mids - residuals[:-1], residuals[1:] - mids
    parts = torch.cat([residuals[:1], torch.stack([attn, mlp], dim=1).reshape(-1, residuals.shape[-1])])
    labels = [(0, EMBED)] + [(block + 1, part) for block in range(mids.shape[0]) for part in (ATTN, MLP)]
    return parts, residuals[-1], labels


def capture_parts(model: Any, tokens: Tensor) -> tuple[Tensor, Tensor, list[tuple[int, str]]]:
    """One forward with the part hooks → (parts ``[P, d]`` float32 at the last position, on the
    unembedding's device, the final residual ``[d]``, and each part's (layer, component))."""
    hooks = model.hook_dict
    names = _part_hooks(model, hooks)
    device = model.unembed.W_U.device  # a model split over GPUs: every part on the lens's device
    cache = capture(model, tokens, names, device=device).activations
    last = {name: tensor[0, -1].float() for name, tensor in cache.items()}
    parts, labels = [last[RESID_PRE_0]], [(0, EMBED)]
    previous = last[RESID_PRE_0]
    for block, parallel in enumerate(_parallel_blocks(model, hooks)):
        post = last[RESID_POST.format(block)]
        if parallel:
            attn, mlp = last[ATTN_OUT.format(block)], last[MLP_OUT.format(block)]
            mlp = post - previous - attn  # what the block added besides attention (its MLP, and any bias)
        else:
            mid = last[RESID_MID.format(block)]
            attn, mlp = mid - previous, post - mid
        parts += [attn, mlp]
        labels += [(block + 1, ATTN), (block + 1, MLP)]
        previous = post
    return torch.stack(parts), previous, labels


def _model_head_logit(model: Any, final_resid: Tensor, answer_id: int) -> float:
    """The answer's logit from the model's own final norm and head modules, before the head
    transform (softcap, scaling)."""
    hf = model.original_model
    head = hf.get_output_embeddings()
    ln_final = getattr(model, "ln_final", None)
    x = final_resid.to(device=head.weight.device, dtype=head.weight.dtype).reshape(1, -1)
    with torch.inference_mode():
        normed = x if ln_final is None else unwrap_norm(ln_final)(x)
        return float(head(normed)[0, answer_id].float())


def attribute(model: Any, tokens: Tensor, answer_id: int, control_id: int | None = None,
              snapshots: tuple[Tensor, Tensor] | None = None) -> Attribution:
    """Splits the answer's logit at the last position of ``tokens`` ``[1, T]`` into parts (and
    the logit difference to ``control_id`` where given). ``snapshots``: the last position's
    residuals ``[n+1, d]`` and mids ``[n, d]`` from the lens forward (else a forward of its own
    captures the parts). Call ``not_decomposable`` first."""
    if snapshots is not None:
        parts, final_resid, labels = parts_from_snapshots(*snapshots)
    else:
        parts, final_resid, labels = capture_parts(model, tokens)
    W_U, b_U = model.unembed.W_U.detach(), getattr(model.unembed, "b_U", None)
    b_U = None if b_U is None else b_U.detach()
    ln_final = getattr(model, "ln_final", None)

    def split(token: int, other: int | None) -> tuple[Tensor, float, float]:
        direction = W_U[:, token].float().to(parts.device)
        bias = 0.0 if b_U is None else float(b_U[token])
        if other is not None:
            direction = direction - W_U[:, other].float().to(parts.device)
            bias -= 0.0 if b_U is None else float(b_U[other])
        u, beta = frozen_norm_readout(ln_final, final_resid, direction)
        values = torch.cat([parts @ u, torch.tensor([beta], device=parts.device)])
        return values, bias, beta

    answer_values, answer_bias, _ = split(answer_id, None)
    labels = labels + [(int(model.cfg.n_layers), NORM_BIAS)]
    head_logit = _model_head_logit(model, final_resid, answer_id)
    control_values = control_head = control_bias = None
    if control_id is not None:
        control_values, control_bias, _ = split(answer_id, control_id)
        control_head = head_logit - _model_head_logit(model, final_resid, control_id)
    answer_list = answer_values.tolist()
    control_list = control_values.tolist() if control_values is not None else [None] * len(answer_list)
    rows = [(layer, component, value, vs)
            for (layer, component), value, vs in zip(labels, answer_list, control_list)]
    error = head_logit - float(answer_values.double().sum()) - answer_bias
    return Attribution(rows, head_logit, answer_bias, error, control_head, control_bias)
