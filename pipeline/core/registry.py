"""One ``Registry`` class for every pluggable family: formats, metrics, optimizers, schedulers, TTA,
samplers, pruners, blenders, target kinds and the config's own checks.

A registry maps a name to an entry. An entry is an object, or a lazy ``"module:attr"`` path that is
imported the first time the entry is looked up, so the config checks a name against the registry
without importing the family that implements it (``pipeline --help`` and ``load_config`` stay light,
and a low package never imports a high one to learn a name). Adding an entry is the one way to extend
a family::

    from pipeline.config.registries import OPTIMIZERS
    OPTIMIZERS.register("nadamw", OptimizerSpec("nadamw"))

    @METRICS.register("my_score")           # as a decorator
    def ...
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from typing import Any

_NOTHING = object()


def unknown_name(kind: str, name: Any, known) -> str:
    """``unknown <kind> 'x'; did you mean y?`` (or the known names when none is close)."""
    known = list(known)
    close = difflib.get_close_matches(str(name), known, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else f"expected one of {', '.join(sorted(known))}"
    return f"unknown {kind} {name!r}; {hint}"


class _Lazy(str):
    """An entry not imported yet: its ``"module:attr"`` path."""


class Registry:
    """Named entries of one family; ``lazy`` entries are ``"module:attr"`` paths resolved on first look-up."""

    def __init__(self, kind: str, *, lazy: dict[str, str] | None = None, entries: dict[str, Any] | None = None):
        self.kind = kind
        self._entries: dict[str, Any] = {}  # in registration order; a lazy entry is a _Lazy path
        for name, path in (lazy or {}).items():
            self.register_lazy(name, path)
        for name, obj in (entries or {}).items():
            self.register(name, obj)

    def register(self, name: str, obj: Any = _NOTHING):
        """Add (or replace) ``name``; without ``obj``, a decorator that registers what it decorates."""
        if obj is _NOTHING:

            def decorate(o):
                self.register(name, o)
                return o

            return decorate
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        self._entries[name] = obj
        return obj

    def register_lazy(self, name: str, path: str) -> None:
        """Add (or replace) ``name`` as ``"module:attr"``, imported when first looked up."""
        module, _, attr = path.partition(":")
        if not module or not attr:
            raise ValueError(f"a lazy {self.kind} entry is 'module:attr', got {path!r}")
        self._entries[name] = _Lazy(path)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a plug-in's entry, e.g. after a test)."""
        if name not in self:
            raise ValueError(self.unknown(name))
        del self._entries[name]

    def names(self) -> list[str]:
        """Every name, in the order registered."""
        return list(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"

    def unknown(self, name: Any) -> str:
        return unknown_name(self.kind, name, self.names())

    def check(self, name: Any) -> str:
        """``name`` when registered, else ``ValueError`` with a did-you-mean line (no import happens)."""
        if name not in self:
            raise ValueError(self.unknown(name))
        return name

    def get(self, name: str) -> Any:
        """The entry for ``name``, importing a lazy one; ``ValueError`` naming the known ones otherwise."""
        if name not in self:
            raise ValueError(self.unknown(name))
        entry = self._entries[name]
        if isinstance(entry, _Lazy):
            module, _, attr = entry.partition(":")
            obj: Any = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
            entry = self._entries[name] = obj
        return entry

    def items(self) -> list[tuple[str, Any]]:
        """(name, entry) for every entry, importing the lazy ones."""
        return [(name, self.get(name)) for name in self.names()]

    def lazy_paths(self) -> dict[str, str]:
        """The entries not imported yet, as ``{name: "module:attr"}`` (the architecture test resolves them)."""
        return {name: str(e) for name, e in self._entries.items() if isinstance(e, _Lazy)}
