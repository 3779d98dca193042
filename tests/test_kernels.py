"""Mini-Sequence Transformer kernels: chunked LM head + CE, chunked MLP, `apply_mini_sequence`.

Every path is checked against the plain computation: the loss and *every* parameter gradient, with a
sequence length that does not divide by the chunk count (the official code drops that tail) and
ignored labels. The Triton kernel runs through Triton's interpreter on CPU (conftest sets
TRITON_INTERPRET=1 when there is no GPU); the `gpu` tests run it compiled on CUDA.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import gpu
from tracecore.kernels.mini_sequence import apply_mini_sequence, default_chunks
from tracecore.kernels.reference import lm_head_ce, plain_lm_head_ce, torch_ce_grad_
from tracecore.kernels.triton_ce import triton_ce_grad_, triton_lm_head_ce
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

TINY = {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
        "num_attention_heads": 4,
            "num_key_value_heads": 2}


def head_inputs(rows=257, d=64, vocab=1000, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, d, generator=gen, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, d, generator=gen, dtype=dtype) * 0.2).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[::5] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("chunks", [1, 7, 64, 300])
def test_chunked_lm_head_matches_plain_loss_and_gradients(chunks):
    hidden, weight, labels = head_inputs()
    plain = plain_lm_head_ce(hidden, weight, labels)
    expected = torch.autograd.grad(plain * 3, (hidden, weight))
    loss = lm_head_ce(hidden, weight, labels, chunks)
    got = torch.autograd.grad(loss * 3, (hidden, weight))  # upstream gradient != 1 is applied in backward
    torch.testing.assert_close(loss, plain)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_all_ignored_labels_give_zero_loss_and_gradients():
    hidden, weight, labels = head_inputs(rows=10)
    loss = lm_head_ce(hidden, weight, torch.full_like(labels, -100), 3)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    assert loss.item() == 0 and dh.abs().max() == 0 and dw.abs().max() == 0


def test_bf16_inputs_accumulate_in_fp32():
    hidden, weight, labels = head_inputs(rows=300, dtype=torch.bfloat16)
    loss = lm_head_ce(hidden, weight, labels, 16)
    ref = plain_lm_head_ce(hidden.float(), weight.float(), labels)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 1e-3 * ref.item()
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    assert dh.dtype == dw.dtype == torch.bfloat16


def test_triton_ce_kernel_matches_reference_in_interpreter():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(19, 700, generator=gen) * 4  # 700: not a power of two, several tiles at BLOCK<=4096
    labels = torch.randint(0, 700, (19,), generator=gen)
    labels[[0, 7]] = -100
    a, b = logits.clone(), logits.clone()
    loss_t, loss_r = triton_ce_grad_(a, labels, 0.25), torch_ce_grad_(b, labels, 0.25)
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert a[0].abs().max() == 0 and loss_t[7] == 0


def test_triton_ce_kernel_works_in_place_on_bf16_logits():
    """The kernel reads the matmul's bf16 logits and writes the bf16 gradient in place (no fp32 copy of the
    chunk's logits: that copy and the cast back were most of the memory the head held above Liger-Kernel's,
    issue 20); the loss and gradient equal the fp32 reference on the same (bf16-rounded) logits."""
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(13, 700, generator=gen) * 4).to(torch.bfloat16)
    labels = torch.randint(0, 700, (13,), generator=gen)
    labels[3] = -100
    a, b = logits.clone(), logits.float()
    loss_t, loss_r = triton_ce_grad_(a, labels, 0.5), torch_ce_grad_(b, labels, 0.5)
    assert a.dtype == torch.bfloat16
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, b.to(torch.bfloat16), rtol=1e-2, atol=1e-3)
    assert a[3].abs().max() == 0


def test_chunked_head_frees_a_chunks_logits_before_the_next_chunks():
    """Only one chunk's logits may be alive at a time: a loop that rebinds `logits = h @ W.T` keeps the old
    chunk's tensor until the new one exists (2x the chunk memory; measured 0.5 GB above Liger-Kernel at 64k
    tokens on an H200, issue 20)."""
    import weakref

    previous = []

    def ce_grad(logits, labels, scale):
        assert all(ref() is None for ref in previous), "the previous chunk's logits are still alive"
        previous.append(weakref.ref(logits))
        return torch_ce_grad_(logits, labels, scale)

    hidden, weight, labels = head_inputs(rows=64, d=16, vocab=100)
    loss = lm_head_ce(hidden, weight, labels, 4, ce_grad=ce_grad)
    loss.backward()
    assert len(previous) == 4


def test_triton_lm_head_hands_the_kernel_logits_in_the_weight_dtype(monkeypatch):
    from tracecore.kernels import triton_ce

    seen, kernel = [], triton_ce.triton_ce_grad_
    monkeypatch.setattr(triton_ce, "triton_ce_grad_", lambda logits, *a: seen.append(logits.dtype)
                        or kernel(logits, *a))
    hidden, weight, labels = head_inputs(rows=45, d=32, vocab=300, dtype=torch.bfloat16)
    loss = triton_ce.triton_lm_head_ce(hidden, weight, labels, 4)
    ref = lm_head_ce(hidden, weight, labels, 4)
    assert seen and set(seen) == {torch.bfloat16}
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_triton_lm_head_matches_plain():
    hidden, weight, labels = head_inputs(rows=45, d=32, vocab=300)
    plain = plain_lm_head_ce(hidden, weight, labels)
    expected = torch.autograd.grad(plain, (hidden, weight))
    loss = triton_lm_head_ce(hidden, weight, labels, 4)
    got = torch.autograd.grad(loss, (hidden, weight))
    torch.testing.assert_close(loss, plain)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def batch(vocab=1000, seq=257, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -20:] = 0  # right padding on one row
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :40] = -100  # prompt tokens carry no loss
    return ids, mask, labels


def grads_of(model, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# GPT-NeoX (Pythia) and GPT-2 under their own config names, dropout off so both paths draw nothing
NEOX = {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
        "num_attention_heads": 4, "attention_dropout": 0.0, "hidden_dropout": 0.0}
GPT2 = {"vocab_size": 1000, "n_embd": 64, "n_inner": 172, "n_layer": 2, "n_head": 4, "n_positions": 512,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
FAMILIES = [(LlamaConfig, LlamaForCausalLM, TINY), (MistralConfig, MistralForCausalLM, TINY),
            (Qwen2Config, Qwen2ForCausalLM, TINY), (GPTNeoXConfig, GPTNeoXForCausalLM, NEOX),
            (GPT2Config, GPT2LMHeadModel, GPT2)]


@pytest.mark.parametrize("config_cls,model_cls,size", FAMILIES, ids=lambda v: getattr(v, "model_type", None))
@pytest.mark.parametrize("use_triton", [False, True])
def test_wrapped_model_equals_plain_model(config_cls, model_cls, size, use_triton):
    if use_triton and config_cls is not LlamaConfig:
        pytest.skip("one family suffices for the interpreter (slow); the PyTorch path covers all of them")
    torch.manual_seed(0)
    plain = model_cls(config_cls(**size)).train()
    wrapped = apply_mini_sequence(copy.deepcopy(plain), lm_chunks=7, mlp_chunks=3, use_triton=use_triton)
    assert any(getattr(m, "gradient_checkpointing", False) for m in wrapped.modules())
    assert wrapped.mini_sequence["mlp_layers"] == 2  # every decoder layer's MLP is chunked, in every family
    loss_p, grads_p = grads_of(plain, *batch())
    loss_w, grads_w = grads_of(wrapped, *batch())
    torch.testing.assert_close(loss_w, loss_p, rtol=1e-5, atol=1e-6)
    assert grads_w.keys() == grads_p.keys() and len(grads_p) == len(list(plain.parameters()))
    for name in grads_p:
        torch.testing.assert_close(grads_w[name], grads_p[name], rtol=1e-4, atol=1e-6, msg=name)


def test_wrapped_lora_model_equals_plain_lora_model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                      task_type="CAUSAL_LM")
    plain = get_peft_model(LlamaForCausalLM(LlamaConfig(**TINY)), lora).train()
    with torch.no_grad():
        for p in plain.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    wrapped = apply_mini_sequence(copy.deepcopy(plain), lm_chunks=5, mlp_chunks=4)
    loss_p, grads_p = grads_of(plain, *batch())
    loss_w, grads_w = grads_of(wrapped, *batch())
    torch.testing.assert_close(loss_w, loss_p)
    assert len(grads_p) == 16 and grads_w.keys() == grads_p.keys()  # 4 modules x (A, B) x 2 layers
    for name in grads_p:
        torch.testing.assert_close(grads_w[name], grads_p[name], rtol=1e-4, atol=1e-7, msg=name)


def test_inference_path_and_state_dict_are_unchanged():
    torch.manual_seed(0)
    plain = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    wrapped = apply_mini_sequence(copy.deepcopy(plain)).eval()
    ids, mask, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(wrapped(input_ids=ids, attention_mask=mask).logits,
                                   plain(input_ids=ids, attention_mask=mask).logits)
    assert wrapped.state_dict().keys() == plain.state_dict().keys()  # checkpoints load into either


def test_default_chunks_follow_the_papers_memory_argument():
    assert default_chunks(LlamaConfig(**TINY)) == (16, 3)  # ceil(1000/64), ceil(172/64)
    llama3 = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336)
    assert default_chunks(llama3) == (32, 4)  # paper: M_lm ~ 31, M_mlp ~ 3.5


def test_model_without_lm_head_is_rejected():
    from transformers import LlamaModel

    with pytest.raises(TypeError, match="no causal-LM head"):
        apply_mini_sequence(LlamaModel(LlamaConfig(**TINY)))


@gpu
@pytest.mark.parametrize("dtype,rows,d,vocab",
                         [(torch.bfloat16, 4097, 256, 32000), (torch.float32, 4097, 256, 32000),
                                                (torch.bfloat16, 8192, 1024, 128256)])
def test_triton_kernel_on_cuda_matches_reference(dtype, rows, d, vocab):
    """Compiled kernel vs. the PyTorch reference, bf16 and fp32, up to Llama-3's vocabulary."""
    hidden, weight, labels = head_inputs(rows=rows, d=d, vocab=vocab, dtype=dtype)
    hidden, weight = (t.detach().cuda().requires_grad_() for t in (hidden, weight))
    labels = labels.cuda()
    ref = lm_head_ce(hidden, weight, labels, 8)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    got = triton_lm_head_ce(hidden, weight, labels, 8)
    got_grads = torch.autograd.grad(got, (hidden, weight))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    tol = {"rtol": 2e-2, "atol": 1e-3} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-5}
    for g, e in zip(got_grads, ref_grads):
        torch.testing.assert_close(g.float(), e.float(), **tol)


