"""The objective terms of the methods and analyses: the target's cross-entropy, L1/L2 and
background distances (in pixel or latent space), two classifiers' disagreement and a
unit's activation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .core import Objective, ObjectiveContext  # noqa: F401  (ObjectiveContext in annotations)


class TargetCE(Objective):
    """-log p(target | x) under the context's classifier (the VCE validity term),
    averaged over the context's augmented views when it has them."""

    uses_classifier = True

    def loss(self, images, ctx):
        logits = ctx.classify(images)
        n, k, c = logits.shape
        return (
            F.cross_entropy(logits.reshape(n * k, c), ctx.target.repeat_interleave(k), reduction="none")
            .view(n, k)
            .mean(1)
        )


def _space(images: torch.Tensor, ctx, space: str, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(change, foreground mask) in pixel space or in a trajectory method's latent space."""
    if space == "pixel":
        return images - ctx.original, ctx.mask
    if ctx.latents is None or ctx.original_latents is None:
        raise ValueError(f"{name}(space='latent') needs latents (a trajectory method)")
    return ctx.latents - ctx.original_latents, ctx.latent_mask


def _check_space(space: str) -> str:
    if space not in ("pixel", "latent"):
        raise ValueError("space must be 'pixel' or 'latent'")
    return space


class L1Distance(Objective):
    """Mean absolute change, ``mean(|x - x_orig|)`` (DiG-IN's ``px_l1``/``latent_l1``),
    in pixel or latent space, optionally only outside the mask; ``reduction="sum"`` gives
    ``|x - x_orig|_1`` (DVCE's distance term, whose gradient is ``sign(x - x_orig)``)."""

    def __init__(self, background_only: bool = False, space: str = "pixel", reduction: str = "mean"):
        if reduction not in ("mean", "sum"):
            raise ValueError("reduction must be 'mean' or 'sum'")
        self.background_only, self.space, self.reduction = background_only, _check_space(space), reduction

    def loss(self, images, ctx):
        d, m = _space(images, ctx, self.space, "L1Distance")
        d = d.abs()
        if self.background_only:
            if m is None:
                raise ValueError("L1Distance(background_only=True) needs masks")
            d = d * (1 - m)
        return d.flatten(1).sum(1) if self.reduction == "sum" else d.flatten(1).mean(1)

    def describe(self):
        where = "" if self.space == "pixel" else "latent"
        if self.background_only:
            where = ", ".join(w for w in (where, "background") if w)
        if self.reduction == "sum":
            where = ", ".join(w for w in (where, "sum") if w)
        return f"L1Distance({where})" if where else "L1Distance"


class L2Distance(Objective):
    """Mean squared change, ``mean((x - x_orig)^2)``, in pixel or latent space: DiG-IN's
    ``px_l2``/``latent_l2`` (``F.mse_loss``), not the Euclidean norm."""

    def __init__(self, space: str = "pixel"):
        self.space = _check_space(space)

    def loss(self, images, ctx):
        d, _ = _space(images, ctx, self.space, "L2Distance")
        return d.pow(2).flatten(1).mean(1)

    def describe(self):
        return "L2Distance" if self.space == "pixel" else "L2Distance(latent)"


class BackgroundL2(Objective):
    """Mean squared change weighted by the background: ``mean((1 - mask) * (x - x_orig)^2)``
    (DiG-IN's ``px_background_l2``/``latent_background_l2``; the mask may be soft), in
    pixel space or in the latent space of a trajectory method (with the mask at latent
    resolution). Without a mask the whole image counts as background."""

    def __init__(self, space: str = "pixel"):
        self.space = _check_space(space)

    def loss(self, images, ctx):
        d, m = _space(images, ctx, self.space, "BackgroundL2")
        d2 = d.pow(2)
        if m is not None:
            d2 = d2 * (1 - m)
        return d2.flatten(1).mean(1)

    def describe(self):
        return f"BackgroundL2({self.space})"


def _class_score(logits: torch.Tensor, y: torch.Tensor, variant: str) -> torch.Tensor:
    """Per-view score of class y: ``confidence`` p(y), ``log_confidence`` log p(y), or
    ``logit_margin`` logit_y - max_{c != y} logit_c. ``logits``: (N, K, C)."""
    yk = y[:, None].expand(-1, logits.shape[1])
    if variant == "confidence":
        return logits.softmax(-1).gather(-1, yk[..., None]).squeeze(-1)
    if variant == "log_confidence":
        return logits.log_softmax(-1).gather(-1, yk[..., None]).squeeze(-1)
    if variant == "logit_margin":
        own = logits.gather(-1, yk[..., None]).squeeze(-1)
        other = logits.scatter(-1, yk[..., None], float("-inf")).amax(-1)
        return own - other
    raise ValueError(f"unknown score variant {variant!r}: confidence, log_confidence or logit_margin")


SCORE_VARIANTS = ("confidence", "log_confidence", "logit_margin")


class Disagreement(Objective):
    """Images of class y (``ctx.target``) that classifier 1 (the context's) scores high and
    ``second`` scores low: loss = -(s1(y) - s2(y)), averaged over views, with s a
    :data:`SCORE_VARIANTS` score (DiG-IN's systematic-error search)."""

    uses_classifier = True

    def __init__(self, second: torch.nn.Module, variant: str = "confidence"):
        if variant not in SCORE_VARIANTS:
            raise ValueError(f"variant must be one of {SCORE_VARIANTS}")
        self.second, self.variant = second, variant

    def loss(self, images, ctx):
        s1 = _class_score(ctx.classify(images), ctx.target, self.variant)
        s2 = _class_score(ctx.classify(images, self.second), ctx.target, self.variant)
        return -(s1 - s2).mean(1)

    def describe(self):
        return f"Disagreement({self.variant}, vs {getattr(self.second, 'name', type(self.second).__name__)})"


def find_layer(model: torch.nn.Module, layer: str | None) -> torch.nn.Module:
    """The named submodule, or (``None``) the last ``nn.Linear``: its input is the penultimate layer."""
    if layer:
        modules = dict(model.named_modules())
        if layer not in modules:
            raise ValueError(f"no layer {layer!r}; some layers: {list(modules)[-8:]}")
        return modules[layer]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear; name the layer explicitly")
    return linears[-1]


class NeuronActivation(Objective):
    """Maximise (``sign=+1``) or minimise (``-1``) unit ``unit`` of a layer's input
    (default: the input of the last linear layer, i.e. a penultimate unit), spatially
    averaged, over views; optionally with ``class_weight * -log p(y)``
    (DiG-IN's variant: ``-10 * act - 0.5 * log p(y)``: ``act_weight=10, class_weight=0.5``)."""

    uses_classifier = True
    thread_safe = False  # reads the unit through a forward hook on the shared classifier

    def __init__(
        self,
        classifier: torch.nn.Module,
        unit: int,
        layer: str | None = None,
        sign: float = 1.0,
        act_weight: float = 1.0,
        class_weight: float = 0.0,
    ):
        self.classifier, self.unit, self.layer, self.sign = classifier, int(unit), layer, float(sign)
        self.act_weight, self.class_weight = act_weight, class_weight
        self._module = find_layer(classifier, layer)

    def activation(self, images: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """(unit activation (N, K), logits (N, K, C)) over the context's views."""
        store = {}

        def hook(_m, inputs):
            store["x"] = inputs[0]

        handle = self._module.register_forward_pre_hook(hook)
        try:
            logits = ctx.classify(images, self.classifier)
        finally:
            handle.remove()
        a = store["x"][:, self.unit]
        if a.dim() > 1:
            a = a.flatten(1).mean(1)
        return a.reshape(logits.shape[0], logits.shape[1]), logits

    def loss(self, images, ctx):
        act, logits = self.activation(images, ctx)
        loss = -self.sign * self.act_weight * act.mean(1)
        if self.class_weight:
            loss = loss - self.class_weight * _class_score(logits, ctx.target, "log_confidence").mean(1)
        return loss

    def describe(self):
        what = "max" if self.sign > 0 else "min"
        base = f"{self.act_weight:g}*Neuron({what} unit {self.unit} of {self.layer or 'penultimate'})"
        return base + (f" + {self.class_weight:g}*ClassNLL" if self.class_weight else "")
