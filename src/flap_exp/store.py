"""Where a decoder layer's weights live while the engine runs it: a layer store.

Every engine step (calibration, scoring, the sequential pass, compensation, surgery, perplexity) runs
layer by layer against a store and never knows where the weights are: `layer(i)`, `embedding()` and
`head()` are context managers yielding the module ready to run. Two stores:

    ResidentStore   the model in memory; each context is a nullcontext
    StreamedModel   (streaming.py) the weights read from safetensors shards for the `with` block, then
                    released, within a memory budget

`--stream` only chooses the store; the engine is the same code.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn as nn

from .arch import ArchView, decoder_layers

if TYPE_CHECKING:
    from .arch import DecoderLayer


class LayerStore(Protocol):
    model: nn.Module  # the *ForCausalLM: real weights (resident) or a skeleton on the meta device (streamed)
    config: Any  # the model's transformers config
    arch: ArchView
    device: torch.device
    dtype: torch.dtype
    cut: bool  # set once prune has cut its layers (a streamed store can then no longer be read)

    @property
    def num_layers(self) -> int: ...

    def layer(self, i: int) -> contextlib.AbstractContextManager[DecoderLayer]: ...

    def embedding(self) -> contextlib.AbstractContextManager[nn.Module]: ...

    def head(self) -> contextlib.AbstractContextManager[tuple[nn.Module, nn.Linear]]:
        """(final norm, lm_head): the logits are lm_head(norm(h))."""
        ...

    def check_budget(self, windows: int, seqlen: int, what: str, extra: int = 0) -> object:
        """Refuse, before any work, a memory budget that cannot hold one layer plus `windows` hidden states
        (plus `extra` bytes); nothing to check when memory is not budgeted."""
        ...

    def chunk_windows(self, windows: int, batch: int, seqlen: int, what: str, extra: int = 0) -> int:
        """How many windows one layer-major pass (perplexity) takes through all layers at once."""
        ...


class ResidentStore:
    """The model in memory: every layer is always there."""

    def __init__(self, model: nn.Module):
        self.model: Any = model  # a *ForCausalLM (Any: its submodules are reached by attribute)
        self.config = model.config
        self.arch = ArchView.from_config(model.config)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self._layers = decoder_layers(model)
        self.cut = False

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def layer(self, i: int) -> contextlib.AbstractContextManager[DecoderLayer]:
        return contextlib.nullcontext(self._layers[i])

    def embedding(self) -> contextlib.AbstractContextManager[nn.Module]:
        return contextlib.nullcontext(getattr(self.model, "model", self.model).embed_tokens)

    @contextlib.contextmanager
    def head(self) -> Iterator[tuple[nn.Module, nn.Linear]]:
        yield getattr(self.model, "model", self.model).norm, self.model.lm_head

    def check_budget(self, windows: int, seqlen: int, what: str, extra: int = 0) -> object:
        return None  # the model is in memory already; activations are the caller's choice of batch

    def chunk_windows(self, windows: int, batch: int, seqlen: int, what: str, extra: int = 0) -> int:
        return min(windows, batch)  # the weights stay resident: holding more windows would save no read


def as_store(source: nn.Module | LayerStore) -> LayerStore:
    """A store for an in-memory model (a ResidentStore), or the store itself."""
    return ResidentStore(source) if isinstance(source, nn.Module) else source
