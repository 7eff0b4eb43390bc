"""The streamed layer store (store.py): a model larger than memory, one decoder layer at a time from its
safetensors shards.

The skeleton is built without weights (`accelerate.init_empty_weights`: parameters on the meta device,
the rotary buffers real). A module's weights are read from the shards when it runs and dropped to the
meta device right after, so at most one decoder layer (or the embedding, or norm + head) is resident,
plus the hidden states of the windows in flight. The engine is the in-memory one: calibration runs
layer-major over all N windows; perplexity over chunks of windows sized to the memory budget, so the
weights are read once per chunk (one chunk when the budget holds all windows' hidden states). Every
group of weights is checked finite as it is read (a NaN is an error, never a result).

Cost: every weight is read once per pass from the page cache or disk (calibration: 1 read; prune:
+1 read, +1 write of the pruned weights; perplexity: 1 read per chunk); compute equals the in-memory run.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.nn as nn
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM

from . import modeling  # noqa: F401  (registers flap_llama, so pruned directories stream too)
from .arch import ArchView, decoder_layers
from .coverage import refuse_incomplete
from .errors import FlapError
from .integrity import check_finite_tensors
from .runtime import return_freed_memory_to_os
from .shards import Checkpoint
from .units import mib
from .validate import read_config

if TYPE_CHECKING:
    from .arch import DecoderLayer

M = TypeVar("M", bound=nn.Module)


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    for p in path:
        module = getattr(module, p)
    module._parameters[leaf] = nn.Parameter(value, requires_grad=False)


@dataclass
class MemoryPlan:
    weights: int  # the largest group of weights resident at once (a decoder layer, embedding or head)
    per_window: int  # hidden states of one window, twice (a layer's input and its output)

    def needed(self, windows: int) -> int:
        return self.weights + windows * self.per_window


class StreamedModel:
    """The skeleton of a model directory plus its shards; `layer(i)` etc. load weights for a `with` block."""

    def __init__(self, folder, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 budget: int | None = None):
        return_freed_memory_to_os()  # else the allocator keeps each released layer resident
        self.ckpt = Checkpoint(folder)  # checks every shard first: a broken directory fails before any work
        self.config = read_config(folder)
        self.arch = ArchView.from_config(self.config)
        self.dtype, self.device, self.budget = dtype, torch.device(device), budget
        with init_empty_weights():  # parameters on "meta"; buffers (rotary inv_freq) real, on the CPU
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype).eval()
        base = self.model.model
        base.rotary_emb.to(self.device)
        self.layers = decoder_layers(self.model)
        self.tied = bool(getattr(self.config, "tie_word_embeddings", False)) and "lm_head.weight" not in self.ckpt
        expected = set(self.model.state_dict()) - ({"lm_head.weight"} if self.tied else set())
        refuse_incomplete({"missing_keys": expected - set(self.ckpt.where),  # before any work, as in memory
                           "unexpected_keys": set(self.ckpt.where) - expected}, folder)
        self.cut = False  # set by prune once it has cut the skeleton's layers: no longer the checkpoint's

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _check_intact(self) -> None:
        if self.cut:
            raise FlapError("this StreamedModel's layers were cut by a streamed prune; open the directory again "
                            "(StreamedModel(folder)) to run it once more")

    def _ckpt_name(self, name: str) -> str:
        return "model.embed_tokens.weight" if self.tied and name == "lm_head.weight" else name

    @contextlib.contextmanager
    def loaded(self, module: M, prefix: str) -> Iterator[M]:
        """`module` (named `prefix` in the checkpoint) with its weights on the device; released on exit."""
        if prefix.startswith("model.layers."):  # a cut skeleton's layers no longer match the checkpoint
            self._check_intact()
        names = [n for n, _ in module.named_parameters()]
        tensors = self.ckpt.load([self._ckpt_name(prefix + n) for n in names], self.dtype, self.device)
        check_finite_tensors(tensors, f"{self.ckpt.folder} ({prefix.rstrip('.')})")
        for n in names:
            _set_param(module, n, tensors.pop(self._ckpt_name(prefix + n)))
        module.to(self.device)  # its buffers (e.g. Gemma's embedding scale); the weights are there already
        try:
            yield module
        finally:
            for n in names:  # frees the weights; the skeleton keeps the shapes, and its buffers stay real
                _set_param(module, n, module.get_parameter(n).to("meta"))

    def layer(self, i: int) -> contextlib.AbstractContextManager[DecoderLayer]:
        return self.loaded(self.layers[i], f"model.layers.{i}.")

    def embedding(self):
        return self.loaded(self.model.model.embed_tokens, "model.embed_tokens.")

    @contextlib.contextmanager
    def head(self) -> Iterator[tuple[nn.Module, nn.Linear]]:
        with self.loaded(self.model.model.norm, "model.norm."), self.loaded(self.model.lm_head, "lm_head."):
            yield self.model.model.norm, self.model.lm_head

    def _bytes(self, prefix: str, module: nn.Module) -> int:
        return sum(self.ckpt.nbytes(self._ckpt_name(prefix + n), self.dtype) for n, _ in module.named_parameters())

    def plan(self, seqlen: int) -> MemoryPlan:
        self._check_intact()
        elem = torch.empty(0, dtype=self.dtype).element_size()
        layer = max(self._bytes(f"model.layers.{i}.", m) for i, m in enumerate(self.layers))
        embed = self._bytes("model.embed_tokens.", self.model.model.embed_tokens)
        head = self._bytes("lm_head.", self.model.lm_head) + self._bytes("model.norm.", self.model.model.norm)
        return MemoryPlan(max(layer, embed, head), 2 * seqlen * self.arch.hidden_size * elem)

    def check_budget(self, windows: int, seqlen: int, what: str, extra: int = 0) -> MemoryPlan:
        """Refuse, before any work, a budget that cannot hold one layer's weights plus `windows` hidden states
        (plus `extra` bytes, e.g. one batch of logits)."""
        plan, budget = self.plan(seqlen), self.budget
        need = plan.needed(windows) + extra
        if budget is not None and budget < need:
            raise FlapError(f"memory budget {mib(budget)} is too small for {what}: it needs {mib(need)} "
                            f"(the largest layer's weights in {str(self.dtype).removeprefix('torch.')}: "
                            f"{mib(plan.weights)}, plus hidden states of {windows} window(s) of {seqlen} tokens: "
                            f"{mib(windows * plan.per_window)}"
                            + (f", plus {mib(extra)} working memory" if extra else "")
                            + "), not counting the interpreter")
        return plan

    def chunk_windows(self, windows: int, batch: int, seqlen: int, what: str, extra: int = 0) -> int:
        """As many windows as the budget holds (all without one): each chunk reads every weight once."""
        plan = self.check_budget(min(batch, windows), seqlen, what, extra)
        if self.budget is None:
            return windows
        return max(1, min(windows, (self.budget - plan.weights - extra) // plan.per_window))

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The state dict's tensors by sorted name, as a model loaded in memory would hold them (a tied head
        under both names), read one at a time."""
        self._check_intact()
        for name in sorted(self.model.state_dict()):
            t = self.ckpt.load([self._ckpt_name(name)], self.dtype, self.device)
            check_finite_tensors(t, str(self.ckpt.folder))
            yield name, t[self._ckpt_name(name)]

    def weight_bytes(self) -> int:
        return sum(self.ckpt.nbytes(n, self.dtype) for n in self.ckpt.where)


def open_streamed(spec: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  budget: int | None = None):
    """models.LoadedModel whose model is the StreamedModel of an embedded name or a local directory (every
    shard checked, the tokenizer loaded; nothing of the weights read)."""
    from transformers import AutoTokenizer

    from .models import LoadedModel, local_model_dir
    folder, identity = local_model_dir(spec)
    sm = StreamedModel(folder, dtype, device, budget)
    identity.setdefault("revision", getattr(sm.config, "_commit_hash", None))  # as models.load_model records it
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise FlapError(f"{folder}: no usable tokenizer ({str(err).strip().splitlines()[0]})") from None
    return LoadedModel(sm, tok, identity)
