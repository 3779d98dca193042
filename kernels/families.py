"""What each Hugging Face causal-LM family needs from us: LoRA targets, the MLP to chunk, functional decoding.

A hand table, on purpose: peft's built-in defaults adapt only `q_proj, v_proj` of a Llama (LESS and TAGCOS
adapt q, k, v and o), and GPT-2's `c_proj` names both the attention output and the MLP output, so the
targets cannot be read off module names. A family missing here still trains (LoRA targets from the
config field, Mini-Sequence on the LM head only); the stages say so in one line, naming the model type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Family:
    lora_targets: tuple[str, ...]  # the attention projections, suffixes as peft matches them
    mlp: str | None = "mlp"  # the decoder layer's MLP attribute: Mini-Sequence chunks it
    decoding: bool = False  # `kernels.decoding`'s functional forward applies (RazorAttention, LongCache)
    fan_in_fan_out: bool = False  # GPT-2's Conv1D stores weights transposed: peft must know


FAMILIES = {
    # Llama layout: pre-norm decoder, q/k/v/o projections, RoPE, gated MLP; the functional forward
    # (kernels/decoding.py) reproduces their logits (tests/test_model_families.py)
    "llama": Family(LLAMA_ATTENTION, decoding=True),
    "mistral": Family(LLAMA_ATTENTION, decoding=True),
    "qwen2": Family(LLAMA_ATTENTION, decoding=True),
    # same projection names, but per-head q/k norms or post-norms the functional forward does not run
    "qwen3": Family(LLAMA_ATTENTION),
    "olmo": Family(LLAMA_ATTENTION),
    "olmo2": Family(LLAMA_ATTENTION),
    "gemma": Family(LLAMA_ATTENTION),
    # Pythia: fused query_key_value, attention output `attention.dense` (not the MLP's dense_h_to_4h)
    "gpt_neox": Family(("query_key_value", "attention.dense")),
    "gpt2": Family(("c_attn", "attn.c_proj"), fan_in_fan_out=True),
}


def family(config) -> Family | None:
    return FAMILIES.get(getattr(config, "model_type", None))


def lora_targets(config, configured: list[str] | None) -> list[str] | None:
    """The configured target modules, else the family's attention projections; None when neither is known."""
    if configured:
        return list(configured)
    known = family(config)
    return list(known.lora_targets) if known else None


def missing_targets(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """Targets that match no module of `model` (peft's rule: the name, or a suffix after a dot)."""
    names = [name for name, _ in model.named_modules()]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def linear_names(model: torch.nn.Module) -> list[str]:
    """Distinct last names of the model's linear layers: what an error message offers as LoRA targets."""
    from transformers.pytorch_utils import Conv1D

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, (torch.nn.Linear, Conv1D))})


def meta_model(config):
    """The architecture without weights (meta device): module names for checks made before any work."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def mlp_modules(model: torch.nn.Module, config) -> list[torch.nn.Module]:
    """Each decoder layer's MLP (empty for a family we do not know)."""
    known = family(config)
    if known is None or known.mlp is None:
        return []
    return [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == known.mlp]


def mini_sequence_obstacle(config, head: torch.nn.Module | None) -> str | None:
    """Why the chunked LM head + CE would not equal the model's own loss, or None when it would."""
    if head is None or not hasattr(head, "weight"):
        return "it has no output embedding (get_output_embeddings() is None)"
    if getattr(head, "bias", None) is not None:
        return "its LM head has a bias"
    if getattr(config, "final_logit_softcapping", None):
        return "it soft-caps its logits (final_logit_softcapping)"
    return None


def decoding_obstacle(config) -> str | None:
    """Why RazorAttention / LongCache cannot run this model, or None when the functional forward applies."""
    known = family(config)
    if known is not None and known.decoding:
        return None
    return (f"model type {getattr(config, 'model_type', '?')!r} is not in the functional forward's families "
            f"({', '.join(sorted(k for k, f in FAMILIES.items() if f.decoding))})")


def intermediate_size(config) -> int:
    """The MLP width under each family's name for it (GPT-2: n_inner, None = 4 x hidden)."""
    return getattr(config, "intermediate_size", None) or getattr(config, "n_inner",
                                                                 None) or 4 * config.hidden_size
