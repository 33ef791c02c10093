"""DiG-IN (Augustin et al., CVPR 2024): guidance by optimising the inputs of a whole
diffusion sampling trajectory against a classifier-derived loss.

For a real image (a VCE):

1. encode it and invert the sampler: DDIM inversion under the source
   conditioning, then null-text inversion (per-step unconditional embeddings
   optimised so the guided trajectory reconstructs the image);
2. switch the conditioning to the target (pixel model: the class; Stable
   Diffusion: the class word in the caption, prompt-to-prompt), injecting the
   original trajectory's cross-attention maps for the first ``injection``
   fraction of steps (Stable Diffusion; the pixel model has no cross-attention,
   so it keeps the source class for those steps instead: the layout is fixed
   early either way), and blending the reconstruction trajectory's background
   into the inputs of the first ``blend`` fraction of steps (z_T included) where
   a foreground mask is known (given with the data, or from the class word's
   cross-attention maps as the official code computes them:
   :mod:`lit_vce.diffusion.masks`); the combinations are tried once and the one
   with the lowest loss is kept, per sample;
3. optimise the initial latent z_T and one additive delta per step on the
   conditional and on the unconditional embedding with Adam (z_T at a tenth of
   the learning rate, renormalised to its starting norm after each update),
   the loss being the objective on the decoded x0-predictions of the last k
   steps with weights 1..k (normalised), gradients through the decoder and
   every UNet call;
4. return, per sample, the iterate with the lowest loss measured without
   augmentation (the start counts as iterate 0).

The classifier terms see ``num_cutouts`` random square cutouts of each decoded
image (:func:`cutout_views`) plus Gaussian noise. All randomness is drawn from
the per-sample rngs. Official quirks deliberately not copied, and other
deviations: ``docs/parity.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
from dataclasses import dataclass
import re
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..diffusion.attention import AttentionInjection, AttentionRecorder, AttentionStore, find_tokens, token_alignment
from ..diffusion.masks import OFFICIAL_POSTPROCESSING, SamRefiner, attention_foreground, latent_mask_from_pixels, postprocess_mask
from ..progress import progress
from ..rngs import per_sample_rand, per_sample_randn
from ..diffusion import Diffusion, Inversion, PixelDiffusion
from ..objectives import BackgroundL2, L1Distance, L2Distance, LPIPSDistance, Objective, ObjectiveContext, TargetCE
from ..registry import METHODS
from .base import CounterfactualResult, VCEBatch, VCEMethod, concat_results, split_batch


def cutout_views(images: torch.Tensor, rngs: list[torch.Generator], num: int, noise_sd: float = 0.005,
                 cut_size: int | None = None, power: float = 0.3) -> torch.Tensor:
    """DiG-IN's published cutouts: ``num`` random square crops per image whose side is
    ``int(U^power * (min(H, W) - s) + s)`` with ``s = min(H, W, cut_size)`` (the
    classifier's input size), at a uniform position, average-pooled to ``cut_size``,
    plus Gaussian noise of sd ``noise_sd`` after pooling; no full view is forced.
    Returns (N * num, C, cut_size, cut_size), image-major."""
    n, c, h, w = images.shape
    big = min(h, w)
    cut = big if cut_size is None else int(cut_size)
    small = min(big, cut)
    u = per_sample_rand((num, 3), rngs).to(images.device)  # side, top, left in [0, 1)
    noise = per_sample_randn((num, c, cut, cut), rngs).to(images) * noise_sd
    views = []
    for i in range(n):
        for k in range(num):
            side = int(float(u[i, k, 0]) ** power * (big - small) + small)
            top, left = int(float(u[i, k, 1]) * (h - side + 1)), int(float(u[i, k, 2]) * (w - side + 1))
            views.append(F.adaptive_avg_pool2d(images[i : i + 1, :, top : top + side, left : left + side], cut))
    return torch.cat(views) + noise.reshape(n * num, c, cut, cut)


def scaled_cutout_views(images: torch.Tensor, rngs: list[torch.Generator], num: int, min_scale: float = 0.7,
                        noise_sd: float = 0.005) -> torch.Tensor:
    """The earlier scheme (``cutouts="scaled"``): crops with side in [min_scale, 1] of the
    image, resized back to the image size; view 0 of every image is the whole image."""
    n, c, h, w = images.shape
    u = per_sample_rand((num, 3), rngs).to(images.device)  # side, top, left in [0, 1)
    noise = per_sample_randn((num, c, h, w), rngs).to(images) * noise_sd
    views = []
    for i in range(n):
        for k in range(num):
            if k == 0:
                crop = images[i : i + 1]
            else:
                side = max(2, int(round((min_scale + (1 - min_scale) * float(u[i, k, 0])) * min(h, w))))
                top = int(float(u[i, k, 1]) * (h - side + 1))
                left = int(float(u[i, k, 2]) * (w - side + 1))
                crop = images[i : i + 1, :, top : top + side, left : left + side]
                crop = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
            views.append(crop)
    return torch.cat(views) + noise.reshape(n * num, c, h, w)


def _copy_generator(g: torch.Generator) -> torch.Generator:
    """A generator in ``g``'s state (drawing from it leaves ``g`` untouched)."""
    copy = torch.Generator(device=g.device)
    copy.set_state(g.get_state())
    return copy


def fraction_steps(fraction: float, num_steps: int) -> int:
    """How many of the first steps a schedule fraction covers: the steps i with
    ``i / num_steps < fraction`` (the official ``threshold_0.0_<fraction>`` schedule;
    0.3 of 20 steps = steps 0-5)."""
    return sum(1 for i in range(num_steps) if i / num_steps < fraction)


def switch_word(caption: str, old: str, new: str) -> str | None:
    """``caption`` with every whole-word, case-insensitive occurrence of ``old`` replaced
    by ``new``; ``None`` when ``old`` does not occur."""
    pattern = re.compile(r"(?<!\w)" + re.escape(old) + r"(?!\w)", re.IGNORECASE)
    out, k = pattern.subn(new, caption)
    return out if k else None


_CHOICES = {"inversion": ("null_text", "ddim", "none"), "autocast": (None, "bfloat16", "float16"),
            "injection": ("auto", "attention", "conditioning"), "mask_source": ("auto", "batch", "attention", "none"),
            "cutouts": ("published", "scaled")}


def _check_choices(**values) -> None:
    for key, value in values.items():
        if value not in _CHOICES[key]:
            raise ValueError(f"{key} must be one of {_CHOICES[key]}, got {value!r}")


def _prepare_diffusion(diffusion, num_steps: int, guidance_scale: float, checkpointing: bool, injection: str,
                       mask_source: str) -> Diffusion:
    """The diffusion model (built from a pixel model spec, or checked and configured),
    refusing attention options on a model without cross-attention."""
    if isinstance(diffusion, str):
        diffusion = PixelDiffusion(diffusion, sampler="ddim", num_steps=num_steps, guidance_scale=guidance_scale,
                                   gradient_checkpointing=checkpointing)
    else:
        if diffusion.num_steps != num_steps:
            raise ValueError(f"the diffusion model was built with {diffusion.num_steps} steps, not num_steps={num_steps}")
        if diffusion.sampler != "ddim":
            raise ValueError(f"DiG-IN needs the deterministic sampler (sampler='ddim'), not {diffusion.sampler!r}")
        diffusion.guidance_scale, diffusion.gradient_checkpointing = guidance_scale, checkpointing
    if not diffusion.has_null_condition:
        raise ValueError(f"DiG-IN needs a conditional model with an unconditional input (null class or empty prompt), "
                         f"not {type(diffusion).__name__} without one")
    if not diffusion.supports_attention_control:
        for key, value in (("injection", injection), ("mask_source", mask_source)):
            if value == "attention":
                raise ValueError(f"{key}='attention' needs a diffusion model with cross-attention, not {type(diffusion).__name__}")
    return diffusion


def default_objective(classifier_weight: float = 1.0, background_latent_weight: float = 25.0,
                      background_pixel_weight: float = 250.0, l1_weight: float = 0.0, l2_weight: float = 0.0,
                      lpips_weight: float = 0.0) -> Objective:
    """DiG-IN's VCE objective: ``w_c * TargetCE`` plus the weighted regularisers that are non-zero."""
    terms = [(background_latent_weight, lambda: BackgroundL2("latent")), (background_pixel_weight, lambda: BackgroundL2("pixel")),
             (l1_weight, L1Distance), (l2_weight, L2Distance), (lpips_weight, LPIPSDistance)]  # built only when weighted
    return sum((w * make() for w, make in terms if w), classifier_weight * TargetCE())


@dataclass
class _Edit:
    """What the edit keeps from the original: the reconstruction's latents at each step's
    input (blending templates), the attention plan (text-conditioned models), foreground masks."""

    templates: list[torch.Tensor] | None
    plan: "_AttentionPlan | None"
    pixel_mask: torch.Tensor | None
    latent_mask: torch.Tensor | None
    paste: torch.Tensor | None = None  # the clean latent pasted outside the mask (``paste_outside_mask``)


@dataclass
class _Search:
    """The setting chosen per sample: injection and blend step counts, start, its z_T."""

    injection: torch.Tensor
    blend: torch.Tensor
    start: torch.Tensor
    z_start: torch.Tensor


@dataclass
class _Best:
    """Per sample: the best iterate's image, its clean loss, its index, failures."""

    images: torch.Tensor
    loss: torch.Tensor
    iterate: torch.Tensor
    failure: list[str | None]


class _AttentionPlan:
    """The recorded maps of a batch and each sample's source->target token alignment."""

    def __init__(self, store: AttentionStore, mapper: torch.Tensor, own: torch.Tensor):
        self.store, self.mapper, self.own = store, mapper, own

    def injection(self, step: int, active: torch.Tensor) -> AttentionInjection:
        if step >= len(self.store.maps):
            raise RuntimeError(f"attention maps were recorded for {len(self.store.maps)} steps, step {step} needs injection")
        return AttentionInjection(self.store.maps[step], self.mapper, self.own, active)


@METHODS.register("digin")
class DiGIN(VCEMethod):
    """DiG-IN VCEs of real images.

    Args:
        diffusion: a :class:`~lit_vce.diffusion.Diffusion` with the ``ddim`` sampler, or a
            pixel model spec (``"world"``, a ``UNet2DModel`` folder; class-conditional
            with a null class). Stable Diffusion: a :class:`~lit_vce.diffusion.LatentDiffusion`
            (prompts from ``prompt`` and ``class_names``).
        num_steps, guidance_scale: DDIM steps and CFG scale (published: 20, 3.0).
        outer_steps: Adam iterations (published: 20); ``0`` = inversion + edit only.
        lr: learning rate of the embedding deltas; z_T uses ``lr * latent_lr_factor``.
        loss_steps: the last k x0-predictions enter the loss with weights 1..k (3).
        num_cutouts, noise_sd: augmentation of classifier inputs (published: 16
            cutouts, noise sd 0.005).
        cutouts: ``"published"`` (:func:`cutout_views`: side ``U^cutout_power``
            between the classifier's input size and the image size, pooled to the
            classifier's size, no full view) or ``"scaled"`` (the earlier scheme:
            side in [``cutout_min_scale``, 1], resized back, view 0 the whole image).
        classifier_weight, background_latent_weight, background_pixel_weight,
            l1_weight, l2_weight, lpips_weight: the objective ``w_c * TargetCE + 25 * BackgroundL2(latent)
            + 250 * BackgroundL2(pixel) (+ L1, L2, LPIPS)``; without masks the background
            terms cover the whole image; LPIPS needs its AlexNet weights (see ``build_lpips``).
        objective: a custom :class:`Objective` (replaces the weighted terms).
        inversion: ``"null_text"`` (published), ``"ddim"`` or ``"none"`` (random z_T).
        num_starts: with ``inversion="none"``, draw this many random z_T per sample and
            keep the one with the lowest un-augmented loss before optimising (the random-start
            analogue of the settings search; 1 = the published single start).
        null_text_steps, null_text_lr: inner Adam steps and learning rate per step.
        blend_fractions, injection_fractions: the settings searched before
            optimisation (published: blend {0, 0.3} x injection {0.3, 0.4, 0.5}).
        injection: what is kept from the original trajectory in the first steps:
            ``"attention"`` (its cross-attention maps, prompt-to-prompt; text-conditioned models),
            ``"conditioning"`` (the source conditioning itself) or ``"auto"`` (attention
            where the model has cross-attention, else conditioning).
        mask_source: the foreground masks of background blending and the background
            terms: ``"batch"`` (given with the data, e.g. the world's ground truth),
            ``"attention"`` (the source word's cross-attention maps, official recipe:
            soft, squashed with cut-off ``mask_threshold``, post-processed), ``"none"``,
            or ``"auto"`` (the batch's masks, else attention maps where the model has them).
        mask_postprocessing: erosion, dilation, blur kernel and blur sigma at 512 px
            (scaled with the resolution) for attention masks; ``None``: none.
        sam_model: refine attention masks with Segment Anything: a SAM-HQ ``.pth``
            checkpoint run with SAM-HQ's code as the official code runs it
            (``sam_hq_vit_h.pth``; ``pip install 'lit_vce[samhq]'``), or a transformers
            ``SamModel`` / ``SamHQModel`` folder or hub id; ``None``: off.
        sam_points, sam_threshold: points drawn where the soft mask exceeds the threshold.
        gradient_checkpointing: ``True``: checkpoint every UNet, decoder and classifier
            call of the optimised trajectory; ``False``: none; ``"auto"``: only as many
            as ``memory_budget_gb`` needs (the activations of one UNet call and of one
            loss evaluation are measured once per batch shape; the loss, then the
            first UNet calls, are checkpointed until the rest fits).
        memory_budget_gb: the activation memory ``"auto"`` may use (default: 90 % of the
            free GPU memory, or half the available RAM on a CPU).
        speedups: the measured speed-ups (``benchmarks/digin_speed.py``; identical
            settings, same method): null-text inversion without checkpointing and
            advanced with its conditional prediction; the loss's x0-predictions decoded
            in one call and all their views through one classifier call, the last
            decoded image reused for the un-augmented loss and the kept iterate; no
            search trajectory when only one setting is searched. ``False`` reproduces
            the earlier code path exactly.
        inversion_cache: a folder where each image's null-text inversion is stored and
            reused (keyed by the image, its source conditioning, the model and the
            inversion settings): an image explained into several targets is inverted once.
        autocast: ``None`` or ``"bfloat16"``/``"float16"`` (mixed precision).
        inner_batch_size: process the batch in chunks (memory; outputs do not change).
        paste_outside_mask: also put the original's clean latent outside the mask into
            the x0-predictions that are scored and returned (not part of the published
            method; the analyses use it to keep a frozen object exactly).
        prompt: the caption template of text-conditioned models (``{}`` = the class name). When
            the data gives captions, the source class name in each caption is replaced by
            the target's (whole word, any case); a caption that does not name the source
            class falls back to the template (diagnostic ``caption_used`` = 0).
        class_names: class names for prompts (default: the classifier's).
    """

    name = "digin"

    def __init__(
        self,
        diffusion: Diffusion | str = "world",
        num_steps: int = 20,
        guidance_scale: float = 3.0,
        outer_steps: int = 20,
        lr: float = 0.01,
        latent_lr_factor: float = 0.1,
        loss_steps: int = 3,
        num_cutouts: int = 16,
        cutouts: str = "published",
        cutout_power: float = 0.3,
        cutout_min_scale: float = 0.7,
        noise_sd: float = 0.005,
        classifier_weight: float = 1.0,
        background_latent_weight: float = 25.0,
        background_pixel_weight: float = 250.0,
        l1_weight: float = 0.0,
        l2_weight: float = 0.0,
        lpips_weight: float = 0.0,
        objective: Objective | None = None,
        inversion: str = "null_text",
        num_starts: int = 1,
        null_text_steps: int = 10,
        null_text_lr: float = 0.01,
        blend_fractions: tuple[float, ...] = (0.0, 0.3),
        injection_fractions: tuple[float, ...] = (0.3, 0.4, 0.5),
        injection: str = "auto",
        mask_source: str = "auto",
        mask_threshold: float = 0.3,
        mask_postprocessing: tuple[float, ...] | None = OFFICIAL_POSTPROCESSING,
        sam_model: str | None = None,
        sam_points: int = 5,
        sam_threshold: float = 0.35,
        gradient_checkpointing: bool | str = "auto",
        memory_budget_gb: float | None = None,
        speedups: bool = True,
        inversion_cache: str | None = None,
        autocast: str | None = None,
        inner_batch_size: int | None = None,
        paste_outside_mask: bool = False,
        prompt: str = "a photograph of a {}",
        class_names: list[str] | None = None,
    ):
        super().__init__()
        _check_choices(inversion=inversion, autocast=autocast, injection=injection, mask_source=mask_source, cutouts=cutouts)
        if not 1 <= loss_steps <= num_steps:
            raise ValueError("loss_steps must be in [1, num_steps]")
        if num_starts < 1:
            raise ValueError("num_starts must be >= 1")
        if gradient_checkpointing not in (True, False, "auto"):
            raise ValueError(f"gradient_checkpointing must be true, false or 'auto', got {gradient_checkpointing!r}")
        if mask_postprocessing is not None and len(mask_postprocessing) != 4:
            raise ValueError("mask_postprocessing: (erosion, dilation, blur kernel, blur sigma) at 512 px, or None")
        self.diffusion = diffusion = _prepare_diffusion(diffusion, num_steps, guidance_scale, gradient_checkpointing is True,
                                                        injection, mask_source)
        self.injection = ("attention" if diffusion.supports_attention_control else "conditioning") if injection == "auto" else injection
        self.mask_source, self.mask_threshold = mask_source, float(mask_threshold)
        self.mask_postprocessing = None if mask_postprocessing is None else tuple(mask_postprocessing)
        self.sam_spec = sam_model
        self.sam = SamRefiner(sam_model, sam_points, sam_threshold) if sam_model else None
        self.num_steps, self.guidance_scale, self.outer_steps = num_steps, guidance_scale, outer_steps
        self.lr, self.latent_lr_factor, self.loss_steps = lr, latent_lr_factor, loss_steps
        self.num_cutouts, self.cutout_min_scale, self.noise_sd = num_cutouts, cutout_min_scale, noise_sd
        self.cutouts, self.cutout_power = cutouts, float(cutout_power)
        self.objective = objective if objective is not None else default_objective(
            classifier_weight, background_latent_weight, background_pixel_weight, l1_weight, l2_weight, lpips_weight)
        self.inversion, self.num_starts = inversion, int(num_starts)
        self.null_text_steps, self.null_text_lr = null_text_steps, null_text_lr
        self.blend_fractions, self.injection_fractions = tuple(blend_fractions), tuple(injection_fractions)
        self.gradient_checkpointing, self.autocast = gradient_checkpointing, autocast
        self.memory_budget_gb, self.speedups = memory_budget_gb, bool(speedups)
        self.inversion_cache = inversion_cache
        self._activation_bytes: dict[tuple, tuple[int, int]] = {}  # batch shape -> (UNet call, loss) bytes
        self.inner_batch_size = inner_batch_size
        self.paste_outside_mask = bool(paste_outside_mask)
        self.prompt, self.class_names = prompt, class_names
        self.last_trace: list[torch.Tensor] = []  # per outer step: augmented loss per sample (diagnostics)

    @classmethod
    def test_kwargs(cls) -> dict:
        return {"num_steps": 5, "outer_steps": 2, "num_cutouts": 2, "null_text_steps": 2}

    # --- conditioning ------------------------------------------------------------------
    def _names(self, classifier: nn.Module) -> list[str]:
        names = self.class_names or list(getattr(classifier, "class_names", []))
        if not names:
            raise ValueError("a text-conditioned model needs class names (class_names=... or a classifier with class_names)")
        return names

    def conditions(self, labels: torch.Tensor, classifier: nn.Module) -> torch.Tensor:
        """The conditioning of ``labels``: class embeddings (pixel) or the template prompt's text embedding."""
        bb = self.diffusion
        if not bb.text_conditioned:
            return bb.condition(labels)
        names = self._names(classifier)
        return bb.condition([self.prompt.format(names[int(c)]) for c in labels])

    def prompts(self, batch: VCEBatch, classifier: nn.Module) -> tuple[list[str], list[str], torch.Tensor]:
        """(source prompts, target prompts, whether each sample's own caption was used)."""
        names = self._names(classifier)
        src, tgt, used, unnamed = [], [], [], []
        for k in range(len(batch)):
            s_name, t_name = names[int(batch.source[k])], names[int(batch.target[k])]
            caption = batch.captions[k] if batch.captions else None
            switched = switch_word(caption, s_name, t_name) if caption else None
            if caption and switched is None:
                unnamed.append(f"{batch.sample_ids[k]!r} ({s_name!r})")
            if switched is None:
                src.append(self.prompt.format(s_name))
                tgt.append(self.prompt.format(t_name))
            else:
                src.append(caption)
                tgt.append(switched)
            used.append(switched is not None)
        if unnamed:
            warnings.warn(f"{len(unnamed)} caption(s) do not name their class, e.g. {unnamed[0]}; "
                          f"the template prompt is used for them (diagnostic caption_used = 0)", stacklevel=2)
        return src, tgt, torch.tensor(used, dtype=torch.float32)

    # --- the trajectory ------------------------------------------------------------------------
    def run_trajectory(self, z_t: torch.Tensor, cond_src, cond_tgt, uncond: list[torch.Tensor], delta_c=None, delta_u=None,
                       injection_steps: torch.Tensor | None = None, blend_steps: torch.Tensor | None = None,
                       templates: list[torch.Tensor] | None = None, latent_mask: torch.Tensor | None = None,
                       keep_last: int = 1, attention: "_AttentionPlan | None" = None,
                       paste: torch.Tensor | None = None, checkpoint_steps: int | None = None) -> list[torch.Tensor]:
        """Sample from ``z_t`` with per-sample injection/blend step counts; returns the
        x0-predictions of the last ``keep_last`` steps. With ``attention`` (a recorded
        trajectory's maps) the first injection steps get its cross-attention maps and the
        target conditioning; without, they get the source conditioning. For the first
        blend steps the input latent is ``mask * z + (1 - mask) * templates[i]`` (the
        reconstruction trajectory's latent at that step; step 0's input is z_T). With
        ``paste`` (a clean latent) the returned x0-predictions take it outside the mask.
        ``checkpoint_steps``: checkpoint the first that many UNet calls and no other
        (``None``: as the diffusion model's ``gradient_checkpointing`` says)."""
        bb, n = self.diffusion, len(z_t)
        dev = z_t.device
        inj = torch.zeros(n, dtype=torch.long, device=dev) if injection_steps is None else injection_steps
        blend = torch.zeros(n, dtype=torch.long, device=dev) if blend_steps is None else blend_steps
        shape_c = (n,) + (1,) * (cond_src.dim() - 1)
        shape_z = (n,) + (1,) * (z_t.dim() - 1)
        x0s = []
        for i in range(self.num_steps):
            if templates is not None and latent_mask is not None and bool((blend > i).any()):
                use = (blend > i).view(shape_z).to(z_t.dtype)
                z_t = use * (latent_mask * z_t + (1 - latent_mask) * templates[i]) + (1 - use) * z_t
            control = None
            if attention is not None:
                cond = cond_tgt
                active = inj > i
                if bool(active.any()):
                    control = attention.injection(i, active)
            else:
                cond = torch.where((inj > i).view(shape_c), cond_src, cond_tgt)
            if delta_c is not None:
                cond = cond + delta_c[i]
            u = uncond[i] if delta_u is None else uncond[i] + delta_u[i]
            t = bb.timesteps[i]
            ck = None if checkpoint_steps is None else i < checkpoint_steps
            z_t, x0 = bb.step(bb.eps(z_t, t, cond, u, control=control, checkpoint=ck), t, z_t)
            if i >= self.num_steps - keep_last:
                if paste is not None and latent_mask is not None:
                    x0 = latent_mask * x0 + (1 - latent_mask) * paste
                x0s.append(x0)
        return x0s

    @torch.no_grad()
    def reconstruct(self, inversion: Inversion, cond: torch.Tensor, keep_steps: int = 0,
                    record_tokens: bool = False) -> tuple[list[torch.Tensor], AttentionStore | None]:
        """Run the reconstruction trajectory (``cond`` and the inversion's unconditional
        embeddings from its z_T): its latent at the input of every step (the blending
        templates) and, on text-conditioned models, its cross-attention: the maps of the first
        ``keep_steps`` steps (injection) and, with ``record_tokens``, the token maps of
        the first half of the steps (masks; the official ``xa_start_t = 0.5``)."""
        bb = self.diffusion
        record = bb.supports_attention_control and (keep_steps > 0 or record_tokens)
        store = AttentionStore() if record else None
        z, latents = inversion.latents[0], []
        last = self.num_steps - 1
        for i in range(self.num_steps):
            latents.append(z)
            rec = None
            if record:
                in_first_half = last == 0 or 1 - i / last >= 0.5
                rec = AttentionRecorder(len(z), store, i, keep_maps=i < keep_steps, record_tokens=record_tokens and in_first_half)
            t = bb.timesteps[i]
            z, _ = bb.step(bb.eps(z, t, cond, inversion.uncond[i], control=rec), t, z)
        return latents, store

    def _loss(self, x0s: list[torch.Tensor], ctx: ObjectiveContext, augmented: bool, checkpoint: bool | None = None
              ) -> torch.Tensor:
        k = len(x0s)
        weights = torch.arange(1, k + 1, dtype=torch.float32) / (k * (k + 1) / 2)
        total = 0.0
        views, ctx.views = ctx.views, (ctx.views if augmented else None)
        try:
            for w, x0 in zip(weights.tolist(), x0s):
                images = self.diffusion.decode_checkpointed(x0, checkpoint)
                if images.shape[-2:] != ctx.original.shape[-2:]:
                    images = F.interpolate(images, size=ctx.original.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
                ctx.latents = x0
                total = total + w * self.objective(images, ctx)
        finally:
            ctx.views = views
        return total

    def _fit(self, images: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != like.shape[-2:]:
            images = F.interpolate(images, size=like.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
        return images

    def _fused_loss(self, x0s: list[torch.Tensor], ctx: ObjectiveContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The augmented loss of :meth:`_loss` with the k x0-predictions decoded in one call
        and the objective evaluated once on all k * n images (all their views through one
        classifier call; the views are drawn per x0-prediction in the same order as
        :meth:`_loss` draws them); also the last x0-prediction's decoded image (unresized)."""
        k, n = len(x0s), len(x0s[0])
        weights = torch.arange(1, k + 1, dtype=torch.float32) / (k * (k + 1) / 2)
        z = torch.cat(x0s)
        raw = self.diffusion.decode_checkpointed(z, False)
        tiled = ctx.tiled(k)
        tiled.latents = z
        per = self.objective(self._fit(raw, ctx.original), tiled).reshape(k, n)
        return (weights.to(per)[:, None] * per).sum(0), raw[-n:]

    def _clean_loss(self, raw: torch.Tensor, x0: torch.Tensor, ctx: ObjectiveContext) -> torch.Tensor:
        """The un-augmented loss of a decoded image (``raw``, from ``x0``)."""
        views, latents = ctx.views, ctx.latents
        ctx.views, ctx.latents = None, x0
        try:
            with torch.no_grad():
                return self.objective(self._fit(raw, ctx.original), ctx).float()
        finally:
            ctx.views, ctx.latents = views, latents

    # --- memory: what "auto" checkpointing measures and plans -------------------------------
    @staticmethod
    def _saved_bytes(fn, exclude: set[int]) -> int:
        """Bytes of the tensors autograd saves while ``fn()`` runs (each storage once;
        ``exclude``: storages not counted, e.g. the frozen weights)."""
        seen: set[int] = set()
        total = 0

        def pack(t):
            nonlocal total
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in seen and ptr not in exclude:
                seen.add(ptr)
                total += storage.nbytes()
            return t

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return total

    def _budget_bytes(self, device: torch.device) -> float:
        if self.memory_budget_gb is not None:
            return float(self.memory_budget_gb) * 2**30
        if device.type == "cuda":
            return 0.9 * torch.cuda.mem_get_info(device)[0]
        import os

        try:
            return 0.5 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return float("inf")

    def checkpoint_plan(self, z: torch.Tensor, cond_tgt, uncond, ctx: ObjectiveContext,
                        classifier: nn.Module) -> tuple[int | None, bool]:
        """(UNet calls to checkpoint (``None``: every one, by the diffusion model's setting),
        whether to checkpoint the loss) for the optimised trajectory. ``"auto"``: the
        activations of one UNet call (``u``) and one loss evaluation (``d``) are measured
        once per batch shape; with ``S`` steps and ``k`` loss steps nothing is
        checkpointed when ``S*u + k*d`` fits the budget, else the loss (one x0-prediction
        at a time) and the first ``S - floor((budget - d) / u)`` UNet calls. ``ctx`` must
        draw its views from copies of the batch's generators (the probe draws views)."""
        if self.gradient_checkpointing is True:
            return None, True
        if self.gradient_checkpointing is False or self.outer_steps == 0:
            return 0, False
        bb = self.diffusion
        key = (tuple(z.shape), tuple(ctx.original.shape), str(z.dtype), self.autocast, self.num_cutouts)
        if key not in self._activation_bytes:
            frozen = {p.untyped_storage().data_ptr() for m in (bb, classifier) for p in m.parameters()}
            leaf = z.detach().clone().requires_grad_(True)
            with self._autocast(z.device):
                u = self._saved_bytes(lambda: bb.eps(leaf, bb.timesteps[-1], cond_tgt, uncond[-1], checkpoint=False), frozen)
                ctx.latents = leaf
                d = self._saved_bytes(lambda: self.objective(self._fit(bb.decode_checkpointed(leaf, False), ctx.original),
                                                             ctx), frozen)
            self._activation_bytes[key] = (u, d)
        u, d = self._activation_bytes[key]
        budget = self._budget_bytes(z.device)
        if self.num_steps * u + self.loss_steps * d <= budget:
            return 0, False
        fits = max(0, int((budget - d) // max(u, 1)))
        return max(0, self.num_steps - fits), True

    def _autocast(self, device: torch.device):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=getattr(torch, self.autocast))

    # --- generate ----------------------------------------------------------------------------
    def generate(self, batch: VCEBatch, classifier: nn.Module) -> CounterfactualResult:
        k = self.inner_batch_size
        if k and k < len(batch):
            return concat_results([self._generate(b, classifier) for b in split_batch(batch, k)])
        return self._generate(batch, classifier)

    def _recording(self, mask: torch.Tensor | None) -> tuple[int, bool]:
        """(steps whose attention maps the edit injects, whether it records token maps for
        masks) on a model with cross-attention, for a batch with foreground ``mask`` or none."""
        bb = self.diffusion
        real = self.inversion != "none"
        attn_masks = real and (self.mask_source == "attention" or (
            self.mask_source == "auto" and mask is None and bb.supports_attention_control))
        keep = max((fraction_steps(j, self.num_steps) for j in self.injection_fractions), default=0)
        inject = real and self.injection == "attention" and keep > 0
        return (keep if inject else 0), attn_masks

    def invert(self, images: torch.Tensor, cond: torch.Tensor, rngs=None, mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, Inversion]:
        """(clean latent, inversion) of ``images`` under ``cond`` (``mask``: the batch's
        foreground masks, which decide what the edit records)."""
        bb = self.diffusion
        with torch.no_grad():
            z0 = bb.encode(images)
        if self.inversion == "null_text":
            if not self.speedups:
                return z0, bb.null_text_inversion(z0, cond, self.null_text_steps, self.null_text_lr)
            # the inversion's own last pass is the reconstruction trajectory: record there what
            # the edit needs (attention maps), so prepare_edit need not run it again
            keep, tokens = self._recording(mask)
            store = AttentionStore() if bb.supports_attention_control and (keep > 0 or tokens) else None
            last = self.num_steps - 1

            def control(i):
                if store is None:
                    return None
                first_half = last == 0 or 1 - i / last >= 0.5
                return AttentionRecorder(len(z0), store, i, keep_maps=i < keep, record_tokens=tokens and first_half)

            inv = bb.null_text_inversion(z0, cond, self.null_text_steps, self.null_text_lr, checkpoint=False,
                                         reuse_conditional=True, control=control)
            inv.store = store
            return z0, inv
        if self.inversion == "ddim":
            return z0, bb.plain_inversion(z0, cond)
        z_T = per_sample_randn(z0.shape[1:], rngs).to(z0)
        u = bb.null_condition(len(z0))
        return z0, Inversion([z_T] + [z0] * self.num_steps, [u] * self.num_steps)

    def _generate(self, batch: VCEBatch, classifier: nn.Module) -> CounterfactualResult:
        """The phases: condition, invert, prepare the edit, search, optimise, select."""
        cond_src, cond_tgt, prompts, captions_used = self._conditioning(batch, classifier)
        z0, inv = self.invert(batch.images, cond_src, batch.rngs, batch.mask)
        edit = self.prepare_edit(batch, classifier, inv, cond_src, prompts)
        ctx = ObjectiveContext(batch.images, batch.source, batch.target, classifier, edit.pixel_mask,
                               views=self._views(batch, classifier), original_latents=z0, latent_mask=edit.latent_mask)
        search = self.search(batch, inv, cond_src, cond_tgt, edit, ctx)
        probe = dataclasses.replace(ctx, views=self._views(batch, classifier, [_copy_generator(g) for g in batch.rngs]))
        plan = self.checkpoint_plan(search.z_start, cond_tgt, inv.uncond, probe, classifier)
        ctx.classifier = self._checkpointed(classifier, plan[1])
        best = self.optimise(batch, inv, cond_src, cond_tgt, edit, ctx, search, plan)
        with torch.no_grad():
            p_t = classifier(best.images).softmax(1).gather(1, batch.target[:, None]).squeeze(1)
        n = len(batch)
        diag = {"target_confidence": p_t, "loss": best.loss.detach().cpu(), "best_iterate": best.iterate.float().cpu(),
                "injection_steps": search.injection.float().cpu(), "blend_steps": search.blend.float().cpu(),
                "start": search.start.float().cpu(),
                "reconstruction_mse": torch.full((n,), float(inv.reconstruction_error or float("nan"))),
                "checkpointed_unet_calls": torch.full((n,), float(self.num_steps if plan[0] is None else plan[0]))}
        if edit.latent_mask is not None:
            diag["mask_fraction"] = edit.latent_mask.float().flatten(1).mean(1).cpu()
        if captions_used is not None:
            diag["caption_used"] = captions_used
        return CounterfactualResult(best.images.detach(), diag, best.failure)

    def _checkpointed(self, classifier: nn.Module, on: bool):
        if not on:
            return classifier

        def clf(x, _c=classifier):
            return _checkpoint(_c, x, use_reentrant=False) if torch.is_grad_enabled() else _c(x)
        clf.num_classes = getattr(classifier, "num_classes", None)
        return clf

    def _conditioning(self, batch: VCEBatch, classifier: nn.Module):
        """(source conditioning, target conditioning, (source prompts, target prompts) or None, captions used)."""
        bb = self.diffusion
        if not bb.text_conditioned:
            return self.conditions(batch.source, classifier), self.conditions(batch.target, classifier), None, None
        src_prompts, tgt_prompts, captions_used = self.prompts(batch, classifier)
        return bb.condition(src_prompts), bb.condition(tgt_prompts), (src_prompts, tgt_prompts), captions_used

    def _views(self, batch: VCEBatch, classifier: nn.Module, rngs: list[torch.Generator] | None = None):
        rngs = batch.rngs if rngs is None else rngs
        if self.cutouts == "scaled":
            return lambda x: scaled_cutout_views(x, rngs, self.num_cutouts, self.cutout_min_scale, self.noise_sd)
        size = getattr(classifier, "input_size", None)
        return lambda x: cutout_views(x, rngs, self.num_cutouts, self.noise_sd, size, self.cutout_power)

    def prepare_edit(self, batch: VCEBatch, classifier: nn.Module, inv: Inversion, cond_src: torch.Tensor,
                     prompts: tuple[list[str], list[str]] | None) -> "_Edit":
        """The reconstruction's blending templates, the attention plan and the foreground masks."""
        bb, dev = self.diffusion, batch.images.device
        if self.mask_source == "batch" and batch.mask is None:
            raise ValueError("mask_source='batch' but the data gives no foreground masks")
        real = self.inversion != "none"
        pixel_mask = None if self.mask_source == "none" else batch.mask
        keep, attn_masks = self._recording(batch.mask)
        inject = keep > 0
        templates = store = None
        if real and (inject or attn_masks or any(b > 0 for b in self.blend_fractions)):
            if self.speedups and inv.trajectory is not None and (inv.store is not None or not bb.supports_attention_control
                                               or not (inject or attn_masks)):
                templates, store = inv.trajectory, inv.store  # recorded while inverting
            else:
                with self._autocast(dev):  # maps stored in the compute dtype (half the memory under bf16)
                    templates, store = self.reconstruct(inv, cond_src, keep, record_tokens=attn_masks)
        plan = None
        if inject:
            aligned = [token_alignment(a, b) for a, b in zip(bb.token_ids(prompts[0]).tolist(), bb.token_ids(prompts[1]).tolist())]
            plan = _AttentionPlan(store, torch.stack([m for m, _ in aligned]).to(dev), torch.stack([o for _, o in aligned]).to(dev))
        if attn_masks:
            pixel_mask = self.attention_masks(store, batch, classifier, prompts[0], inv.latents[0].shape[-1])
        latent_mask = None
        if pixel_mask is not None and real:
            latent_mask = latent_mask_from_pixels(pixel_mask, inv.latents[0].shape[-1])
        paste = inv.latents[-1] if (self.paste_outside_mask and latent_mask is not None) else None
        return _Edit(templates, plan, pixel_mask, latent_mask, paste)

    def attention_masks(self, store: AttentionStore, batch: VCEBatch, classifier: nn.Module, src_prompts: list[str],
                        latent_size: int) -> torch.Tensor:
        """Soft foreground masks (n, 1, H, W) from the source class word's cross-attention
        (:mod:`lit_vce.diffusion.masks`), optionally refined by SAM, post-processed."""
        bb, names = self.diffusion, self._names(classifier)
        ids_src = bb.token_ids(src_prompts).tolist()
        tokens = [find_tokens(ids, bb.word_ids(names[int(c)])) for ids, c in zip(ids_src, batch.source)]
        maps = store.token_maps(max(1, latent_size // 4))  # 16x16 for Stable Diffusion at 512 px
        mask = attention_foreground(maps, tokens, batch.images.shape[-1], self.mask_threshold)
        if self.sam is not None:
            mask = self.sam(batch.images, mask, batch.rngs)
        if self.mask_postprocessing is not None:
            mask = postprocess_mask(mask, *self.mask_postprocessing)
        return mask

    def search(self, batch: VCEBatch, inv: Inversion, cond_src, cond_tgt, edit: "_Edit", ctx: ObjectiveContext) -> "_Search":
        """Try every (blend, injection) setting (and random start) once, keep the best per sample."""
        n, dev = len(batch), batch.images.device
        blends = [b for b in self.blend_fractions if b == 0 or (edit.latent_mask is not None and edit.templates is not None)] or [0.0]
        injections = self.injection_fractions or (0.0,)
        if edit.plan is None and torch.equal(cond_src, cond_tgt):
            injections = (0.0,)  # nothing to inject: the settings would repeat one trajectory
        starts = [inv.latents[0]]
        if self.inversion == "none":
            starts += [per_sample_randn(inv.latents[0].shape[1:], batch.rngs).to(inv.latents[0]) for _ in range(self.num_starts - 1)]
        best = torch.full((n,), float("inf"), device=dev)
        inj, blend, start = (torch.zeros(n, dtype=torch.long, device=dev) for _ in range(3))
        settings = [(k, z, b, j) for k, z in enumerate(starts) for b, j in itertools.product(blends, injections)]
        if self.speedups and len(settings) == 1:  # nothing to choose: outer step 0 runs this trajectory anyway
            _, z_start, b, j = settings[0]
            full = functools.partial(torch.full, (n,), dtype=torch.long, device=dev)
            return _Search(full(fraction_steps(j, self.num_steps)), full(fraction_steps(b, self.num_steps)), full(0), z_start)
        with torch.no_grad(), self._autocast(dev):
            for k, z_start, b, j in progress(settings, desc="DiG-IN search", unit="setting"):
                bs = torch.full((n,), fraction_steps(b, self.num_steps), dtype=torch.long, device=dev)
                js = torch.full((n,), fraction_steps(j, self.num_steps), dtype=torch.long, device=dev)
                x0s = self.run_trajectory(z_start, cond_src, cond_tgt, inv.uncond, injection_steps=js, blend_steps=bs,
                                          templates=edit.templates, latent_mask=edit.latent_mask, attention=edit.plan,
                                          paste=edit.paste)
                loss = self._loss(x0s, ctx, augmented=False).float()
                better = loss < best
                best = torch.where(better, loss, best)
                inj, blend = torch.where(better, js, inj), torch.where(better, bs, blend)
                start = torch.where(better, torch.full_like(start, k), start)
        return _Search(inj, blend, start, torch.stack(starts)[start, torch.arange(n, device=dev)])

    def optimise(self, batch: VCEBatch, inv: Inversion, cond_src, cond_tgt, edit: "_Edit", ctx: ObjectiveContext,
                 search: "_Search", plan: tuple[int | None, bool] = (None, False)) -> "_Best":
        """Adam on z_T and the per-step embedding deltas; keeps each sample's iterate with the lowest clean loss.
        ``plan``: (UNet calls to checkpoint, whether the loss is checkpointed), see :meth:`checkpoint_plan`."""
        n, dev = len(batch), batch.images.device
        z_T = search.z_start.detach().clone().requires_grad_(True)
        norm0 = z_T.detach().flatten(1).norm(dim=1)
        delta_c = torch.zeros((self.num_steps, *cond_src.shape), device=dev, requires_grad=True)
        delta_u = torch.zeros((self.num_steps, *inv.uncond[0].shape), device=dev, requires_grad=True)
        opt = torch.optim.Adam([{"params": [z_T], "lr": self.lr * self.latent_lr_factor}, {"params": [delta_c, delta_u], "lr": self.lr}])
        best = _Best(batch.images.clone(), torch.full((n,), float("inf"), device=dev), torch.zeros(n, dtype=torch.long, device=dev),
                     [None] * n)
        ok = torch.ones(n, dtype=torch.bool, device=dev)
        self.last_trace = []
        for it in progress(range(self.outer_steps + 1), desc="DiG-IN outer steps", unit="step"):  # 0 is the searched start
            last = it == self.outer_steps
            with torch.set_grad_enabled(not last), self._autocast(dev):
                x0s = self.run_trajectory(z_T, cond_src, cond_tgt, inv.uncond, delta_c, delta_u, search.injection, search.blend,
                                          edit.templates, edit.latent_mask, keep_last=1 if last else self.loss_steps,
                                          attention=edit.plan, paste=edit.paste, checkpoint_steps=plan[0])
                fused = self.speedups and not plan[1]
                if fused:  # one decode of the k x0-predictions serves the loss, the clean loss and the kept image
                    if last:
                        with torch.no_grad():
                            raw = self.diffusion.decode(x0s[-1])
                    else:
                        loss, raw = self._fused_loss(x0s, ctx)
                    raw = raw.detach()
                    clean = self._clean_loss(raw, x0s[-1].detach(), ctx)
                else:
                    with torch.no_grad():  # the un-augmented loss of this iterate decides what is kept
                        clean = self._loss(x0s[-1:], ctx, augmented=False).float()
                better = (clean < best.loss) & ok
                if better.any():
                    best.loss = torch.where(better, clean, best.loss)
                    best.iterate = torch.where(better, torch.full_like(best.iterate, it), best.iterate)
                    image = self._resized(raw.float(), batch.images) if fused else self._image(x0s[-1].detach(), batch.images)
                    best.images[better] = image[better]
                if last:
                    break
                loss = loss.float() if fused else self._loss(x0s, ctx, augmented=True, checkpoint=plan[1]).float()
                opt.zero_grad()
                loss.sum().backward()
            self.last_trace.append(loss.detach())
            ok &= self._finite_grads(z_T, delta_c, delta_u, ok, best.failure, it)
            opt.step()
            with torch.no_grad():
                z_T.mul_((norm0 / z_T.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, *([1] * (z_T.dim() - 1))))
        return best

    @staticmethod
    def _finite_grads(z_T, delta_c, delta_u, ok, failure, it) -> torch.Tensor:
        """Per-sample finiteness of the gradients; non-finite samples are recorded as failures
        and frozen (their gradients zeroed)."""
        for p in (z_T, delta_c, delta_u):
            if p.grad is None:  # delta_u at guidance_scale 1 (no unconditional branch), delta_c at 0
                p.grad = torch.zeros_like(p)
        fine = torch.isfinite(z_T.grad).flatten(1).all(1) & torch.isfinite(delta_c.grad.transpose(0, 1).flatten(1)).all(1) \
            & torch.isfinite(delta_u.grad.transpose(0, 1).flatten(1)).all(1)
        for i in torch.nonzero(~fine & ok).flatten().tolist():
            failure[i] = f"non-finite gradient at outer step {it + 1}"
        keep = ok & fine
        for p in (z_T, delta_c, delta_u):
            p.grad = torch.nan_to_num(p.grad, 0.0, 0.0, 0.0)
        z_T.grad[~keep] = 0
        delta_c.grad[:, ~keep] = 0
        delta_u.grad[:, ~keep] = 0
        return fine

    def _image(self, x0: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self._resized(self.diffusion.decode(x0).float(), like)

    @staticmethod
    def _resized(img: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if img.shape[-2:] != like.shape[-2:]:
            img = F.interpolate(img, size=like.shape[-2:], mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        return img
