"""Long-context kernels: the pluggable forward, LongCache selection, RazorAttention compression.

Exactness checks against plain attention, the compensation token against explicit duplication, the
Triton biased-attention kernel against its reference (Triton interpreter on CPU; compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import gpu
from tracecore.kernels.biased_attention import biased_attention
from tracecore.kernels.decoding import FullAttention, attention, fast_attention, forward
from tracecore.kernels.longcache import LongCache, LongCacheConfig, expand_spans, select_middle
from tracecore.kernels.razor import (
    RazorCache,
    RazorConfig,
    compensated_attention,
    head_scores,
    retrieval_heads,
)
from transformers import LlamaConfig, LlamaForCausalLM


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
    lc = LongCache(model,
                   LongCacheConfig(global_size=4, local_size=200, mid_size=1, span_size=4, recall_clip=2))
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
    # clamped
    assert expand_spans(torch.tensor([0, 7]), 4, start=32, stop=40).tolist() == [32, 33, 37, 38, 39]


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
    torch.testing.assert_close(biased_attention(q, k, v, bias, q_pos, k_pos),
                               attention(q, k, v, bias, q_pos, k_pos), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tq", [1, 7])
def test_fused_attention_matches_reference_for_a_growing_cache(tq):
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 4, tq, 16, generator=gen), torch.randn(1, 2, 40, 16, generator=gen), torch.randn(
        1, 2, 40, 16, generator=gen)
    k_pos = torch.arange(40)
    q_pos = k_pos[-tq:]
    torch.testing.assert_close(fast_attention(q, k, v, q_pos, k_pos), attention(q, k, v, None, q_pos, k_pos),
                               rtol=1e-5, atol=1e-6)


def test_triton_biased_attention_merges_key_splits():
    """Over 512 keys the kernel splits the keys across programs and merges the partials; a split whose keys
    are all masked (future positions, -inf bias) must weigh nothing."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 3, 16, generator=gen), torch.randn(1, 1, 1100, 16, generator=gen),
               torch.randn(1, 1, 1100, 16, generator=gen))
    bias = torch.randn(1, 1, 1100, generator=gen)
    bias[..., 700:900] = float("-inf")
    q_pos, k_pos = torch.tensor([100, 600, 1099]), torch.arange(1100)  # query 0 sees only the first split
    torch.testing.assert_close(biased_attention(q, k, v, bias, q_pos, k_pos),
                               attention(q, k, v, bias, q_pos, k_pos), rtol=1e-5, atol=1e-6)


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
    # decoding keeps the size
    expected = n_retrieval * (190 + 10) * per_head + (4 - n_retrieval) * kept * per_head
    assert razor.cache_bytes() == expected and razor.cache_bytes() < 0.5 * full.cache_bytes()


def test_razor_with_nothing_to_drop_equals_full_attention(model):
    heads = torch.zeros(2, 2, dtype=torch.bool)
    razor, full, x = RazorCache(model, heads, RazorConfig(min_buffer=4096)), FullAttention(model), ids(60)
    forward(model, x[:, :50], razor, 0), forward(model, x[:, :50], full, 0)
    razor.after_prefill()
    torch.testing.assert_close(forward(model, x[:, 50:], razor, 50), forward(model, x[:, 50:], full, 50),
                               rtol=1e-4, atol=1e-5)


@gpu
@pytest.mark.parametrize("dtype,keys,heads,kv_heads,dim", [(torch.float32, 4096, 8, 2, 64),
                                                           (torch.bfloat16, 32768, 16, 8, 128)])
