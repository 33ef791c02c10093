"""The method interface: a method implements ``counterfactuals(batch, classifier)``;
callers run ``method.generate(batch, classifier) -> CounterfactualResult``, the template
that adds the harness's duties (:class:`VCEMethod`).

A method is any combination of sampler, guidance, objective and gradient
post-processing (per-step guidance, whole-trajectory optimisation, image-space
attack all fit). The LightningModule only builds a :class:`VCEBatch` and calls
``generate``; it has no method logic of its own.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
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
    region: torch.Tensor | None = None  # (N, 1, H, W): 1 where the edit may go (lit_vce.regions), when given

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
    """Base class of all VCE methods (register subclasses with ``@METHODS.register(name)``,
    which sets :attr:`name`).

    **The contract.** A method implements one step,
    :meth:`counterfactuals` ``(batch, classifier) -> CounterfactualResult``: the images it
    makes for the batch it is given and its own per-sample diagnostics (and, where it
    knows why a sample failed, the reason). :meth:`generate` is the harness's template
    around it and is not overridden; it does, once for every method:

    1. chunking: :attr:`inner_batch_size` samples per call (memory; outputs unchanged);
    2. resolution: by :attr:`resolution` (``"model"``: the batch, foreground masks
       included, is resized to the diffusion model's resolution and the images are resized
       back; ``"exact"``: a batch at another resolution is refused; ``"input"``: the method
       gets the batch as given);
    3. retries: each of :meth:`attempts` in turn on the samples not flipped yet (DiME's
       larger guidance scales); a sample keeps the first attempt that flips it, or the last;
    4. failures: a sample whose image is not finite fails with ``"non-finite output"``, and
       every failed sample returns its original image;
    5. ``target_confidence`` (the classifier's target probability on the returned image),
       first among the diagnostics.

    What the step must do: return ``len(batch)`` images in [0, 1] of the batch's shape,
    per-sample diagnostic tensors of shape ``(N,)`` and one failure entry per sample; draw
    every random number from ``batch.rngs`` (one generator per sample). Constructor
    arguments are recorded automatically (:mod:`lit_vce.provenance`), so :meth:`describe`
    covers every setting without a hand-kept list. :func:`lit_vce.testing.check_method`
    checks a method class against all of this on tiny models."""

    name: str = "method"
    #: ``"model"``, ``"exact"`` or ``"input"``: what :meth:`generate` does with a batch whose
    #: resolution is not the diffusion model's (see the class docstring).
    resolution: str = "model"
    #: samples per :meth:`counterfactuals` call (``None``: the whole batch).
    inner_batch_size: int | None = None
    #: settings of earlier releases now fixed at one value (name -> that value): a run recorded
    #: with it resumes under the current code (:func:`~lit_vce.lightning.resume.canonical_fingerprint`)
    retired_settings: dict = {}
    #: deprecated flat setting names -> ``group.field`` of a nested settings group (a config or
    #: command line that uses one is rewritten, with a note; :mod:`lit_vce.lightning.cli`)
    setting_aliases: dict = {}
    #: how the method keeps to a region (:mod:`lit_vce.regions`) when the batch carries one:
    #: ``"compose"`` (per step with the noised original outside it, and the result with the
    #: original: nothing outside changes), ``"native"`` (the method edits only the region by
    #: construction; the result is composed too), ``"project"`` (the perturbation is projected
    #: onto it), ``"penalty"`` (soft terms; change outside is possible and reported) or
    #: ``None`` (regions refused).
    region_mode: str | None = None
    #: ``counterfactuals`` keeps no state between calls, draws its randomness only from the
    #: batch's generators and touches no shared module state (hooks, attention
    #: processors), so deterministic runs may explain several samples at once on worker
    #: threads (:func:`generate_one_by_one`). Opt-in: a new method is run sequentially
    #: until its author sets this (and :func:`~lit_vce.testing.check_method` then checks the bytes).
    supports_concurrency: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "generate" in cls.__dict__:
            raise TypeError(
                f"{cls.__name__} overrides generate(), the harness's template: implement "
                "counterfactuals(batch, classifier) instead (see lit_vce.methods.base.VCEMethod)"
            )
        if cls.resolution not in ("model", "exact", "input"):
            raise TypeError(f"{cls.__name__}.resolution must be 'model', 'exact' or 'input', got {cls.resolution!r}")
        if cls.region_mode not in (None, "compose", "native", "project", "penalty"):
            raise TypeError(f"{cls.__name__}.region_mode must be None, 'compose', 'native', 'project' or 'penalty'")

    @property
    def concurrent_samples(self) -> bool:
        """Whether samples may be generated concurrently: :attr:`supports_concurrency` and an
        objective (``self.objective``, when there is one) whose terms are all thread-safe."""
        return bool(self.supports_concurrency) and getattr(getattr(self, "objective", None), "thread_safe", True)

    def counterfactuals(self, batch: VCEBatch, classifier: nn.Module) -> CounterfactualResult:
        """The method's own step: counterfactuals of ``batch`` (at the resolution
        :attr:`resolution` says) with the method's diagnostics; see the class docstring."""
        raise NotImplementedError(f"{type(self).__name__} must implement counterfactuals(batch, classifier)")

    def attempts(self) -> list[tuple[dict[str, float], VCEMethod]]:
        """The settings :meth:`generate` tries in turn on the samples not flipped yet, each as
        (diagnostics recorded for the samples it produced, the method to run); default: one
        attempt, this method."""
        return [({}, self)]

    def model_resolution(self) -> int | None:
        """The side of the images :meth:`counterfactuals` works at: the diffusion model's
        (``self.diffusion.image_size``), or ``None`` for a method without one."""
        diffusion = getattr(self, "diffusion", None)
        return None if diffusion is None else int(diffusion.image_size)

    def generate(self, batch: VCEBatch, classifier: nn.Module) -> CounterfactualResult:
        """Counterfactuals of ``batch`` for ``classifier``, with the harness's duties done
        (chunking, resolution, retries, failures, ``target_confidence``): the template
        around :meth:`counterfactuals`, the one way every caller runs a method."""
        if batch.region is not None and self.region_mode is None:
            raise ValueError(
                f"{self.name} cannot keep its edit to a region: run it without --data.regions "
                "(methods with regions: the per-step diffusion methods, RCSB, SVCE, ACE, DiG-IN)"
            )
        k = self.inner_batch_size
        parts = split_batch(batch, k) if k and k < len(batch) else [batch]
        return concat_results([self._generate_part(b, classifier) for b in parts])

    def _generate_part(self, batch: VCEBatch, classifier: nn.Module) -> CounterfactualResult:
        tries = self.attempts()
        out: list[CounterfactualResult | None] = [None] * len(batch)
        todo = list(range(len(batch)))
        from ..progress import steps as bar

        tries = list(enumerate(tries))
        for j, (labels, method) in (
            bar(tries, f"{self.name} attempts", len(batch), unit="try") if len(tries) > 1 else tries
        ):
            sub = batch if len(todo) == len(batch) else select_batch(batch, todo)
            part = method._at_input_resolution(sub, classifier)
            for k, i in enumerate(todo):
                out[i] = CounterfactualResult(
                    part.images[k : k + 1],
                    {
                        **{key: v[k : k + 1] for key, v in part.diagnostics.items()},
                        **{key: torch.tensor([float(v)]) for key, v in labels.items()},
                    },
                    [part.failure[k]],
                )
            if j + 1 == len(tries):
                break
            with torch.no_grad():
                flipped = classifier(part.images).argmax(1).cpu() == sub.target.cpu()
            todo = [i for k, i in enumerate(todo) if not flipped[k] or part.failure[k]]  # a failure is retried
            if not todo:
                break
        result = concat_results(out)
        with torch.no_grad():
            probs = classifier(result.images).softmax(1)
        confidence = probs.gather(1, batch.target[:, None].to(probs.device)).squeeze(1)
        result.diagnostics = {"target_confidence": confidence, **result.diagnostics}
        if batch.region is not None:  # recorded per sample: the region's area and the change outside it
            from ..regions import change_outside, region_area

            region = batch.region.to(result.images)
            result.diagnostics["region_area"] = region_area(region).cpu()
            result.diagnostics["region_change_outside"] = change_outside(batch.images, result.images, region).cpu()
        return result

    def _at_input_resolution(self, batch: VCEBatch, classifier: nn.Module) -> CounterfactualResult:
        """:meth:`counterfactuals` at the model's resolution, checked, back at the batch's,
        non-finite images failed and every failed sample's image the original."""
        size_in, original, region = tuple(batch.images.shape[-2:]), batch.images, batch.region
        size = self.model_resolution() if self.resolution != "input" else None
        if size is not None and size_in != (size, size):
            if self.resolution == "exact":
                raise ValueError(
                    f"{self.name} works at its diffusion model's resolution ({size} px), got "
                    f"{size_in[0]}x{size_in[1]} images: set the data's image size to {size}"
                )
            batch = at_resolution(batch, size)
        result = self.counterfactuals(batch, classifier)
        check_result(self, batch, result)
        images = result.images
        if tuple(images.shape[-2:]) != size_in:
            images = F.interpolate(images, size=size_in, mode="bilinear", antialias=True, align_corners=False).clamp(
                0, 1
            )
        if region is not None and self.region_mode in ("compose", "native"):  # nothing outside changes
            from ..regions import compose

            images = compose(images, original.to(images.dtype), region.to(images.dtype))
        finite = torch.isfinite(images).flatten(1).all(1)
        failure = [f if f else (None if bool(ok) else "non-finite output") for f, ok in zip(result.failure, finite)]
        failed = torch.tensor([f is not None for f in failure], device=images.device)
        images = torch.where(failed.view(-1, 1, 1, 1), original.to(images.dtype), images)
        return CounterfactualResult(images.detach(), dict(result.diagnostics), failure)

    def describe(self) -> dict:
        """Settings stored with every result and in the run's fingerprint: the name and
        every constructor argument (the diffusion model's own arguments nested, objectives
        by their description; see :meth:`~lit_vce.provenance.RecordsInitArgs.describe_init_args})."""
        return {"name": self.name, **self.describe_init_args()}

    @classmethod
    def test_kwargs(cls) -> dict:
        """Small constructor arguments for :func:`lit_vce.testing.check_method` (which the
        registry tests run on every registered method): it builds the method on tiny
        models with these, adding the diffusion model (``diffusion``: a 16 px pixel model
        with the sampler of the ``sampler`` argument, or of :attr:`diffusion_sampler`, and
        ``num_steps`` taken from here, default 10) and, for a ``robust_classifier`` argument,
        a tiny classifier. Choose values that exercise the method's real branches in seconds."""
        return {}

    def setup(self, device: torch.device) -> None:
        """Called once before the first batch (e.g. to move auxiliary models)."""
        self.to(device)


