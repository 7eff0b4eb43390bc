"""The one tiny-model builder of the tests: random LLaMAs (GQA or MHA), and a model directory with a word-level
tokenizer as a user's local model looks."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
WIKITEXT2 = SHARED / "data" / "wikitext-2-raw"


def tiny_config(heads: int = 4, kv: int = 2, layers: int = 3, hidden: int = 32, inter: int = 48,
                head_dim: int = 8, vocab: int = 101, kind: str = "llama", **kw) -> LlamaConfig:
    """`kind`: "llama", or "mistral" (a MistralConfig: pass sliding_window=W for its windowed attention)."""
    kw = {"max_position_embeddings": 128, "tie_word_embeddings": False, **kw}
    cls = {"llama": LlamaConfig, "mistral": MistralConfig}[kind]
    return cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, **kw)


def tiny_model(seed: int = 0, std: float | None = 0.3, **kw) -> LlamaForCausalLM:
    """A random tiny LLaMA (or Mistral: kind="mistral"); `std`: its matrices redrawn with that deviation (the
    default init, 0.02, gives near-constant activations), None keeps transformers' init."""
    torch.manual_seed(seed)
    config = tiny_config(**kw)
    cls = MistralForCausalLM if config.model_type == "mistral" else LlamaForCausalLM
    model = cls(config).eval()
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
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
