"""Diffusion backbones behind one small interface (encode/decode, eps, x0, step)."""

from .noise import per_sample_rand, per_sample_randn, sample_generators, sample_seed
from .pixel import PixelDiffusion

__all__ = ["PixelDiffusion", "per_sample_rand", "per_sample_randn", "sample_generators", "sample_seed"]