def at_resolution(batch: VCEBatch, size: int) -> VCEBatch:
    """``batch`` with its images (and foreground masks and regions, nearest) resized to ``size`` px."""
    from ..imageops import resize_to

    images = resize_to(batch.images, size)

    def nearest(m):
        return None if m is None else F.interpolate(m.float(), size=images.shape[-2:], mode="nearest")

    return dataclasses.replace(batch, images=images, mask=nearest(batch.mask), region=nearest(batch.region))


def check_result(method: VCEMethod, batch: VCEBatch, result: CounterfactualResult) -> None:
    """Refuse a step output that breaks the contract, naming the method and what is wrong."""
    n, problems = len(batch), []
    if not isinstance(result, CounterfactualResult):
        raise TypeError(
            f"{method.name}: counterfactuals() must return a CounterfactualResult, got {type(result).__name__}"
        )
    if tuple(result.images.shape) != tuple(batch.images.shape):
        problems.append(f"images of shape {tuple(result.images.shape)} for a batch of {tuple(batch.images.shape)}")
    for key, value in result.diagnostics.items():
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (n,):
            problems.append(f"diagnostic {key!r} is not a tensor of shape ({n},)")
    if "target_confidence" in result.diagnostics:
        problems.append("diagnostic 'target_confidence' is the harness's (generate computes it)")
    if problems:
        raise ValueError(f"{method.name}: counterfactuals() broke the method contract: {'; '.join(problems)}")


