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
   early either way), and blending the original trajectory's background back
   for the first ``blend`` fraction of steps where a foreground mask is known
   (given with the data, or from the class word's cross-attention maps); the
   combinations are tried once and the one with the lowest loss is kept, per
   sample;
3. optimise the initial latent z_T and one additive delta per step on the
   conditional and on the unconditional embedding with Adam (z_T at a tenth of
   the learning rate, renormalised to its starting norm after each update),
   the loss being the objective on the decoded x0-predictions of the last k
   steps with weights 1..k (normalised), gradients through the decoder and
   every UNet call;
4. return, per sample, the iterate with the lowest loss measured without
   augmentation (the start counts as iterate 0).

The classifier terms see ``num_cutouts`` random square cutouts of each decoded
image (resized back to its size) plus Gaussian noise. All randomness is drawn
from the per-sample generators.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..generators.attention import (AttentionInjection, AttentionRecorder, AttentionStore, attention_mask, find_tokens,
                                    token_alignment)
from ..generators.noise import per_sample_rand, per_sample_randn
from ..generators.trajectory import Inversion, PixelTrajectory, TrajectoryBackbone
from ..objectives import BackgroundL2, L1Distance, L2Distance, LPIPSDistance, Objective, ObjectiveContext, TargetCE
from ..registry import METHODS
from .base import CounterfactualResult, VCEBatch, VCEMethod, concat_results, split_batch


def cutout_views(images: torch.Tensor, generators: list[torch.Generator], num: int, min_scale: float = 0.7,
                 noise_sd: float = 0.005) -> torch.Tensor:
    """``num`` random square cutouts per image (side in [min_scale, 1] of the image, random
    position), resized back to the image size, plus Gaussian noise: (N * num, C, H, W).
    Cutout 0 of every image is the whole image."""
    n, c, h, w = images.shape
    u = per_sample_rand((num, 3), generators).to(images.device)  # side, top, left in [0, 1)
    noise = per_sample_randn((num, c, h, w), generators).to(images) * noise_sd
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


def switch_word(caption: str, old: str, new: str) -> str | None:
    """``caption`` with every whole-word, case-insensitive occurrence of ``old`` replaced
    by ``new``; ``None`` when ``old`` does not occur."""
    pattern = re.compile(r"(?<!\w)" + re.escape(old) + r"(?!\w)", re.IGNORECASE)
    out, k = pattern.subn(new, caption)
    return out if k else None


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
        backbone: a :class:`TrajectoryBackbone`, ``"world"`` or a ``UNet2DModel``
            folder (pixel, class-conditional). Stable Diffusion: a
            :class:`LatentDiffusion` (prompts from ``prompt`` and ``class_names``).
        num_steps, guidance_scale: DDIM steps and CFG scale (published: 20, 3.0).
        outer_steps: Adam iterations (published: 20); ``0`` = inversion + edit only.
        lr: learning rate of the embedding deltas; z_T uses ``lr * latent_lr_factor``.
        loss_steps: the last k x0-predictions enter the loss with weights 1..k (3).
        num_cutouts, cutout_min_scale, noise_sd: augmentation of classifier inputs
            (published: 16 cutouts, noise sd 0.005).
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
            ``"attention"`` (its cross-attention maps, prompt-to-prompt; text backbones),
            ``"conditioning"`` (the source conditioning itself) or ``"auto"`` (attention
            where the backbone has cross-attention, else conditioning).
        mask_source: the foreground masks of background blending and the background
            terms: ``"batch"`` (given with the data, e.g. the world's ground truth),
            ``"attention"`` (the source word's cross-attention maps, thresholded at
            ``mask_threshold`` of their maximum), ``"none"``, or ``"auto"`` (the batch's
            masks, else attention maps where the backbone has them).
        gradient_checkpointing: checkpoint UNet, decoder and classifier calls.
        autocast: ``None`` or ``"bfloat16"``/``"float16"`` (mixed precision).
        inner_batch_size: process the batch in chunks (memory; outputs do not change).
        prompt: the caption template of text backbones (``{}`` = the class name). When
            the data gives captions, the source class name in each caption is replaced by
            the target's (whole word, any case); a caption that does not name the source
            class falls back to the template (diagnostic ``caption_used`` = 0).
        class_names: class names for prompts (default: the classifier's).
    """

    name = "digin"

    def __init__(
        self,
        backbone: TrajectoryBackbone | str = "world",
        num_steps: int = 20,
        guidance_scale: float = 3.0,
        outer_steps: int = 20,
        lr: float = 0.01,
        latent_lr_factor: float = 0.1,
        loss_steps: int = 3,
        num_cutouts: int = 16,
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
        gradient_checkpointing: bool = False,
        autocast: str | None = None,
        inner_batch_size: int | None = None,
        prompt: str = "a photograph of a {}",
        class_names: list[str] | None = None,
    ):
        super().__init__()
        if inversion not in ("null_text", "ddim", "none"):
            raise ValueError("inversion must be 'null_text', 'ddim' or 'none'")
        if not 1 <= loss_steps <= num_steps:
            raise ValueError("loss_steps must be in [1, num_steps]")
        if autocast not in (None, "bfloat16", "float16"):
            raise ValueError("autocast must be None, 'bfloat16' or 'float16'")
        if num_starts < 1:
            raise ValueError("num_starts must be >= 1")
        if injection not in ("auto", "attention", "conditioning"):
            raise ValueError("injection must be 'auto', 'attention' or 'conditioning'")
        if mask_source not in ("auto", "batch", "attention", "none"):
            raise ValueError("mask_source must be 'auto', 'batch', 'attention' or 'none'")
        if isinstance(backbone, str):
            backbone = PixelTrajectory(backbone, num_steps=num_steps, guidance_scale=guidance_scale,
                                       gradient_checkpointing=gradient_checkpointing)
        else:
            if backbone.num_steps != num_steps:
                raise ValueError(f"the backbone was built with {backbone.num_steps} steps, not num_steps={num_steps}")
            backbone.guidance_scale = guidance_scale
            backbone.gradient_checkpointing = gradient_checkpointing
        if not backbone.supports_attention_control:
            if injection == "attention":
                raise ValueError(f"injection='attention' needs a backbone with cross-attention, not {type(backbone).__name__}")
            if mask_source == "attention":
                raise ValueError(f"mask_source='attention' needs a backbone with cross-attention, not {type(backbone).__name__}")
        self.backbone = backbone
        self.injection = ("attention" if backbone.supports_attention_control else "conditioning") if injection == "auto" else injection
        self.mask_source, self.mask_threshold = mask_source, float(mask_threshold)
        self.num_steps, self.guidance_scale, self.outer_steps = num_steps, guidance_scale, outer_steps
        self.lr, self.latent_lr_factor, self.loss_steps = lr, latent_lr_factor, loss_steps
        self.num_cutouts, self.cutout_min_scale, self.noise_sd = num_cutouts, cutout_min_scale, noise_sd
        if objective is None:
            objective = classifier_weight * TargetCE()
            if background_latent_weight:
                objective = objective + background_latent_weight * BackgroundL2("latent")
            if background_pixel_weight:
                objective = objective + background_pixel_weight * BackgroundL2("pixel")
            if l1_weight:
                objective = objective + l1_weight * L1Distance()
            if l2_weight:
                objective = objective + l2_weight * L2Distance()
            if lpips_weight:
                objective = objective + lpips_weight * LPIPSDistance()
        self.objective = objective
        self.inversion, self.num_starts = inversion, int(num_starts)
        self.null_text_steps, self.null_text_lr = null_text_steps, null_text_lr
        self.blend_fractions, self.injection_fractions = tuple(blend_fractions), tuple(injection_fractions)
        self.gradient_checkpointing, self.autocast = gradient_checkpointing, autocast
        self.inner_batch_size = inner_batch_size
        self.prompt, self.class_names = prompt, class_names
        self.last_trace: list[torch.Tensor] = []  # per outer step: augmented loss per sample (diagnostics)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "objective": self.objective.describe(), "backbone": type(self.backbone).__name__,
                "num_steps": self.num_steps, "guidance_scale": self.guidance_scale, "outer_steps": self.outer_steps,
                "lr": self.lr, "latent_lr_factor": self.latent_lr_factor, "loss_steps": self.loss_steps,
                "num_cutouts": self.num_cutouts, "noise_sd": self.noise_sd, "inversion": self.inversion, "num_starts": self.num_starts,
                "blend_fractions": list(self.blend_fractions), "injection_fractions": list(self.injection_fractions),
                "injection": self.injection, "mask_source": self.mask_source, "mask_threshold": self.mask_threshold,
                "gradient_checkpointing": self.gradient_checkpointing, "autocast": self.autocast}

    # --- conditioning ------------------------------------------------------------------
    def _names(self, classifier: nn.Module) -> list[str]:
        names = self.class_names or list(getattr(classifier, "class_names", []))
        if not names:
            raise ValueError("a text backbone needs class names (class_names=... or a classifier with class_names)")
        return names

    def conditions(self, labels: torch.Tensor, classifier: nn.Module) -> torch.Tensor:
        """The conditioning of ``labels``: class embeddings (pixel) or the template prompt's text embedding."""
        bb = self.backbone
        if isinstance(bb, PixelTrajectory):
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
                       inversion: Inversion | None = None, latent_mask: torch.Tensor | None = None,
                       keep_last: int = 1, attention: "_AttentionPlan | None" = None) -> list[torch.Tensor]:
        """Sample from ``z_t`` with per-sample injection/blend step counts; returns the
        x0-predictions of the last ``keep_last`` steps. With ``attention`` (a recorded
        trajectory's maps) the first injection steps get its cross-attention maps and the
        target conditioning; without, they get the source conditioning."""
        bb, n = self.backbone, len(z_t)
        dev = z_t.device
        inj = torch.zeros(n, dtype=torch.long, device=dev) if injection_steps is None else injection_steps
        blend = torch.zeros(n, dtype=torch.long, device=dev) if blend_steps is None else blend_steps
        shape_c = (n,) + (1,) * (cond_src.dim() - 1)
        shape_z = (n,) + (1,) * (z_t.dim() - 1)
        x0s = []
        for i in range(self.num_steps):
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
            eps = bb.eps_cfg(z_t, i, cond, u, control=control)
            z_next, x0 = bb.ddim_step(z_t, eps, i)
            if inversion is not None and latent_mask is not None:
                use = (blend > i).view(shape_z).to(z_next.dtype)
                mixed = latent_mask * z_next + (1 - latent_mask) * inversion.latents[i + 1]
                z_next = use * mixed + (1 - use) * z_next
            if i >= self.num_steps - keep_last:
                x0s.append(x0)
            z_t = z_next
        return x0s

    @torch.no_grad()
    def record_attention(self, inversion: Inversion, cond: torch.Tensor, keep_steps: int) -> AttentionStore:
        """Run the reconstruction trajectory (``cond`` and the inversion's unconditional
        embeddings from its z_T) and record its cross-attention: the maps of the first
        ``keep_steps`` steps and every token's map averaged over all steps."""
        bb, store = self.backbone, AttentionStore()
        z = inversion.latents[0]
        for i in range(self.num_steps):
            rec = AttentionRecorder(len(z), store, i, keep_maps=i < keep_steps, latent_size=z.shape[-1])
            eps = bb.eps_cfg(z, i, cond, inversion.uncond[i], control=rec)
            rec.finish()
            z, _ = bb.ddim_step(z, eps, i)
        return store

    def _loss(self, x0s: list[torch.Tensor], ctx: ObjectiveContext, augmented: bool) -> torch.Tensor:
        k = len(x0s)
        weights = torch.arange(1, k + 1, dtype=torch.float32) / (k * (k + 1) / 2)
        total = 0.0
        views, ctx.views = ctx.views, (ctx.views if augmented else None)
        try:
            for w, x0 in zip(weights.tolist(), x0s):
                images = self.backbone.decode_checkpointed(x0)
                if images.shape[-2:] != ctx.original.shape[-2:]:
                    images = F.interpolate(images, size=ctx.original.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
                ctx.latents = x0
                total = total + w * self.objective(images, ctx)
        finally:
            ctx.views = views
        return total

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

    def invert(self, images: torch.Tensor, cond: torch.Tensor, generators=None) -> tuple[torch.Tensor, Inversion]:
        """(clean latent, inversion) of ``images`` under ``cond``."""
        bb = self.backbone
        with torch.no_grad():
            z0 = bb.encode(images)
        if self.inversion == "null_text":
            return z0, bb.null_text_inversion(z0, cond, self.null_text_steps, self.null_text_lr)
        if self.inversion == "ddim":
            return z0, bb.plain_inversion(z0, cond)
        z_T = per_sample_randn(z0.shape[1:], generators).to(z0)
        u = bb.null_condition(len(z0))
        return z0, Inversion([z_T] + [z0] * self.num_steps, [u] * self.num_steps)

    def _generate(self, batch: VCEBatch, classifier: nn.Module) -> CounterfactualResult:
        bb, n, dev = self.backbone, len(batch), batch.images.device
        clf = classifier
        if self.gradient_checkpointing:
            def clf(x, _c=classifier):  # noqa: E306
                return _checkpoint(_c, x, use_reentrant=False) if torch.is_grad_enabled() else _c(x)
            clf.num_classes = getattr(classifier, "num_classes", None)
        captions_used = None
        if isinstance(bb, PixelTrajectory):
            cond_src = self.conditions(batch.source, classifier)
            cond_tgt = self.conditions(batch.target, classifier)
        else:
            src_prompts, tgt_prompts, captions_used = self.prompts(batch, classifier)
            cond_src, cond_tgt = bb.condition(src_prompts), bb.condition(tgt_prompts)
        z0, inv = self.invert(batch.images, cond_src, batch.generators)
        latent_mask, pixel_mask = None, batch.mask
        if self.mask_source == "batch" and batch.mask is None:
            raise ValueError("mask_source='batch' but the data gives no foreground masks")
        attn_masks = self.inversion != "none" and (self.mask_source == "attention" or (
            self.mask_source == "auto" and batch.mask is None and bb.supports_attention_control))
        if self.mask_source == "none":
            pixel_mask = None
        plan = None
        keep = max((round(j * self.num_steps) for j in self.injection_fractions), default=0)
        if self.inversion != "none" and ((self.injection == "attention" and keep > 0) or attn_masks):
            with self._autocast(dev):  # maps stored in the compute dtype (half the memory under bf16)
                store = self.record_attention(inv, cond_src, keep if self.injection == "attention" else 0)
            ids_src = bb.token_ids(src_prompts).tolist()
            if self.injection == "attention":
                aligned = [token_alignment(a, b) for a, b in zip(ids_src, bb.token_ids(tgt_prompts).tolist())]
                plan = _AttentionPlan(store, torch.stack([m for m, _ in aligned]).to(dev),
                                      torch.stack([o for _, o in aligned]).to(dev))
            if attn_masks:
                names = self._names(classifier)
                tokens = [find_tokens(ids, bb.word_ids(names[int(c)])) for ids, c in zip(ids_src, batch.source)]
                latent_mask = attention_mask(store.token_maps, tokens, self.mask_threshold)
                pixel_mask = F.interpolate(latent_mask, size=batch.images.shape[-2:], mode="nearest")
        if pixel_mask is not None and latent_mask is None and self.inversion != "none":
            latent_mask = F.interpolate(pixel_mask.float(), size=z0.shape[-2:], mode="area")
        ctx = ObjectiveContext(batch.images, batch.source, batch.target, clf, pixel_mask,
                               views=lambda x: cutout_views(x, batch.generators, self.num_cutouts, self.cutout_min_scale, self.noise_sd),
                               original_latents=z0, latent_mask=latent_mask)
        # 1. the search over settings (and random starts), no optimisation, per sample
        blends = [b for b in self.blend_fractions if b == 0 or latent_mask is not None] or [0.0]
        injections = self.injection_fractions or (0.0,)
        if plan is None and torch.equal(cond_src, cond_tgt):
            injections = (0.0,)  # nothing to inject: the settings would repeat one trajectory
        combos = list(itertools.product(blends, injections))
        starts = [inv.latents[0]]
        if self.inversion == "none":
            starts += [per_sample_randn(z0.shape[1:], batch.generators).to(z0) for _ in range(self.num_starts - 1)]
        search_loss = torch.full((n,), float("inf"), device=dev)
        best_loss = torch.full((n,), float("inf"), device=dev)
        inj = torch.zeros(n, dtype=torch.long, device=dev)
        blend = torch.zeros(n, dtype=torch.long, device=dev)
        start = torch.zeros(n, dtype=torch.long, device=dev)
        best_img = batch.images.clone()
        with torch.no_grad(), self._autocast(dev):
            for k, z_start in enumerate(starts):
                for b, j in combos:
                    bs = torch.full((n,), round(b * self.num_steps), dtype=torch.long, device=dev)
                    js = torch.full((n,), round(j * self.num_steps), dtype=torch.long, device=dev)
                    x0s = self.run_trajectory(z_start, cond_src, cond_tgt, inv.uncond, injection_steps=js, blend_steps=bs,
                                              inversion=inv, latent_mask=latent_mask, attention=plan)
                    loss = self._loss(x0s, ctx, augmented=False).float()
                    better = loss < search_loss
                    search_loss = torch.where(better, loss, search_loss)
                    inj, blend = torch.where(better, js, inj), torch.where(better, bs, blend)
                    start = torch.where(better, torch.full_like(start, k), start)
        z_start = torch.stack(starts)[start, torch.arange(n, device=dev)]
        # 2. trajectory optimisation
        z_T = z_start.detach().clone().requires_grad_(True)
        norm0 = z_T.detach().flatten(1).norm(dim=1)
        delta_c = torch.zeros((self.num_steps, *cond_src.shape), device=dev, requires_grad=True)
        delta_u = torch.zeros((self.num_steps, *inv.uncond[0].shape), device=dev, requires_grad=True)
        opt = torch.optim.Adam([{"params": [z_T], "lr": self.lr * self.latent_lr_factor}, {"params": [delta_c, delta_u], "lr": self.lr}])
        failure: list[str | None] = [None] * n
        ok = torch.ones(n, dtype=torch.bool, device=dev)
        self.last_trace = []
        chosen = torch.zeros(n, dtype=torch.long, device=dev)
        for it in range(self.outer_steps + 1):  # iterates 0..outer_steps; 0 is the searched start
            last = it == self.outer_steps
            with torch.set_grad_enabled(not last), self._autocast(dev):
                x0s = self.run_trajectory(z_T, cond_src, cond_tgt, inv.uncond, delta_c, delta_u, inj, blend, inv, latent_mask,
                                          keep_last=1 if last else self.loss_steps, attention=plan)
                with torch.no_grad():  # the un-augmented loss of this iterate decides what is kept
                    clean = self._loss(x0s[-1:], ctx, augmented=False).float()
                better = (clean < best_loss) & ok
                if better.any():
                    best_loss = torch.where(better, clean, best_loss)
                    chosen = torch.where(better, torch.full_like(chosen, it), chosen)
                    best_img[better] = self._image(x0s[-1].detach(), batch.images)[better]
                if last:
                    break
                loss = self._loss(x0s, ctx, augmented=True).float()
                opt.zero_grad()
                loss.sum().backward()
            self.last_trace.append(loss.detach())
            for p in (z_T, delta_c, delta_u):
                if p.grad is None:  # e.g. delta_u when guidance_scale is 1 (no unconditional branch)
                    p.grad = torch.zeros_like(p)
            grads_ok = torch.isfinite(z_T.grad).flatten(1).all(1) & torch.isfinite(delta_c.grad.transpose(0, 1).flatten(1)).all(1) \
                & torch.isfinite(delta_u.grad.transpose(0, 1).flatten(1)).all(1)
            for i in torch.nonzero(~grads_ok & ok).flatten().tolist():
                failure[i] = f"non-finite gradient at outer step {it + 1}"
            ok &= grads_ok
            for p in (z_T, delta_c, delta_u):
                p.grad = torch.nan_to_num(p.grad, 0.0, 0.0, 0.0)
            z_T.grad[~ok] = 0
            delta_c.grad[:, ~ok] = 0
            delta_u.grad[:, ~ok] = 0
            opt.step()
            with torch.no_grad():
                z_T.mul_((norm0 / z_T.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, *([1] * (z_T.dim() - 1))))
        with torch.no_grad():
            p_t = classifier(best_img).softmax(1).gather(1, batch.target[:, None]).squeeze(1)
        diag = {"target_confidence": p_t, "loss": best_loss.detach().cpu(), "best_iterate": chosen.float().cpu(),
                "injection_steps": inj.float().cpu(), "blend_steps": blend.float().cpu(), "start": start.float().cpu(),
                "reconstruction_mse": torch.full((n,), float(inv.reconstruction_error or float("nan")))}
        if latent_mask is not None:
            diag["mask_fraction"] = latent_mask.float().flatten(1).mean(1).cpu()
        if captions_used is not None:
            diag["caption_used"] = captions_used
        return CounterfactualResult(best_img.detach(), diag, failure)

    def _image(self, x0: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        img = self.backbone.decode(x0).float()
        if img.shape[-2:] != like.shape[-2:]:
            img = F.interpolate(img, size=like.shape[-2:], mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        return img
