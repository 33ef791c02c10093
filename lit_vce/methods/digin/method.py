"""The DiG-IN method: its constructor, conditioning, inversion and the phases of one call
(condition, invert, prepare the edit, search, optimise, select). The phases live in the
mixins of ``edit.py``, ``trajectory.py``, ``optimise.py`` and ``memory.py``."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ...diffusion import Diffusion, Inversion
from ...diffusion.masks import SamRefiner
from ...objectives import Objective, ObjectiveContext
from ...registry import METHODS
from ...rngs import per_sample_randn
from ..base import CounterfactualResult, VCEBatch, VCEMethod
from .build import _prepare_diffusion, default_objective  # noqa: F401  (default_objective: imported from here)
from .cache import InversionCache
from .conditioning import ConditioningMixin
from .edit import EditMixin
from .memory import MemoryMixin, checkpointed
from .optimise import OptimiseMixin
from .settings import (
    FLAT_NAMES,
    RETIRED,
    InversionSettings,
    LossSettings,
    MaskSettings,
    MemorySettings,
    OptimisationSettings,
    SearchSettings,
    flat_settings,
    resolve,
)
from .trajectory import TrajectoryMixin
from .views import copy_generator


@METHODS.register("digin")
class DiGIN(ConditioningMixin, EditMixin, TrajectoryMixin, OptimiseMixin, MemoryMixin, VCEMethod):
    """DiG-IN VCEs of real images (Augustin et al., CVPR 2024).

    Invert the image (null-text inversion), switch the conditioning to the target while the
    first steps keep the original's layout and background, then optimise the initial latent
    and one delta per step on the conditional and unconditional embeddings (Adam) against the
    classifier-derived loss on the last x0-predictions, with gradients through every UNet call
    and the decoder; return each sample's best iterate. See the package docstring.

    Args:
        diffusion: a :class:`~lit_vce.diffusion.Diffusion` with the ``ddim`` sampler, or a
            pixel model spec (``"world"``, a ``UNet2DModel`` folder; class-conditional
            with a null class). Stable Diffusion: a :class:`~lit_vce.diffusion.LatentDiffusion`
            (prompts from ``prompt`` and ``class_names``).
        num_steps, guidance_scale: DDIM steps and CFG scale (published: 20, 3.0).
        inversion: :class:`~lit_vce.methods.digin.settings.InversionSettings` (null-text
            inversion, random starts, the inversion cache).
        search: :class:`~lit_vce.methods.digin.settings.SearchSettings` (the blend and
            injection settings tried before optimising).
        masks: :class:`~lit_vce.methods.digin.settings.MaskSettings` (foreground masks).
        optimisation: :class:`~lit_vce.methods.digin.settings.OptimisationSettings` (Adam,
            loss steps, the classifier's views).
        loss: :class:`~lit_vce.methods.digin.settings.LossSettings` (the default objective's weights).
        memory: :class:`~lit_vce.methods.digin.settings.MemorySettings` (checkpointing,
            mixed precision, chunking).
        objective: a custom :class:`Objective` (replaces the weighted terms of ``loss``).
        prompt: the caption template of text-conditioned models (``{}`` = the class name). When
            the data gives captions, the source class name in each caption is replaced by
            the target's (whole word, any case); a caption that does not name the source
            class falls back to the template (diagnostic ``caption_used`` = 0).
        class_names: class names for prompts (default: the classifier's).
        **flat: the flat names of earlier releases (``outer_steps=10``, ``inversion="ddim"``, ...;
            :data:`~lit_vce.methods.digin.settings.FLAT_NAMES`), deprecated, for one release.
    """

    #: the loss compares decoded images with the original at the batch's resolution
    resolution = "input"
    #: a region is the foreground mask of the loss's background terms (soft: change outside is reported)
    region_mode = "penalty"
    retired_settings = RETIRED
    setting_aliases = {flat: f"{group}.{field}" for flat, (group, field) in FLAT_NAMES.items()}

    def __init__(
        self,
        diffusion: Diffusion | str = "world",
        num_steps: int = 20,
        guidance_scale: float = 3.0,
        inversion: InversionSettings = InversionSettings(),  # copied, never changed: a shared default is safe
        search: SearchSettings = SearchSettings(),
        masks: MaskSettings = MaskSettings(),
        optimisation: OptimisationSettings = OptimisationSettings(),
        loss: LossSettings = LossSettings(),
        memory: MemorySettings = MemorySettings(),
        objective: Objective | None = None,
        prompt: str = "a photograph of a {}",
        class_names: list[str] | None = None,
        **flat,
    ):
        super().__init__()
        if isinstance(inversion, str):  # the flat name of earlier releases
            flat, inversion = {"inversion": inversion, **flat}, None
        groups = resolve(
            {
                "inversion": inversion,
                "search": search,
                "masks": masks,
                "optimisation": optimisation,
                "loss": loss,
                "memory": memory,
            },
            flat,
        )
        self.inversion, self.search, self.masks = groups["inversion"], groups["search"], groups["masks"]
        self.optimisation, self.loss, self.memory = groups["optimisation"], groups["loss"], groups["memory"]
        if not 1 <= self.optimisation.loss_steps <= num_steps:
            raise ValueError("loss_steps must be in [1, num_steps]")
        self.diffusion = diffusion = _prepare_diffusion(
            diffusion,
            num_steps,
            guidance_scale,
            self.memory.gradient_checkpointing is True,
            self.search.injection,
            self.masks.source,
        )
        if self.search.injection == "auto":
            self.search.injection = "attention" if diffusion.supports_attention_control else "conditioning"
        self.sam = (
            SamRefiner(self.masks.sam_model, self.masks.sam_points, self.masks.sam_threshold)
            if self.masks.sam_model
            else None
        )
        self.num_steps, self.guidance_scale = num_steps, guidance_scale
        self.objective = objective if objective is not None else default_objective(**dataclasses.asdict(self.loss))
        self.inner_batch_size = self.memory.inner_batch_size
        self._activation_bytes: dict[tuple, tuple[int, int]] = {}  # batch shape -> (UNet call, loss) bytes
        self._cache: InversionCache | None = None  # inversion.cache's folder, with its hit and miss counts
        self.prompt, self.class_names = prompt, class_names
        self.last_trace: list[torch.Tensor] = []  # per outer step: augmented loss per sample (diagnostics)

    @classmethod
    def test_kwargs(cls) -> dict:
        return {
            "num_steps": 5,
            "optimisation": OptimisationSettings(outer_steps=2, num_cutouts=2),
            "inversion": InversionSettings(null_text_steps=2),
        }

    def describe(self) -> dict:
        """The settings under the flat names results have always recorded (so earlier runs'
        results and resume fingerprints compare), the diffusion model and the objective."""
        from ...provenance import describe_value

        groups = {
            "inversion": self.inversion,
            "search": self.search,
            "masks": self.masks,
            "optimisation": self.optimisation,
            "loss": self.loss,
            "memory": self.memory,
        }
        flat = flat_settings(groups)
        flat["inner_batch_size"] = self.inner_batch_size
        return {
            "name": self.name,
            "diffusion": describe_value(self.diffusion),
            "num_steps": self.num_steps,
            "guidance_scale": self.guidance_scale,
            "objective": describe_value(self.objective),
            "prompt": self.prompt,
            "class_names": describe_value(self.class_names),
            **{k: describe_value(v) for k, v in flat.items()},
        }

    # --- inversion -------------------------------------------------------------------------
    def invert(
        self,
        images: torch.Tensor,
        cond: torch.Tensor,
        rngs=None,
        mask: torch.Tensor | None = None,
        sources: list[str] | None = None,
    ) -> tuple[torch.Tensor, Inversion]:
        """(clean latent, inversion) of ``images`` under ``cond`` (``mask``: the batch's
        foreground masks, which decide what the edit records). With ``inversion.cache`` and
        ``sources`` (one source key per image: its class or source prompt), each image's
        inversion is read from the cache when stored there, else computed and stored."""
        bb, inv_s = self.diffusion, self.inversion
        with torch.no_grad():
            z0 = bb.encode(images)
        if inv_s.method == "none":
            z_T = per_sample_randn(z0.shape[1:], rngs).to(z0)
            u = bb.null_condition(len(z0))
            return z0, Inversion([z_T] + [z0] * self.num_steps, [u] * self.num_steps)
        if inv_s.cache is None or sources is None:
            return z0, self._invert(z0, cond, mask)
        if self._cache is None or self._cache.folder != InversionCache(inv_s.cache).folder:
            self._cache = InversionCache(inv_s.cache)
        cache = self._cache
        settings = {
            "method": inv_s.method,
            "null_text_steps": inv_s.null_text_steps,
            "null_text_lr": inv_s.null_text_lr,
            "num_steps": self.num_steps,
            "guidance_scale": self.guidance_scale,
            "diffusion": self.describe()["diffusion"],
        }
        keys = [cache.key(images[i], sources[i], settings) for i in range(len(images))]
        found = [cache.load(k, z0.device) for k in keys]
        first: dict[str, int] = {}  # one inversion per distinct (image, source) of the batch
        for i, f in enumerate(found):
            if f is None:
                first.setdefault(keys[i], i)
        reps = list(first.values())
        if reps:
            sub = self._invert(z0[reps], cond[reps], None if mask is None else mask[reps])
            for j, i in enumerate(reps):
                cache.save(keys[i], sub.select([j]))
            if len(reps) == len(images):
                return z0, sub  # every sample inverted here: the inversion keeps what it recorded
            computed = {keys[i]: sub.select([j]) for j, i in enumerate(reps)}
            found = [f if f is not None else computed[keys[i]] for i, f in enumerate(found)]
        return z0, Inversion.concat(found, list(range(len(images))))

    def _invert(self, z0: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None) -> Inversion:
        bb, inv_s = self.diffusion, self.inversion
        if inv_s.method == "ddim":
            return bb.plain_inversion(z0, cond)
        # the inversion's own last pass is the reconstruction trajectory: record there what
        # the edit needs (attention maps), so prepare_edit need not run it again
        store, control = self.recorder(len(z0), mask)
        inv = bb.null_text_inversion(
            z0,
            cond,
            inv_s.null_text_steps,
            inv_s.null_text_lr,
            checkpoint=False,
            reuse_conditional=True,
            control=control,
        )
        inv.store = store
        return inv

    # --- one call --------------------------------------------------------------------------
    def counterfactuals(self, batch: VCEBatch, classifier: nn.Module) -> CounterfactualResult:
        """The phases: condition, invert, prepare the edit, search, optimise, select."""
        cond_src, cond_tgt, prompts, captions_used = self._conditioning(batch, classifier)
        sources = prompts[0] if prompts is not None else [f"class:{int(c)}" for c in batch.source]
        z0, inv = self.invert(batch.images, cond_src, batch.rngs, batch.mask, sources)
        edit = self.prepare_edit(batch, classifier, inv, cond_src, prompts)
        ctx = ObjectiveContext(
            batch.images,
            batch.source,
            batch.target,
            classifier,
            edit.pixel_mask,
            views=self._views(batch, classifier),
            original_latents=z0,
            latent_mask=edit.latent_mask,
        )
        start = self.search_start(batch, inv, cond_src, cond_tgt, edit, ctx)
        probe = dataclasses.replace(ctx, views=self._views(batch, classifier, [copy_generator(g) for g in batch.rngs]))
        plan = self.checkpoint_plan(start.z_start, cond_tgt, inv.uncond, probe, classifier)
        ctx.classifier = checkpointed(classifier, plan[1])
        best = self.optimise(batch, inv, cond_src, cond_tgt, edit, ctx, start, plan)
        n = len(batch)
        errors = (
            inv.errors if inv.errors is not None else torch.full((n,), float(inv.reconstruction_error or float("nan")))
        )
        diag = {
            "loss": best.loss.detach().cpu(),
            "best_iterate": best.iterate.float().cpu(),
            "injection_steps": start.injection.float().cpu(),
            "blend_steps": start.blend.float().cpu(),
            "start": start.start.float().cpu(),
            "reconstruction_mse": errors.float().cpu(),
            "checkpointed_unet_calls": torch.full((n,), float(self.num_steps if plan[0] is None else plan[0])),
        }
        if edit.latent_mask is not None:
            diag["mask_fraction"] = edit.latent_mask.float().flatten(1).mean(1).cpu()
        if captions_used is not None:
            diag["caption_used"] = captions_used
        return CounterfactualResult(best.images.detach(), diag, best.failure)
