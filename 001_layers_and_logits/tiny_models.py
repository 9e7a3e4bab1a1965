"""Tiny random-weight causal LMs of several families, built offline for tests and benchmarks.

Each model is built from a transformers config class, given non-trivial norm weights (and an
unembedding bias where the family allows one) so that a wrong gamma, beta, epsilon, bias or softcap
changes the numbers, and saved with ``save_pretrained`` next to a BPE tokenizer trained locally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

CORPUS = [
    "Give the city name only, plain text. The capital of Germany is called simply Berlin.",
    "The capital of France is called simply Paris. The capital of Japan is Tokyo.",
    "Berlin is the capital of Germany. Germany's capital city is called Berlin.",
    'Quotes " and commas, back\\slashes and\nnew lines are tokens too: ("-) a,b x\ny',
    "In Germany the capital city is known as Berlin; answer with one word simply.",
]
VOCAB_SIZE = 320
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"]


def train_tokenizer(out_dir: str) -> None:
    """Trains a byte-level BPE tokenizer on ``CORPUS`` and saves it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>",
    )
    fast.save_pretrained(out_dir)


def _common(vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, **_common(VOCAB_SIZE))
    return LlamaForCausalLM(cfg)


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        sliding_window=64, rms_norm_eps=1e-6, **_common(VOCAB_SIZE))
    return MistralForCausalLM(cfg)


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, **_common(VOCAB_SIZE))
    return Qwen2ForCausalLM(cfg)


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=128, rms_norm_eps=1e-6, **_common(VOCAB_SIZE))
    return Qwen3ForCausalLM(cfg)


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=128, final_logit_softcapping=5.0,
                       attn_logit_softcapping=50.0, query_pre_attn_scalar=16,
                       sliding_window=64, **_common(VOCAB_SIZE))
    return Gemma2ForCausalLM(cfg)


def _phi():
    from transformers import PhiConfig, PhiForCausalLM

    cfg = PhiConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=128, partial_rotary_factor=0.5,
                    **_common(VOCAB_SIZE))
    return PhiForCausalLM(cfg)  # LayerNorm, parallel attention, lm_head with a real bias


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=128, **_common(VOCAB_SIZE))
    return GPT2LMHeadModel(cfg)


def _neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.25,
                        use_parallel_residual=True, tie_word_embeddings=False,
                        **_common(VOCAB_SIZE))
    return GPTNeoXForCausalLM(cfg)


@dataclass(frozen=True)
class TinyFamily:
    """One fixture family: how to build it and what the lens must respect."""

    name: str
    build: Callable
    logit_gain: float = 1.0  # scales the unembedding so that logits reach a softcap


FAMILIES: dict[str, TinyFamily] = {
    f.name: f
    for f in (
        TinyFamily("llama", _llama),
        TinyFamily("mistral", _mistral),
        TinyFamily("qwen2", _qwen2),
        TinyFamily("qwen3", _qwen3),
        TinyFamily("gemma2", _gemma2, logit_gain=40.0),
        TinyFamily("phi", _phi),
        TinyFamily("gpt2", _gpt2),
        TinyFamily("gpt-neox", _neox),
    )
}