def test_biased_attention_kernel_on_cuda(dtype, keys, heads, kv_heads, dim):
    """Compiled kernel vs. the PyTorch reference (which computes in fp32), fp32 and bf16, up to 32k keys."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, 16, dim, generator=gen).to("cuda", dtype)
    k, v = (torch.randn(1, kv_heads, keys, dim, generator=gen).to("cuda", dtype) for _ in range(2))
    bias = torch.randn(1, kv_heads, keys, generator=gen).cuda()
    q_pos, k_pos = torch.arange(keys - 16, keys).cuda(), torch.arange(keys).cuda()
    tol = {"rtol": 1e-3, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(biased_attention(q, k, v, bias, q_pos, k_pos).float(),
                               attention(q, k, v, bias, q_pos, k_pos).float(), **tol)


def test_retrieval_head_counts_follow_the_fractions():
    """14 % by induction (at least one head) union 1 % by echo (may round to none on a small model)."""
    gen = torch.Generator().manual_seed(0)
    cfg = RazorConfig(induction_fraction=0.14, echo_fraction=0.01)
    induction, echo = torch.rand(3, 3, generator=gen), torch.rand(3, 3, generator=gen)
    heads = retrieval_heads(induction, echo, cfg)
    # round(1.26) = 1, round(0.09) = 0
    assert heads.sum() == 1 and heads.flatten()[induction.flatten().argmax()]
    induction, echo = torch.rand(32, 8, generator=gen), torch.rand(32, 8, generator=gen)
    heads = retrieval_heads(induction, echo, cfg).flatten()
    top_induction = set(induction.flatten().topk(36).indices.tolist())
    top_echo = set(echo.flatten().topk(3).indices.tolist())
    assert set(heads.nonzero().flatten().tolist()) == top_induction | top_echo  # 14 % of 256 = 36, 1 % = 3


def test_razor_keeps_sinks_buffer_and_compensation_while_decoding(model):
    """Non-retrieval heads hold exactly sinks + the most recent buffer + one compensation token after every
    decoded token too (the compensation token absorbs each evicted token); retrieval heads hold everything."""
    cfg = RazorConfig(sinks=2, min_buffer=8, compression=8)
    heads = torch.tensor([[True, False], [False, False]])
    razor, full, x = RazorCache(model, heads, cfg), FullAttention(model), ids(130)
    forward(model, x[:, :100], razor, 0), forward(model, x[:, :100], full, 0)
    razor.after_prefill()
    for t in range(100, 120):  # 20 decoded tokens, one at a time
        forward(model, x[:, t:t + 1], razor, t), forward(model, x[:, t:t + 1], full, t)
    buffer = max(8, -(-100 // 8))  # 13, fixed at compression time
    for layer in range(2):
        for h in range(2):
            head = razor.head(layer, h)
            if heads[layer, h]:
                assert head["pos"].tolist() == list(range(120)) and int(head["n_dropped"]) == 0
                continue
            assert head["pos"].tolist() == [0, 1] + list(range(120 - buffer, 120))
            assert int(head["n_dropped"]) == 120 - 2 - buffer
            if layer > 0:  # deeper keys of decoded tokens depend on the compressed layers below: not full's
                continue
            dropped = full.k[layer][:, h, 2:120 - buffer]
            torch.testing.assert_close(head["ck"][:, 0], dropped.mean(1), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(head["cv"][:, 0], full.v[layer][:, h, 2:120 - buffer].mean(1),
                                       rtol=1e-5, atol=1e-6)


def test_razor_decoding_a_chunk_equals_decoding_token_by_token(model):
    """A teacher-forced answer chunk sees the same caches as decoding its tokens one at a time."""
    cfg, heads, x = RazorConfig(sinks=2, min_buffer=8,
                                compression=8), torch.tensor([[False, True], [False, False]]), ids(110)
    one, chunk = RazorCache(model, heads, cfg), RazorCache(model, heads, cfg)
    for policy in (one, chunk):
        forward(model, x[:, :100], policy, 0)
        policy.after_prefill()
    stepwise = torch.cat([forward(model, x[:, t:t + 1], one, t) for t in range(100, 110)], 1)
    torch.testing.assert_close(forward(model, x[:, 100:], chunk, 100), stepwise, rtol=1e-4, atol=1e-5)


def test_razor_and_full_decode_a_batch_as_each_sequence_alone(model):
    """bench/long_context.py --batch decodes several sequences at once: each row's logits equal decoding that
    sequence alone, so the batched speed measures the same computation."""
    cfg, heads = RazorConfig(sinks=2, min_buffer=8,
                             compression=8), torch.tensor([[False, True], [False, False]])
    rows = torch.cat([ids(106, seed=1), ids(106, seed=2)])

    def decode(x, make):
        policy = make()
        forward(model, x[:, :100], policy, 0)
        policy.after_prefill() if hasattr(policy, "after_prefill") else None
        return torch.cat([forward(model, x[:, t:t + 1], policy, t) for t in range(100, 106)], 1)

    for make in (lambda: RazorCache(model, heads, cfg), lambda: FullAttention(model)):
        together = decode(rows, make)
        alone = torch.cat([decode(rows[i:i + 1], make) for i in range(2)])
        torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


class _ScriptedAttention:
    """A stand-in model whose attention maps are scripted: head 0 echoes (attends to the earlier copy of the
    current token), head 1 induces (attends to the token after that copy). Both heads share one KV head
    each."""

    def __init__(self):
        from types import SimpleNamespace

        self.config = SimpleNamespace(bos_token_id=0, num_attention_heads=2, num_key_value_heads=2)

    def __call__(self, input_ids, output_attentions=True):
        from types import SimpleNamespace

        t = input_ids.shape[1]
        att = torch.zeros(1, 2, t, t)
        for i in range(t):
            earlier = [j for j in range(1, i) if input_ids[0, j] == input_ids[0, i]]
            if earlier:
                att[0, 0, i, earlier[-1]] = 1.0
                att[0, 1, i, earlier[-1] + 1] = 1.0
            else:
                att[0, :, i, 0] = 1.0
        return SimpleNamespace(attentions=(att,))


def test_head_scores_tell_echo_from_induction():
    induction, echo = head_scores(_ScriptedAttention(), block=16, repeats=3, low=10, high=10_000)
    assert echo[0, 0] > 0.9 and echo[0, 1] < 0.1, echo
    assert induction[0, 1] > 0.9 and induction[0, 0] < 0.1, induction


def _longcache_reference(q, k_all, v_all, cfg, rope):
    """Slow LongCache for one call: explicit per-row top-k over the middle (q . k un-rotated, mean over each
    KV group's query heads), union, the `recall_clip` most frequent centres (ties: lower index), spans
    around them, then positions re-numbered 0..n-1 and causal softmax attention over exactly those keys."""
    import math
    from collections import Counter

    b, hq, t, d = q.shape
    hkv, total = k_all.shape[1], k_all.shape[2]
    groups, start, stop = hq // hkv, cfg.global_size, total - t - cfg.local_size
    counts = Counter()
    for bi in range(b):
        for g in range(hkv):
            for row in range(t):
                qm = q[bi, g * groups:(g + 1) * groups, row].float().mean(0)
                scores = [float(qm @ k_all[bi, g, start + j].float()) for j in range(stop - start)]
                best = sorted(range(len(scores)), key=lambda j: -scores[j])[:cfg.mid_size]
                counts.update(best)
    centres = sorted(counts,
                     key=lambda j: (-counts[j], j))[:cfg.recall_clip] if cfg.recall_clip > 0 else list(counts)
    spans = sorted({min(max(c + start + o, start), stop - 1) for c in centres
                    for o in range(-(cfg.span_size // 2), cfg.span_size - cfg.span_size // 2)})
    index = list(range(start)) + spans + list(range(stop, total))
    n = len(index)
    keys = rope(k_all[:, :, index], torch.arange(n))
    queries = rope(q, torch.arange(n - t, n))
    out = torch.zeros(b, hq, t, d)
    for bi in range(b):
        for h in range(hq):
            for row in range(t):
                visible = n - t + row + 1  # causal over the re-numbered positions
                logits = torch.stack([queries[bi, h, row] @ keys[bi, h // groups, j] for j in range(visible)])
                weights = (logits / math.sqrt(d)).softmax(0)
                out[bi, h, row] = sum(w * v_all[bi, h // groups, index[j]] for j, w in enumerate(weights))
    return out, index


def test_longcache_selection_path_equals_a_slow_reference(model):
    """The path where middle tokens are selected: clipped top-k spans, re-numbered positions, attention over
    exactly the gathered keys, against an explicit loop (several query rows, clip active, spans clamped)."""
    from tracecore.kernels.decoding import Rope

    gen = torch.Generator().manual_seed(3)
    cfg = LongCacheConfig(global_size=3, local_size=10, mid_size=2, span_size=4, recall_clip=3)
    q = torch.randn(1, 4, 5, 16, generator=gen)
    k_all, v_all = torch.randn(1, 2, 90, 16, generator=gen), torch.randn(1, 2, 90, 16, generator=gen)
    cache = LongCache(model, cfg)
    cache.k[0], cache.v[0] = k_all[:, :, :85], v_all[:, :, :85]
    got = cache.attend(0, q, k_all[:, :, 85:], v_all[:, :, 85:], torch.arange(85, 90))
    expected, index = _longcache_reference(q, k_all, v_all, cfg, Rope(model))
    assert 3 + 10 + 5 < len(index) < 90  # something was selected from the middle, not everything
    assert cache.gather_index(q, k_all, 5).tolist() == index
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@gpu
def test_razor_decoding_on_cuda_matches_cpu(model):
    """Every cache tensor follows the model's device (a CPU-side counter once broke decoding on CUDA), and the
    Triton/SDPA path decodes what the CPU reference decodes."""
    import copy

    cfg, heads, x = RazorConfig(sinks=2, min_buffer=8,
                                compression=8), torch.tensor([[False, True], [False, False]]), ids(130)
    logits = []
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        razor = RazorCache(m, heads, cfg)
        forward(m, x[:, :100].to(device), razor, 0)
        razor.after_prefill()
        logits.append(torch.cat([forward(m, x[:, t:t + 1].to(device), razor, t) for t in range(100, 130)],
                                1).cpu())
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-3, atol=1e-4)


class QuerySpy(FullAttention):
    """Full attention that records how many query tokens each call after the prefill carries."""

    def __init__(self, model):
        super().__init__(model)
        self.prefilled, self.decode_queries = False, []

    def after_prefill(self):
        self.prefilled = True

    def attend(self, layer, q, k, v, positions):
        if self.prefilled and layer == 0:
            self.decode_queries.append(q.shape[2])
        return super().attend(layer, q, k, v, positions)


def test_answer_accuracy_decodes_one_token_per_call_so_no_selection_sees_the_answer(model):
    """A cache policy that selects from all of a call's queries (LongCache) would let the gold answer's own
    tokens choose what its first token attends to if the answer were fed as one teacher-forced chunk."""
    from tracecore.kernels.decoding import answer_accuracy, greedy_decode

    x = ids(60)
    with torch.no_grad():
        reference = model.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0)[:, 60:]
    assert torch.equal(greedy_decode(model, x, 4, FullAttention(model)), reference)
    spy = QuerySpy(model)
    assert answer_accuracy(model, x, reference, spy)
    assert spy.decode_queries and set(spy.decode_queries) == {1}, spy.decode_queries
    wrong = reference.clone()
    wrong[0, 2] = (wrong[0, 2] + 1) % 500
    assert not answer_accuracy(model, x, wrong, FullAttention(model))


def test_one_shared_prefill_decodes_exactly_as_a_prefill_per_policy(model):
    """The needle grid prefills each long prompt once and copies the cache to full attention and to Razor
    with either head set; decoded tokens and KV bytes must equal separate prefills, and one policy's
    decoding must not touch another's copy."""
    from tracecore.kernels.decoding import answers_after_one_prefill, greedy_decode

    x, cfg = ids(150), RazorConfig(induction_fraction=0.25, echo_fraction=0.01, sinks=2, min_buffer=8,
                                   compression=8)
    heads = torch.tensor([[True, False], [False, False]])
    other = torch.tensor([[False, False], [False, True]])
    with torch.no_grad():
        separate = {name: (greedy_decode(model, x, 5, make()), make) for name, make in
                    {"full": lambda: FullAttention(model), "razor": lambda: RazorCache(model, heads, cfg),
                     "razor_other": lambda: RazorCache(model, other, cfg)}.items()}
        answers = {name: tokens for name, (tokens, _) in separate.items()}
        for name, answer in answers.items():
            starts = {"full": lambda full: full, "razor": lambda full: RazorCache(model, heads, cfg, full),
                      "razor_other": lambda full: RazorCache(model, other, cfg, full)}
            shared = answers_after_one_prefill(model, x, answer, starts)
            assert shared[name][0], name  # each policy reproduces its own separately decoded tokens
            reference = separate[name][1]()
            greedy_decode(model, x, 5, reference)
            assert shared[name][1].cache_bytes() == reference.cache_bytes(), name
