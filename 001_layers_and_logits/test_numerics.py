"""numerics: entropy, casting, KL, ranks, post-unembed transform, unembedding."""

import math

import pytest
import torch

from layers_core.numerics import (
    answer_rank,
    apply_post_unembed_transform,
    bits_entropy_from_logits,
    entropy_bits_from_log_probs,
    get_post_unembed_transform,
    kl_bits,
    safe_cast_for_unembed,
    topk_last_dim,
    unembed_logits,
)

NO_TRANSFORM = {"softcap": None, "logit_scale_multiply": None, "logit_scale_divide": None}


def test_uniform_entropy_is_log2_v():
    assert bits_entropy_from_logits(torch.zeros(10)).item() == pytest.approx(3.321928, abs=1e-5)


def test_peaked_entropy_is_near_zero():
    logits = torch.full((10,), -10.0)
    logits[3] = 10.0
    assert bits_entropy_from_logits(logits).item() < 1e-3


@pytest.mark.parametrize("logits", [
    torch.tensor([1e4, -1e4, 0.0]),
    torch.tensor([0.0, -math.inf, -math.inf]),
    torch.tensor([5.0, -math.inf, 5.0, -1e4]),
])
def test_extreme_logits_give_finite_non_negative_entropy(logits):
    value = bits_entropy_from_logits(logits)
    assert torch.isfinite(value) and value.item() >= 0
    assert math.copysign(1.0, value.item()) == 1.0  # never −0.0


def test_entropy_is_batched_and_bounded_property():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=gen) * torch.rand(64, 1, generator=gen) * 20
    h = bits_entropy_from_logits(logits)
    assert h.shape == (64,) and h.dtype == torch.float32
    assert (h >= 0).all() and (h <= math.log2(50) + 1e-5).all()
    p = torch.softmax(logits.double(), -1)
    reference = -(p * p.log()).sum(-1) / math.log(2)
    assert torch.allclose(h.double(), reference, atol=1e-4)


def test_entropy_with_scratch_equals_without_and_only_scratch_is_overwritten():
    gen = torch.Generator().manual_seed(1)
    log_probs = torch.log_softmax(torch.randn(5, 300, generator=gen) * 4, dim=-1)
    log_probs[2, :150] = -math.inf  # p = 0 terms on the nan-repair path
    log_probs[2] = torch.log_softmax(log_probs[2], dim=-1)
    kept, scratch = log_probs.clone(), torch.randn(5, 300)
    with_scratch = entropy_bits_from_log_probs(log_probs, scratch)
    assert torch.equal(log_probs, kept)
    assert torch.equal(with_scratch, entropy_bits_from_log_probs(log_probs))
    assert torch.isfinite(with_scratch).all()


@pytest.mark.parametrize("width", [50, 64 * 80, 64 * 80 + 37, 49_152])
def test_topk_last_dim_equals_torch_topk_property(width):
    gen = torch.Generator().manual_seed(width)
    for scale in (0.1, 3.0, 30.0):
        x = torch.log_softmax(torch.randn(7, width, generator=gen) * scale, dim=-1)
        x[0, -5:] = 10.0  # the winners sit in the ragged tail
        x[1, :64] = 9.0  # one chunk holds them all
        values, ids = topk_last_dim(x, 20)
        reference = torch.topk(x, 20, dim=-1)
        assert torch.equal(values, reference.values)
        assert torch.equal(x.gather(1, ids), values)
        untied = (values[:, :-1] != values[:, 1:]).all(dim=-1)
        assert torch.equal(ids[untied], reference.indices[untied])


def test_entropy_of_bf16_logits_is_float32():
    h = bits_entropy_from_logits(torch.zeros(8, dtype=torch.bfloat16))
    assert h.dtype == torch.float32 and h.item() == pytest.approx(3.0, abs=1e-6)


def test_safe_cast_policy():
    fp16, fp32 = torch.ones(2, dtype=torch.float16), torch.ones(2)
    W32, W16 = torch.ones(2, 3), torch.ones(2, 3, dtype=torch.float16)
    assert safe_cast_for_unembed(fp16, W32, force_fp32_unembed=True).dtype == torch.float32
    assert safe_cast_for_unembed(fp32, W16).dtype == torch.float16
    assert safe_cast_for_unembed(fp32, torch.ones(2, 3, dtype=torch.bfloat16)).dtype == torch.bfloat16
    W8 = torch.ones(2, 3, dtype=torch.int8)
    assert safe_cast_for_unembed(fp16, W8) is fp16


