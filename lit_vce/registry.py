"""Registries by decorator, extensible by other packages through entry points.

    from lit_vce.registry import METHODS

    @METHODS.register("my_method")
    class MyMethod(VCEMethod): ...

A package can also register without being imported by lit_vce, through the entry
point group named by the registry (``lit_vce.methods``, ``lit_vce.classifiers``),
e.g. in its pyproject: ``[project.entry-points."lit_vce.methods"] my_method = "pkg.mod:MyMethod"``.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any


class Registry:
    """A name -> object table filled by the ``register`` decorator."""

    def __init__(self, kind: str, group: str):
        self.kind, self.group = kind, group
        self._items: dict[str, Any] = {}
        self._entry_points_loaded = False

    def register(self, name: str) -> Callable[[Any], Any]:
        def deco(obj):
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered ({self._items[name]!r})")
            self._items[name] = obj
            return obj

        return deco

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.group):
            if ep.name not in self._items:
                self._items[ep.name] = ep.load()

    def get(self, name: str) -> Any:
        if name not in self._items:
            self._load_entry_points()
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._items)) or '(none)'}")
        return self._items[name]

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._items


METHODS = Registry("method", "lit_vce.methods")
CLASSIFIER_FAMILIES = Registry("classifier family", "lit_vce.classifiers")
