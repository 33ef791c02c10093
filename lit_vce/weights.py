"""Where weights come from, and which process may download them.

Every loader looks for local files under :func:`weights_dir` (``$LIT_VCE_WEIGHTS_DIR``,
default ``~/.cache/lit_vce``) and in the libraries' own caches (the Hugging Face hub
cache, torch hub) before it downloads anything, and only downloads when
:func:`may_download` says so; a file it cannot find or fetch is a
:class:`~lit_vce.errors.MissingWeightsError` naming the file and where to put it.

In a run (``lit-vce predict``, ``disagree``, ``neurons``, ``fetch``) the stage builds its
models in Lightning's ``prepare_data`` hook, under :func:`fetching`, on one process per
node (local rank 0; with ``--model.fetch_per_node false`` on global rank 0 only, for a
cache every node shares), while the other processes wait. They then build the same
models in ``setup`` under :func:`cache_only`: the Hugging Face hub in offline mode and
no download attempted, so N processes make no network requests and a file the
fetching process did not leave in the cache is a clear error instead of N concurrent
downloads. ``LIT_VCE_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) makes every process cache-only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "weights_dir",
    "is_offline",
    "may_download",
    "fetching",
    "cache_only",
    "phase",
    "no_download_reason",
    "collecting_missing",
    "needed",
]

_PHASE: str | None = None  # "fetch" inside fetching(), "cache" inside cache_only(), else None
_MISSING: list[str] | None = None  # the messages collecting_missing() gathers


@contextlib.contextmanager
def collecting_missing() -> Iterator[list[str]]:
    """Inside, a part loaded through :func:`needed` whose weights are missing is
    recorded (its one-line message, in the list this yields) instead of stopping the
    build, so ``lit-vce fetch`` names every missing file of a run at once. What was
    built with a part missing is incomplete: use it only to find what is missing."""
    global _MISSING
    old, _MISSING = _MISSING, []
    try:
        yield _MISSING
    finally:
        _MISSING = old


def needed(load, *args, **kwargs):
    """``load(*args, **kwargs)``; inside :func:`collecting_missing` a
    :class:`~lit_vce.errors.MissingWeightsError` is recorded and ``None`` returned."""
    from .errors import MissingWeightsError

    try:
        return load(*args, **kwargs)
    except MissingWeightsError as e:
        if _MISSING is None:
            raise
        if str(e) not in _MISSING:
            _MISSING.append(str(e))
        return None


def weights_dir() -> Path:
    """Root of locally provided weights: ``$LIT_VCE_WEIGHTS_DIR`` or ``~/.cache/lit_vce``."""
    return Path(os.environ.get("LIT_VCE_WEIGHTS_DIR", Path.home() / ".cache" / "lit_vce"))


def phase() -> str | None:
    """``"fetch"`` while a stage fetches its weights, ``"cache"`` while it builds from the
    cache only, ``None`` outside a run's build (Python use)."""
    return _PHASE


def is_offline() -> bool:
    """No download may be attempted: ``LIT_VCE_OFFLINE``/``HF_HUB_OFFLINE`` is set, or this
    process builds from the cache (:func:`cache_only`)."""
    env = any(os.environ.get(k, "0") not in ("", "0") for k in ("LIT_VCE_OFFLINE", "HF_HUB_OFFLINE"))
    return env or _PHASE == "cache"


def may_download() -> bool:
    """Whether this process may download a missing file: never offline or cache-only;
    while fetching, yes; outside a run's build, only on rank 0 of the launcher's
    environment (other ranks of a hand-made launch would download concurrently)."""
    from .progress import env_rank

    if is_offline():
        return False
    return _PHASE == "fetch" or env_rank() == 0


