"""Composable objective terms (lower is better), with an algebra of ``+`` and scalar ``*``.

    objective = TargetCE() + 0.1 * L1Distance()
    loss = objective(images, ctx)        # per-sample losses, shape (N,)
    objective.describe()                 # "1*TargetCE + 0.1*L1Distance", stored with results

Every term maps images in [0, 1] and an :class:`ObjectiveContext` (original
images, source/target labels, the classifier, optional foreground masks) to a
per-sample loss, so per-sample gradients stay independent of the batch.
"""

from __future__ import annotations

from collections.abc import Callable
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
    # augmented views for classifier terms: images (N, ...) -> (N * K, ...), K views per image
    views: Callable[[torch.Tensor], torch.Tensor] | None = None
    latents: torch.Tensor | None = None  # the candidate's latent (trajectory methods)
    original_latents: torch.Tensor | None = None
    latent_mask: torch.Tensor | None = None  # (N, 1, h, w) at latent resolution

    def classify(self, images: torch.Tensor, classifier: torch.nn.Module | None = None) -> torch.Tensor:
        """Logits (N, K, C) of the K augmented views of each image (K = 1 without ``views``)."""
        clf = classifier or self.classifier
        n = len(images)
        x = self.views(images) if self.views is not None else images
        return clf(x).reshape(n, len(x) // n, -1)


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
    """-log p(target | x) under the context's classifier (the VCE validity term),
    averaged over the context's augmented views when it has them."""

    def loss(self, images, ctx):
        logits = ctx.classify(images)
        n, k, c = logits.shape
        return F.cross_entropy(logits.reshape(n * k, c), ctx.target.repeat_interleave(k), reduction="none").view(n, k).mean(1)


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


class BackgroundL2(Objective):
    """Mean squared change outside the object: ``mean(((x - x_orig) * (1 - mask))^2)``,
    in pixel space (``space="pixel"``) or in the latent space of a trajectory method
    (``space="latent"``, with the mask at latent resolution). Without a mask the whole
    image counts as background."""

    def __init__(self, space: str = "pixel"):
        if space not in ("pixel", "latent"):
            raise ValueError("space must be 'pixel' or 'latent'")
        self.space = space

    def loss(self, images, ctx):
        if self.space == "pixel":
            d, m = images - ctx.original, ctx.mask
        else:
            if ctx.latents is None or ctx.original_latents is None:
                raise ValueError("BackgroundL2(space='latent') needs latents (a trajectory method)")
            d, m = ctx.latents - ctx.original_latents, ctx.latent_mask
        if m is not None:
            d = d * (1 - m)
        return d.pow(2).flatten(1).mean(1)

    def describe(self):
        return f"BackgroundL2({self.space})"
