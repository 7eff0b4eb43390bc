"""String-keyed registries, one per method axis; a method registers itself, with its facts, in its own module.

A registry's keys are the file names of its conf/ group. Its methods are the modules of one package
(flap_exp.methods.AXIS), imported on first use, plus any module named in FLAP_EXP_PLUGINS (comma-separated,
importable from PYTHONPATH): a user's method is one file and one conf file, and DVC's stage processes see it
through the environment. Method modules import nothing heavy at module level, so listing and checking
methods (the CLI's choices, the pipeline's composition) never imports torch.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import FlapError

PLUGINS_ENV = "FLAP_EXP_PLUGINS"


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any  # what the method provides (a compensation's `begin`)
    facts: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, fact: str) -> Any:
        try:
            return self.facts[fact]
        except KeyError:
            raise AttributeError(fact) from None


class Registry:
    def __init__(self, axis: str, package: str, defaults: dict[str, Any] | None = None):
        self.axis, self.package = axis, package
        self.defaults = {"rank": 100, **(defaults or {})}  # rank: place among the choices (plugins last)
        self._entries: dict[str, Entry] = {}
        self._loaded = False

    def register(self, name: str, **facts: Any) -> Callable[[Any], Any]:
        """Decorator: `@COMPENSATIONS.register("bias", needs="stats")` on the method's entry point."""
        unknown = sorted(set(facts) - set(self.defaults))
        if unknown:
            raise FlapError(f"{self.axis} {name!r}: unknown fact(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(self.defaults))}")

        def add(obj: Any) -> Any:
            if name in self._entries and self._entries[name].obj is not obj:
                raise FlapError(f"{self.axis} {name!r} is registered twice")
            self._entries[name] = Entry(name, obj, {**self.defaults, **facts})
            return obj
        return add

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self.package)
        for m in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            importlib.import_module(f"{self.package}.{m.name}")
        for name in filter(None, (p.strip() for p in os.environ.get(PLUGINS_ENV, "").split(","))):
            try:
                importlib.import_module(name)
            except ImportError as err:
                raise FlapError(f"{PLUGINS_ENV}: cannot import {name!r} ({err})") from None

    def names(self) -> tuple[str, ...]:
        """By the `rank` fact, then by name: the order of choices, errors and report rows, whatever the
        order of imports."""
        self._load()
        return tuple(sorted(self._entries, key=lambda n: (self._entries[n].facts.get("rank", 100), n)))

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def get(self, name: str) -> Entry:
        if name not in self.names():
            raise FlapError(f"unknown {self.axis} {name!r}; known {self.axis}s: {', '.join(self.names())}")
        return self._entries[name]
