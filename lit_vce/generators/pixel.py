"""Pixel-space diffusion backbone over a diffusers ``UNet2DModel`` and DDIM/DDPM schedulers."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def _make_scheduler(kind: str, config: dict, clip_sample: bool):
    from diffusers import DDIMScheduler, DDPMScheduler

    if kind == "ddim":
        # from_config ignores keys of other scheduler classes (a DDPM config has variance_type)
        return DDIMScheduler.from_config({**config, "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": clip_sample})
    if kind == "ddpm":
        return DDPMScheduler.from_config({**config, "clip_sample": clip_sample, "variance_type": "fixed_small"})
    raise ValueError(f"scheduler must be 'ddim' or 'ddpm', got {kind!r}")


class PixelDiffusion(nn.Module):
    """A (class-conditional) pixel diffusion model with classifier-free guidance.

    The model works on images scaled to [-1, 1]; :meth:`encode`/:meth:`decode`
    map from/to [0, 1] so every method sees images in [0, 1].

    Args:
        model: ``"world"`` (the embedded ``ddpm``), or a folder saved by
            ``UNet2DModel.save_pretrained`` holding a ``scheduler_config.json``
            beside (or in ``scheduler/``).
        scheduler: ``"ddim"`` (deterministic, eta 0) or ``"ddpm"`` (ancestral).
        num_inference_steps: the respaced number of steps over the full range.
        null_class: the class index that means "no class" (classifier-free
            guidance); ``None`` for unconditional models.
        unet: an already built ``UNet2DModel`` (tests, programmatic use);
            overrides ``model``.
        scheduler_config: the training noise-schedule config (with ``unet``).
        clip_sample: clip the scheduler's x0-prediction to [-1, 1] at every step
            (the world's ddpm needs it: oracle shape accuracy of its samples is
            0.94 with clipping and 0.38 without, DDPM 100 steps).
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
    ):
        super().__init__()
        if unet is None:
            unet, scheduler_config, default_null = self._load(model)
            null_class = default_null if null_class is None else null_class
        if scheduler_config is None:
            raise ValueError("scheduler_config is required with a prebuilt unet")
        self.unet = unet.eval().requires_grad_(False)
        self.null_class = null_class
        self.scheduler_kind = scheduler
        self.scheduler = _make_scheduler(scheduler, dict(scheduler_config), clip_sample)
        self.num_inference_steps = int(num_inference_steps)
        self.scheduler.set_timesteps(self.num_inference_steps)

    @staticmethod
    def _load(model: str):
        if model in ("world", "world:ddpm"):
            from ..world.models import NULL_CLASS, SCHEDULER_CONFIG, load_world_network

            return load_world_network("ddpm"), SCHEDULER_CONFIG, NULL_CLASS
        import json

        from diffusers import UNet2DModel

        root = Path(model)
        if not root.is_dir():
            raise FileNotFoundError(f"diffusion model folder {root} does not exist (expected a UNet2DModel.save_pretrained folder)")
        unet_dir = root / "unet" if (root / "unet").is_dir() else root
        sched = next((p for p in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json") if p.is_file()), None)
        if sched is None:
            raise FileNotFoundError(f"no scheduler_config.json in {root} or {root / 'scheduler'}")
        cfg = {k: v for k, v in json.loads(sched.read_text()).items() if not k.startswith("_")}
        unet = UNet2DModel.from_pretrained(str(unet_dir))
        null = unet.config.num_class_embeds - 1 if unet.config.num_class_embeds else None
        return unet, cfg, null

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
        return self.scheduler.timesteps

    def alpha_bar(self, t: torch.Tensor | int) -> torch.Tensor:
        return self.scheduler.alphas_cumprod[int(t)]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        a = self.alpha_bar(t).to(x0.dtype)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        a = self.alpha_bar(t).to(x_t.dtype)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    # --- model ----------------------------------------------------------------
    def eps(self, x_t: torch.Tensor, t: int, labels: torch.Tensor | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
        """Noise prediction, with classifier-free guidance when ``guidance_scale != 1``.

        ``labels=None`` means unconditional (the null class).
        """
        n = len(x_t)
        tt = torch.full((n,), int(t), device=x_t.device, dtype=torch.long)
        if self.null_class is None:
            return self.unet(x_t, tt).sample
        null = torch.full((n,), self.null_class, device=x_t.device, dtype=torch.long)
        if labels is None:
            return self.unet(x_t, tt, class_labels=null).sample
        if guidance_scale == 1.0:
            return self.unet(x_t, tt, class_labels=labels).sample
        both = self.unet(torch.cat([x_t, x_t]), torch.cat([tt, tt]), class_labels=torch.cat([labels, null])).sample
        cond, uncond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def step(self, eps: torch.Tensor, t: int, x_t: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """One reverse step; ancestral noise is drawn from one generator per sample."""
        if self.scheduler_kind == "ddim":
            return self.scheduler.step(eps, int(t), x_t, eta=0.0).prev_sample
        out = self.scheduler.step(eps, int(t), x_t, generator=generators).prev_sample
        return out

    @torch.no_grad()
    def sample(self, labels: torch.Tensor | None, n: int, generators: list[torch.Generator], guidance_scale: float = 1.0) -> torch.Tensor:
        """Plain (unguided) samples in [0, 1]; ``labels=None`` for unconditional."""
        from .noise import per_sample_randn

        size = self.image_size
        x = per_sample_randn((3, size, size), generators).to(self.unet.device)
        for t in self.timesteps:
            x = self.step(self.eps(x, t, labels, guidance_scale), t, x, generators)
        return self.decode(x)