def test_kl_of_identical_is_zero_and_non_negative_property():
    gen = torch.Generator().manual_seed(1)
    p, q = torch.randn(32, 20, generator=gen), torch.randn(32, 20, generator=gen) * 3
    assert torch.equal(kl_bits(p, p), torch.zeros(32))
    assert (kl_bits(p, q) >= 0).all()


def test_kl_hand_computed_two_token_value_and_asymmetry():
    p = torch.log(torch.tensor([0.75, 0.25]))
    q = torch.log(torch.tensor([0.5, 0.5]))
    expected_pq = 0.75 * math.log2(0.75 / 0.5) + 0.25 * math.log2(0.25 / 0.5)  # 0.188722
    expected_qp = 0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)  # 0.207519
    assert kl_bits(p, q).item() == pytest.approx(expected_pq, abs=1e-6)
    assert kl_bits(q, p).item() == pytest.approx(expected_qp, abs=1e-6)


def test_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(2)
    p, q = torch.randn(40, generator=gen), torch.randn(40, generator=gen)
    ref = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=p),
                                            torch.distributions.Categorical(logits=q))
    assert kl_bits(p, q).item() == pytest.approx(ref.item() / math.log(2), abs=1e-6)


def test_answer_rank_counts_strictly_greater_and_ties_favour_answer():
    logits = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert answer_rank(logits, 1) == 1  # tied with ids 2 and 4
    assert answer_rank(logits, 3) == 4
    assert answer_rank(logits, 0) == 5


def test_softcap_applied_once():
    transform = {**NO_TRANSFORM, "softcap": 30.0}
    out = apply_post_unembed_transform(torch.tensor([100.0]), transform)
    assert out.item() == pytest.approx(29.92374, abs=1e-4)  # twice would give 22.81573
    assert out.item() != pytest.approx(22.81573, abs=1e-3)


def test_scaling_divide_and_multiply_before_softcap():
    z = torch.tensor([8.0])
    assert apply_post_unembed_transform(z, {**NO_TRANSFORM, "logit_scale_divide": 4.0}).item() == 2.0
    assert apply_post_unembed_transform(z, {**NO_TRANSFORM, "logit_scale_multiply": 0.5}).item() == 4.0
    both = {"softcap": 3.0, "logit_scale_multiply": 2.0, "logit_scale_divide": None}
    assert apply_post_unembed_transform(z, both).item() == pytest.approx(3 * math.tanh(16 / 3))


def test_post_unembed_transform_read_from_hf_config(load_bridge):
    gemma = get_post_unembed_transform(load_bridge("gemma2"))
    assert gemma == {"softcap": 5.0, "logit_scale_multiply": None, "logit_scale_divide": None}
    assert get_post_unembed_transform(load_bridge("llama")) == NO_TRANSFORM


def test_unembed_logits_matmul_bias_and_callable_transform():
    x, W, b = torch.randn(3, 4), torch.randn(4, 6), torch.randn(6)
    out = unembed_logits(x, W, b, NO_TRANSFORM)
    assert torch.allclose(out, x @ W + b, atol=1e-6) and out.dtype == torch.float32
    capped = unembed_logits(x * 100, W, None, lambda z: 2.0 * torch.tanh(z / 2.0))
    assert capped.abs().max() <= 2.0


def test_unembed_logits_writes_into_a_matching_buffer_only():
    x, W, b = torch.randn(3, 4), torch.randn(4, 6), torch.randn(6)
    buffer = torch.empty(3, 6)
    out = unembed_logits(x, W, b, NO_TRANSFORM, out=buffer)
    assert out.data_ptr() == buffer.data_ptr() and torch.allclose(out, x @ W + b, atol=1e-6)
    fp16_out = unembed_logits(x.half(), W.half(), None, NO_TRANSFORM, out=buffer)
    assert fp16_out.data_ptr() != buffer.data_ptr() and fp16_out.dtype == torch.float32


def test_unembed_logits_fp16_weights_return_float32():
    x, W = torch.randn(2, 4, dtype=torch.float16), torch.randn(4, 5, dtype=torch.float16)
    assert unembed_logits(x, W, None, NO_TRANSFORM).dtype == torch.float32
