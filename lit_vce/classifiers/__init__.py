"""Classifiers: one wrapper type (images in [0, 1] of any size -> logits) and loaders by name."""

from .base import ImageClassifier
from . import faces, openclip, robustness  # noqa: F401  (register the celeba, celebahq, openclip, robustness families)
from ..errors import MissingWeightsError  # re-exported: its home is lit_vce.errors
from .loaders import load_classifier

__all__ = ["ImageClassifier", "MissingWeightsError", "load_classifier"]
