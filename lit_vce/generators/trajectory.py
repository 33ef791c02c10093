"""Backbones for trajectory optimisation (DiG-IN): a deterministic DDIM sampler
(eta = 0) over a latent space, conditioned by continuous embeddings so that the
conditioning itself can be optimised.

One interface, two backbones:

- :class:`PixelTrajectory`: a class-conditional pixel model (the world's
  ``ddpm``, or any diffusers ``UNet2DModel`` folder). The latent is the image in
  [-1, 1]; the conditioning is the class embedding vector (N, D); the null
  class's embedding plays the role of the unconditional ("null-text") input.
- :class:`LatentDiffusion`: Stable Diffusion-style components (diffusers
  ``UNet2DConditionModel`` + ``AutoencoderKL`` + a CLIP text encoder and
  tokenizer). The latent is the VAE latent; the conditioning is the prompt's
  text embedding (N, 77, D); the empty prompt's embedding is the unconditional.

Both give ``encode``/``decode`` (images in [0, 1]), ``condition``/``null_condition``,
``eps(z, t, cond)``, the DDIM step with its x0-prediction, DDIM inversion and
null-text inversion. Every UNet call can be gradient-checkpointed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint


@dataclass
class Inversion:
    """A DDIM inversion: ``latents[i]`` is the latent at the input of sampling step i
    (``latents[0]`` = z_T), ``latents[-1]`` the clean latent; ``uncond[i]`` the
    unconditional embedding of step i (optimised by null-text inversion)."""

    latents: list[torch.Tensor]
    uncond: list[torch.Tensor]
    reconstruction_error: float | None = None


class TrajectoryBackbone(nn.Module):
    """Base class: subclasses set ``self.alphas_cumprod`` and implement the model parts."""

    def __init__(self, num_steps: int = 20, guidance_scale: float = 3.0, gradient_checkpointing: bool = False):
        super().__init__()
        self.num_steps = int(num_steps)
        self.guidance_scale = float(guidance_scale)
        self.gradient_checkpointing = bool(gradient_checkpointing)

    # --- to implement -----------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _eps(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, control=None) -> torch.Tensor:
        raise NotImplementedError

    #: whether ``eps`` accepts an attention control (text backbones with cross-attention)
    supports_attention_control = False

    def null_condition(self, n: int) -> torch.Tensor:
        raise NotImplementedError

    @property
    def image_size(self) -> int:
        raise NotImplementedError

    # --- schedule -----------------------------------------------------------------
    def _set_schedule(self, alphas_cumprod: torch.Tensor, train_steps: int) -> None:
        ratio = train_steps // self.num_steps
        ts = (torch.arange(self.num_steps - 1, -1, -1) * ratio + 1).long()  # steps_offset=1 ("leading")
        self.register_buffer("timesteps", ts, persistent=False)
        a = alphas_cumprod[ts].float()
        prev = torch.cat([alphas_cumprod[ts[1:]], alphas_cumprod[:1]]).float()  # final alpha: alphas_cumprod[0]
        self.register_buffer("alpha", a, persistent=False)
        self.register_buffer("alpha_prev", prev, persistent=False)

    # --- model ----------------------------------------------------------------------
    def eps(self, z: torch.Tensor, i: int, cond: torch.Tensor, control=None) -> torch.Tensor:
        """The noise prediction of sampling step ``i`` (checkpointed when enabled and grad is on).
        ``control``: an :class:`~lit_vce.generators.attention.AttentionControl` for the
        cross-attention of the first ``control.n`` rows (text backbones only)."""
        if control is not None and not self.supports_attention_control:
            raise ValueError(f"{type(self).__name__} has no cross-attention to control")
        t = self.timesteps[i].expand(len(z)).to(z.device)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return _checkpoint(self._eps, z, t, cond, control, use_reentrant=False)
        return self._eps(z, t, cond, control)

    def eps_cfg(self, z: torch.Tensor, i: int, cond: torch.Tensor, uncond: torch.Tensor, scale: float | None = None,
                control=None) -> torch.Tensor:
        """Classifier-free guidance: ``uncond + s * (cond - uncond)`` in one batched call
        (the conditional half first, where an attention ``control`` acts)."""
        s = self.guidance_scale if scale is None else scale
        if s == 1.0:
            return self.eps(z, i, cond, control)
        both = self.eps(torch.cat([z, z]), i, torch.cat([cond, uncond]), control)
        e_c, e_u = both.chunk(2)
        return e_u + s * (e_c - e_u)

    def ddim_step(self, z: torch.Tensor, eps: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent after step i, x0-prediction of step i), eta = 0, differentiable."""
        a, ap = self.alpha[i].to(z), self.alpha_prev[i].to(z)
        x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
        x0 = self._clip_x0(x0)
        return ap.sqrt() * x0 + (1 - ap).sqrt() * eps, x0

    def _clip_x0(self, x0: torch.Tensor) -> torch.Tensor:
        return x0

    def decode_checkpointed(self, z: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return _checkpoint(self.decode, z, use_reentrant=False)
        return self.decode(z)

    # --- inversion ----------------------------------------------------------------------
    @torch.no_grad()
    def ddim_invert(self, z0: torch.Tensor, cond: torch.Tensor) -> list[torch.Tensor]:
        """DDIM inversion with the conditional model (no CFG): [z_T, ..., z_0]."""
        z = z0
        out = [z0]
        for i in range(self.num_steps - 1, -1, -1):
            a, ap = self.alpha[i].to(z), self.alpha_prev[i].to(z)
            eps = self.eps(z, i, cond)
            x0 = (z - (1 - ap).sqrt() * eps) / ap.sqrt()
            z = a.sqrt() * x0 + (1 - a).sqrt() * eps
            out.append(z)
        return out[::-1]

    def null_text_inversion(self, z0: torch.Tensor, cond: torch.Tensor, inner_steps: int = 10, lr: float = 1e-2,
                            tol: float = 1e-5, scale: float | None = None) -> Inversion:
        """DDIM inversion, then per-step unconditional embeddings optimised (Adam) so that
        the CFG trajectory from z_T retraces the inverted latents (Mokady et al., 2023).

        As the official DiG-IN/null-text code: at step i Adam runs with learning rate
        ``lr * (1 - i / 100)`` for at most ``inner_steps`` steps and stops once the
        loss (the MSE to the inverted latent, computed before the update) falls
        below ``tol + i * 2e-5``, checked after the update. Each sample stops on its
        own loss, so the batch does not matter.
        """
        target = self.ddim_invert(z0, cond)
        n = len(z0)
        u = self.null_condition(n).detach()
        uncond, z = [], target[0]
        for i in range(self.num_steps):
            u = u.detach().clone().requires_grad_(True)
            opt = torch.optim.Adam([u], lr=lr * (1.0 - i / 100.0))
            with torch.no_grad():
                e_c = self.eps(z, i, cond)
            done = torch.zeros(n, dtype=torch.bool, device=z.device)
            for _ in range(inner_steps):
                with torch.enable_grad():
                    e_u = self.eps(z, i, u)
                    pred, _ = self.ddim_step(z, e_u + self._scale(scale) * (e_c - e_u), i)
                    per_sample = (pred - target[i + 1]).pow(2).flatten(1).mean(1)
                    opt.zero_grad()
                    per_sample.sum().backward()  # a sum: each sample's gradient is its own
                kept = u.detach()[done].clone()
                opt.step()
                with torch.no_grad():
                    u[done] = kept  # samples that stopped earlier keep their embedding
                done |= per_sample.detach() < tol + i * 2e-5
                if done.all():
                    break
            with torch.no_grad():
                z, _ = self.ddim_step(z, self.eps_cfg(z, i, cond, u.detach(), scale), i)
            uncond.append(u.detach())
        err = float(F.mse_loss(z, z0))
        return Inversion(target, uncond, err)

    def _scale(self, scale: float | None) -> float:
        return self.guidance_scale if scale is None else scale

    def plain_inversion(self, z0: torch.Tensor, cond: torch.Tensor) -> Inversion:
        """DDIM inversion with the null embedding as unconditional at every step."""
        target = self.ddim_invert(z0, cond)
        u = self.null_condition(len(z0))
        with torch.no_grad():
            z = target[0]
            for i in range(self.num_steps):
                z, _ = self.ddim_step(z, self.eps_cfg(z, i, cond, u), i)
        return Inversion(target, [u] * self.num_steps, float(F.mse_loss(z, z0)))


class _ClassEmbeddingInput(nn.Module):
    """Wraps a UNet's class embedding so it also accepts embedding vectors directly
    (float (N, D) inputs pass through; integer labels are embedded)."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.embedding = embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.is_floating_point() else self.embedding(x)


class PixelTrajectory(TrajectoryBackbone):
    """A class-conditional pixel diffusion model as a trajectory backbone.

    Args:
        model: ``"world"`` or a ``UNet2DModel`` folder (see :class:`PixelDiffusion`).
        num_steps: DDIM steps (DiG-IN: 20).
        guidance_scale: classifier-free guidance scale (DiG-IN: 3.0).
        clip_x0: clip x0-predictions to [-1, 1] (the world's ddpm needs it).
        unet, scheduler_config, null_class: a prebuilt model (tests).
    """

    def __init__(self, model: str = "world", num_steps: int = 20, guidance_scale: float = 3.0, clip_x0: bool = True,
                 gradient_checkpointing: bool = False, unet: nn.Module | None = None, scheduler_config: dict | None = None,
                 null_class: int | None = None):
        super().__init__(num_steps, guidance_scale, gradient_checkpointing)
        from .pixel import PixelDiffusion

        if unet is None:
            unet, scheduler_config, default_null = PixelDiffusion._load(model)
            null_class = default_null if null_class is None else null_class
        if null_class is None or getattr(unet, "class_embedding", None) is None:
            raise ValueError("PixelTrajectory needs a class-conditional UNet2DModel with a null class")
        if not isinstance(unet.class_embedding, _ClassEmbeddingInput):
            unet.class_embedding = _ClassEmbeddingInput(unet.class_embedding)
        self.unet = unet.eval().requires_grad_(False)
        self.null_class = int(null_class)
        self.clip_x0 = clip_x0
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(dict(scheduler_config))
        self._set_schedule(sched.alphas_cumprod, sched.config.num_train_timesteps)

    @property
    def image_size(self) -> int:
        s = self.unet.config.sample_size
        return s[0] if isinstance(s, (tuple, list)) else int(s)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.image_size:
            images = F.interpolate(images, size=(self.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        return images * 2 - 1

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return ((z + 1) / 2).clamp(0, 1)

    def _clip_x0(self, x0):
        return x0.clamp(-1, 1) if self.clip_x0 else x0

    def condition(self, labels: torch.Tensor) -> torch.Tensor:
        """The class embeddings (N, D) of ``labels``."""
        return self.unet.class_embedding.embedding(labels.long())

    def null_condition(self, n: int) -> torch.Tensor:
        dev = self.timesteps.device
        return self.condition(torch.full((n,), self.null_class, dtype=torch.long, device=dev))

    def _eps(self, z, t, cond, control=None):
        return self.unet(z, t, class_labels=cond).sample


class LatentDiffusion(TrajectoryBackbone):
    """Stable Diffusion-style latent text-to-image components as a trajectory backbone.

    Args:
        model: a hub id or local folder of a diffusers Stable Diffusion pipeline
            (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``).
        num_steps, guidance_scale: DDIM steps and CFG scale (DiG-IN: 20, 3.0).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for the components.
        attention_slicing: compute attention in slices (memory).
        unet, vae, text_encoder, tokenizer, scheduler_config: prebuilt components (tests).
    """

    def __init__(self, model: str | None = None, num_steps: int = 20, guidance_scale: float = 3.0, dtype: str = "float32",
                 gradient_checkpointing: bool = False, attention_slicing: bool = False, unet=None, vae=None,
                 text_encoder=None, tokenizer=None, scheduler_config: dict | None = None):
        super().__init__(num_steps, guidance_scale, gradient_checkpointing)
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        if unet is None:
            if model is None:
                raise ValueError("LatentDiffusion needs model=<hub id or folder> or prebuilt components")
            unet, vae, text_encoder, tokenizer, scheduler_config = self._load(model, torch_dtype)
        def prepared(m):
            return (m if m.dtype == torch_dtype else m.to(torch_dtype)).eval().requires_grad_(False)

        self.unet, self.vae, self.text_encoder = prepared(unet), prepared(vae), prepared(text_encoder)
        self.tokenizer = tokenizer
        self.dtype_ = torch_dtype
        if attention_slicing and hasattr(self.unet, "set_attention_slice"):
            self.unet.set_attention_slice("auto")
        self.scaling = float(getattr(self.vae.config, "scaling_factor", 0.18215))
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(dict(scheduler_config))
        self._set_schedule(sched.alphas_cumprod, sched.config.num_train_timesteps)

    @staticmethod
    def _load(model: str, dtype):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from ..classifiers.loaders import MissingWeightsError

        try:
            unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype)
            vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype)
            text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=dtype)
            tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
        except (OSError, ValueError) as e:
            raise MissingWeightsError(f"cannot load the latent diffusion model {model!r} (a diffusers Stable Diffusion "
                                      f"folder or hub id with unet/, vae/, text_encoder/, tokenizer/, scheduler/): {e}") from e
        local = Path(model) / "scheduler" / "scheduler_config.json"
        if local.is_file():
            cfg = json.loads(local.read_text())
        else:
            from diffusers import DDIMScheduler

            cfg = dict(DDIMScheduler.from_pretrained(model, subfolder="scheduler").config)
        return unet, vae, text_encoder, tokenizer, {k: v for k, v in cfg.items() if not k.startswith("_")}

    @property
    def image_size(self) -> int:
        s = self.unet.config.sample_size
        s = s[0] if isinstance(s, (tuple, list)) else int(s)
        return s * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.image_size:
            images = F.interpolate(images, size=(self.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        return self.vae.encode((images * 2 - 1).to(self.dtype_)).latent_dist.mean.float() * self.scaling

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode((z / self.scaling).to(self.dtype_)).sample.float()
        return ((x + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def condition(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (N, L, D) of ``prompts``."""
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        ids = tok.input_ids.to(self.timesteps.device)
        return self.text_encoder(ids)[0].float()

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        """Padded token ids (N, L) of ``prompts``, as the text encoder sees them."""
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def word_ids(self, word: str) -> list[int]:
        """The token ids of ``word`` alone (no start/end tokens)."""
        return list(self.tokenizer(word, add_special_tokens=False).input_ids)

    def null_condition(self, n: int) -> torch.Tensor:
        return self.condition([""] * n)

    supports_attention_control = True

    def _eps(self, z, t, cond, control=None):
        kwargs = None
        if control is not None:
            from .attention import install_attention_control

            install_attention_control(self.unet)  # idempotent; also after processors were replaced (e.g. slicing)
            kwargs = {"control": control}
        return self.unet(z.to(self.dtype_), t, encoder_hidden_states=cond.to(self.dtype_), cross_attention_kwargs=kwargs).sample.float()
