"""The one diffusion interface every method uses.

A :class:`Diffusion` is a noise-prediction model plus a sampler over a fixed
schedule of ``num_steps`` timesteps. Subclasses provide the model parts
(:meth:`encode`/:meth:`decode` between images in [0, 1] and the model's space,
:meth:`condition`/:meth:`null_condition`, and ``_forward``); everything else is
written once here:

- :meth:`model_output` / :meth:`eps`: the model call at a timestep, with
  classifier-free guidance ``uncond + s * (cond - uncond)`` in one batched call
  (the conditional half first), optional gradient checkpointing and an
  attention control for models with cross-attention;
- :meth:`x0` (the x0-prediction), :meth:`add_noise`, :meth:`alpha_bar`;
- :meth:`step`: one reverse step, by diffusers' ``DDIMScheduler`` (``ddim``,
  eta 0, differentiable) or ``DDPMScheduler`` (``ddpm``), or guided-diffusion's
  respaced ancestral sampler (``adm``,
  :class:`~lit_vce.diffusion.gaussian.RespacedDiffusion`, with
  :meth:`p_mean_variance`, :meth:`condition_mean` and :meth:`p_sample` for
  mean-shift guidance);
- :meth:`invert`, :meth:`null_text_inversion` and :meth:`plain_inversion`, which
  delegate to :mod:`lit_vce.diffusion.inversion` (usable by any method).

Timesteps are the sampler's own values (``timesteps``: noisiest first; diffusers'
training steps for ``ddim``/``ddpm``, respaced indices for ``adm``). All
randomness comes from per-sample ``rngs`` (:mod:`lit_vce.rngs`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..imageops import resize_to  # noqa: F401  (imported from here by the models)
from ..provenance import RecordsInitArgs
from ..rngs import per_sample_randn
from .inversion import Inversion

SAMPLERS = ("ddim", "ddpm", "adm")


def betas_from_config(config: dict) -> torch.Tensor:
    """The training betas (float64) of a diffusers scheduler config."""
    from .gaussian import named_betas

    n = int(config.get("num_train_timesteps", 1000))
    kind = config.get("beta_schedule", "linear")
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    if kind == "linear":
        return torch.linspace(start, end, n, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    return named_betas(kind, n)


def _diffusers_config(config: dict, clip_sample: bool) -> dict:
    """The schedule config for diffusers' DDIM/DDPM/DDIM-inverse schedulers: the final
    alpha is ``alphas_cumprod[0]`` and the steps are offset by one, as DDIM, DiG-IN and
    Stable Diffusion sample."""
    return {**config, "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": clip_sample}


class Diffusion(nn.Module, RecordsInitArgs):
    """Base of every diffusion model (pixel, latent, ADM): see the module docstring.

    Args:
        scheduler_config: the training noise schedule (a diffusers scheduler config;
            eps prediction).
        sampler: ``"ddim"`` (deterministic, eta 0), ``"ddpm"`` (diffusers'
            ancestral) or ``"adm"`` (guided-diffusion's respaced ancestral sampler
            with the model's learned variance, or the posterior variance for
            models without variance channels).
        num_steps: the respaced number of steps over the full noise range.
        guidance_scale: the default classifier-free guidance scale.
        clip_sample: clip x0-predictions to [-1, 1] inside every step.
        gradient_checkpointing: checkpoint every model call (and
            :meth:`decode_checkpointed`) when gradients are on.
        learned_variance: the model outputs 2C channels (eps and the variance
            interpolation of guided-diffusion).
    """

    #: whether :meth:`model_output` accepts an attention control (text models with cross-attention)
    supports_attention_control = False
    #: whether :meth:`condition` takes prompts (else class labels)
    text_conditioned = False

    def __init__(
        self,
        scheduler_config: dict,
        sampler: str = "ddim",
        num_steps: int = 50,
        guidance_scale: float = 1.0,
        clip_sample: bool = False,
        gradient_checkpointing: bool = False,
        learned_variance: bool = False,
    ):
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if int(num_steps) < 1:
            raise ValueError("num_steps must be >= 1")
        cfg = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
        if cfg.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(
                f"only eps-prediction models are supported, this schedule has prediction_type="
                f"{cfg['prediction_type']!r}"
            )
        self.scheduler_config = cfg
        self.sampler, self.num_steps = sampler, int(num_steps)
        self.guidance_scale, self.clip_sample = float(guidance_scale), bool(clip_sample)
        self.gradient_checkpointing, self.learned_variance = bool(gradient_checkpointing), bool(learned_variance)
        self.respaced = self.scheduler = None
        if sampler == "adm":
            from .gaussian import RespacedDiffusion

            self.respaced = RespacedDiffusion(
                betas_from_config(cfg), str(self.num_steps), "learned_range" if learned_variance else "fixed_small"
            )
        else:
            from diffusers import DDIMScheduler, DDPMScheduler

            if sampler == "ddim":  # from_config ignores keys of other scheduler classes (variance_type)
                self.scheduler = DDIMScheduler.from_config(_diffusers_config(cfg, self.clip_sample))
            else:
                self.scheduler = DDPMScheduler.from_config(
                    {**cfg, "clip_sample": self.clip_sample, "variance_type": "fixed_small"}
                )
            self.scheduler.set_timesteps(self.num_steps)
        self._inverse = None

    # --- model parts (subclasses) ------------------------------------------------------
    @property
    def image_size(self) -> int:
        raise NotImplementedError

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (resized to :attr:`image_size`) -> the model's space."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The model's space -> images in [0, 1]."""
        raise NotImplementedError

    def x0_image(self, x0: torch.Tensor) -> torch.Tensor:
        """An x0-prediction as the image guidance differentiates (not clamped, so gradients
        reach values outside [0, 1]); :meth:`decode` clamps."""
        raise NotImplementedError

    def condition(self, what) -> torch.Tensor | None:
        """The model's conditioning input for ``what`` (class labels, or prompts for text models)."""
        raise NotImplementedError

    def null_condition(self, n: int) -> torch.Tensor:
        """The unconditional input of ``n`` samples (classifier-free guidance, null-text inversion)."""
        raise ValueError(
            f"{type(self).__name__} has no unconditional input, so classifier-free guidance is unavailable"
        )

    @property
    def has_null_condition(self) -> bool:
        return False

    def _forward(self, z: torch.Tensor, t: torch.Tensor, cond, control=None) -> torch.Tensor:
        raise NotImplementedError

    # --- schedule ------------------------------------------------------------------------
    @property
    def timesteps(self) -> torch.Tensor:
        """The steps of a full reverse run, noisiest first (respaced indices for ``adm``)."""
        if self.respaced is not None:
            return torch.arange(len(self.respaced) - 1, -1, -1)
        return self.scheduler.timesteps

    def alpha_bar(self, t) -> torch.Tensor:
        if self.respaced is not None:
            return self.respaced.alphas_cumprod[int(t)].float()
        return self.scheduler.alphas_cumprod[int(t)]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """``x0`` noised to timestep ``t``."""
        if self.respaced is not None:
            return self.respaced.q_sample(x0, int(t), noise)
        a = self.alpha_bar(t).to(x0.dtype)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def x0(self, z: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """The x0-prediction (model space, not clipped) from the noise prediction at ``t``."""
        if self.respaced is not None:
            return self.respaced.predict_xstart(z, eps, int(t))
        a = self.alpha_bar(t).to(z.dtype)
        return (z - (1 - a).sqrt() * eps) / a.sqrt()

    def model_timestep(self, t, n: int, device) -> torch.Tensor:
        """The model's timestep input for the sampler's ``t`` (the 1000-step scale for ``adm``)."""
        if self.respaced is not None:
            return torch.full((n,), self.respaced.model_timestep(int(t)), device=device, dtype=torch.float32)
        return torch.full((n,), int(t), device=device, dtype=torch.long)

    # --- model -------------------------------------------------------------------------------
    def _call(self, z: torch.Tensor, t, cond, control=None, checkpoint: bool | None = None) -> torch.Tensor:
        if control is not None and not self.supports_attention_control:
            raise ValueError(f"{type(self).__name__} has no cross-attention to control")
        tt = self.model_timestep(t, len(z), z.device)
        if (self.gradient_checkpointing if checkpoint is None else checkpoint) and torch.is_grad_enabled():
            return _checkpoint(self._forward, z, tt, cond, control, use_reentrant=False)
        return self._forward(z, tt, cond, control)

    def model_output(
        self,
        z: torch.Tensor,
        t,
        cond=None,
        uncond=None,
        scale: float | None = None,
        control=None,
        checkpoint: bool | None = None,
    ) -> torch.Tensor:
        """The raw model output at timestep ``t`` (eps, plus the variance channels of
        learned-variance models). With ``uncond`` and a scale other than 1 (default
        :attr:`guidance_scale`), classifier-free guidance mixes the eps channels in one
        batched call, the conditional half first (where an attention ``control`` acts);
        the variance channels are the conditional ones. Scale 0 is the unconditional
        prediction alone, from one call (for models without variance channels and
        without a ``control``). ``checkpoint`` overrides :attr:`gradient_checkpointing`
        for this call."""
        s = self.guidance_scale if scale is None else float(scale)
        if uncond is None or s == 1.0:
            return self._call(z, t, cond, control, checkpoint)
        if s == 0.0 and control is None and not self.learned_variance:
            return self._call(z, t, uncond, None, checkpoint)
        both = self._call(torch.cat([z, z]), t, torch.cat([cond, uncond]), control, checkpoint)
        c_out, u_out = both.chunk(2)
        ch = z.shape[1]
        mixed = u_out[:, :ch] + s * (c_out[:, :ch] - u_out[:, :ch])
        return mixed if both.shape[1] == ch else torch.cat([mixed, c_out[:, ch:]], 1)

    def eps(
        self,
        z: torch.Tensor,
        t,
        cond=None,
        uncond=None,
        scale: float | None = None,
        control=None,
        checkpoint: bool | None = None,
    ) -> torch.Tensor:
        """The (guided) noise prediction: :meth:`model_output` without variance channels."""
        return self.model_output(z, t, cond, uncond, scale, control, checkpoint)[:, : z.shape[1]]

    def decode_checkpointed(self, z: torch.Tensor, checkpoint: bool | None = None) -> torch.Tensor:
        if (self.gradient_checkpointing if checkpoint is None else checkpoint) and torch.is_grad_enabled():
            return _checkpoint(self.decode, z, use_reentrant=False)
        return self.decode(z)

    # --- steps -------------------------------------------------------------------------------
    def step(
        self, eps: torch.Tensor, t, z: torch.Tensor, rngs: list[torch.Generator] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One reverse step from the noise prediction at ``t``: (the next sample, the step's
        x0-prediction, clipped when ``clip_sample``). ``ddim`` is deterministic and
        differentiable; ancestral noise is drawn from one generator per sample.
        (Learned-variance models step through :meth:`p_mean_variance` and :meth:`p_sample`.)"""
        if self.respaced is not None:
            if self.learned_variance:
                raise ValueError(
                    "the adm sampler of a learned-variance model steps from the full model output "
                    "(p_mean_variance + p_sample), not from eps alone"
                )
            out = self.p_mean_variance(eps, z, t)
            return self.p_sample(out["mean"], out["log_variance"], t, rngs), out["pred_xstart"]
        if self.sampler == "ddim":
            out = self.scheduler.step(eps, int(t), z, eta=0.0)
        else:
            if self.learned_variance:
                raise ValueError("diffusers' DDPM step needs the model's variance channels; use sampler='adm'")
            out = self.scheduler.step(eps, int(t), z, generator=rngs)
        return out.prev_sample, out.pred_original_sample

    def p_mean_variance(self, model_output: torch.Tensor, z: torch.Tensor, t) -> dict:
        """``adm`` sampler: mean, variance, log variance, x0 and eps at respaced index ``t``."""
        return self.respaced.p_mean_variance(model_output, z, int(t), clip_denoised=self.clip_sample)

    def condition_mean(self, out: dict, gradient: torch.Tensor) -> torch.Tensor:
        """``adm`` sampler: the mean shifted by variance times a guidance gradient (Sohl-Dickstein)."""
        return self.respaced.condition_mean(out, gradient)

    def p_sample(
        self, mean: torch.Tensor, log_variance: torch.Tensor, t, rngs: list[torch.Generator] | None
    ) -> torch.Tensor:
        """``adm`` sampler: the ancestral step from a (possibly guided) mean, noise per sample."""
        if int(t) == 0:
            return mean
        noise = per_sample_randn(mean.shape[1:], rngs).to(mean) if rngs else torch.randn_like(mean)
        return self.respaced.p_sample(mean, log_variance, int(t), noise)

    @torch.no_grad()
    def sample(self, cond, rngs: list[torch.Generator], uncond=None, scale: float | None = None) -> torch.Tensor:
        """Plain (unguided) samples in [0, 1], one per generator; ``cond`` from :meth:`condition`."""
        z = per_sample_randn(self.latent_shape, rngs).to(self.device)
        for t in self.timesteps:
            out = self.model_output(z, t, cond, uncond, scale)
            if self.respaced is not None:
                pmv = self.p_mean_variance(out, z, t)
                z = self.p_sample(pmv["mean"], pmv["log_variance"], t, rngs)
            else:
                z, _ = self.step(out[:, : z.shape[1]], t, z, rngs)
        return self.decode(z)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample in the model's space."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # --- inversion -------------------------------------------------------------------------
    def _require_ddim(self, what: str) -> None:
        if self.sampler != "ddim":
            raise ValueError(f"{what} needs the deterministic sampler (sampler='ddim'), not {self.sampler!r}")

    def inverse_scheduler(self):
        """diffusers' ``DDIMInverseScheduler`` over this model's schedule and steps (built once)."""
        self._require_ddim("inversion")
        if self._inverse is None:
            from diffusers import DDIMInverseScheduler

            self._inverse = DDIMInverseScheduler.from_config(_diffusers_config(self.scheduler_config, False))
            self._inverse.set_timesteps(self.num_steps)
        return self._inverse

    def invert(self, z0: torch.Tensor, cond) -> list[torch.Tensor]:
        """DDIM inversion: :func:`lit_vce.diffusion.inversion.ddim_inversion`."""
        from .inversion import ddim_inversion

        return ddim_inversion(self, z0, cond)

    def null_text_inversion(
        self, z0: torch.Tensor, cond, inner_steps: int = 10, lr: float = 1e-2, **kwargs
    ) -> Inversion:
        """Null-text inversion: :func:`lit_vce.diffusion.inversion.null_text_inversion`."""
        from .inversion import null_text_inversion

        return null_text_inversion(self, z0, cond, inner_steps, lr, **kwargs)

    def plain_inversion(self, z0: torch.Tensor, cond, scale: float | None = None) -> Inversion:
        """DDIM inversion with the null embedding: :func:`lit_vce.diffusion.inversion.plain_inversion`."""
        from .inversion import plain_inversion

        return plain_inversion(self, z0, cond, scale)
