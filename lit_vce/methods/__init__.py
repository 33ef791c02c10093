"""VCE methods, one file each, registered by name in ``lit_vce.registry.METHODS``."""

from .base import CounterfactualResult, VCEBatch, VCEMethod
from .classifier_guidance import ClassifierGuidance
from .digin import DiGIN
from .dvce import DVCE
from .guided import PerStepGuidance

__all__ = ["VCEMethod", "VCEBatch", "CounterfactualResult", "PerStepGuidance", "ClassifierGuidance", "DVCE", "DiGIN"]
