"""The method contract as one check a plug-in author runs on their own class:

    from lit_vce.testing import check_method

    check_method(MyMethod)          # raises AssertionError listing every broken rule

It builds the method from its ``test_kwargs()`` on tiny random models (a 16 px
class-conditional pixel diffusion model, a 4-class CNN) and checks what the harness
relies on: the contract of :class:`~lit_vce.methods.base.VCEMethod` (one
``counterfactuals`` step, ``generate`` left as the template), images in [0, 1] of the
input's shape, per-sample diagnostics, ``target_confidence``, settings that serialise,
the same bytes for the same seeds, outputs independent of batch composition and of
``inner_batch_size``, the resolution rule, and, for a method that claims
``supports_concurrency``, the same bytes on worker threads. The registry tests run it on
every built-in method and on the example of docs/adding-a-method.md.
"""

from __future__ import annotations

import inspect
import json

import torch

#: how far an output may move with batch composition (float rounding of batched kernels)
BATCH_TOLERANCE = 1 / 255


def tiny_unet(sample_size: int = 16, num_class_embeds: int | None = None):
    """A random two-level diffusers ``UNet2DModel`` (8/16 channels) of RGB images of
    ``sample_size`` px; class-conditional with ``num_class_embeds`` (the caller seeds)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=num_class_embeds,
    )


def tiny_pixel_diffusion(sampler: str = "ddim", steps: int = 10, seed: int = 0):
    """A random 16x16 class-conditional pixel diffusion model (4 classes + a null class 4)."""
    from ..diffusion import PixelDiffusion
    from ..world.models import SCHEDULER_CONFIG

    torch.manual_seed(seed)
    unet = tiny_unet(16, num_class_embeds=5)
    return PixelDiffusion(unet=unet, scheduler_config=SCHEDULER_CONFIG, sampler=sampler, num_steps=steps, null_class=4)


def tiny_classifier(seed: int = 1):
    """A random SmallCNN as a 4-class classifier (classes ``a``-``d``) of 16x16 images."""
    from ..classifiers import ImageClassifier
    from ..world.models import SmallCNN

    torch.manual_seed(seed)
    return ImageClassifier(SmallCNN(width=8), 16, ["a", "b", "c", "d"], name="tiny")


def tiny_batch(n: int = 4, size: int = 16, seed: int = 2, masks: bool = False):
    """``n`` random images with sources 0, 1, 2, ... and targets source + 1 (mod 4), ids
    ``s0``, ``s1``, ...; ``masks``: a centred square foreground mask per image."""
    from ..methods import VCEBatch
    from ..rngs import sample_rngs

    torch.manual_seed(seed)
    ids = [f"s{i}" for i in range(n)]
    src = torch.arange(n) % 4
    mask = None
    if masks:
        mask = torch.zeros(n, 1, size, size)
        mask[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    return VCEBatch(torch.rand(n, 3, size, size), src, (src + 1) % 4, ids, sample_rngs(0, ids), mask)


def build_for_test(cls, diffusion_factory=tiny_pixel_diffusion, classifier=None, stochastic: bool = False):
    """``cls`` built from its ``test_kwargs()``, adding the tiny diffusion model (for a
    ``diffusion`` argument: the sampler of its ``sampler`` argument or of
    ``cls.diffusion_sampler``; ancestral ``ddpm`` instead of ``ddim`` with ``stochastic``)
    and, for a ``robust_classifier`` argument, ``classifier``."""
    params = inspect.signature(cls.__init__).parameters
    kwargs = dict(cls.test_kwargs())
    if "diffusion" in params:  # image-space methods (SVCE) take none
        default = params["sampler"].default if "sampler" in params else getattr(cls, "diffusion_sampler", "ddim")
        sampler = kwargs.pop("sampler", default)
        if stochastic and sampler == "ddim" and "sampler" in params:
            sampler = "ddpm"  # ancestral noise: what batch independence is about
        steps = kwargs.pop("num_steps", 10) if "sampler" in params else kwargs.get("num_steps", 10)
        kwargs["diffusion"] = diffusion_factory(sampler, steps)  # methods without a sampler argument: their own
    if "robust_classifier" in params:
        kwargs["robust_classifier"] = classifier if classifier is not None else tiny_classifier()
    return cls(**kwargs)


class _Problems:
    def __init__(self, name: str):
        self.name, self.items, self.passed = name, [], []

    def check(self, ok: bool, rule: str, detail: str = "") -> bool:
        (self.passed if ok else self.items).append(rule + (f" ({detail})" if detail and not ok else ""))
        return ok


def _fresh(batch):
    """The batch with new generators from the same seeds (a method consumes them)."""
    import dataclasses

    from ..rngs import sample_rngs

    return dataclasses.replace(batch, rngs=sample_rngs(0, batch.sample_ids))


def check_method(method_cls, classifier=None, diffusion_factory=tiny_pixel_diffusion) -> list[str]:
    """Check ``method_cls`` (a :class:`~lit_vce.methods.base.VCEMethod` subclass) against the
    method contract on tiny models; returns the rules that hold, raises ``AssertionError``
    naming every one that does not. ``classifier`` / ``diffusion_factory``: other tiny models
    (``diffusion_factory(sampler, num_steps)``, e.g. a tiny latent model for a text-conditioned method)."""
    from ..methods.base import VCEMethod
    from ..registry import METHODS

    if not (isinstance(method_cls, type) and issubclass(method_cls, VCEMethod)):
        raise TypeError(f"check_method takes a VCEMethod subclass, got {method_cls!r}")
    p = _Problems(method_cls.__name__)
    p.check(
        method_cls.counterfactuals is not VCEMethod.counterfactuals, "implements counterfactuals(batch, classifier)"
    )
    p.check(
        bool(inspect.getdoc(method_cls)) and inspect.getdoc(method_cls) != inspect.getdoc(VCEMethod),
        "has a docstring of its own (lit-vce methods prints its first line)",
    )
    registered = [n for n in METHODS.names() if METHODS.get(n) is method_cls]
    p.check(
        all(method_cls.name == n for n in registered),
        "its name is the registered one",
        f"{method_cls.name!r} vs {registered}",
    )
    p.check(isinstance(method_cls.test_kwargs(), dict), "test_kwargs() returns a dict")
    clf = classifier if classifier is not None else tiny_classifier()
    method = build_for_test(method_cls, diffusion_factory, clf)
    batch = tiny_batch()

    with torch.enable_grad():
        out = method.generate(batch, clf)
    images = out.images
    _check_output(p, out, batch, clf)
    try:
        described = method.describe()
        json.dumps(described)
        p.check(described.get("name") == method.name, "describe() names the method")
    except (TypeError, ValueError) as e:
        p.check(False, "describe() is a JSON-serialisable dict", str(e))

    with torch.enable_grad():
        again = method.generate(_fresh(batch), clf)
    p.check(torch.equal(again.images, images), "the same seeds give the same bytes")

    _check_batches(p, method_cls, diffusion_factory, clf, batch)
    _check_resolution(p, method, clf)
    if method.supports_concurrency and method.concurrent_samples:
        _check_concurrency(p, method, clf, batch)
    if p.items:
        raise AssertionError(f"{p.name} breaks the method contract:\n  - " + "\n  - ".join(p.items))
    return p.passed


def _check_output(p: _Problems, out, batch, clf) -> None:
    """Shapes, range, failures, diagnostics and ``target_confidence`` of one ``generate`` call."""
    images, n = out.images, len(batch)
    if p.check(
        tuple(images.shape) == tuple(batch.images.shape),
        "returns one image per sample of the input's shape",
        f"{tuple(images.shape)}",
    ):
        p.check(
            bool(torch.isfinite(images).all()) and float(images.min()) >= 0 and float(images.max()) <= 1,
            "images are finite and in [0, 1]",
        )
        p.check(not torch.allclose(images, batch.images), "changes the images")
    p.check(out.failure == [None] * n, "no failure on the tiny batch", str(out.failure))
    diag = out.diagnostics
    p.check(
        all(isinstance(v, torch.Tensor) and tuple(v.shape) == (n,) for v in diag.values()),
        "diagnostics are per-sample tensors of shape (N,)",
        str({k: tuple(getattr(v, "shape", ())) for k, v in diag.items()}),
    )
    if p.check(list(diag)[:1] == ["target_confidence"], "target_confidence comes first (the harness's)"):
        with torch.no_grad():
            expected = clf(images).softmax(1).gather(1, batch.target[:, None]).squeeze(1)
        p.check(
            torch.allclose(diag["target_confidence"], expected, atol=1e-6),
            "target_confidence is the classifier's on the output",
        )


def _check_concurrency(p: _Problems, method, clf, batch) -> None:
    """For a method that claims ``supports_concurrency``: worker threads give the sequential bytes."""
    from ..methods.base import generate_one_by_one

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            one = generate_one_by_one(method, _fresh(batch), clf, workers=1)
            four = generate_one_by_one(method, _fresh(batch), clf, workers=4)
    finally:
        torch.set_num_threads(threads)
    same = (
        torch.equal(one.images, four.images)
        and one.failure == four.failure
        and all(torch.equal(v, four.diagnostics[k]) for k, v in one.diagnostics.items())
    )
    p.check(same, "supports_concurrency: worker threads give the sequential bytes")


def _check_batches(p: _Problems, method_cls, diffusion_factory, clf, batch) -> None:
    """Outputs independent of batch composition and of ``inner_batch_size`` (ancestral sampler)."""
    from ..methods import VCEBatch
    from ..rngs import sample_rngs

    method = build_for_test(method_cls, diffusion_factory, clf, stochastic=True)
    with torch.enable_grad():
        full = method.generate(_fresh(batch), clf).images
        b = batch
        part = VCEBatch(b.images[2:], b.source[2:], b.target[2:], b.sample_ids[2:], sample_rngs(0, b.sample_ids[2:]))
        half = method.generate(part, clf).images
        gap = float((full[2:] - half).abs().max())
        p.check(
            gap <= BATCH_TOLERANCE, "a sample's output does not depend on the batch it came in", f"max gap {gap:.4f}"
        )
        method.inner_batch_size = 1
        chunked = method.generate(_fresh(batch), clf).images
        gap = float((full - chunked).abs().max())
        p.check(gap <= BATCH_TOLERANCE, "inner_batch_size does not change outputs", f"max gap {gap:.4f}")


def _check_resolution(p: _Problems, method, clf) -> None:
    """Images of another resolution: resized and back (``"model"``), refused (``"exact"``) or
    handled by the method (``"input"``); the output has the input's shape."""
    size = method.model_resolution()
    if size is None:
        return
    other = tiny_batch(2, size + 8)
    if method.resolution == "exact":
        try:
            with torch.enable_grad():
                method.generate(other, clf)
            p.check(False, "resolution 'exact' refuses another resolution", "it ran")
        except ValueError:
            p.check(True, "resolution 'exact' refuses another resolution")
        return
    with torch.enable_grad():
        out = method.generate(other, clf)
    p.check(
        tuple(out.images.shape) == tuple(other.images.shape),
        f"{size + 8} px input gives {size + 8} px output",
        f"{tuple(out.images.shape)}",
    )
