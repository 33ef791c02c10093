"""The per-step guided sampler shared by classifier guidance, DVCE and their relatives.

Noise the input to a late start step, then run the reverse process; at every
step a guidance gradient g (computed on the x0-prediction, differentiated with
respect to x_t through the denoiser) steers the step:

- ``sampler="adm"`` (guided-diffusion's respaced ancestral sampler, as DVCE
  was published): the posterior mean moves by ``Sigma_t * g`` (Sohl-Dickstein
  conditioning, with the model's learned variance where it has one), x0 is
  not clipped inside the step, and the result is the last step's
  x0-prediction;
- ``ddim``/``ddpm`` (diffusers' schedulers): the noise prediction is shifted,
  ``eps' = eps - sqrt(1 - abar_t) * g`` (Dhariwal & Nichol, 2021), and the
  result is the final sample.

Subclasses implement :meth:`PerStepGuidance.guidance` (the ascent direction at a
step) and, when they need to, :meth:`PerStepGuidance.post_step` (anything done
to the new sample: masks, blending, resampling). Both receive a :class:`Step`
record; ``step.state`` is a dict that lives for one ``generate`` call (its
``"diagnostics"`` entry, a dict of per-sample tensors, joins the result's).
"""

from __future__ import annotations

import dataclasses

import torch

from ..rngs import per_sample_randn
from ..diffusion import Diffusion, PixelDiffusion
from .base import CounterfactualResult, VCEBatch, VCEMethod


@dataclasses.dataclass
class Step:
    """One reverse step, as the hooks see it.

    ``index``: 0 for the first guided step; ``t`` / ``next_t``: the sampler's
    timestep of this step and of the next (``None`` at the last step; respaced
    indices for the ``adm`` sampler); ``x_t``: the noisy input of the step (model
    space, detached); ``x0``: the step's x0-prediction as an image in [0, 1]
    (detached); ``alpha_bar``: the cumulative alpha at ``t``; ``num_steps``: steps
    in the run; ``state``: a dict shared by every step of one ``generate`` call.
    """

    index: int
    t: int
    next_t: int | None
    x_t: torch.Tensor
    x0: torch.Tensor
    alpha_bar: torch.Tensor
    num_steps: int
    state: dict

    @property
    def last(self) -> bool:
        return self.next_t is None


def vjp(output: torch.Tensor, inputs: torch.Tensor, v: torch.Tensor, retain_graph: bool = True) -> torch.Tensor:
    """``v^T d output / d inputs`` (zeros where the graph does not connect)."""
    (g,) = torch.autograd.grad(output, inputs, grad_outputs=v, retain_graph=retain_graph, allow_unused=True)
    return torch.zeros_like(inputs) if g is None else g