def _perturb_weights(model, seed: int, logit_gain: float) -> None:
    """Makes norms and biases non-trivial so that each term of the lens maths is visible."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.startswith("transformer.ln_f"):
                # weights around 1 (Gemma stores w with scale 1+w, so this is also non-trivial),
                # biases (LayerNorm beta) clearly non-zero
                noise = torch.randn(param.shape, generator=gen) * 0.3
                param.copy_((1.0 + noise) if name.endswith("weight") else noise)
        head = model.get_output_embeddings()
        if head.bias is not None:
            head.bias.copy_(torch.randn(head.out_features, generator=gen) * 0.5)
        head.weight.mul_(logit_gain)  # tied embeddings scale too; the lens sees both


def _olmo2():
    from transformers import Olmo2Config, Olmo2ForCausalLM

    cfg = Olmo2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, **_common(VOCAB_SIZE))
    return Olmo2ForCausalLM(cfg)


# Layouts the family-wide HF references do not cover (no pre-sublayer norm): tested on their own.
EXTRA_FAMILIES: dict[str, TinyFamily] = {"olmo2": TinyFamily("olmo2", _olmo2)}


# The family matrix: every attention-based, text-only decoder architecture that the pinned
# TransformerLens bridges and transformers 5.24 builds from a config (SSM, diffusion and multimodal
# adapters are out of scope). Each is built by shrinking its config class's defaults
# (``_SMALL``); the dict holds the few settings a family needs beyond that.
MATRIX: dict[str, dict] = {
    "AfmoeForCausalLM": {}, "ApertusForCausalLM": {}, "ArceeForCausalLM": {}, "BitNetForCausalLM": {},
    "BloomForCausalLM": {}, "CodeGenForCausalLM": {"rotary_dim": 8}, "CohereForCausalLM": {},
    "Cohere2ForCausalLM": {}, "DeepseekV2ForCausalLM": {},
    "DeepseekV3ForCausalLM": {"n_group": 1, "topk_group": 1},
    "DeepseekV4ForCausalLM": {}, "Ernie4_5ForCausalLM": {}, "Ernie4_5_MoeForCausalLM": {},
    "Exaone4ForCausalLM": {}, "FalconForCausalLM": {}, "FlexOlmoForCausalLM": {}, "GPT2LMHeadModel": {},
    "GPTBigCodeForCausalLM": {}, "GPTJForCausalLM": {"rotary_dim": 8},
    "GPTNeoForCausalLM": {"attention_types": [[["global", "local"], 1]], "window_size": 64},
    "GPTNeoXForCausalLM": {}, "GemmaForCausalLM": {}, "Gemma2ForCausalLM": {}, "Gemma3ForCausalLM": {},
    "Gemma4ForCausalLM": {}, "GlmForCausalLM": {}, "Glm4ForCausalLM": {}, "Glm4MoeForCausalLM": {},
    "Glm4MoeLiteForCausalLM": {}, "GlmMoeDsaForCausalLM": {}, "GptOssForCausalLM": {}, "GraniteForCausalLM": {},
    "GraniteMoeForCausalLM": {}, "HrmTextForCausalLM": {}, "HunYuanDenseV1ForCausalLM": {},
    "Jais2ForCausalLM": {}, "JetMoeForCausalLM": {}, "LagunaForCausalLM": {}, "LlamaForCausalLM": {},
    "Llama4ForCausalLM": {}, "MiniMaxM2ForCausalLM": {}, "Ministral3ForCausalLM": {}, "MistralForCausalLM": {},
    "MixtralForCausalLM": {}, "ModernBertDecoderForCausalLM": {}, "MptForCausalLM": {},
    "NanoChatForCausalLM": {}, "NemotronForCausalLM": {}, "OPTForCausalLM": {}, "OlmoForCausalLM": {},
    "Olmo2ForCausalLM": {}, "Olmo3ForCausalLM": {}, "OlmoeForCausalLM": {}, "OpenAIGPTLMHeadModel": {},
    "PhiForCausalLM": {}, "Phi3ForCausalLM": {}, "PhimoeForCausalLM": {}, "Qwen2ForCausalLM": {},
    "Qwen2MoeForCausalLM": {}, "Qwen3ForCausalLM": {}, "Qwen3MoeForCausalLM": {}, "SeedOssForCausalLM": {},
    "SmolLM3ForCausalLM": {}, "StableLmForCausalLM": {}, "Starcoder2ForCausalLM": {},
    "VaultGemmaForCausalLM": {}, "XGLMForCausalLM": {}, "YoutuForCausalLM": {},
    # hybrids: attention mixed with linear attention or short convolutions (one layer of each)
    "Qwen3NextForCausalLM": {}, "Qwen3_5ForCausalLM": {}, "Qwen3_5MoeForCausalLM": {},
    "OlmoHybridForCausalLM": {}, "Lfm2ForCausalLM": {"layer_types": ["conv", "full_attention"]},
    "Lfm2MoeForCausalLM": {"layer_types": ["conv", "full_attention"]},
}
_SMALL = dict(
    hidden_size=64, n_embd=64, d_model=64, intermediate_size=128, ffn_hidden_size=128, n_inner=128,
    num_hidden_layers=2, n_layer=2, n_layers=2, num_layers=2, num_attention_heads=4, n_head=4, n_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=128, n_positions=128, n_ctx=128,
    moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, n_routed_experts=4,
    num_local_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
    kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    sliding_window=64, tie_word_embeddings=False, **_common(VOCAB_SIZE))
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def matrix_config(architecture: str):
    """The tiny config of one matrix family: its config class's defaults, shrunk.

    Multi-head latent attention (``qk_rope_head_dim``) keeps its own head_dim and one KV head per
    head; a config with several layer types gets one layer of each, so hybrids run both kinds.
    """
    import transformers

    config_class = getattr(transformers, architecture).config_class
    defaults = config_class().to_dict()
    settings = {key: value for key, value in _SMALL.items() if key in defaults}
    if "qk_rope_head_dim" in defaults:
        settings.pop("head_dim", None)
        settings["num_key_value_heads"] = settings["num_attention_heads"]
    kinds = list(dict.fromkeys(defaults.get("layer_types") or []))
    if len(kinds) > 1:
        settings["layer_types"] = kinds
        settings.update({key: len(kinds) for key in _LAYER_COUNT_KEYS if key in settings})
    settings.update(MATRIX[architecture])
    if "layer_types" in settings:
        settings.update({key: len(settings["layer_types"]) for key in _LAYER_COUNT_KEYS if key in settings})
    return config_class(**settings)


def _matrix_family(architecture: str) -> TinyFamily:
    def build():
        import transformers

        return getattr(transformers, architecture)(matrix_config(architecture))

    return TinyFamily(architecture, build)


def build_tiny_model(family: str, out_dir: str, seed: int = 0) -> str:
    """Builds, perturbs and saves one tiny model with its tokenizer into ``out_dir``.

    ``family``: a fixture family (``FAMILIES``, ``EXTRA_FAMILIES``) or a matrix architecture.
    """
    import torch

    spec = FAMILIES.get(family) or EXTRA_FAMILIES.get(family) or _matrix_family(family)
    torch.manual_seed(seed)
    model = spec.build().eval()
    _perturb_weights(model, seed + 1, spec.logit_gain)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    train_tokenizer(out_dir)
    return out_dir


def build_llama_1b_shape(out_dir: str, seed: int = 0) -> str:
    """A random-weight Llama-3.2-1B-shape checkpoint saved in bfloat16 (≈ 2.5 GB), tied
    embeddings, with a small locally trained tokenizer: big enough to measure memory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0, tie_word_embeddings=True, **_common(128256))
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.config.dtype = "bfloat16"
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    train_tokenizer(out_dir)
    return out_dir
