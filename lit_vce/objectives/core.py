"""The objective algebra: :class:`ObjectiveContext`, :class:`Objective` and its sums and
scalings (the terms are in ``terms.py`` and ``perceptual.py``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


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

    def tiled(self, k: int) -> ObjectiveContext:
        """The context of ``k`` stacked copies of the batch (``k * N`` candidates, copy-major),
        so one objective call scores k candidates per sample; views are drawn per copy, in
        order, as k separate calls would draw them."""

        def tile(t):
            return None if t is None else torch.cat([t] * k)

        views = self.views
        if views is not None and k > 1:

            def views(x, _v=self.views):
                return torch.cat([_v(c) for c in x.chunk(k)])

        return ObjectiveContext(
            tile(self.original),
            tile(self.source),
            tile(self.target),
            self.classifier,
            tile(self.mask),
            views,
            tile(self.latents),
            tile(self.original_latents),
            tile(self.latent_mask),
        )

    def classify(self, images: torch.Tensor, classifier: torch.nn.Module | None = None) -> torch.Tensor:
        """Logits (N, K, C) of the K augmented views of each image (K = 1 without ``views``)."""
        clf = classifier or self.classifier
        n = len(images)
        x = self.views(images) if self.views is not None else images
        return clf(x).reshape(n, len(x) // n, -1)


class Objective:
    """Base class: subclasses implement ``loss(images, ctx) -> (N,)``."""

    #: whether the term reads the classifier (validity terms; distances do not)
    uses_classifier = False
    #: whether two threads may evaluate the term at once (no hooks or other shared state
    #: touched during ``loss``); deterministic runs generate samples concurrently only then
    thread_safe = True

    def loss(self, images: torch.Tensor, ctx: ObjectiveContext) -> torch.Tensor:
        raise NotImplementedError

    def weighted_terms(self) -> list[tuple[float, Objective]]:
        """The objective as ``[(weight, term), ...]`` with ``sum(w * term)`` equal to it: what
        methods that treat each term's gradient on its own (DVCE's per-term rescaling) iterate over."""
        return [(1.0, self)]

    def describe(self) -> str:
        return type(self).__name__

    def __call__(self, images: torch.Tensor, ctx: ObjectiveContext) -> torch.Tensor:
        return self.loss(images, ctx)

    def __add__(self, other: Objective) -> Objective:
        if isinstance(other, (int, float)) and other == 0:  # sum([...]) starts from 0
            return self
        if not isinstance(other, Objective):
            return NotImplemented
        return Sum([self, other])

    __radd__ = __add__

    def __sub__(self, other: Objective) -> Objective:
        if not isinstance(other, Objective):
            return NotImplemented
        return Sum([self, -other])

    def __neg__(self) -> Objective:
        return Scaled(self, -1.0)

    def __mul__(self, weight: float) -> Objective:
        if not isinstance(weight, (int, float)):
            return NotImplemented
        return Scaled(self, float(weight))

    __rmul__ = __mul__

    def __truediv__(self, divisor: float) -> Objective:
        if not isinstance(divisor, (int, float)):
            return NotImplemented
        if divisor == 0:
            raise ZeroDivisionError("an objective divided by 0")
        return Scaled(self, 1.0 / float(divisor))

    def __repr__(self) -> str:
        return self.describe()


class Sum(Objective):
    def __init__(self, terms):
        self.terms = []
        for t in terms:
            self.terms.extend(t.terms if isinstance(t, Sum) else [t])

    def loss(self, images, ctx):
        return sum(t(images, ctx) for t in self.terms)

    def weighted_terms(self):
        return [wt for t in self.terms for wt in t.weighted_terms()]

    @property
    def uses_classifier(self):
        return any(t.uses_classifier for t in self.terms)

    @property
    def thread_safe(self):
        return all(t.thread_safe for t in self.terms)

    def describe(self):
        out = self.terms[0].describe()
        for t in self.terms[1:]:
            d = t.describe()
            out += f" - {d[1:]}" if d.startswith("-") else f" + {d}"
        return out


class Scaled(Objective):
    def __init__(self, term: Objective, weight: float):
        if isinstance(term, Scaled):  # weights multiply: 2 * (3 * T) = 6 * T
            term, weight = term.term, weight * term.weight
        self.term, self.weight = term, weight

    def loss(self, images, ctx):
        return self.weight * self.term(images, ctx)

    def weighted_terms(self):
        return [(self.weight * w, t) for w, t in self.term.weighted_terms()]

    @property
    def uses_classifier(self):
        return self.term.uses_classifier

    @property
    def thread_safe(self):
        return self.term.thread_safe

    def describe(self):
        inner = self.term.describe()
        if isinstance(self.term, Sum):
            inner = f"({inner})"
        if self.weight == -1.0:
            return f"-{inner}"
        return f"{self.weight:g}*{inner}"
