"""The one tiny-model builder of the tests: random LLaMAs (GQA or MHA) and the other families' models, and a
model directory with a word-level tokenizer as a user's local model looks."""
from __future__ import annotations

import json
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
WIKITEXT2 = SHARED / "data" / "wikitext-2-raw"


#: The families of flap_exp.families, each as a tiny random model. Gemma's small sliding window (8 tokens, below
#: the tests' 16-token windows) and its alternating layer types make the per-layer masks and rotary bases differ.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")


def _family_config(family: str, **kw):
    import transformers
    if family in ("llama", "mistral", "qwen2", "qwen3"):
        cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
        return cls(**kw)
    layers = kw["num_hidden_layers"]
    kw = {"tie_word_embeddings": True, "sliding_window": 8, "query_pre_attn_scalar": kw["head_dim"],
          "layer_types": [("sliding_attention", "full_attention")[i % 2] for i in range(layers)], **kw}
    if family == "gemma2":
        return transformers.Gemma2Config(**kw)
    if family == "gemma3_text":
        return transformers.Gemma3TextConfig(**kw)
    raise ValueError(family)


def tiny_config(heads: int = 4, kv: int = 2, layers: int = 3, hidden: int = 32, inter: int = 48,
                head_dim: int = 8, vocab: int = 101, family: str = "llama", **kw):
    """A tiny config of `family` (one of FAMILIES; LLaMA by default)."""
    if not family.startswith("gemma"):  # Gemma keeps its tied (scaled) embeddings
        kw = {"tie_word_embeddings": False, **kw}
    kw = {"max_position_embeddings": 128, **kw}
    return _family_config(family, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                          head_dim=head_dim, **kw)


def tiny_model(seed: int = 0, std: float | None = 0.3, **kw):
    """A random tiny model (a LLaMA unless `family=` names another); `std`: its matrices and biases redrawn with
    that deviation (the default init, 0.02, gives near-constant activations), None keeps transformers' init."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(**kw)).eval()
    if std is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2 or name.endswith(".bias"):  # Qwen2's q/k/v biases too
                    p.normal_(0, std)
    return model


def word_tokenizer(words: list[str]):
    """A word-level fast tokenizer over `words` (plus <unk>, </s>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def save_model_dir(path: Path, words: list[str], std: float | None = 0.3, identity: bool = False, **kw) -> Path:
    """A tiny LLaMA (max 64 positions) with a word-level tokenizer over `words`, saved as a local model directory;
    `identity`: with the flap_identity.json the pipeline's prepare stage records."""
    model = tiny_model(std=std, vocab=len(words) + 2, **{"max_position_embeddings": 64, **kw})
    model.save_pretrained(path)
    word_tokenizer(words).save_pretrained(path)
    if identity:
        (path / "flap_identity.json").write_text(json.dumps({"name": "tiny-llama", "source": "test"}))
    return path


def save_pruned_dir(path: Path, groups: list[int], channels: list[int], bias: bool = True, seed: int = 0,
                    words: list[str] | None = None, **kw) -> Path:
    """A tiny LLaMA pruned to `groups[i]` k/v groups and `channels[i]` MLP channels in layer i (which ones: drawn
    with `seed`), with random compensation biases (`bias`) or zero ones, saved as `flap-exp prune` does.
    With `attention_bias=True` / `mlp_bias=True` (in `kw`) the dense model's own biases are random too."""
    from flap_exp.arch import ArchView
    from flap_exp.persist import save_pruned
    from flap_exp.selection import Selection
    from flap_exp.surgery import prune_model
    words = words or [f"w{i}" for i in range(40)]
    model = tiny_model(seed=seed, vocab=len(words) + 2, layers=len(groups), **kw)
    arch = ArchView.from_config(model.config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def mask(n: int, k: int) -> torch.Tensor:
        m = torch.zeros(n, dtype=torch.bool)
        m[torch.randperm(n, generator=g)[:k]] = True
        return m
    sel = Selection([mask(arch.num_kv_heads, k) for k in groups], [mask(arch.intermediate_size, c) for c in channels])
    biases = [(torch.randn(arch.hidden_size, generator=g) * bias, torch.randn(arch.hidden_size, generator=g) * bias)
              for _ in groups]
    prune_model(model, sel, biases, arch)
    return save_pruned(model, word_tokenizer(words), {"selection": sel.to_json(),
                                                      "base_model": {"name": "tiny-llama", "source": "test"}}, path)
