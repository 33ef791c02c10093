"""Diffusion models behind one interface (:class:`Diffusion`: encode/decode, eps with
classifier-free guidance, x0, step, add_noise, invert) over diffusers' DDIM, DDPM and
DDIM-inverse schedulers and guided-diffusion's respaced sampler, for pixel
(``UNet2DModel``, ADM) and latent (Stable Diffusion) models."""

from .base import SAMPLERS, Diffusion, Inversion
from .latent import LatentDiffusion
from .pixel import PixelDiffusion

__all__ = ["SAMPLERS", "Diffusion", "Inversion", "LatentDiffusion", "PixelDiffusion"]
