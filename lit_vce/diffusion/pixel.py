"""Pixel-space diffusion: a diffusers ``UNet2DModel`` (the world's ``ddpm``, any
``save_pretrained`` folder) or an OpenAI guided-diffusion (ADM) checkpoint.

The model space is the image in [-1, 1]. The conditioning of a class-conditional
``UNet2DModel`` is the class embedding vector (N, D) (so that DiG-IN can optimise
it; integer labels give the same embedding), the null class's embedding the
unconditional input. ADM's class-conditional models have no null class: their
conditioning is the class id and classifier-free guidance is unavailable.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .base import Diffusion, resize_to


class _ClassEmbeddingInput(nn.Module):
    """Wraps a UNet's class embedding so it also accepts embedding vectors directly
    (float (N, D) inputs pass through; integer labels are embedded)."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.embedding = embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.is_floating_point() else self.embedding(x)


def _adm_spec(model: str) -> tuple[str | None, str | None] | None:
    """``adm:<preset>`` or ``adm:<preset>@<file>`` or a path with an official ADM file name -> (preset, file)."""
    from .adm import preset_for_file

    if model.startswith("adm:"):
        preset, _, path = model[len("adm:") :].partition("@")
        return preset, path or None
    if model.endswith((".pt", ".pth")) and preset_for_file(model):
        return preset_for_file(model), model
    return None


