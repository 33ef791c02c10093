"""The YAML configs shipped inside the package (``lit_vce/configs``).

``--config`` accepts a file path or the name of a shipped config, with or without
``.yaml``: ``world/dvce``, ``imagenet/base``, ``imagenet/methods/digin``,
``imagenet/protocols/pairs``. A path that exists wins over a shipped name, so a
local copy of a config (edited) is used as given. ``lit-vce configs`` lists them.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigNotFoundError, suggest

__all__ = ["config_root", "shipped_configs", "find_config", "ConfigNotFoundError"]


def config_root() -> Path:
    """The folder of the shipped configs (inside the installed package)."""
    return Path(__file__).resolve().parent / "configs"


def shipped_configs() -> list[str]:
    """Names of the shipped configs (``world/dvce``, ...), sorted."""
    root = config_root()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def find_config(name: str | Path) -> Path:
    """The config file ``name`` refers to: an existing path as it is, else a shipped
    config (``world/dvce``, ``world/dvce.yaml`` or ``configs/world/dvce.yaml``).

    Raises :class:`ConfigNotFoundError` naming the closest shipped configs."""
    path = Path(name)
    if path.is_file():
        return path
    key = path.as_posix()
    key = key[len("configs/") :] if key.startswith("configs/") else key
    key = key[: -len(".yaml")] if key.endswith(".yaml") else key
    candidate = config_root() / f"{key}.yaml"
    if candidate.is_file():
        return candidate
    hint = suggest(key, shipped_configs(), cutoff=0.5) or "; `lit-vce configs` lists the shipped ones"
    raise ConfigNotFoundError(f"--config {name}: no such file and no shipped config {key!r}{hint}")