def split_batch(batch: VCEBatch, size: int) -> list[VCEBatch]:
    """Consecutive sub-batches of at most ``size`` samples (rngs travel with their samples)."""
    n = len(batch)
    return [select_batch(batch, list(range(i, min(i + size, n)))) for i in range(0, n, size)]


def select_batch(batch: VCEBatch, idx: list[int]) -> VCEBatch:
    """The samples at positions ``idx`` (rngs travel with their samples), e.g. to retry some."""
    pick = torch.tensor(idx, dtype=torch.long, device=batch.images.device)
    return VCEBatch(
        batch.images[pick],
        batch.source[pick],
        batch.target[pick],
        [batch.sample_ids[i] for i in idx],
        [batch.rngs[i] for i in idx],
        None if batch.mask is None else batch.mask[pick],
        None if batch.captions is None else [batch.captions[i] for i in idx],
        None if batch.region is None else batch.region[pick],
    )


def concat_results(parts: list[CounterfactualResult]) -> CounterfactualResult:
    """The inverse of :func:`split_batch` for results."""
    keys = parts[0].diagnostics.keys()
    return CounterfactualResult(
        torch.cat([p.images for p in parts]),
        {key: torch.cat([p.diagnostics[key] for p in parts]) for key in keys},
        [f for p in parts for f in p.failure],
    )


def generate_one_by_one(
    method: VCEMethod, batch: VCEBatch, classifier: nn.Module, workers: int = 1
) -> CounterfactualResult:
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
    diffusion = getattr(method, "diffusion", None) or getattr(method, "bridge", None)
    if getattr(diffusion, "domain", None) == "world" and (h, w) != (32, 32):
        what = (
            "bridge is the embedded world's 32 px bridge"
            if hasattr(method, "bridge")
            else "diffusion model is the embedded world's 32 px ddpm"
        )
        problems.append(f"its {what} (4 shapes)")
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
        fix = (
            f"--config imagenet/methods/{name} for ImageNet" if shipped else "a model of this domain"
        ) + " (or set --model.method.init_args.diffusion / robust_classifier)"
        raise ConfigError(
            f"{name}: {' and '.join(problems)}, but the data are {h}x{w} images for "
            f"{getattr(classifier, 'name', 'the classifier')} ({k} classes): use {fix}"
        )
