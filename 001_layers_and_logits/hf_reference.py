"""An HF-only reference for the lens: the Hugging Face model's own residual stream (forward
hooks on its decoder layers), its own final norm module and head, and the config's head
transform. Nothing here touches TransformerLens or layers_core."""

from __future__ import annotations

import math

import torch

_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "final_norm", "norm_f",
                     "embedding_norm", "layer_norm")
_LAYER_LIST_NAMES = ("layers", "h", "blocks")


def entropy_bits(log_probs):
    return float(-(log_probs.exp() * log_probs).nan_to_num().sum(-1) / math.log(2))


def kl_bits(log_p, log_q):
    return float((log_p.exp() * (log_p - log_q)).nan_to_num().sum(-1) / math.log(2))


def _decoder_layers(hf):
    """(parent module, the decoder layers' ModuleList) found by name and length."""
    n_layers = hf.config.num_hidden_layers
    for name, module in hf.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers \
                and name.rsplit(".", 1)[-1] in _LAYER_LIST_NAMES:
            parent = hf.get_submodule(name.rsplit(".", 1)[0]) if "." in name else hf
            return parent, module
    raise AssertionError("no decoder layer list found")


def hf_head(hf):
    """The HF model's own head on a final-normed residual ``[d]`` → float64 log-probs ``[V]``."""
    config = hf.config
    output = hf.get_output_embeddings()
    pre_head = getattr(hf, "lm_head", None)
    pre_head = None if pre_head is output else pre_head  # ModernBERT-decoder: dense, GELU, LayerNorm

    def head(x):
        z = output(pre_head(x) if pre_head is not None else x).double()
        if getattr(config, "logits_scaling", None):
            z = z / config.logits_scaling
        if getattr(config, "logit_scale", None):
            z = z * config.logit_scale
        cap = getattr(config, "final_logit_softcapping", None)
        if cap:
            z = cap * torch.tanh(z / cap)
        return torch.log_softmax(z, -1)

    return head


def hf_residuals(hf, tokens):
    """The HF model's own residual stream at the last position: layer 0 (the input of the first
    decoder layer) and each layer's output, from forward hooks; and its own logits there."""
    _, layers = _decoder_layers(hf)
    captured = []

    def before(module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"])[0, -1])

    def after(module, args, output):
        captured.append((output[0] if isinstance(output, (tuple, list)) else output)[0, -1])

    handles = [layers[0].register_forward_pre_hook(before, with_kwargs=True)]
    handles += [layer.register_forward_hook(after) for layer in layers]
    try:
        with torch.no_grad():
            logits = hf(tokens).logits[0, -1]
    finally:
        for handle in handles:
            handle.remove()
    return captured, logits


def hf_all_residuals(hf, ids):
    """The HF model's own residual stream at every position of ``ids`` (a list of token ids):
    layer 0 and each decoder layer's output ``[T, d]``, from forward hooks; and its logits ``[T, V]``."""
    _, layers = _decoder_layers(hf)
    captured = []

    def before(module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"])[0])

    def after(module, args, output):
        captured.append((output[0] if isinstance(output, (tuple, list)) else output)[0])

    handles = [layers[0].register_forward_pre_hook(before, with_kwargs=True)]
    handles += [layer.register_forward_hook(after) for layer in layers]
    try:
        with torch.no_grad():
            logits = hf(torch.tensor([list(ids)])).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    return captured, logits


def final_norm(hf):
    parent, _ = _decoder_layers(hf)
    for name in _FINAL_NORM_NAMES:
        module = getattr(parent, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None  # a post-norm model whose blocks end in a norm (OpenAI GPT)


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