class PerStepGuidance(VCEMethod):
    """Base for per-step guidance on the x0-prediction.

    Args:
        diffusion: a :class:`~lit_vce.diffusion.Diffusion` or the pixel model spec
            :class:`~lit_vce.diffusion.PixelDiffusion` loads (default: the world's ``ddpm``).
        sampler: ``"ddim"`` (deterministic), ``"ddpm"`` (diffusers' ancestral) or
            ``"adm"`` (guided-diffusion's respaced ancestral sampler with mean-shift
            guidance; see the module docstring), when ``diffusion`` is a spec.
        num_steps: respaced steps over the whole noise range.
        clip_sample: clip the x0-prediction to [-1, 1] inside every step (when
            ``diffusion`` is a spec; a built model keeps its own setting).
        output: ``"x0"`` (the last step's x0-prediction, as DVCE returns),
            ``"sample"`` (the final sample) or ``"auto"`` (x0 for the ``adm``
            sampler, the sample for the others).
        skip: fraction of those steps skipped at the noisy end (late start):
            the input is noised to the first step after the skipped ones.
        conditioning: ``"none"`` (unconditional / null class), ``"target"``
            (class-conditional on the target, with ``cfg_scale``) or ``"source"``
            (on the source class: the prior holds the original's class while
            the classifier's gradient moves what the classifier reads; not a
            published setting of any method, see the shortcut findings).
        cfg_scale: classifier-free guidance scale when conditioning on a class.
        through_unet: differentiate the x0 gradient through the denoiser
            (exact); ``False`` uses the x0 gradient directly (cheaper).
        inner_batch_size: split each batch into chunks of this size (memory knob;
            outputs do not change).
        noise_offset: noise the input this many sampler steps above the first guided
            step (0: at it). DiME's and FastDiME's code noise to ``start_step`` and
            guide from ``start_step - 1``: their classes default to 1.
    """

    name = "per_step_guidance"
    supports_concurrency = True
    region_mode = "compose"
    #: ``adm`` sampler: draw the ancestral noise of each step (``False``: the guided posterior
    #: mean is the next sample, as MaskDiME's code steps inside its mask)
    ancestral_noise = True

    def __init__(
        self,
        diffusion: Diffusion | str = "world",
        sampler: str = "ddim",
        num_steps: int = 50,
        skip: float = 0.5,
        conditioning: str = "none",
        cfg_scale: float = 1.0,
        through_unet: bool = True,
        inner_batch_size: int | None = None,
        clip_sample: bool = True,
        output: str = "auto",
        noise_offset: int = 0,
    ):
        super().__init__()
        if output not in ("auto", "x0", "sample"):
            raise ValueError("output must be 'auto', 'x0' or 'sample'")
        if not 0 <= skip < 1:
            raise ValueError("skip must be in [0, 1)")
        if conditioning not in ("none", "target", "source"):
            raise ValueError("conditioning must be 'none', 'target' or 'source'")
        if num_steps < 1:
            raise ValueError("num_steps must be >= 1")
        if isinstance(diffusion, str):
            diffusion = PixelDiffusion(diffusion, sampler=sampler, num_steps=num_steps, clip_sample=clip_sample)
        self.diffusion = diffusion
        # what the sampler really runs (a built model keeps its own settings): recorded as such
        self.sampler, self.num_steps, self.clip_sample = diffusion.sampler, diffusion.num_steps, diffusion.clip_sample
        self.skip, self.conditioning, self.cfg_scale = skip, conditioning, cfg_scale
        self.through_unet, self.inner_batch_size = through_unet, inner_batch_size
        self.output = ("x0" if diffusion.sampler == "adm" else "sample") if output == "auto" else output
        if not 0 <= int(noise_offset) <= self.start_index():
            raise ValueError(
                f"noise_offset must be in [0, {self.start_index()}] (the steps skipped above the first guided one)"
            )
        self.noise_offset = int(noise_offset)

    @classmethod
    def test_kwargs(cls) -> dict:
        return {"num_steps": 10}

    # --- the method-specific part --------------------------------------------
    def guidance(
        self, x0: torch.Tensor, batch: VCEBatch, classifier, eps: torch.Tensor, to_xt, step: Step
    ) -> torch.Tensor:
        """The ascent direction on x_t (same shape as ``x0``).

        ``x0`` is the x0-prediction as an image in [0, 1] (part of the autograd
        graph); ``to_xt(v)`` maps an image-space gradient to x_t (a VJP through
        the denoiser, or the identity scaled to model space); ``eps`` the noise
        prediction (detached); ``step`` the :class:`Step` record.
        """
        raise NotImplementedError

    def post_step(self, x_t: torch.Tensor, step: Step, batch: VCEBatch, state: dict) -> torch.Tensor:
        """The new sample after a reverse step (model space): return it changed or not.

        Masks, blending the noised original back, RePaint-style resampling go
        here. ``state`` is ``step.state``. The default keeps ``x_t``.
        """
        return x_t

    def encode_start(self, batch: VCEBatch) -> torch.Tensor:
        """The images in the model's space before they are noised (the autoencoder's
        posterior mean for latent models); methods whose code samples it override this."""
        return self.diffusion.encode(batch.images)

    # --- the sampler -----------------------------------------------------------
    def start_index(self) -> int:
        n = len(self.diffusion.timesteps)
        return min(int(round(self.skip * n)), n - 1)

    def _conditions(self, batch: VCEBatch):
        """(cond, uncond) of the model calls: the null input, or the target (source) with CFG."""
        d, n = self.diffusion, len(batch)
        if self.conditioning == "none":
            return (d.null_condition(n) if d.has_null_condition else None), None
        cond = d.condition(batch.source if self.conditioning == "source" else batch.target)
        return cond, (d.null_condition(n) if self.cfg_scale != 1.0 else None)

    def counterfactuals(self, batch: VCEBatch, classifier) -> CounterfactualResult:
        """The guided reverse process from the noised batch (at the model's resolution)."""
        d = self.diffusion
        n = len(batch)
        steps = d.timesteps[self.start_index() :]
        t_noise = d.timesteps[self.start_index() - self.noise_offset]  # DiME's code: one step above the first guided
        z0 = self.encode_start(batch)
        x_t = d.add_noise(z0, per_sample_randn(z0.shape[1:], batch.rngs).to(z0), int(t_noise))
        conds = self._conditions(batch)
        failure: list[str | None] = [None] * n
        ok = torch.ones(n, dtype=torch.bool, device=x_t.device)
        state: dict = {}
        from ..progress import steps as bar

        for k, t in enumerate(bar(steps, f"{self.name} steps", n)):
            t = int(t)
            step = Step(
                k,
                t,
                int(steps[k + 1]) if k + 1 < len(steps) else None,
                x_t.detach(),
                None,
                d.alpha_bar(t),
                len(steps),
                state,
            )
            out, grad = self._guided_step(step, batch, classifier, conds)
            finite = torch.isfinite(grad).flatten(1).all(1)
            for i in torch.nonzero(~finite & ok).flatten().tolist():
                failure[i] = f"non-finite guidance gradient at t={t}"
            ok &= finite
            grad = torch.where(ok.view(-1, 1, 1, 1), torch.nan_to_num(grad, 0.0, 0.0, 0.0), torch.zeros_like(grad))
            if d.sampler == "adm":  # mean shift by variance * gradient
                mean = d.condition_mean(out, grad)
                x_t = (d.p_sample(mean, out["log_variance"], t, batch.rngs) if self.ancestral_noise else mean).detach()
            else:  # noise-prediction shift
                eps_g = out["eps"] - (1 - d.alpha_bar(t)).sqrt().to(out["eps"]) * grad
                x_t = d.step(eps_g, t, x_t.detach(), batch.rngs)[0].detach()
            x_t = self.post_step(x_t, step, batch, state).detach()
            if batch.region is not None:  # outside the region: the original, noised to the new sample's level
                x_t = self._region_step(x_t, z0, step, batch)
        if self.output == "x0":  # the last step's x0-prediction (model space)
            x_t = out["pred_xstart"] if "pred_xstart" in out else d.encode(step.x0)
        diag = {"steps": torch.full((n,), len(steps), dtype=torch.float32), **state.get("diagnostics", {})}
        return CounterfactualResult(d.decode(x_t).detach(), diag, failure)

    def _region_step(self, x_t: torch.Tensor, z0: torch.Tensor, step: Step, batch: VCEBatch) -> torch.Tensor:
        """``x_t`` inside the region, the original noised to the next step's level (itself after
        the last step) outside it (the noise drawn from the samples' generators)."""
        from ..regions import compose

        if step.last:
            return compose(x_t, z0, batch.region)
        noise = per_sample_randn(z0.shape[1:], batch.rngs).to(z0)
        return compose(x_t, self.diffusion.add_noise(z0, noise, step.next_t), batch.region)

    def _guided_step(self, step: Step, batch: VCEBatch, classifier, conds) -> tuple[dict, torch.Tensor]:
        """The model's prediction at ``step`` (a dict with ``eps``, and for ``adm`` the mean and
        variance) and the guidance g; fills in ``step.x0``."""
        d, t = self.diffusion, step.t
        with torch.enable_grad():
            # without the VJP through the denoiser (DiME, FastDiME) no graph through it is built:
            # one evaluation's activations per image, never used, were held until the step ended
            xt = step.x_t.detach().requires_grad_(self.through_unet)
            model_out = d.model_output(xt, t, conds[0], conds[1], self.cfg_scale)
            if d.sampler == "adm":
                out = d.p_mean_variance(model_out, xt, t)
                x0 = out["pred_xstart"]
            else:
                out = {"eps": model_out[:, : xt.shape[1]]}
                x0 = d.x0(xt, out["eps"], t)
            img0 = d.x0_image(x0)
            eps = out["eps"].detach()
            if not self.through_unet and not isinstance(d, PixelDiffusion):
                raise ValueError("through_unet=False (the x0 gradient applied directly) needs a pixel diffusion model")

            def to_xt(v, _img0=img0, _xt=xt):
                return vjp(_img0, _xt, v) if self.through_unet else v * 0.5 / d.alpha_bar(t).sqrt().to(v)

            step.x0 = img0.detach()
            grad = self.guidance(
                img0 if self.through_unet else img0.detach().requires_grad_(True), batch, classifier, eps, to_xt, step
            )
        return {k: v.detach() for k, v in out.items()}, grad
