"""DiG-IN's settings, grouped: what is inverted, what is searched, the masks, the
optimisation, the loss weights and the memory knobs. Each group is a dataclass that
LightningCLI and YAML fill as a nested block (``--model.method.init_args.optimisation.lr
0.05``; in YAML ``optimisation: {lr: 0.05}``).

The flat names of earlier releases (``outer_steps=...``, ``inversion="ddim"``) stay
accepted for one release, in Python, on the command line and in YAML files, with a
deprecation warning (:data:`FLAT_NAMES` maps each to its group and field); results record
the settings under the flat names, so the results and resume fingerprints of earlier runs
stay comparable.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

from ...diffusion.masks import OFFICIAL_POSTPROCESSING


@dataclass
class InversionSettings:
    """How a real image becomes the start of the trajectory.

    Args:
        method: ``"null_text"`` (published: DDIM inversion, then per-step unconditional
            embeddings optimised so the trajectory reconstructs the image), ``"ddim"`` (plain
            DDIM inversion) or ``"none"`` (a random z_T: generation, not an edit).
        null_text_steps: inner Adam steps per sampling step (published: 10).
        null_text_lr: their learning rate.
        num_starts: with ``method="none"``, this many random z_T per sample; the one with
            the lowest un-augmented loss is optimised (1: the published single start).
        cache: a folder where each image's inversion is stored and reused, keyed by the
            image, its source conditioning, the model and these settings: an image explained
            into several targets is inverted once (``None``: off).
    """

    method: str = "null_text"
    null_text_steps: int = 10
    null_text_lr: float = 0.01
    num_starts: int = 1
    cache: str | None = None


@dataclass
class SearchSettings:
    """The settings tried once before optimising; each sample keeps the one with the lowest
    un-augmented loss.

    Args:
        blend_fractions: fractions of the first steps whose input takes the reconstruction's
            background outside the foreground mask (published: 0 and 0.3).
        injection_fractions: fractions of the first steps that keep the original's layout
            (published: 0.3, 0.4, 0.5).
        injection: what those steps keep: ``"attention"`` (the original's cross-attention
            maps, prompt-to-prompt; text-conditioned models), ``"conditioning"`` (the source
            conditioning itself) or ``"auto"`` (attention where the model has cross-attention).
    """

    blend_fractions: tuple[float, ...] = (0.0, 0.3)
    injection_fractions: tuple[float, ...] = (0.3, 0.4, 0.5)
    injection: str = "auto"


@dataclass
class MaskSettings:
    """The foreground masks of background blending and of the background loss terms.

    Args:
        source: ``"batch"`` (given with the data), ``"attention"`` (the source class word's
            cross-attention maps, as the official code), ``"none"`` or ``"auto"`` (the batch's
            masks, else attention maps where the model has them).
        threshold: the cut-off of the squashed attention map.
        postprocessing: erosion, dilation, blur kernel and blur sigma at 512 px (scaled with
            the resolution); ``None``: none.
        sam_model: refine attention masks with Segment Anything: a SAM-HQ ``.pth`` checkpoint
            (``pip install 'lit_vce[samhq]'``), or a transformers ``SamModel`` / ``SamHQModel``
            folder or hub id; ``None``: off.
        sam_points, sam_threshold: points drawn where the soft mask exceeds the threshold.
        paste_outside: also put the original's clean latent outside the mask into the
            x0-predictions that are scored and returned (not part of the published method;
            the analyses use it to keep a frozen object exactly).
    """

    source: str = "auto"
    threshold: float = 0.3
    postprocessing: tuple[float, ...] | None = OFFICIAL_POSTPROCESSING
    sam_model: str | None = None
    sam_points: int = 5
    sam_threshold: float = 0.35
    paste_outside: bool = False


@dataclass
class OptimisationSettings:
    """Adam on the initial latent and the per-step embedding deltas.

    Args:
        outer_steps: Adam iterations (published: 20); 0 = inversion and edit only.
        lr: learning rate of the embedding deltas; z_T uses ``lr * latent_lr_factor``.
        latent_lr_factor: see ``lr``.
        loss_steps: the last k x0-predictions enter the loss with weights 1..k (3).
        num_cutouts: classifier views per image (published: 16).
        cutouts: ``"published"`` (side ``U^cutout_power`` between the classifier's input size
            and the image size, pooled to the classifier's size, no full view) or
            ``"scaled"`` (side in [``cutout_min_scale``, 1], resized back, view 0 the whole image).
        cutout_power, cutout_min_scale: see ``cutouts``.
        noise_sd: Gaussian noise added to each view (published: 0.005).
    """

    outer_steps: int = 20
    lr: float = 0.01
    latent_lr_factor: float = 0.1
    loss_steps: int = 3
    num_cutouts: int = 16
    cutouts: str = "published"
    cutout_power: float = 0.3
    cutout_min_scale: float = 0.7
    noise_sd: float = 0.005


@dataclass
class LossSettings:
    """The weights of the default objective ``w_c * TargetCE + 25 * BackgroundL2(latent) +
    250 * BackgroundL2(pixel) (+ L1, L2, LPIPS)``; without masks the background terms cover
    the whole image; LPIPS needs its AlexNet weights. A custom ``objective`` replaces them."""

    classifier_weight: float = 1.0
    background_latent_weight: float = 25.0
    background_pixel_weight: float = 250.0
    l1_weight: float = 0.0
    l2_weight: float = 0.0
    lpips_weight: float = 0.0


@dataclass
class MemorySettings:
    """Memory and precision; none changes the method (checkpointing recomputes).

    Args:
        gradient_checkpointing: ``True``: checkpoint every UNet, decoder and classifier call
            of the optimised trajectory; ``False``: none; ``"auto"``: only as many as
            ``budget_gb`` needs (the activations of one UNet call and of one loss evaluation
            are measured once per batch shape; the loss, then the first UNet calls, are
            checkpointed until the rest fits).
        budget_gb: the activation memory ``"auto"`` may use (default: 90 % of the free GPU
            memory, or half the available RAM on a CPU).
        autocast: ``None`` or ``"bfloat16"`` / ``"float16"`` (mixed precision).
        inner_batch_size: samples per call (memory; outputs do not change).
    """

    gradient_checkpointing: bool | str = "auto"
    budget_gb: float | None = None
    autocast: str | None = None
    inner_batch_size: int | None = None


#: the groups of :class:`~lit_vce.methods.digin.DiGIN`'s constructor, by argument name
GROUPS = {
    "inversion": InversionSettings,
    "search": SearchSettings,
    "masks": MaskSettings,
    "optimisation": OptimisationSettings,
    "loss": LossSettings,
    "memory": MemorySettings,
}

#: each flat name of earlier releases -> (group, field); results record settings under these names
FLAT_NAMES: dict[str, tuple[str, str]] = {
    "inversion": ("inversion", "method"),
    "null_text_steps": ("inversion", "null_text_steps"),
    "null_text_lr": ("inversion", "null_text_lr"),
    "num_starts": ("inversion", "num_starts"),
    "inversion_cache": ("inversion", "cache"),
    "blend_fractions": ("search", "blend_fractions"),
    "injection_fractions": ("search", "injection_fractions"),
    "injection": ("search", "injection"),
    "mask_source": ("masks", "source"),
    "mask_threshold": ("masks", "threshold"),
    "mask_postprocessing": ("masks", "postprocessing"),
    "sam_model": ("masks", "sam_model"),
    "sam_points": ("masks", "sam_points"),
    "sam_threshold": ("masks", "sam_threshold"),
    "paste_outside_mask": ("masks", "paste_outside"),
    **{
        name: ("optimisation", name)
        for name in (
            "outer_steps",
            "lr",
            "latent_lr_factor",
            "loss_steps",
            "num_cutouts",
            "cutouts",
            "cutout_power",
            "cutout_min_scale",
            "noise_sd",
        )
    },
    **{f.name: ("loss", f.name) for f in dataclasses.fields(LossSettings)},
    "gradient_checkpointing": ("memory", "gradient_checkpointing"),
    "memory_budget_gb": ("memory", "budget_gb"),
    "autocast": ("memory", "autocast"),
    "inner_batch_size": ("memory", "inner_batch_size"),
}

#: names of earlier releases whose only behaviour is now the default: accepted at that value
RETIRED = {"speedups": True}

_CHOICES = {
    ("inversion", "method"): ("null_text", "ddim", "none"),
    ("memory", "autocast"): (None, "bfloat16", "float16"),
    ("search", "injection"): ("auto", "attention", "conditioning"),
    ("masks", "source"): ("auto", "batch", "attention", "none"),
    ("optimisation", "cutouts"): ("published", "scaled"),
    ("memory", "gradient_checkpointing"): (True, False, "auto"),
}


def resolve(groups: dict[str, Any], flat: dict[str, Any]) -> dict[str, Any]:
    """The six groups as dataclasses: each given one (a dataclass, a mapping of its fields, or
    ``None`` for the defaults), updated by the flat names in ``flat`` (with a deprecation
    warning), checked. Raises ``TypeError`` for an unknown name, ``ValueError`` for a bad value."""
    out = {}
    for name, cls in GROUPS.items():
        value = groups.get(name)
        if value is None:
            value = cls()
        elif isinstance(value, dict):
            value = cls(**value)
        elif not isinstance(value, cls):
            raise TypeError(f"{name} must be a {cls.__name__} (or a mapping of its fields), got {type(value).__name__}")
        out[name] = dataclasses.replace(value)  # a copy: the caller's object is never changed
    for key, value in flat.items():
        if key in RETIRED:
            if value != RETIRED[key]:
                raise ValueError(
                    f"{key}={value!r} was retired: only {key}={RETIRED[key]!r} remains (the same method, "
                    "checked against the earlier code's outputs by the tests)"
                )
            continue
        if key not in FLAT_NAMES:
            raise TypeError(f"DiGIN got an unexpected argument {key!r}")
        group, field = FLAT_NAMES[key]
        warnings.warn(
            f"DiGIN({key}=...) is deprecated: use {group}={GROUPS[group].__name__}({field}=...) "
            f"(in YAML: {group}: {{{field}: ...}})",
            DeprecationWarning,
            stacklevel=3,
        )
        setattr(out[group], field, value)
    for (group, field), allowed in _CHOICES.items():
        value = getattr(out[group], field)
        if value not in allowed:
            raise ValueError(f"{group}.{field} must be one of {allowed}, got {value!r}")
    opt, masks = out["optimisation"], out["masks"]
    if out["inversion"].num_starts < 1:
        raise ValueError("num_starts must be >= 1")
    if masks.postprocessing is not None and len(masks.postprocessing) != 4:
        raise ValueError("mask_postprocessing: (erosion, dilation, blur kernel, blur sigma) at 512 px, or None")
    out["search"].blend_fractions = tuple(out["search"].blend_fractions)
    out["search"].injection_fractions = tuple(out["search"].injection_fractions)
    masks.postprocessing = None if masks.postprocessing is None else tuple(masks.postprocessing)
    opt.cutout_power = float(opt.cutout_power)
    return out


def flat_settings(groups: dict[str, Any]) -> dict[str, Any]:
    """Every group field under its flat name (what results record)."""
    return {flat: getattr(groups[group], field) for flat, (group, field) in FLAT_NAMES.items()}
