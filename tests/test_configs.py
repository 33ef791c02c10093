"""Every YAML file under configs/ parses, and every class it names exists and accepts its arguments."""

import importlib
import inspect
from pathlib import Path

import pytest
import yaml

from lit_vce.registry import METHODS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def _class_specs(node, where=""):
    """(where, class_path, init_args) of every ``class_path`` mapping in a config tree."""
    if isinstance(node, dict):
        if "class_path" in node:
            yield where, node["class_path"], node.get("init_args") or {}
        for k, v in node.items():
            yield from _class_specs(v, f"{where}.{k}" if where else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _class_specs(v, f"{where}[{i}]")


def _accepted(cls) -> set[str] | None:
    """Argument names the constructor accepts, following ``**kwargs`` up the class tree (None: anything)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names
    return None


def test_there_are_configs():
    assert len(CONFIGS) >= 10 and any("fastdime" in p.name for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_config_parses_and_names_real_classes(path):
    cfg = yaml.safe_load(path.read_text())
    assert isinstance(cfg, dict) and cfg, path
    for where, class_path, init_args in _class_specs(cfg):
        if "." not in class_path and class_path in METHODS:  # a registered method name
            cls = METHODS.get(class_path)
        else:
            module, _, name = class_path.rpartition(".")
            cls = getattr(importlib.import_module(module), name)
        accepted = _accepted(cls)
        unknown = set(init_args) - accepted if accepted is not None else set()
        assert not unknown, f"{path.name}: {where} ({class_path}) does not take {sorted(unknown)}"
