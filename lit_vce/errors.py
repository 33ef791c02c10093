"""Errors of the user's input or environment.

The ``lit-vce`` command prints these as one line (``lit-vce predict: <message>``)
instead of a traceback; each message names the option or file and the fix. Other
exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import difflib

__all__ = [
    "LitVCEError",
    "ConfigError",
    "MissingWeightsError",
    "MissingDependencyError",
    "ConfigNotFoundError",
    "UnknownNameError",
    "suggest",
]


class LitVCEError(Exception):
    """Base class of the errors the CLI reports in one line."""


class ConfigError(LitVCEError, ValueError):
    """A setting that cannot work (found while building the run, before any work)."""


class MissingWeightsError(LitVCEError, FileNotFoundError):
    """A model's weights are neither on disk nor downloadable; the message names the
    file and where to put it."""


class MissingDependencyError(LitVCEError, ImportError):
    """An optional package (an extra) is needed but not installed; the message says how to install it."""


class ConfigNotFoundError(LitVCEError, FileNotFoundError):
    """``--config`` names neither a file nor a shipped config."""


class UnknownNameError(LitVCEError, KeyError, ValueError):
    """A name (method, classifier, family, model) that is not known; the message says
    what is and, where one is close, ``did you mean ...?``."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def suggest(name: str, choices, n: int = 3, cutoff: float = 0.6) -> str:
    """``"; did you mean a or b?"`` for the choices close to ``name`` (empty if none)."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=cutoff)
    return f"; did you mean {' or '.join(close)}?" if close else ""
