"""What DiG-IN's edit keeps from the original: the reconstruction trajectory (blending
templates), the cross-attention plan of text-conditioned models (prompt-to-prompt) and the
foreground masks (given with the data, or from the class word's attention maps)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...diffusion import Inversion
from ...diffusion.attention import AttentionInjection, AttentionRecorder, AttentionStore, find_tokens, token_alignment
from ...diffusion.masks import attention_foreground, latent_mask_from_pixels, postprocess_mask
from ..base import VCEBatch
from .views import fraction_steps


@dataclass
class Edit:
    """The reconstruction's latents at each step's input (blending templates), the attention
    plan (text-conditioned models), the foreground masks, and the clean latent pasted outside
    the mask (``masks.paste_outside``)."""

    templates: list[torch.Tensor] | None
    plan: AttentionPlan | None
    pixel_mask: torch.Tensor | None
    latent_mask: torch.Tensor | None
    paste: torch.Tensor | None = None


class AttentionPlan:
    """The recorded maps of a batch and each sample's source->target token alignment."""

    def __init__(self, store: AttentionStore, mapper: torch.Tensor, own: torch.Tensor):
        self.store, self.mapper, self.own = store, mapper, own

    def injection(self, step: int, active: torch.Tensor) -> AttentionInjection:
        if step >= len(self.store.maps):
            raise RuntimeError(
                f"attention maps were recorded for {len(self.store.maps)} steps, step {step} needs injection"
            )
        return AttentionInjection(self.store.maps[step], self.mapper, self.own, active)


class EditMixin:
    """:class:`~lit_vce.methods.digin.DiGIN`'s edit preparation (a mixin of the method)."""

    def recording(self, mask: torch.Tensor | None) -> tuple[int, bool]:
        """(steps whose attention maps the edit injects, whether it records token maps for
        masks) on a model with cross-attention, for a batch with foreground ``mask`` or none."""
        bb = self.diffusion
        real = self.inversion.method != "none"
        attn_masks = real and (
            self.masks.source == "attention"
            or (self.masks.source == "auto" and mask is None and bb.supports_attention_control)
        )
        keep = max((fraction_steps(j, self.num_steps) for j in self.search.injection_fractions), default=0)
        inject = real and self.search.injection == "attention" and keep > 0
        return (keep if inject else 0), attn_masks

    def recorder(self, n: int, mask: torch.Tensor | None):
        """``(store, control)``: where the inversion's reconstruction pass records what the
        edit needs (``control(i)`` for step i; ``None`` when nothing is recorded)."""
        keep, tokens = self.recording(mask)
        if not (self.diffusion.supports_attention_control and (keep > 0 or tokens)):
            return None, None
        store, last = AttentionStore(), self.num_steps - 1

        def control(i):
            first_half = last == 0 or 1 - i / last >= 0.5
            return AttentionRecorder(n, store, i, keep_maps=i < keep, record_tokens=tokens and first_half)

        return store, control

    @torch.no_grad()
    def reconstruct(
        self, inversion: Inversion, cond: torch.Tensor, keep_steps: int = 0, record_tokens: bool = False
    ) -> tuple[list[torch.Tensor], AttentionStore | None]:
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
                rec = AttentionRecorder(
                    len(z), store, i, keep_maps=i < keep_steps, record_tokens=record_tokens and in_first_half
                )
            t = bb.timesteps[i]
            z, _ = bb.step(bb.eps(z, t, cond, inversion.uncond[i], control=rec), t, z)
        return latents, store

    def prepare_edit(
        self,
        batch: VCEBatch,
        classifier: nn.Module,
        inv: Inversion,
        cond_src: torch.Tensor,
        prompts: tuple[list[str], list[str]] | None,
    ) -> Edit:
        """The reconstruction's blending templates, the attention plan and the foreground masks."""
        bb, dev = self.diffusion, batch.images.device
        if self.masks.source == "batch" and batch.mask is None:
            raise ValueError("mask_source='batch' but the data gives no foreground masks")
        real = self.inversion.method != "none"
        pixel_mask = None if self.masks.source == "none" else batch.mask
        keep, attn_masks = self.recording(batch.mask)
        inject = keep > 0
        templates = store = None
        if real and (inject or attn_masks or any(b > 0 for b in self.search.blend_fractions)):
            recorded = inv.store is not None or not bb.supports_attention_control or not (inject or attn_masks)
            if inv.trajectory is not None and recorded:
                templates, store = inv.trajectory, inv.store  # recorded while inverting
            else:  # an inversion from the cache, or one that did not record: run the trajectory again
                with self.autocast_context(dev):  # maps stored in the compute dtype (half the memory under bf16)
                    templates, store = self.reconstruct(inv, cond_src, keep, record_tokens=attn_masks)
        plan = None
        if inject:
            aligned = [
                token_alignment(a, b)
                for a, b in zip(bb.token_ids(prompts[0]).tolist(), bb.token_ids(prompts[1]).tolist())
            ]
            plan = AttentionPlan(
                store, torch.stack([m for m, _ in aligned]).to(dev), torch.stack([o for _, o in aligned]).to(dev)
            )
        if attn_masks:
            pixel_mask = self.attention_masks(store, batch, classifier, prompts[0], inv.latents[0].shape[-1])
        if batch.region is not None:  # --data.regions: the region is the edit's foreground (background terms outside)
            pixel_mask = batch.region
        latent_mask = None
        if pixel_mask is not None and real:
            latent_mask = latent_mask_from_pixels(pixel_mask, inv.latents[0].shape[-1])
        paste = inv.latents[-1] if (self.masks.paste_outside and latent_mask is not None) else None
        return Edit(templates, plan, pixel_mask, latent_mask, paste)

    def attention_masks(
        self, store: AttentionStore, batch: VCEBatch, classifier: nn.Module, src_prompts: list[str], latent_size: int
    ) -> torch.Tensor:
        """Soft foreground masks (n, 1, H, W) from the source class word's cross-attention
        (:mod:`lit_vce.diffusion.masks`), optionally refined by SAM, post-processed."""
        bb, names = self.diffusion, self.class_names_for(classifier)
        ids_src = bb.token_ids(src_prompts).tolist()
        tokens = [find_tokens(ids, bb.word_ids(names[int(c)])) for ids, c in zip(ids_src, batch.source)]
        maps = store.token_maps(max(1, latent_size // 4))  # 16x16 for Stable Diffusion at 512 px
        mask = attention_foreground(maps, tokens, batch.images.shape[-1], self.masks.threshold)
        if self.sam is not None:
            mask = self.sam(batch.images, mask, batch.rngs)
        if self.masks.postprocessing is not None:
            mask = postprocess_mask(mask, *self.masks.postprocessing)
        return mask
