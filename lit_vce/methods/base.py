"""The method interface: ``method.generate(batch, classifier) -> CounterfactualResult``.

A method is any combination of sampler, guidance, objective and gradient
post-processing (per-step guidance, whole-trajectory optimisation, image-space
attack all fit). The LightningModule only builds a :class:`VCEBatch` and calls
``generate``; it has no method logic of its own.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from ..provenance import RecordsInitArgs


@dataclass
class VCEBatch:
    """One batch to explain.

    ``rngs`` hold one ``torch.Generator`` per sample, seeded by (seed,
    sample id): methods must draw all their randomness from them.
    """

    images: torch.Tensor  # (N, 3, H, W) in [0, 1]
    source: torch.Tensor  # (N,) long
    target: torch.Tensor  # (N,) long
    sample_ids: list[str]
    rngs: list[torch.Generator]
    mask: torch.Tensor | None = None  # (N, 1, H, W) foreground masks, when known
    captions: list[str] | None = None  # one caption per image, when known (text-conditioned methods)

    def __len__(self) -> int:
        return len(self.sample_ids)


@dataclass
class CounterfactualResult:
    """The output of a method.

    ``images`` are the counterfactuals in [0, 1]; ``diagnostics`` maps names to
    per-sample tensors (N,); ``failure`` holds ``None`` or a reason per sample (a
    failed sample still has an image, usually the original).
    """

    images: torch.Tensor
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)
    failure: list[str | None] = field(default_factory=list)

    def __post_init__(self):
        if not self.failure:
            self.failure = [None] * len(self.images)
        if len(self.failure) != len(self.images):
            raise ValueError("one failure entry per image is required")


class VCEMethod(nn.Module, RecordsInitArgs):
    """Base class of all VCE methods (register subclasses with ``@METHODS.register``).

    Constructor arguments are recorded automatically (:mod:`lit_vce.provenance`), so
    :meth:`describe` covers every setting without a hand-kept list."""

    name: str = "method"
    #: ``generate`` keeps no state between calls, draws its randomness only from the
    #: batch's generators and touches no shared module state (hooks, attention
    #: processors), so deterministic runs may explain several samples at once on worker
    #: threads (:func:`generate_one_by_one`). Opt-in: a new method is run sequentially
    #: until its author sets this (and the registry tests then check the bytes).
    supports_concurrency: bool = False

    @property
    def concurrent_samples(self) -> bool:
        """Whether samples may be generated concurrently: :attr:`supports_concurrency` and an
        objective (``self.objective``, when there is one) whose terms are all thread-safe."""
        return bool(self.supports_concurrency) and getattr(getattr(self, "objective", None), "thread_safe", True)

    def generate(self, batch: VCEBatch, classifier: nn.Module) -> CounterfactualResult:
        raise NotImplementedError

    def describe(self) -> dict:
        """Settings stored with every result and in the run's fingerprint: the name and
        every constructor argument (the diffusion model's own arguments nested, objectives
        by their description; see :meth:`~lit_vce.provenance.RecordsInitArgs.describe_init_args})."""
        return {"name": self.name, **self.describe_init_args()}

    @classmethod
    def test_kwargs(cls) -> dict:
        """Small constructor arguments for the registry-driven tests (``tests/test_methods.py``):
        they build every registered method on tiny models with these, adding the
        diffusion model (``diffusion``) and, for a ``robust_classifier``
        argument, a tiny classifier. Choose values that exercise the method's real
        branches in seconds."""
        return {}

    def setup(self, device: torch.device) -> None:
        """Called once before the first batch (e.g. to move auxiliary models)."""
        self.to(device)


def split_batch(batch: VCEBatch, size: int) -> list[VCEBatch]:
    """Consecutive sub-batches of at most ``size`` samples (rngs travel with their samples)."""
    n = len(batch)
    return [select_batch(batch, list(range(i, min(i + size, n)))) for i in range(0, n, size)]


def select_batch(batch: VCEBatch, idx: list[int]) -> VCEBatch:
    """The samples at positions ``idx`` (rngs travel with their samples), e.g. to retry some."""
    pick = torch.tensor(idx, dtype=torch.long, device=batch.images.device)
    return VCEBatch(batch.images[pick], batch.source[pick], batch.target[pick], [batch.sample_ids[i] for i in idx],
                    [batch.rngs[i] for i in idx], None if batch.mask is None else batch.mask[pick],
                    None if batch.captions is None else [batch.captions[i] for i in idx])


def concat_results(parts: list[CounterfactualResult]) -> CounterfactualResult:
    """The inverse of :func:`split_batch` for results."""
    keys = parts[0].diagnostics.keys()
    return CounterfactualResult(
        torch.cat([p.images for p in parts]),
        {key: torch.cat([p.diagnostics[key] for p in parts]) for key in keys},
        [f for p in parts for f in p.failure],
    )


def generate_one_by_one(method: VCEMethod, batch: VCEBatch, classifier: nn.Module, workers: int = 1) -> CounterfactualResult:
    """``method.generate`` one sample at a time (deterministic runs): with one intra-op CPU
    thread (the caller pins it) a sample's bytes do not depend on the batch it came in.

    With ``workers > 1``, on CPU, and for a method whose :attr:`~VCEMethod.concurrent_samples`
    holds, the samples run concurrently on that many threads. Each sample is still the
    same sequence of single-threaded kernels, so the bytes are those of one worker, and
    a process with several cores uses them all (on 2 cores, classifier guidance and
    DVCE on the world: 1.9x and 1.7x faster; ``benchmarks/deterministic_speed.py``).
    """
    parts = split_batch(batch, 1)
    if workers <= 1 or len(parts) == 1 or not method.concurrent_samples or batch.images.device.type != "cpu":
        return concat_results([method.generate(b, classifier) for b in parts])
    grad = torch.is_grad_enabled()  # grad mode is thread-local: workers take the caller's

    def one(b: VCEBatch) -> CounterfactualResult:
        with torch.set_grad_enabled(grad):
            return method.generate(b, classifier)

    with ThreadPoolExecutor(min(int(workers), len(parts)), thread_name_prefix="lit-vce-sample") as pool:
        return concat_results(list(pool.map(one, parts)))


def check_domain(method: VCEMethod, classifier: nn.Module, image_size: tuple[int, int]) -> None:
    """Refuse a method whose models do not fit the data: the embedded world's 32 px ddpm
    (every method's default diffusion model) on images of another resolution, a robust
    partner (DVCE) of another class space than the classifier's, and a world classifier
    as the partner of a classifier of other classes. Raises a one-line
    :class:`~lit_vce.errors.ConfigError` naming the config to use. (The world ddpm on
    other 32 px images, unconditionally, is allowed: small tests use it so.)"""
    from ..data.world import CLASS_NAMES
    from ..errors import ConfigError
    from ..world.models import WORLD_CLASSIFIERS

    h, w = (int(image_size[0]), int(image_size[1]))
    names = list(getattr(classifier, "class_names", []) or [])
    k = getattr(classifier, "num_classes", len(names))
    problems = []
    diffusion = getattr(method, "diffusion", None)
    if getattr(diffusion, "domain", None) == "world" and (h, w) != (32, 32):
        problems.append("its diffusion model is the embedded world's 32 px ddpm (4 shapes)")
    robust = getattr(method, "robust", None)
    if robust is not None:
        k2 = getattr(robust, "num_classes", None)
        if k2 is not None and k is not None and k2 != k:
            problems.append(f"its robust partner {getattr(robust, 'name', '?')} has {k2} classes")
        elif getattr(robust, "name", None) in WORLD_CLASSIFIERS and names != list(CLASS_NAMES):
            problems.append(f"its robust partner is the world's {robust.name!r} classifier")
    if problems:
        from ..config_files import config_root

        name = getattr(method, "name", "method")
        shipped = (config_root() / "imagenet" / "methods" / f"{name}.yaml").is_file()
        fix = (f"--config imagenet/methods/{name} for ImageNet" if shipped else "a model of this domain") + \
            " (or set --model.method.init_args.diffusion / robust_classifier)"
        raise ConfigError(f"{name}: {' and '.join(problems)}, but the data are {h}x{w} images for "
                          f"{getattr(classifier, 'name', 'the classifier')} ({k} classes): use {fix}")
