"""`apply_mini_sequence`: Mini-Sequence Transformer (arXiv 2407.15892) for any HF causal LM.

As the official `minisequence(model)`: every decoder MLP runs per sequence chunk (`mini_sequence_mlp`), the
causal LM's loss is computed by the chunked LM head + CE (the `[tokens, vocab]` logits never exist), and
gradient checkpointing is switched on so that only decoder-layer inputs persist. The paper calls MsT
implementation-agnostic: the LM-head part needs only the base model's final hidden states and
`get_output_embeddings()`, so it applies to every family; the MLP part needs to know which module is the
MLP (`kernels/families.py`: Llama/Mistral/Qwen2/OLMo/Gemma, GPT-NeoX, GPT-2). For a family not in that
table the MLP runs unchunked and `model.mini_sequence["mlp_layers"]` is 0 (the finetune stage logs it).

Differences from the official code: chunk counts default to the paper's memory argument
(M_lm = ceil(V / d), M_mlp = ceil(I / d)) instead of fixed 64 / 4096-token chunks, with LM-head chunks
of at least 256 rows (`auto_lm_chunks`); the sequence tail
is never dropped; inference (no labels) runs the model's own forward unchanged, logits included.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from tracecore.kernels.families import intermediate_size, mini_sequence_obstacle, mlp_modules
from tracecore.kernels.reference import IGNORE_INDEX, lm_head_ce, mini_sequence_mlp

MIN_CHUNK_ROWS = 256  # automatic LM-head chunks never get smaller: they would only re-read the weight


def default_chunks(config) -> tuple[int, int]:
    """(LM-head chunks, MLP chunks) that shrink each transient to about the size of the layer input."""
    d = config.hidden_size
    return max(1, math.ceil(config.vocab_size / d)), max(1, math.ceil(intermediate_size(config) / d))


def auto_lm_chunks(rows: int, vocab: int, hidden: int) -> int:
    """M = ceil(V / d) chunks, but at least MIN_CHUNK_ROWS rows each. At short lengths the paper's M
    gives chunks of a few rows (8 for 1k tokens at V 128k, d 1k), each re-reading the whole LM-head
    weight, several times slower than the plain head on CPU, while the logits it saves are small there."""
    return max(1, min(math.ceil(vocab / hidden), rows // MIN_CHUNK_ROWS))


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The `*ForCausalLM` module inside a plain or peft-wrapped model: a PreTrainedModel with an output
    embedding and a base model under it."""
    from transformers import PreTrainedModel

    for module in model.modules():  # peft wrappers forward attribute lookups, so check real modules
        if isinstance(module, PreTrainedModel) and module.base_model is not module \
                and module.get_output_embeddings() is not None:
            return module
    raise TypeError(f"apply_mini_sequence: {type(model).__name__} has no causal-LM head "
                    f"(get_output_embeddings)")


def apply_mini_sequence(model: torch.nn.Module, lm_chunks: int | None = None, mlp_chunks: int | None = None,
                        use_triton: bool | None = None, checkpointing: bool = True) -> torch.nn.Module:
    """Wrap `model` in place (and return it). `use_triton=None`: Triton on CUDA, PyTorch elsewhere."""
    lm = _causal_lm(model)
    obstacle = mini_sequence_obstacle(lm.config, lm.get_output_embeddings())
    if obstacle:
        raise TypeError(f"apply_mini_sequence: model type {lm.config.model_type!r} not supported: {obstacle}")
    mlp_chunks = mlp_chunks or default_chunks(lm.config)[1]
    mlps = [m for m in mlp_modules(lm, lm.config) if not hasattr(m, "mini_sequence_chunks")]
    for module in mlps:
        mini_sequence_mlp(module, mlp_chunks)
    lm.forward = types.MethodType(_make_forward(type(lm).forward, lm_chunks, use_triton), lm)
    if checkpointing:
        _enable_checkpointing(lm)
    lm.mini_sequence = {"lm_chunks": lm_chunks, "mlp_chunks": mlp_chunks, "use_triton": use_triton,
                        "mlp_layers": len(mlps)}
    return model


def _enable_checkpointing(lm) -> None:
    """Decoder-layer activation recomputation (non-reentrant); the API was renamed in transformers 5."""
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _loss_fn(use_triton: bool | None, device: torch.device):
    from_triton = use_triton if use_triton is not None else device.type == "cuda"
    if from_triton:
        from tracecore.kernels.triton_ce import triton_available, triton_lm_head_ce

        if not triton_available(device):
            raise RuntimeError("mini-sequence: use_triton=True needs CUDA tensors or TRITON_INTERPRET=1")
        return triton_lm_head_ce
    return lm_head_ce


def _make_forward(original, lm_chunks: int, use_triton: bool | None):
    def forward(self, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None:
            return original(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("logits_to_keep", None)
        kwargs.setdefault("use_cache", False)
        out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = out.last_hidden_state
        # HF's causal-LM loss: pad labels with one ignored position, shift left by one
        shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].to(hidden.device)
        loss_fn = _loss_fn(use_triton, hidden.device)
        denominator = float(num_items_in_batch) if num_items_in_batch is not None else None
        rows = hidden.reshape(-1, hidden.shape[-1])
        weight = self.get_output_embeddings().weight
        chunks = lm_chunks or auto_lm_chunks(rows.shape[0], weight.shape[0], rows.shape[1])
        loss = loss_fn(rows, weight, shifted.reshape(-1), chunks, denominator)
        return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=out.hidden_states,
                                      attentions=out.attentions)

    return forward
