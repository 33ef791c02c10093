"""Settings recorded from constructor calls, so results describe a method completely
without hand-kept lists.

A class deriving from :class:`RecordsInitArgs` remembers the arguments of its
constructor (defaults filled in, ``**kwargs`` flattened, the arguments a subclass
forwards to its parents' constructors merged, the outermost value winning unless
it is ``None``) in ``init_args``; :func:`describe_value` turns them into JSON-safe data: nested
recorded objects (a diffusion model inside a method) by their own arguments,
objectives by their description, classifiers by name, other modules by type.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any


def _bound(init, self, args, kwargs) -> dict[str, Any]:
    sig = inspect.signature(init)
    bound = sig.bind(self, *args, **kwargs)
    bound.apply_defaults()
    out: dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[1:]:
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            out[name] = list(value)
        else:
            out[name] = value
    return out


class RecordsInitArgs:
    """Mixin: ``self.init_args`` holds every constructor argument of the instance."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_records_init_args", False):
            return

        @functools.wraps(init)
        def recording_init(self, *args, **kw):
            record = self.__dict__.get("_init_args")
            if record is None:
                record = {}
                object.__setattr__(self, "_init_args", record)
            for key, value in _bound(init, self, args, kw).items():
                if record.get(key) is None:  # the outermost constructor's value wins, unless it was None
                    record[key] = value
            init(self, *args, **kw)

        recording_init._records_init_args = True
        cls.__init__ = recording_init

    @property
    def init_args(self) -> dict[str, Any]:
        return dict(self.__dict__.get("_init_args", {}))

    def describe_init_args(self) -> dict[str, Any]:
        """Every constructor argument as JSON-safe data (:func:`describe_value`), taking the
        instance's attribute of the same name where it has one: values resolved in the
        constructor (``"auto"`` choices, a model built from its name) or changed since."""
        out = {}
        for key, value in self.init_args.items():
            try:
                value = getattr(self, key, value)
            except Exception:  # a property that cannot answer now
                pass
            out[key] = describe_value(value)
        return out


def describe_value(value: Any) -> Any:
    """A JSON-safe description of a constructor argument."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [describe_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): describe_value(v) for k, v in value.items()}
    if isinstance(value, RecordsInitArgs):
        return {"class": type(value).__name__, **value.describe_init_args()}
    describe = getattr(value, "describe", None)
    if callable(describe):  # objectives print themselves (duck-typed: provenance imports no higher layer)
        return describe_value(describe())
    name = getattr(value, "name", None)
    if isinstance(name, str):  # classifiers
        return name
    return type(value).__name__
