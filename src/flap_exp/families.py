"""Where the prunable units live in each supported model family: one small description per family.

Every family has the same units (k/v groups of q/k/v/o projections, gated-MLP channels of gate/up/down), so
the engine is one; a family only says which transformers classes hold it, which norm feeds its MLP, and
which norms (Gemma's post-norms) sit between a block's output projection and the residual stream. Per-head
q/k norms (Qwen3, Gemma 3) act on each kept head alone and are kept as they are; q/k/v biases (Qwen2) are
sliced with their rows by surgery.py. Torch-free: class names are resolved by modeling.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import FlapError


@dataclass(frozen=True)
class Family:
    model_type: str  # the dense model's config.model_type
    pruned_type: str  # model_type of a pruned model of this family (per-layer widths; modeling.py)
    config_class: str  # transformers' config and causal-LM class names of the dense model
    model_class: str
    mlp_norm: str = "post_attention_layernorm"  # the norm in front of the MLP (LLaMA's naming)
    attn_out_norm: str | None = None  # a norm on the attention block's output before the residual add
    mlp_out_norm: str | None = None  # the same after the MLP


_GEMMA_NORMS = dict(mlp_norm="pre_feedforward_layernorm", attn_out_norm="post_attention_layernorm",
                    mlp_out_norm="post_feedforward_layernorm")

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "flap_llama", "LlamaConfig", "LlamaForCausalLM"),
    # A pruned Mistral is a flap_mistral: Mistral's config and forward keep its sliding window through a save.
    Family("mistral", "flap_mistral", "MistralConfig", "MistralForCausalLM"),
    Family("qwen2", "flap_qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
    Family("qwen3", "flap_qwen3", "Qwen3Config", "Qwen3ForCausalLM"),
    Family("gemma2", "flap_gemma2", "Gemma2Config", "Gemma2ForCausalLM", **_GEMMA_NORMS),
    Family("gemma3_text", "flap_gemma3_text", "Gemma3TextConfig", "Gemma3ForCausalLM", **_GEMMA_NORMS),
)}
#: A pruned model type's family: the first family that is saved as it (flap_llama: llama).
PRUNED: dict[str, Family] = {}
for _f in FAMILIES.values():
    PRUNED.setdefault(_f.pruned_type, _f)


def family_of(model_type: str | None) -> Family:
    """The family of a dense or pruned model type; any other type is refused in one line."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type in PRUNED:
        return PRUNED[model_type]
    raise FlapError(f"model type {model_type!r} is not supported; supported: {', '.join(FAMILIES)} "
                    f"(and their pruned types {', '.join(PRUNED)})")
