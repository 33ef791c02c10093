"""VCE methods, one file each, registered by name in ``lit_vce.registry.METHODS``.

Every module of this package is imported here, so a method file dropped into
``lit_vce/methods/`` registers itself without editing any other file.
"""

import importlib
import pkgutil

from .base import CounterfactualResult, VCEBatch, VCEMethod
from .classifier_guidance import ClassifierGuidance
from .digin import DiGIN
from .dvce import DVCE
from .guided import PerStepGuidance, Step

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "VCEMethod",
    "VCEBatch",
    "CounterfactualResult",
    "PerStepGuidance",
    "Step",
    "ClassifierGuidance",
    "DVCE",
    "DiGIN",
]
