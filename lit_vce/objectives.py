"""Composable objective terms (lower is better), with an algebra of ``+``, ``-``, unary
``-``, scalar ``*`` and ``/`` and ``sum([...])``.

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
        return ObjectiveContext(tile(self.original), tile(self.source), tile(self.target), self.classifier, tile(self.mask),
                                views, tile(self.latents), tile(self.original_latents), tile(self.latent_mask))

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


class TargetCE(Objective):
    """-log p(target | x) under the context's classifier (the VCE validity term),
    averaged over the context's augmented views when it has them."""

    uses_classifier = True

    def loss(self, images, ctx):
        logits = ctx.classify(images)
        n, k, c = logits.shape
        return F.cross_entropy(logits.reshape(n * k, c), ctx.target.repeat_interleave(k), reduction="none").view(n, k).mean(1)


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

    def __init__(self, classifier: torch.nn.Module, unit: int, layer: str | None = None, sign: float = 1.0,
                 act_weight: float = 1.0, class_weight: float = 0.0):
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


class LPIPSDistance(Objective):
    """LPIPS-AlexNet distance to the original (differentiable). ``net`` defaults to the
    network of :func:`lit_vce.metrics.lpips.build_lpips` (local weights, see there)."""

    def __init__(self, net: torch.nn.Module | None = None):
        if net is None:
            from .metrics.lpips import build_lpips

            net = build_lpips().net
        self.net = net

    def loss(self, images, ctx):
        return self.net(images.float(), ctx.original.float(), normalize=True).reshape(len(images))


VGG19_FILE = "vgg19-dcbbe73f.pth"  # torchvision's ImageNet VGG-19 weights
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_vgg19_features(layers: int, weights_path: str | None = None) -> torch.nn.Module:
    """The first ``layers`` modules of torchvision's VGG-19 ``features`` with ImageNet weights
    from a local file: ``weights_path``, ``$LIT_VCE_VGG_WEIGHTS`` or
    ``$LIT_VCE_WEIGHTS_DIR/vgg/vgg19-dcbbe73f.pth`` (downloaded only when online)."""
    import os
    from pathlib import Path

    import torchvision

    from .errors import MissingWeightsError
    from .weights import may_download, weights_dir

    value = weights_path or os.environ.get("LIT_VCE_VGG_WEIGHTS")
    path = Path(value).expanduser() if value else weights_dir() / "vgg" / VGG19_FILE
    if path.is_file():
        features = torchvision.models.vgg19().features[:layers]
        state = torch.load(path, map_location="cpu", weights_only=True)
        # only the layers used (a file holding just those, or the whole network, both load)
        used = {k[len("features."):]: v for k, v in state.items()
                if k.startswith("features.") and int(k.split(".")[1]) < layers}
        features.load_state_dict(used)
    elif value or not may_download():
        raise MissingWeightsError(f"VGG-19 weights {path} do not exist: put torchvision's {VGG19_FILE} there "
                                  f"(or point $LIT_VCE_VGG_WEIGHTS to it)")
    else:
        features = torchvision.models.vgg19(weights="IMAGENET1K_V1").features[:layers]
    return features.eval().requires_grad_(False)


class VGGPerceptual(Objective):
    """DiME's perceptual distance: the mean squared difference of VGG-19 features (the first
    ``layer`` modules of ``features``, ImageNet-normalised inputs clamped to [0, 1]) between the
    image and the original, per sample. ``features``: a prebuilt module (tests)."""

    def __init__(self, layer: int = 18, weights_path: str | None = None, features: torch.nn.Module | None = None):
        self.layer = int(layer)
        self.features = features if features is not None else load_vgg19_features(self.layer, weights_path)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.new_tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(_IMAGENET_STD).view(1, 3, 1, 1)
        self.features.to(x.device)
        return self.features((x.clamp(0, 1) - mean) / std).flatten(1)

    def loss(self, images, ctx):
        return (self._embed(images) - self._embed(ctx.original)).pow(2).mean(1)

    def describe(self):
        return f"VGGPerceptual(layer {self.layer})"
