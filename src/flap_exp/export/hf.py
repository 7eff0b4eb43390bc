"""`--to hf`: a pruned model whose layers all keep the same widths, as a stock transformers directory.

The base type is the pruned model's family (flap_llama -> `LlamaForCausalLM`, flap_mistral -> Mistral's,
flap_qwen2 -> Qwen2's, ...): the same forward with one width for every layer. The config gets the kept head,
k/v-head and MLP widths and an explicit `head_dim`. Compensation biases live on o_proj and down_proj; a stock
LLaMA has them only as `attention_bias` (q, k, v and o) and `mlp_bias` (gate, up and down), so where one is
non-zero the other projections of that block get zero biases (a family without those flags cannot hold them:
refused by the weights' check). Before anything is written the stock model's logits are compared with the
pruned model's; the directory loads with plain transformers, without flap_exp.
"""
from __future__ import annotations

import torch
import transformers

from ..atomic import atomic_dir
from ..errors import FlapError
from ..families import family_of
from ..persist import load_pruned
from .request import ExportRequest
from .verify import check_same_logits
from .widths import Widths, require_uniform

#: keys of a pruned config that a stock LlamaConfig must not carry
FLAP_KEYS = ("model_type", "architectures", "transformers_version", "layer_kv_heads", "layer_intermediate_size",
             "layer_q_heads", "auto_map")


def stock_config(config, w: Widths, attention_bias: bool, mlp_bias: bool):
    """The family's own config with the kept widths (bias flags where the family has them: LLaMA's; another
    family's model has no such parameters, and its compensation biases are refused by the weights' check)."""
    fam = family_of(config.model_type)
    d = {k: v for k, v in config.to_dict().items() if k not in FLAP_KEYS}
    d.update(num_attention_heads=w.heads[0], num_key_value_heads=w.kv_heads[0], head_dim=w.head_dim,
             intermediate_size=w.channels[0], attention_bias=attention_bias, mlp_bias=mlp_bias)
    cfg = getattr(transformers, fam.config_class)(**d)
    cfg.architectures = [fam.model_class]
    return cfg


def _nonzero(sd: dict[str, torch.Tensor], suffix: str) -> bool:
    return any(bool(v.any()) for k, v in sd.items() if k.endswith(suffix))


def stock_state_dict(sd: dict[str, torch.Tensor], attention_bias: bool, mlp_bias: bool) -> dict[str, torch.Tensor]:
    """The pruned state dict with the biases a stock LLaMA of those flags has: zero where the pruned model has
    none, dropped (all zero, checked by the caller) where the stock model has none."""
    out = dict(sd)
    for block, flag, outputs, weights in (("self_attn", attention_bias, "o_proj", ("q_proj", "k_proj", "v_proj")),
                                          ("mlp", mlp_bias, "down_proj", ("gate_proj", "up_proj"))):
        for k in [k for k in sd if f".{block}.{outputs}.bias" in k]:
            if not flag:
                del out[k]
        if flag:
            for k in [k for k in sd if f".{block}." in k and k.endswith(tuple(f"{n}.weight" for n in weights))]:
                bias = k.removesuffix("weight") + "bias"
                out.setdefault(bias, sd[k].new_zeros(sd[k].shape[0]))
    return out


def export(req: ExportRequest) -> dict:
    model, tok, manifest = load_pruned(req.src, verify=False)  # verified by check_request
    w = Widths.of(model.config)
    require_uniform(w)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    attention_bias = _nonzero(sd, "self_attn.o_proj.bias") or _nonzero(sd, "self_attn.q_proj.bias")
    mlp_bias = _nonzero(sd, "mlp.down_proj.bias") or _nonzero(sd, "mlp.gate_proj.bias")
    cfg = stock_config(model.config, w, attention_bias, mlp_bias)
    fam = family_of(model.config.model_type)
    stock = getattr(transformers, fam.model_class)(cfg).to(next(model.parameters()).dtype).eval()
    slots = set(stock.state_dict())
    # a zero bias the family has no parameter for (Qwen2's o_proj: its q/k/v biases set attention_bias) is dropped
    weights = {k: v for k, v in stock_state_dict(sd, attention_bias, mlp_bias).items() if k in slots or v.any()}
    missing, unexpected = stock.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not cfg.tie_word_embeddings]
    if missing or unexpected:
        raise FlapError(f"{req.src}: the pruned weights do not map onto a stock {fam.model_class} (missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}); nothing written")
    diff = check_same_logits(model, stock, cfg.vocab_size)
    with atomic_dir(req.out) as tmp:
        stock.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
    return {"out": str(req.out), "format": "hf", "model_type": fam.model_type, "num_attention_heads": w.heads[0],
            "num_key_value_heads": w.kv_heads[0], "intermediate_size": w.channels[0],
            "attention_bias": attention_bias, "mlp_bias": mlp_bias, "max_abs_logit_diff": diff,
            "base_model": manifest.get("base_model", {}).get("name")}
