"""What the command line prints besides the package's own lines.

- Lightning's banners (``GPU available ...``, ``TPU available ...``, ``LOCAL_RANK ...``)
  are dropped under ``--quiet`` (``LIT_VCE_QUIET=1``) and in ``lit-vce demo``
  (:func:`hide_banners`); its advertising tips
  (``💡 Tip: ... litlogger``) always.
- The Hugging Face hub's "Could not reach the Hub" is dropped when offline was asked
  for (``LIT_VCE_OFFLINE=1``/``HF_HUB_OFFLINE=1``, or a process building from the
  caches): the package chose not to reach it.
- diffusers' advice to install ``accelerate`` is dropped (loading works without it).
- Python warnings (:func:`one_line_warnings`, the ``lit-vce`` console script): each
  distinct warning once, on one line (``warning: <message> (<file>:<line>)``), instead of
  the message plus the echoed source line, once per place it was raised.

Filters are installed once (:func:`tame_library_logs`) and read the environment when a
record is emitted, so ``--quiet`` given after the import still applies.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

__all__ = ["tame_library_logs", "one_line_warnings", "is_quiet", "hide_banners"]

_LIGHTNING = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
)
_HUB = ("huggingface_hub.hf_api", "huggingface_hub.file_download", "huggingface_hub._snapshot_download")
_installed = False


def is_quiet() -> bool:
    """``--quiet`` / ``LIT_VCE_QUIET=1``."""
    return os.environ.get("LIT_VCE_QUIET", "0") not in ("", "0")


def _offline() -> bool:
    from .weights import is_offline

    return is_offline()


class _Drop(logging.Filter):
    def __init__(self, test):
        super().__init__()
        self.test = test

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not self.test(record)
        except Exception:  # a filter must never lose a record by failing
            return True


_banners = True


def hide_banners() -> None:
    """Drop Lightning's informational lines (the GPU/TPU banner) in this process even
    without ``--quiet``: ``lit-vce demo`` prints its own header per run instead."""
    global _banners
    _banners = False


def _lightning_noise(record: logging.LogRecord) -> bool:
    message = str(record.getMessage())
    return message.startswith("💡 Tip") or ((is_quiet() or not _banners) and record.levelno < logging.WARNING)


def _hub_noise(record: logging.LogRecord) -> bool:
    return "Could not reach the Hub" in str(record.getMessage()) and _offline()


def _accelerate_advice(record: logging.LogRecord) -> bool:
    return "`accelerate` was not found" in str(record.getMessage())


def tame_library_logs() -> None:
    """Install the filters above on the libraries' loggers (once per process)."""
    global _installed
    if _installed:
        return
    _installed = True
    for name in _LIGHTNING:
        logging.getLogger(name).addFilter(_Drop(_lightning_noise))
    for name in _HUB:
        logging.getLogger(name).addFilter(_Drop(_hub_noise))
    logging.getLogger("diffusers.models.modeling_utils").addFilter(_Drop(_accelerate_advice))


_seen: set[tuple[str, str]] = set()


def _show(message, category, filename, lineno, file=None, line=None) -> None:
    key = (category.__name__, str(message))
    if key in _seen:
        return
    _seen.add(key)
    text = " ".join(str(message).split())  # one line
    where = f"{os.path.basename(filename)}:{lineno}"
    out = file if file is not None else sys.stderr
    try:
        out.write(f"warning: {text} ({category.__name__}, {where})\n")
    except (OSError, ValueError):  # a closed stream
        pass


def one_line_warnings() -> None:
    """Every Python warning once per distinct message, on one line (the console script).
    Warnings still follow the filters (``-W``, ``PYTHONWARNINGS``); this changes only how
    a shown one looks and that a repeat is not shown."""
    warnings.showwarning = _show
