"""Long-context kernels: the pluggable forward, LongCache selection, RazorAttention compression.

Exactness checks against plain attention, the compensation token against explicit duplication, the
Triton biased-attention kernel against its reference (Triton interpreter on CPU; compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import gpu
from transformers import LlamaConfig, LlamaForCausalLM

from kernels.biased_attention import biased_attention
from kernels.decoding import FullAttention, attention, forward
from kernels.longcache import LongCache, LongCacheConfig, expand_spans, select_middle
from kernels.razor import RazorCache, RazorConfig, compensated_attention, head_scores, retrieval_heads


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    return LlamaForCausalLM(cfg).eval()


def ids(n=120, seed=0):
    return torch.randint(0, 500, (1, n), generator=torch.Generator().manual_seed(seed))


def test_functional_forward_matches_hf_in_one_pass_and_in_chunks(model):
    x = ids()
    with torch.no_grad():
        ref = model(input_ids=x).logits
    torch.testing.assert_close(forward(model, x, FullAttention(model), 0), ref, rtol=1e-4, atol=1e-5)
    policy = FullAttention(model)
    parts = [forward(model, x[:, s:s + 25], policy, s) for s in range(0, 120, 25)]
    torch.testing.assert_close(torch.cat(parts, 1), ref, rtol=1e-4, atol=1e-5)


def test_longcache_equals_full_attention_when_the_window_covers_everything(model):
    x = ids()
    with torch.no_grad():
        ref = model(input_ids=x).logits
    lc = LongCache(model, LongCacheConfig(global_size=4, local_size=200, mid_size=1, span_size=4, recall_clip=2))
    parts = [forward(model, x[:, s:s + 30], lc, s) for s in range(0, 120, 30)]
    torch.testing.assert_close(torch.cat(parts, 1), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 16])
def test_longcache_positions_never_exceed_the_scope(model, chunk):
    cfg = LongCacheConfig(global_size=4, local_size=16, mid_size=2, span_size=8, recall_clip=3)
    lc = LongCache(model, cfg)
    x = ids(300)
    for s in range(0, 300, chunk):
        forward(model, x[:, s:s + chunk], lc, s)
    assert 0 < lc.max_position < cfg.scope(chunk) and lc.cache_bytes() > 0
    assert all(k.shape[2] == 300 for k in lc.k.values())  # the whole context is kept


def test_middle_selection_and_spans():
    scores = torch.tensor([[0.0, 5.0, 1.0, 0.0, 4.0], [0.0, 5.0, 0.0, 3.0, 0.0], [9.0, 5.0, 0.0, 0.0, 0.0]])
    assert select_middle(scores, 1, -1).tolist() == [0, 1]
    assert select_middle(scores, 2, 1).tolist() == [1]  # clip keeps the most frequently chosen
    assert expand_spans(torch.tensor([0, 7]), 4, start=32, stop=40).tolist() == [32, 33, 37, 38, 39]  # clamped


def test_compensation_token_equals_duplicating_the_mean_token():
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 3, 16, generator=gen), torch.randn(1, 2, 10, 16, generator=gen), torch.randn(
        1, 2, 10, 16, generator=gen)
    ck, cv = torch.randn(1, 2, 16, generator=gen), torch.randn(1, 2, 16, generator=gen)
    got = compensated_attention(q, k, v, torch.tensor([7]), ck, cv, attn=attention)
    k_dup = torch.cat([ck[:, :, None].expand(1, 2, 7, 16), k], 2)
    v_dup = torch.cat([cv[:, :, None].expand(1, 2, 7, 16), v], 2)
    torch.testing.assert_close(got, attention(q, k_dup, v_dup), rtol=1e-5, atol=1e-6)
    triton = compensated_attention(q, k, v, torch.tensor([7]), ck, cv, attn=biased_attention)  # interpreter
    torch.testing.assert_close(triton, attention(q, k_dup, v_dup), rtol=1e-5, atol=1e-6)


def test_triton_biased_attention_matches_reference_with_causal_mask_and_padding():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 5, 24, generator=gen), torch.randn(2, 2, 70, 24, generator=gen),
               torch.randn(2, 2, 70, 24, generator=gen))
    bias = torch.randn(2, 2, 70, generator=gen)
    bias[:, 1, 60:] = float("-inf")  # padding on one head
    q_pos, k_pos = torch.tensor([0, 10, 30, 65, 69]), torch.arange(70)
    torch.testing.assert_close(biased_attention(q, k, v, bias, q_pos, k_pos), attention(q, k, v, bias, q_pos, k_pos),
                               rtol=1e-5, atol=1e-6)


def test_retrieval_heads_and_compressed_cache(model):
    induction, echo = head_scores(model, block=32, repeats=4, low=10, high=500)
    assert induction.shape == echo.shape == (2, 2) and (induction >= 0).all() and (induction <= 1).all()
    cfg = RazorConfig(induction_fraction=0.25, echo_fraction=0.01, sinks=2, min_buffer=8, compression=8)
    heads = retrieval_heads(induction, echo, cfg)
    assert 1 <= int(heads.sum()) <= 2
    full, razor = FullAttention(model), RazorCache(model, heads, cfg)
    x = ids(200)
    for policy in (full, razor):
        forward(model, x[:, :190], policy, 0)
    razor.after_prefill()
    out_full, out_razor = forward(model, x[:, 190:], full, 190), forward(model, x[:, 190:], razor, 190)
    assert out_razor.shape == out_full.shape and torch.isfinite(out_razor).all()
    kept = 2 + max(8, -(-190 // 8)) + 1  # sinks + buffer + compensation token
    per_head = 2 * 16 * 4  # k and v, head_dim 16, fp32
    n_retrieval = int(heads.sum())
    expected = n_retrieval * (190 + 10) * per_head + (4 - n_retrieval) * (kept + 10) * per_head
    assert razor.cache_bytes() == expected and razor.cache_bytes() < 0.5 * full.cache_bytes()


def test_razor_with_nothing_to_drop_equals_full_attention(model):
    heads = torch.zeros(2, 2, dtype=torch.bool)
    razor, full, x = RazorCache(model, heads, RazorConfig(min_buffer=4096)), FullAttention(model), ids(60)
    forward(model, x[:, :50], razor, 0), forward(model, x[:, :50], full, 0)
    razor.after_prefill()
    torch.testing.assert_close(forward(model, x[:, 50:], razor, 50), forward(model, x[:, 50:], full, 50),
                               rtol=1e-4, atol=1e-5)


@gpu
def test_biased_attention_kernel_on_cuda():
    q, k, v = torch.randn(1, 8, 16, 64).cuda(), torch.randn(1, 2, 4096, 64).cuda(), torch.randn(1, 2, 4096, 64).cuda()
    bias = torch.randn(1, 2, 4096).cuda()
    q_pos, k_pos = torch.arange(4080, 4096).cuda(), torch.arange(4096).cuda()
    torch.testing.assert_close(biased_attention(q, k, v, bias, q_pos, k_pos), attention(q, k, v, bias, q_pos, k_pos),
                               rtol=1e-3, atol=1e-4)


def test_retrieval_head_counts_follow_the_fractions():
    """14 % by induction (at least one head) union 1 % by echo (may round to none on a small model)."""
    gen = torch.Generator().manual_seed(0)
    cfg = RazorConfig(induction_fraction=0.14, echo_fraction=0.01)
    induction, echo = torch.rand(3, 3, generator=gen), torch.rand(3, 3, generator=gen)
    heads = retrieval_heads(induction, echo, cfg)
    assert heads.sum() == 1 and heads.flatten()[induction.flatten().argmax()]  # round(1.26) = 1, round(0.09) = 0
    induction, echo = torch.rand(32, 8, generator=gen), torch.rand(32, 8, generator=gen)
    heads = retrieval_heads(induction, echo, cfg).flatten()
    top_induction, top_echo = set(induction.flatten().topk(36).indices.tolist()), set(echo.flatten().topk(3).indices.tolist())
    assert set(heads.nonzero().flatten().tolist()) == top_induction | top_echo  # 14 % of 256 = 36, 1 % = 3
