"""Composable objective terms (lower is better), with an algebra of ``+``, ``-``, unary
``-``, scalar ``*`` and ``/`` and ``sum([...])``.

    objective = TargetCE() + 0.1 * L1Distance()
    loss = objective(images, ctx)        # per-sample losses, shape (N,)
    objective.describe()                 # "1*TargetCE + 0.1*L1Distance", stored with results

Every term maps images in [0, 1] and an :class:`ObjectiveContext` (original
images, source/target labels, the classifier, optional foreground masks) to a
per-sample loss, so per-sample gradients stay independent of the batch.
"""

from .core import Objective, ObjectiveContext, Scaled, Sum
from .perceptual import LPIPSDistance, VGGPerceptual, load_vgg19_features
from .terms import (
    SCORE_VARIANTS,
    BackgroundL2,
    Disagreement,
    L1Distance,
    L2Distance,
    NeuronActivation,
    TargetCE,
    find_layer,
)

__all__ = [
    "ObjectiveContext",
    "Objective",
    "Sum",
    "Scaled",
    "TargetCE",
    "L1Distance",
    "L2Distance",
    "BackgroundL2",
    "Disagreement",
    "NeuronActivation",
    "LPIPSDistance",
    "VGGPerceptual",
    "SCORE_VARIANTS",
    "find_layer",
    "load_vgg19_features",
]
