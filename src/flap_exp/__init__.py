"""flap-exp: FLAP structured pruning of LLaMA-family models.

Importing the package makes a pruned directory (`model_type: flap_llama`) loadable with
`transformers.AutoModelForCausalLM.from_pretrained(dir)`: the config and model classes are registered
with transformers' Auto classes as soon as transformers is imported (at once if it already is). The
import itself stays light (no torch, no transformers), so the command line and the pipeline's
composition start fast.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


def _register() -> None:
    from . import modeling  # noqa: F401  (deferred on purpose: it imports torch and transformers)


class _RegisterWithTransformers(importlib.abc.MetaPathFinder):
    """Runs _register right after `transformers` is first imported, whoever imports it."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)  # once; and find_spec below must not come back here
        spec = importlib.util.find_spec(name)
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_and_register(module) -> None:
            exec_module(module)
            _register()

        loader.exec_module = exec_and_register  # this spec's loader only
        return spec


if "transformers" in sys.modules:
    _register()
else:
    sys.meta_path.insert(0, _RegisterWithTransformers())