def load_pixel_model(model: str, adm_overrides: dict | None = None) -> tuple[nn.Module, dict, int | None]:
    """(network, training schedule config, null class or None) of a pixel model spec
    (see :class:`PixelDiffusion`)."""
    if model in ("world", "world:ddpm"):
        from ..world.models import NULL_CLASS, SCHEDULER_CONFIG, load_world_network

        return load_world_network("ddpm"), SCHEDULER_CONFIG, NULL_CLASS
    adm = _adm_spec(model)
    if adm is not None:
        from .adm import load_adm

        net = load_adm(adm[0], adm[1], **(adm_overrides or {}))
        return (
            net,
            {"num_train_timesteps": net.config.diffusion_steps, "beta_schedule": net.config.noise_schedule},
            None,
        )
    from diffusers import UNet2DModel

    root = Path(model)
    if not root.is_dir():
        raise FileNotFoundError(
            f"diffusion model {root} does not exist (expected a UNet2DModel.save_pretrained folder, "
            "'adm:<preset>' or an ADM checkpoint file)"
        )
    unet_dir = root / "unet" if (root / "unet").is_dir() else root
    sched = next(
        (p for p in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json") if p.is_file()), None
    )
    if sched is None:
        raise FileNotFoundError(f"no scheduler_config.json in {root} or {root / 'scheduler'}")
    cfg = {k: v for k, v in json.loads(sched.read_text()).items() if not k.startswith("_")}
    unet = UNet2DModel.from_pretrained(str(unet_dir))
    null = unet.config.num_class_embeds - 1 if unet.config.num_class_embeds else None
    return unet, cfg, null


class PixelDiffusion(Diffusion):
    """A (class-conditional) pixel diffusion model.

    Args:
        model: ``"world"`` (the embedded ``ddpm``); a folder saved by
            ``UNet2DModel.save_pretrained`` holding a ``scheduler_config.json``
            beside (or in ``scheduler/``); or an OpenAI guided-diffusion (ADM)
            checkpoint: ``"adm:<preset>"`` (the file under
            ``$LIT_VCE_WEIGHTS_DIR/adm/``), ``"adm:<preset>@<path>"``, or a
            path with the official file name (e.g. ``256x256_diffusion_uncond.pt``).
            Presets: :data:`lit_vce.diffusion.adm.ADM_PRESETS`.
        sampler, num_steps, guidance_scale, gradient_checkpointing: see
            :class:`~lit_vce.diffusion.base.Diffusion`.
        clip_sample: clip the x0-prediction to [-1, 1] inside every step. The
            published DVCE/ADM sampling does not (``clip_denoised=False``); the
            world's ddpm needs it for plain sampling (oracle shape accuracy of
            its samples was 0.94 with clipping and 0.38 without, DDPM 100 steps, for the
            first-stage weights).
        null_class: the class index that means "no class" (classifier-free
            guidance); ``None``: the model's default (the last class of a
            ``UNet2DModel``, none for ADM).
        unet: an already built ``UNet2DModel`` or ``ADMUNet`` (tests,
            programmatic use); overrides ``model``.
        scheduler_config: the training noise-schedule config (with ``unet``).
        adm_overrides: ADM architecture keys that differ from the preset (e.g.
            ``{"num_channels": 128}`` for a checkpoint of one's own).
    """

    def __init__(
        self,
        model: str = "world",
        sampler: str = "ddim",
        num_steps: int = 50,
        guidance_scale: float = 1.0,
        clip_sample: bool = True,
        gradient_checkpointing: bool = False,
        null_class: int | None = None,
        unet: nn.Module | None = None,
        scheduler_config: dict | None = None,
        adm_overrides: dict | None = None,
    ):
        from .adm import ADMUNet

        default_null = None
        #: the data the model was trained for: "world" (the embedded 32 px ddpm), else None (unknown)
        self_domain = "world" if unet is None and model in ("world", "world:ddpm") else None
        if unet is None:
            unet, scheduler_config, default_null = load_pixel_model(model, adm_overrides)
        elif scheduler_config is None:
            raise ValueError("scheduler_config is required with a prebuilt unet")
        self.is_adm = isinstance(unet, ADMUNet)
        if self.is_adm:
            c = unet.config
            classes, learned, size = (c.num_classes if c.class_cond else None), c.learn_sigma, c.image_size
        else:
            classes, learned = unet.config.num_class_embeds, unet.config.out_channels == 2 * unet.config.in_channels
            size = unet.config.sample_size
        super().__init__(
            scheduler_config, sampler, num_steps, guidance_scale, clip_sample, gradient_checkpointing, learned
        )
        self.null_class = default_null if null_class is None else int(null_class)
        if self.null_class is not None and self.is_adm:
            raise ValueError("ADM models have no null class")
        self.num_classes = classes
        self._size = int(size[0] if isinstance(size, (tuple, list)) else size)
        if classes and not self.is_adm and not isinstance(unet.class_embedding, _ClassEmbeddingInput):
            unet.class_embedding = _ClassEmbeddingInput(unet.class_embedding)
        self.unet = unet.eval().requires_grad_(False)
        self.domain = self_domain

    @property
    def class_conditional_only(self) -> bool:
        """True for class-conditional models without a null class (ADM): they need labels."""
        return self.null_class is None and bool(self.num_classes)

    @property
    def has_null_condition(self) -> bool:
        return self.null_class is not None

    @property
    def image_size(self) -> int:
        return self._size

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (3, self._size, self._size)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return resize_to(images, self._size) * 2 - 1

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return ((z + 1) / 2).clamp(0, 1)

    def x0_image(self, x0: torch.Tensor) -> torch.Tensor:
        return (x0 + 1) / 2

    def condition(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """The conditioning of class ``labels``: embedding vectors (N, D) of a
        ``UNet2DModel``, the ids themselves for ADM; ``None`` for unconditional models."""
        if labels is None or not self.num_classes:
            return None
        if self.is_adm:
            return labels.long()
        return self.unet.class_embedding.embedding(labels.long().to(self.device))

    def null_condition(self, n: int) -> torch.Tensor:
        if self.null_class is None:
            if not self.num_classes:
                return None
            return super().null_condition(n)
        return self.condition(torch.full((n,), self.null_class, dtype=torch.long))

    def _forward(self, z, t, cond, control=None):
        if self.num_classes and cond is None:
            raise ValueError("this diffusion model is class-conditional without a null class: condition on the target")
        if self.is_adm:
            return self.unet(z, t, cond if self.num_classes else None)
        if self.num_classes:
            return self.unet(z, t, class_labels=cond).sample
        return self.unet(z, t).sample
