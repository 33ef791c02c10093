"""Classifiers: one wrapper type (images in [0, 1] of any size -> logits) and loaders by name."""

from .base import ImageClassifier
from .loaders import MissingWeightsError, load_classifier

__all__ = ["ImageClassifier", "MissingWeightsError", "load_classifier"]
