"""Per-layer widths of a loaded pruned model and the one-line refusal of a model a stock config cannot hold."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import FlapError


@dataclass(frozen=True)
class Widths:
    kv_heads: list[int]  # kept key/value groups per layer
    channels: list[int]  # kept MLP channels per layer
    group_size: int  # query heads per k/v head (G), the dense model's
    head_dim: int
    q_heads: tuple[int, ...] = ()  # kept query heads per layer (query-head units); empty: G per kept group

    @property
    def heads(self) -> list[int]:
        return list(self.q_heads) if self.q_heads else [k * self.group_size for k in self.kv_heads]

    @property
    def full_groups(self) -> bool:
        """Every kept k/v group keeps all its G query heads (no query-head units removed)."""
        return self.heads == [k * self.group_size for k in self.kv_heads]

    @property
    def uniform(self) -> bool:
        return len(set(self.kv_heads)) == 1 and len(set(self.channels)) == 1 and len(set(self.heads)) == 1

    @classmethod
    def of(cls, config) -> Widths:
        heads, kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
        hd = getattr(config, "head_dim", None) or config.hidden_size // heads
        n = config.num_hidden_layers
        return cls(list(getattr(config, "layer_kv_heads", [kv] * n)),
                   list(getattr(config, "layer_intermediate_size", [config.intermediate_size] * n)), heads // kv, hd,
                   tuple(getattr(config, "layer_q_heads", None) or ()))


def require_uniform(w: Widths) -> None:
    """A stock transformers config has one head count and one MLP width for every layer, and at least one head."""
    if not w.uniform:
        differ = [i for i in range(len(w.kv_heads)) if (w.kv_heads[i], w.channels[i]) != (w.kv_heads[0], w.channels[0])]
        shown = ", ".join(map(str, differ[:8])) + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
        j = differ[0]
        raise FlapError(f"layers keep different widths (layer 0: {w.kv_heads[0]} k/v groups and {w.channels[0]} MLP "
                        f"channels; layer {j}: {w.kv_heads[j]} and {w.channels[j]}; layers differing from layer 0: "
                        f"{shown}); a stock transformers model has one width for all layers: use --to gguf")
    if w.kv_heads[0] == 0:
        raise FlapError("every layer lost all its attention heads; a stock transformers LLaMA needs at least one: "
                        "use --to gguf")
