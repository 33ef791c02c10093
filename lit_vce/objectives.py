"""Composable objective terms (lower is better), with an algebra of ``+`` and scalar ``*``.

    objective = TargetCE() + 0.1 * L1Distance()
    loss = objective(images, ctx)        # per-sample losses, shape (N,)
    objective.describe()                 # "1*TargetCE + 0.1*L1Distance", stored with results

Every term maps images in [0, 1] and an :class:`ObjectiveContext` (original
images, source/target labels, the classifier, optional foreground masks) to a
per-sample loss, so per-sample gradients stay independent of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ObjectiveContext:
    """What a term may look at besides the candidate images."""

    original: torch.Tensor
    source: torch.Tensor
    target: torch.Tensor
    classifier: torch.nn.Module | None = None
    mask: torch.Tensor | None = None  # (N, 1, H, W), 1 on the object


class Objective:
    """Base class: subclasses implement ``loss(images, ctx) -> (N,)``."""

    def loss(self, images: torch.Tensor, ctx: ObjectiveContext) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__

    def __call__(self, images: torch.Tensor, ctx: ObjectiveContext) -> torch.Tensor:
        return self.loss(images, ctx)

    def __add__(self, other: Objective) -> Objective:
        return Sum([self, other])

    def __mul__(self, weight: float) -> Objective:
        return Scaled(self, float(weight))

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return self.describe()


class Sum(Objective):
    def __init__(self, terms):
        self.terms = []
        for t in terms:
            self.terms.extend(t.terms if isinstance(t, Sum) else [t])

    def loss(self, images, ctx):
        return sum(t(images, ctx) for t in self.terms)

    def describe(self):
        return " + ".join(t.describe() for t in self.terms)


class Scaled(Objective):
    def __init__(self, term: Objective, weight: float):
        self.term, self.weight = term, weight

    def loss(self, images, ctx):
        return self.weight * self.term(images, ctx)

    def describe(self):
        return f"{self.weight:g}*{self.term.describe()}"


class TargetCE(Objective):
    """-log p(target | x) under the context's classifier (the VCE validity term)."""

    def loss(self, images, ctx):
        return F.cross_entropy(ctx.classifier(images), ctx.target, reduction="none")


class L1Distance(Objective):
    """Mean absolute difference to the original (optionally only outside the mask)."""

    def __init__(self, background_only: bool = False):
        self.background_only = background_only

    def loss(self, images, ctx):
        d = (images - ctx.original).abs()
        if self.background_only:
            if ctx.mask is None:
                raise ValueError("L1Distance(background_only=True) needs masks")
            d = d * (1 - ctx.mask)
        return d.flatten(1).mean(1)

    def describe(self):
        return "L1Distance(background)" if self.background_only else "L1Distance"


class L2Distance(Objective):
    """Per-sample Euclidean distance to the original."""

    def loss(self, images, ctx):
        return (images - ctx.original).flatten(1).norm(dim=1)
