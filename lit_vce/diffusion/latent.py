"""Latent text-to-image diffusion (Stable Diffusion-style diffusers components).

The model space is the VAE latent (scaled by the VAE's scaling factor); the
conditioning is the prompt's CLIP text embedding (N, 77, D), the empty prompt's
embedding the unconditional input; the UNet's cross-attention can be recorded
or injected through an attention control (:mod:`lit_vce.diffusion.attention`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .base import Diffusion, resize_to

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_latent_components(model: str, dtype: torch.dtype):
    """(unet, vae, text encoder, tokenizer, scheduler config) of a diffusers Stable
    Diffusion folder or hub id; a clear error when any part is missing."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..errors import MissingWeightsError

    try:
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    except (OSError, ValueError) as e:
        from ..weights import hub_model_missing

        layout = ["unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer/", "scheduler/"]
        raise MissingWeightsError(hub_model_missing("Stable Diffusion", str(model), layout, e)) from e
    local = Path(model) / "scheduler" / "scheduler_config.json"
    if local.is_file():
        cfg = json.loads(local.read_text())
    else:
        from diffusers import DDIMScheduler

        cfg = dict(DDIMScheduler.from_pretrained(model, subfolder="scheduler").config)
    return unet, vae, text_encoder, tokenizer, {k: v for k, v in cfg.items() if not k.startswith("_")}


class LatentDiffusion(Diffusion):
    """Stable Diffusion-style latent text-to-image components.

    Args:
        model: a hub id or local folder of a diffusers Stable Diffusion pipeline
            (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``).
        sampler, num_steps, guidance_scale, gradient_checkpointing: see
            :class:`~lit_vce.diffusion.base.Diffusion` (DiG-IN: ddim, 20, 3.0).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for the components.
        attention_slicing: compute attention in slices (memory).
        unet, vae, text_encoder, tokenizer, scheduler_config: prebuilt components (tests).
    """

    supports_attention_control = True
    text_conditioned = True

    def __init__(
        self,
        model: str | None = None,
        sampler: str = "ddim",
        num_steps: int = 20,
        guidance_scale: float = 3.0,
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        attention_slicing: bool = False,
        unet=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        scheduler_config: dict | None = None,
    ):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        torch_dtype = _DTYPES[dtype]
        if unet is None:
            if model is None:
                raise ValueError("LatentDiffusion needs model=<hub id or folder> or prebuilt components")
            unet, vae, text_encoder, tokenizer, scheduler_config = load_latent_components(model, torch_dtype)
        super().__init__(scheduler_config, sampler, num_steps, guidance_scale, False, gradient_checkpointing)

        def prepared(m):
            return (m if m.dtype == torch_dtype else m.to(torch_dtype)).eval().requires_grad_(False)

        self.unet, self.vae, self.text_encoder = prepared(unet), prepared(vae), prepared(text_encoder)
        self.tokenizer = tokenizer
        self.dtype_ = torch_dtype
        if attention_slicing and hasattr(self.unet, "set_attention_slice"):
            self.unet.set_attention_slice("auto")
        self.scaling = float(getattr(self.vae.config, "scaling_factor", 0.18215))

    @property
    def has_null_condition(self) -> bool:
        return True

    @property
    def image_size(self) -> int:
        return self._latent_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def _latent_size(self) -> int:
        s = self.unet.config.sample_size
        return s[0] if isinstance(s, (tuple, list)) else int(s)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.unet.config.in_channels, self._latent_size, self._latent_size)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        images = resize_to(images, self.image_size)
        return self.vae.encode((images * 2 - 1).to(self.dtype_)).latent_dist.mean.float() * self.scaling

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.x0_image(z).clamp(0, 1)

    def x0_image(self, x0: torch.Tensor) -> torch.Tensor:
        return (self.vae.decode((x0 / self.scaling).to(self.dtype_)).sample.float() + 1) / 2

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        """Padded token ids (N, L) of ``prompts``, as the text encoder sees them."""
        return self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    @torch.no_grad()
    def condition(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (N, L, D) of ``prompts``."""
        return self.text_encoder(self.token_ids(prompts).to(self.device))[0].float()

    def word_ids(self, word: str) -> list[int]:
        """The token ids of ``word`` alone (no start/end tokens)."""
        return list(self.tokenizer(word, add_special_tokens=False).input_ids)

    def null_condition(self, n: int) -> torch.Tensor:
        return self.condition([""] * n)

    def _forward(self, z, t, cond, control=None):
        kwargs = None
        if control is not None:
            from .attention import install_attention_control

            install_attention_control(self.unet)  # idempotent; also after processors were replaced (e.g. slicing)
            kwargs = {"control": control}
        return self.unet(
            z.to(self.dtype_), t, encoder_hidden_states=cond.to(self.dtype_), cross_attention_kwargs=kwargs
        ).sample.float()
