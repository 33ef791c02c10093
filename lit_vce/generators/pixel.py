"""Pixel-space diffusion backbone: a diffusers ``UNet2DModel`` or an ADM checkpoint, with its samplers.

Samplers: diffusers' DDIM and DDPM schedulers (``ddim``, ``ddpm``; guidance
shifts the noise prediction) and guided-diffusion's respaced ancestral sampler
(``adm``; :class:`~lit_vce.generators.gaussian.RespacedDiffusion`: learned or
fixed variance, guidance shifts the posterior mean by variance * gradient, as
DVCE, ACE and DiME were published).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


SCHEDULERS = ("ddim", "ddpm", "adm")


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


def _make_scheduler(kind: str, config: dict, clip_sample: bool):
    from diffusers import DDIMScheduler, DDPMScheduler

    if kind == "ddim":
        # from_config ignores keys of other scheduler classes (a DDPM config has variance_type)
        return DDIMScheduler.from_config({**config, "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": clip_sample})
    if kind == "ddpm":
        return DDPMScheduler.from_config({**config, "clip_sample": clip_sample, "variance_type": "fixed_small"})
    raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {kind!r}")


class _ADMAdapter(nn.Module):
    """Calls an :class:`~lit_vce.generators.adm.ADMUNet` with the UNet2DModel convention (``.sample``)."""

    def __init__(self, adm: nn.Module):
        super().__init__()
        self.adm = adm
        c = adm.config
        self.config = type("ADMUNetConfig", (), {"sample_size": c.image_size, "num_class_embeds": c.num_classes if c.class_cond else None,
                                                 "out_channels": 6 if c.learn_sigma else 3})()

    @property
    def device(self) -> torch.device:
        return next(self.adm.parameters()).device

    def forward(self, x, t, class_labels=None):
        from types import SimpleNamespace

        return SimpleNamespace(sample=self.adm(x, t, class_labels if self.config.num_class_embeds else None))


def _adm_spec(model: str) -> tuple[str | None, str | None] | None:
    """``adm:<preset>`` or ``adm:<preset>@<file>`` or a path with an official ADM file name -> (preset, file)."""
    from .adm import preset_for_file

    if model.startswith("adm:"):
        preset, _, path = model[len("adm:"):].partition("@")
        return preset, path or None
    if model.endswith((".pt", ".pth")) and preset_for_file(model):
        return preset_for_file(model), model
    return None


class PixelDiffusion(nn.Module):
    """A (class-conditional) pixel diffusion model with classifier-free guidance.

    The model works on images scaled to [-1, 1]; :meth:`encode`/:meth:`decode`
    map from/to [0, 1] so every method sees images in [0, 1].

    Args:
        model: ``"world"`` (the embedded ``ddpm``); a folder saved by
            ``UNet2DModel.save_pretrained`` holding a ``scheduler_config.json``
            beside (or in ``scheduler/``); or an OpenAI guided-diffusion (ADM)
            checkpoint: ``"adm:<preset>"`` (the file under
            ``$LIT_VCE_WEIGHTS_DIR/adm/``), ``"adm:<preset>@<path>"``, or a
            path with the official file name (e.g. ``256x256_diffusion_uncond.pt``).
            Presets: :data:`lit_vce.generators.adm.ADM_PRESETS`.
        scheduler: ``"ddim"`` (deterministic, eta 0), ``"ddpm"`` (diffusers'
            ancestral) or ``"adm"`` (guided-diffusion's respaced ancestral
            sampler with the model's learned variance, or the posterior
            variance for 3-channel models).
        num_inference_steps: the respaced number of steps over the full range.
        null_class: the class index that means "no class" (classifier-free
            guidance); ``None`` for unconditional models.
        unet: an already built ``UNet2DModel`` (tests, programmatic use);
            overrides ``model``.
        scheduler_config: the training noise-schedule config (with ``unet``).
        adm_overrides: ADM architecture keys that differ from the preset (e.g.
            ``{"num_channels": 128}`` for a checkpoint of one's own).
        clip_sample: clip the x0-prediction to [-1, 1] inside every step. The
            published DVCE/ADM sampling does not (``clip_denoised=False``); the
            world's ddpm needs it for plain sampling (oracle shape accuracy of
            its samples is 0.94 with clipping and 0.38 without, DDPM 100 steps).
    """

    def __init__(
        self,
        model: str = "world",
        scheduler: str = "ddim",
        num_inference_steps: int = 50,
        null_class: int | None = None,
        unet: nn.Module | None = None,
        scheduler_config: dict | None = None,
        clip_sample: bool = True,
        adm_overrides: dict | None = None,
    ):
        super().__init__()
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        if unet is None:
            unet, scheduler_config, default_null = self._load(model, adm_overrides or {})
            null_class = default_null if null_class is None else null_class
        if scheduler_config is None:
            raise ValueError("scheduler_config is required with a prebuilt unet")
        self.unet = unet.eval().requires_grad_(False)
        self.null_class = null_class
        self.scheduler_kind = scheduler
        self.clip_sample = clip_sample
        self.num_inference_steps = int(num_inference_steps)
        self.learned_variance = getattr(self.unet.config, "out_channels", 3) == 6
        if scheduler == "adm":
            from .gaussian import RespacedDiffusion

            self.scheduler = None
            self.diffusion = RespacedDiffusion(betas_from_config(dict(scheduler_config)), str(self.num_inference_steps),
                                               "learned_range" if self.learned_variance else "fixed_small")
        else:
            cfg = dict(scheduler_config)
            if self.learned_variance:
                cfg["variance_type"] = "learned_range"
            self.scheduler = _make_scheduler(scheduler, cfg, clip_sample)
            self.scheduler.set_timesteps(self.num_inference_steps)
            self.diffusion = None

    @staticmethod
    def _load(model: str, adm_overrides: dict | None = None):
        if model in ("world", "world:ddpm"):
            from ..world.models import NULL_CLASS, SCHEDULER_CONFIG, load_world_network

            return load_world_network("ddpm"), SCHEDULER_CONFIG, NULL_CLASS
        adm = _adm_spec(model)
        if adm is not None:
            from .adm import load_adm

            net = load_adm(adm[0], adm[1], **(adm_overrides or {}))
            c = net.config
            return _ADMAdapter(net), {"num_train_timesteps": c.diffusion_steps, "beta_schedule": c.noise_schedule}, None
        import json

        from diffusers import UNet2DModel

        root = Path(model)
        if not root.is_dir():
            raise FileNotFoundError(f"diffusion model {root} does not exist (expected a UNet2DModel.save_pretrained folder, "
                                    "'adm:<preset>' or an ADM checkpoint file)")
        unet_dir = root / "unet" if (root / "unet").is_dir() else root
        sched = next((p for p in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json") if p.is_file()), None)
        if sched is None:
            raise FileNotFoundError(f"no scheduler_config.json in {root} or {root / 'scheduler'}")
        cfg = {k: v for k, v in json.loads(sched.read_text()).items() if not k.startswith("_")}
        unet = UNet2DModel.from_pretrained(str(unet_dir))
        null = unet.config.num_class_embeds - 1 if unet.config.num_class_embeds else None
        return unet, cfg, null

    @property
    def class_conditional_only(self) -> bool:
        """True for class-conditional models without a null class (ADM): they need labels."""
        return self.null_class is None and bool(getattr(self.unet.config, "num_class_embeds", None))

    # --- spaces ---------------------------------------------------------------
    @property
    def image_size(self) -> int:
        s = self.unet.config.sample_size
        return s[0] if isinstance(s, (tuple, list)) else int(s)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images * 2 - 1

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return ((x + 1) / 2).clamp(0, 1)

    # --- schedule -------------------------------------------------------------
    @property
    def timesteps(self) -> torch.Tensor:
        """The steps of a full reverse run, noisiest first (respaced indices for ``adm``)."""
        if self.diffusion is not None:
            return torch.arange(len(self.diffusion) - 1, -1, -1)
        return self.scheduler.timesteps

    def alpha_bar(self, t: torch.Tensor | int) -> torch.Tensor:
        if self.diffusion is not None:
            return self.diffusion.alphas_cumprod[int(t)].float()
        return self.scheduler.alphas_cumprod[int(t)]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        if self.diffusion is not None:
            return self.diffusion.q_sample(x0, int(t), noise)
        a = self.alpha_bar(t).to(x0.dtype)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        if self.diffusion is not None:
            return self.diffusion.predict_xstart(x_t, eps, int(t))
        a = self.alpha_bar(t).to(x_t.dtype)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    # --- model ----------------------------------------------------------------
    def _model_t(self, t: int, n: int, device) -> torch.Tensor:
        if self.diffusion is not None:  # respaced index -> the model's (float) timestep
            return torch.full((n,), self.diffusion.model_timestep(int(t)), device=device, dtype=torch.float32)
        return torch.full((n,), int(t), device=device, dtype=torch.long)

    def model_output(self, x_t: torch.Tensor, t: int, labels: torch.Tensor | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
        """The raw model output (eps, plus the variance channels of learned-sigma models).

        ``labels=None`` means unconditional (the null class); classifier-free
        guidance mixes the eps channels when ``guidance_scale != 1``.
        """
        n = len(x_t)
        tt = self._model_t(t, n, x_t.device)
        if self.class_conditional_only:
            if labels is None:
                raise ValueError("this diffusion model is class-conditional without a null class: condition on the target")
            if guidance_scale != 1.0:
                raise ValueError("this diffusion model has no null class, so classifier-free guidance is unavailable")
            return self.unet(x_t, tt, class_labels=labels).sample
        if self.null_class is None:
            return self.unet(x_t, tt).sample
        null = torch.full((n,), self.null_class, device=x_t.device, dtype=torch.long)
        if labels is None:
            return self.unet(x_t, tt, class_labels=null).sample
        if guidance_scale == 1.0:
            return self.unet(x_t, tt, class_labels=labels).sample
        both = self.unet(torch.cat([x_t, x_t]), torch.cat([tt, tt]), class_labels=torch.cat([labels, null])).sample
        cond, uncond = both.chunk(2)
        c = x_t.shape[1]
        return torch.cat([uncond[:, :c] + guidance_scale * (cond[:, :c] - uncond[:, :c]), cond[:, c:]], 1)

    def eps(self, x_t: torch.Tensor, t: int, labels: torch.Tensor | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
        """Noise prediction, with classifier-free guidance when ``guidance_scale != 1``."""
        return self.model_output(x_t, t, labels, guidance_scale)[:, : x_t.shape[1]]

    def step(self, eps: torch.Tensor, t: int, x_t: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """One reverse step from the noise prediction; ancestral noise is drawn from one generator per sample.

        (The ``adm`` sampler steps through :meth:`p_mean_variance` and
        :meth:`p_sample` instead, where guidance shifts the mean.)
        """
        if self.diffusion is not None:
            if self.learned_variance:
                raise ValueError("the adm sampler of a learned-variance model steps from the full model output "
                                 "(p_mean_variance + p_sample), not from eps alone")
            out = self.p_mean_variance(eps, x_t, t)
            return self.p_sample(out["mean"], out["log_variance"], t, generators)
        if self.scheduler_kind == "ddim":
            return self.scheduler.step(eps, int(t), x_t, eta=0.0).prev_sample
        if self.learned_variance:
            raise ValueError("diffusers' DDPM step needs the model's variance channels; use scheduler='adm'")
        return self.scheduler.step(eps, int(t), x_t, generator=generators).prev_sample

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: int) -> dict:
        """``adm`` sampler: mean, variance, log variance, x0 and eps at respaced index ``t``."""
        return self.diffusion.p_mean_variance(model_output, x_t, int(t), clip_denoised=self.clip_sample)

    def p_sample(self, mean: torch.Tensor, log_variance: torch.Tensor, t: int, generators: list[torch.Generator] | None) -> torch.Tensor:
        """``adm`` sampler: the ancestral step from a (possibly guided) mean, noise per sample."""
        from .noise import per_sample_randn

        if int(t) == 0:
            return mean
        noise = per_sample_randn(mean.shape[1:], generators).to(mean) if generators else torch.randn_like(mean)
        return self.diffusion.p_sample(mean, log_variance, int(t), noise)

    @torch.no_grad()
    def sample(self, labels: torch.Tensor | None, n: int, generators: list[torch.Generator], guidance_scale: float = 1.0) -> torch.Tensor:
        """Plain (unguided) samples in [0, 1]; ``labels=None`` for unconditional."""
        from .noise import per_sample_randn

        size = self.image_size
        x = per_sample_randn((3, size, size), generators).to(self.unet.device)
        for t in self.timesteps:
            if self.diffusion is not None:
                out = self.p_mean_variance(self.model_output(x, t, labels, guidance_scale), x, t)
                x = self.p_sample(out["mean"], out["log_variance"], t, generators)
            else:
                x = self.step(self.eps(x, t, labels, guidance_scale), t, x, generators)
        return self.decode(x)