@gpu
def test_chunked_head_peak_memory_is_lower_on_cuda():
    hidden, weight, labels = head_inputs(rows=16384, d=512, vocab=32000, dtype=torch.bfloat16)
    hidden, weight = hidden.detach().cuda().requires_grad_(), weight.detach().cuda().requires_grad_()
    labels = labels.cuda()

    def peak(fn):
        torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(hidden, weight, labels).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    plain = peak(plain_lm_head_ce)
    chunked = peak(lambda h, w, y: triton_lm_head_ce(h, w, y, 32))
    assert chunked * 4 < plain


def test_automatic_lm_chunks_keep_at_least_256_rows():
    from tracecore.kernels.mini_sequence import auto_lm_chunks

    assert auto_lm_chunks(65536, 128256, 4096) == 32  # long sequences: the paper's M
    assert auto_lm_chunks(1024, 128256, 1024) == 4  # short ones: 256-row chunks, not 126 chunks of 8 rows
    assert auto_lm_chunks(100, 32000, 512) == 1


def test_every_kernel_module_imports_under_the_tracecore_namespace():
    """The repository's `kernels/` folder is a namespace portion (no `__init__.py`), so its modules are
    reached
    only as `tracecore.kernels.*`; a bare `kernels` is Hugging Face's package, which transformers imports."""
    import importlib
    import pkgutil

    import tracecore.kernels

    names = [info.name for info in pkgutil.iter_modules(tracecore.kernels.__path__)]
    assert {"mini_sequence", "reference", "razor", "longcache"} <= set(names)
    for name in names:
        assert importlib.import_module(f"tracecore.kernels.{name}").__name__ == f"tracecore.kernels.{name}"


@gpu
@pytest.mark.parametrize("config_cls,model_cls,size", FAMILIES, ids=lambda v: getattr(v, "model_type", None))
def test_wrapped_model_on_cuda_with_triton_equals_plain_in_every_family(config_cls, model_cls, size):
    """The compiled Triton LM-head path on a GPU, for every family the CPU test covers (fp32, so the
    comparison is tight; bf16 kernels are compared against the reference in the kernel tests)."""
    torch.manual_seed(0)
    plain = model_cls(config_cls(**size)).cuda().train()
    wrapped = apply_mini_sequence(copy.deepcopy(plain), lm_chunks=7, mlp_chunks=3, use_triton=True)
    ids, mask, labels = (t.cuda() for t in batch())
    loss_p, grads_p = grads_of(plain, ids, mask, labels)
    loss_w, grads_w = grads_of(wrapped, ids, mask, labels)
    torch.testing.assert_close(loss_w, loss_p, rtol=1e-4, atol=1e-5)
    assert grads_w.keys() == grads_p.keys()
    for name in grads_p:
        torch.testing.assert_close(grads_w[name], grads_p[name], rtol=1e-3, atol=1e-5, msg=name)
