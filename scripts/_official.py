"""Shared by the scripts that write parity fixtures by running an authors' code
(``make_*_fixture.py``): stand-ins for packages that code imports for other paths."""

from __future__ import annotations

import importlib.machinery
import sys
import types


def stub(name: str, **attrs) -> types.ModuleType:
    """Register an importable module ``name`` with ``attrs``; any other public name is a no-op
    callable (the official code imports it, the path a fixture runs never uses it)."""
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)

    def anything(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return lambda *a, **k: None

    mod.__getattr__ = anything
    for k, v in attrs.items():
        setattr(mod, k, v)
    sys.modules[name] = mod
    return mod