def no_download_reason() -> str:
    """Why :func:`may_download` is False, for error messages."""
    from .progress import env_rank

    if _PHASE == "cache":
        return "this process reads the caches the fetching process filled in prepare_data, and the file was not there"
    if any(os.environ.get(k, "0") not in ("", "0") for k in ("LIT_VCE_OFFLINE", "HF_HUB_OFFLINE")):
        return "offline (LIT_VCE_OFFLINE/HF_HUB_OFFLINE)"
    return f"rank {env_rank()} does not download (run `lit-vce fetch` first, or build the models inside a Trainer)"


@contextlib.contextmanager
def _set_phase(value: str) -> Iterator[None]:
    global _PHASE
    old, _PHASE = _PHASE, value
    try:
        yield
    finally:
        _PHASE = old


@contextlib.contextmanager
def fetching() -> Iterator[None]:
    """Build models with downloads allowed (the process that fills the caches)."""
    with _set_phase("fetch"):
        yield


@contextlib.contextmanager
def cache_only() -> Iterator[None]:
    """Build models from local files and caches only: no download is attempted, and the
    Hugging Face hub (timm, open_clip, diffusers, transformers) runs in offline mode."""
    saved_env = os.environ.get("HF_HUB_OFFLINE")
    hub = None
    try:
        import huggingface_hub.constants as hub
    except ImportError:
        pass
    saved_hub = getattr(hub, "HF_HUB_OFFLINE", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    try:
        with _set_phase("cache"):
            yield
    finally:
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env
        if hub is not None:
            hub.HF_HUB_OFFLINE = saved_hub


def find_weights(family: str, filename: str, path: str | Path | None = None) -> Path:
    """``path`` if given, else ``$LIT_VCE_WEIGHTS_DIR/<family>/<filename>``, else the torch hub's
    ``checkpoints/<filename>``; a one-line :class:`MissingWeightsError` naming them otherwise."""
    import torch

    from .errors import MissingWeightsError

    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise MissingWeightsError(f"{family} weights {p} do not exist (expected {filename})")
        return p
    candidates = [weights_dir() / family / filename, Path(torch.hub.get_dir()) / "checkpoints" / filename]
    for c in candidates:
        if c.is_file():
            return c
    raise MissingWeightsError(f"{family}: {filename} not found; put it at {candidates[0]} (or {candidates[1]})")


def hub_model_missing(what: str, spec: str, layout: list[str], error: BaseException) -> str:
    """The one-line message for a model given as a Hugging Face hub id or a local folder
    (``from_pretrained``) that could not be loaded: a folder that does not exist, the
    parts of ``layout`` (relative paths) a local folder lacks, or, for a hub id, the cache
    it was looked for in, why nothing was downloaded and how to get it there."""
    spec_path = Path(spec).expanduser()
    if spec_path.is_dir():
        missing = [p for p in layout if not (spec_path / p).exists()]
        for p in layout:  # a component whose config is there but not its weights
            folder = (spec_path / p).parent
            if p.endswith("config.json") and (spec_path / p).exists() and folder != spec_path:
                if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
                    missing.append(f"{folder.relative_to(spec_path)}/ weights (*.safetensors)")
        lacks = f"lacks {', '.join(missing)}" if missing else f"could not be read ({type(error).__name__}: {error})"
        return f"{what} folder {spec_path} {lacks}; it needs {', '.join(layout)} (a save_pretrained folder)"
    if spec.startswith(("/", ".", "~")) or spec.count("/") > 1:
        return f"{what} folder {spec_path} does not exist; give a folder with {', '.join(layout)} or a hub id"
    try:
        from huggingface_hub import constants

        cache = constants.HF_HUB_CACHE
    except ImportError:  # pragma: no cover - a dependency of diffusers/transformers
        cache = "$HF_HOME/hub"
    why = no_download_reason() if not may_download() else f"the download failed: {type(error).__name__}"
    return (
        f"{what} {spec!r} is not in the Hugging Face cache {cache} ({why}); download it once where there is "
        f"internet (`huggingface-cli download {spec}`, or `lit-vce fetch` with this run's arguments) into that "
        f"cache, or give a local folder with {', '.join(layout)}"
    )
