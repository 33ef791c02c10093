"""Registries by decorator, extensible by other packages through entry points.

    from lit_vce.registry import METHODS

    @METHODS.register("my_method")  # sets MyMethod.name = "my_method"
    class MyMethod(VCEMethod): ...

Every module inside ``lit_vce/methods/`` is imported when the method registry is
first read, so a new method is one file there (no other file to edit). A package
can also register without being imported by lit_vce, through the entry point
group named by the registry (``lit_vce.methods``, ``lit_vce.classifiers``), e.g.
in its pyproject: ``[project.entry-points."lit_vce.methods"] my_method = "pkg.mod:MyMethod"``.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any


class Registry:
    """A name -> object table filled by the ``register`` decorator."""

    def __init__(self, kind: str, group: str, package: str | None = None):
        self.kind, self.group, self.package = kind, group, package
        self._items: dict[str, Any] = {}
        self._entry_points_loaded = False

    def register(self, name: str) -> Callable[[Any], Any]:
        """Register under ``name``; a class gets ``name`` as its ``name`` attribute (the one
        place a method's name is set: results, configs and the registry agree)."""

        def deco(obj):
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered ({self._items[name]!r})")
            self._items[name] = _named(obj, name)
            return obj

        return deco

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        if self.package:  # the built-in modules register on import
            import importlib

            importlib.import_module(self.package)
        for ep in entry_points(group=self.group):
            if ep.name not in self._items:
                self._items[ep.name] = _named(ep.load(), ep.name)

    def get(self, name: str) -> Any:
        if name not in self._items:
            self._load_entry_points()
        if name not in self._items:
            from .errors import UnknownNameError, suggest

            known = sorted(self._items)
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{suggest(name, known)} (registered: {', '.join(known) or '(none)'})"
            )
        return self._items[name]

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._items


def _named(obj: Any, name: str) -> Any:
    """``obj`` with its ``name`` attribute set to ``name`` when it is a class that has one
    (methods; functions and other registered objects are left as they are)."""
    if isinstance(obj, type) and hasattr(obj, "name"):
        obj.name = name
    return obj


METHODS = Registry("method", "lit_vce.methods", package="lit_vce.methods")
CLASSIFIER_FAMILIES = Registry("classifier family", "lit_vce.classifiers")


def describe_method(name: str, cls: Any) -> str:
    """``name``, the class path, the docstring's first line and the constructor's defaults
    (the class's own arguments, then those it inherits through ``**kwargs``)."""
    import inspect

    doc = (inspect.getdoc(cls) or "").strip().splitlines()
    lines = [f"{name}  ({cls.__module__}.{cls.__qualname__})", f"  {doc[0] if doc else '(no description)'}"]
    seen: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        params = [
            p
            for p in inspect.signature(init).parameters.values()
            if p.name not in seen and p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        ]
        seen.update(p.name for p in params)
        if params:
            lines.append(
                "  " + ", ".join(f"{p.name}={p.default!r}" if p.default is not p.empty else p.name for p in params)
            )
    return "\n".join(lines)
