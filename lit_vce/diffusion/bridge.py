"""Image-to-image Schrödinger bridges (I2SB; Liu et al., ICML 2023), the prior RCSB samples.

I2SB learns a diffusion bridge between a clean image ``x0`` and a degraded one
``x1`` (for inpainting: the image with noise inside the region). Its forward
process has the closed form (the paper's Eq. 11) ``x_t ~ N(mu_x0[t] x0 + mu_x1[t] x1,
std_sb[t]^2)`` with ``std_fwd[t]^2 = sum_{s<=t} beta_s``, ``std_bwd[t]^2 = sum_{s>=t}
beta_s``, ``mu_x0 = std_bwd^2 / (std_fwd^2 + std_bwd^2)``, ``mu_x1 = 1 - mu_x0`` and
``std_sb^2 = std_fwd^2 std_bwd^2 / (std_fwd^2 + std_bwd^2)``. The network predicts
``(x_t - x0) / std_fwd[t]`` (Eq. 12), so ``x0_hat = x_t - std_fwd[t] * net(x_t, t)``, and
a reverse step draws from the posterior ``p(x_{n'} | x_n, x0_hat)`` (Eq. 4): mean
``c0 x0_hat + cn x_n`` with ``(c0, cn)`` the Gaussian-product coefficients of
``std_fwd[n']`` and ``sqrt(std_fwd[n]^2 - std_fwd[n']^2)``.

The schedule is the official code's: ``interval`` (1000) betas, ``sqrt``-linear from
1e-4 to ``beta_max / interval`` and mirrored about the middle; the network's time input
for step ``k`` is ``noise_levels[k] = linspace(t0, T, interval)[k] * interval``; sampling
visits ``space_indices(start, nfe + 1)``. Tables are float64, as the official ones.

Networks: guided-diffusion's ADM UNet without learned sigma (I2SB's ImageNet
checkpoints, ``Image256Net``: the state dict's ``diffusion_model.*`` keys, read by
:func:`load_i2sb_checkpoint` through :mod:`lit_vce.diffusion.adm`) or the world's
``UNet2DModel`` (the shipped ``bridge`` weights, trained by ``scripts/train_world.py
--models bridge``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..provenance import RecordsInitArgs


def bridge_betas(interval: int = 1000, beta_max: float = 1.0) -> np.ndarray:
    """I2SB's betas: ``linspace(1e-4 ** 0.5, (beta_max / interval) ** 0.5, interval) ** 2`` (float64),
    the first half followed by its mirror image."""
    betas = torch.linspace(1e-4**0.5, (beta_max / interval) ** 0.5, interval, dtype=torch.float64).pow(2).numpy()
    return np.concatenate([betas[: interval // 2], np.flip(betas[: interval // 2])])


def gaussian_product(sigma1, sigma2):
    """For ``N(x | a, sigma1^2) N(x | b, sigma2^2)``: the weights of ``a`` and ``b`` in the
    product's mean and its variance."""
    denom = sigma1**2 + sigma2**2
    return sigma2**2 / denom, sigma1**2 / denom, sigma1**2 * sigma2**2 / denom


def space_indices(num_steps: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``0 .. num_steps - 1`` (rounded; I2SB's ``util``)."""
    if count > num_steps:
        raise ValueError(f"cannot take {count} steps out of {num_steps}")
    stride = 1.0 if count <= 1 else (num_steps - 1) / (count - 1)
    return [round(k * stride) for k in range(count)]


class BridgeSchedule:
    """The bridge's tables (float64): ``std_fwd``, ``std_bwd``, ``std_sb``, ``mu_x0``, ``mu_x1``
    and the network's time inputs ``noise_levels`` (float32, as the official buffer)."""

    def __init__(self, interval: int = 1000, beta_max: float = 1.0, t0: float = 1e-4, T: float = 1.0):
        if interval < 2:
            raise ValueError("interval must be >= 2")
        self.interval, self.beta_max, self.t0, self.T = int(interval), float(beta_max), float(t0), float(T)
        betas = bridge_betas(self.interval, self.beta_max)
        self.std_fwd = torch.from_numpy(np.sqrt(np.cumsum(betas)))
        self.std_bwd = torch.from_numpy(np.sqrt(np.flip(np.cumsum(np.flip(betas))).copy()))
        self.mu_x0, self.mu_x1, var = gaussian_product(self.std_fwd, self.std_bwd)
        self.std_sb = var.sqrt()
        self.noise_levels = torch.linspace(self.t0, self.T, self.interval) * self.interval

    def q_sample(self, step: int, x0: torch.Tensor, x1: torch.Tensor, noise: torch.Tensor | None = None):
        """A draw of ``x_step`` between ``x0`` and ``x1`` (Eq. 11); ``noise=None``: its mean (OT-ODE)."""
        xt = self.mu_x0[step].item() * x0 + self.mu_x1[step].item() * x1
        return xt if noise is None else xt + self.std_sb[step].item() * noise

    def posterior(self, prev: int, step: int) -> tuple[float, float, float]:
        """(weight of x0_hat, weight of x_step, variance) of ``p(x_prev | x_step, x0_hat)`` (Eq. 4)."""
        if not prev < step:
            raise ValueError(f"posterior from step {step} to {prev}: the earlier step must be smaller")
        delta = (self.std_fwd[step] ** 2 - self.std_fwd[prev] ** 2).sqrt()
        c0, cn, var = gaussian_product(self.std_fwd[prev], delta)
        return c0, cn, var

    def describe(self) -> dict:
        return {"interval": self.interval, "beta_max": self.beta_max, "t0": self.t0, "T": self.T}


class _WorldNet(nn.Module):
    """The world's class-conditional ``UNet2DModel`` as a bridge network (always the null class)."""

    def __init__(self, unet: nn.Module, null_class: int):
        super().__init__()
        self.unet, self.null_class = unet, int(null_class)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = torch.full((len(x),), self.null_class, dtype=torch.long, device=x.device)
        return self.unet(x, t, class_labels=y).sample


def world_bridge_network(unet: nn.Module | None = None) -> nn.Module:
    """The world bridge's network: the world ddpm's architecture (random weights unless
    ``unet`` is given), called with the null class."""
    from ..world.models import NULL_CLASS, build_world_unet

    return _WorldNet(unet if unet is not None else build_world_unet(), NULL_CLASS)


def load_i2sb_checkpoint(path: str | Path, preset: str = "imagenet256_uncond", **overrides) -> nn.Module:
    """An I2SB ``Image256Net`` checkpoint (``{"net": state}`` or the state itself; keys
    ``diffusion_model.*`` and ``noise_levels``) as an ADM UNet without learned sigma, read as
    RCSB reads it (the ``net`` weights, not the EMA)."""
    from ..errors import MissingWeightsError
    from .adm import ADMConfig, ADMUNet

    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingWeightsError(
            f"I2SB checkpoint {path} does not exist; put I2SB's inpainting checkpoint (RCSB's "
            "data/weights/inpainters/cddb/imagenet/freeform_20_30/latest.pt) there"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("net", state)
    adm = {k[len("diffusion_model.") :]: v for k, v in state.items() if k.startswith("diffusion_model.")}
    if not adm:
        raise ValueError(f"{path} holds no 'diffusion_model.*' weights: not an I2SB Image256Net checkpoint")
    model = ADMUNet(ADMConfig.preset(preset, **{"learn_sigma": False, **overrides}))
    try:
        missing, unexpected = model.load_state_dict(adm, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit ADM preset {preset!r} without learned sigma: {str(e)[:300]}") from e
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit ADM preset {preset!r}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval().requires_grad_(False)


class I2SBBridge(nn.Module, RecordsInitArgs):
    """An I2SB inpainting bridge: a network and its schedule.

    Args:
        model: ``"world"`` (the shipped world bridge, 32 px), ``"i2sb:imagenet"`` (RCSB's ImageNet
            inpainting bridge, I2SB's ``inpaint-freeform2030`` checkpoint, read from
            ``$LIT_VCE_WEIGHTS_DIR/i2sb/imagenet-freeform2030.pt``), ``"i2sb:<path>"`` (an I2SB
            ``latest.pt``; with ``adm_preset``, default ``imagenet256_uncond``), or a built network
            ``net(x, t)`` (then give ``image_size``).
        interval, beta_max, t0, T: the schedule (I2SB's and RCSB's ImageNet values).
        image_size: the side of the images a built network works at.
        adm_preset: the ADM architecture of an ``i2sb:`` checkpoint.
    """

    def __init__(
        self,
        model: str | nn.Module = "world",
        interval: int = 1000,
        beta_max: float = 1.0,
        t0: float = 1e-4,
        T: float = 1.0,
        image_size: int | None = None,
        adm_preset: str = "imagenet256_uncond",
    ):
        super().__init__()
        self.schedule = BridgeSchedule(interval, beta_max, t0, T)
        if isinstance(model, nn.Module):
            if image_size is None:
                raise ValueError("a built bridge network needs image_size")
            self.net, self._size, self.domain = model, int(image_size), None
        elif model == "world":
            from ..world.models import load_world_network

            self.net, self._size, self.domain = world_bridge_network(load_world_network("bridge")), 32, "world"
        elif isinstance(model, str) and model.startswith("i2sb:"):
            from ..weights import weights_dir
            from .adm import ADM_PRESETS

            path = model[len("i2sb:") :]
            if path == "imagenet":
                path = weights_dir() / "i2sb" / "imagenet-freeform2030.pt"
            self.net = load_i2sb_checkpoint(path, adm_preset)
            self._size, self.domain = int(ADM_PRESETS[adm_preset]["image_size"]), None
        else:
            raise ValueError(f"unknown bridge model {model!r}: use 'world' or 'i2sb:<checkpoint path>'")
        self.net.eval().requires_grad_(False)

    @property
    def image_size(self) -> int:
        return self._size

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the bridge's space [-1, 1] (``(x - 0.5) * 2``, RCSB's rounding)."""
        return (images - 0.5) * 2

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The bridge's space -> images in [0, 1]: float32, clamped to [-1, 1], halved and
        shifted (RCSB's output, operation for operation)."""
        return x.float().clamp(-1, 1) / 2 + 0.5

    def pred_x0(self, xt: torch.Tensor, step: int) -> torch.Tensor:
        """``x_t - std_fwd[step] * net(x_t, noise_levels[step])`` in float64 (no clipping): the
        network sees ``x_t`` in float32, and the official code's float64 ``std_fwd`` table
        makes the prediction (and with it the sampler's state) float64."""
        xt32 = xt.float()
        t = self.schedule.noise_levels[int(step)].to(xt.device).expand(len(xt))
        std = self.schedule.std_fwd[int(step)].to(xt.device)
        return xt32.double() - std * self.net(xt32, t).double()

    @torch.no_grad()
    def inpaint(
        self, images: torch.Tensor, region: torch.Tensor, noise: torch.Tensor, start_step: int = 1000, nfe: int = 100
    ) -> torch.Tensor:
        """Unguided inpainting of ``region`` (OT-ODE, the sampler RCSB guides): the images in [0, 1]."""
        s, mask = self.schedule, region.expand_as(images).double()
        x = self.encode(images).double()
        start = s.q_sample(start_step - 1, x, (1 - mask) * x + mask * noise.double())
        xt, steps = start, space_indices(start_step, nfe + 1)[::-1]
        for prev, step in zip(steps[1:], steps[:-1]):
            c0, cn, _ = s.posterior(prev, step)
            xt = (1 - mask) * start + mask * (c0 * self.pred_x0(xt, step) + cn * xt)
        return mask.float() * self.decode(xt) + (1 - mask.float()) * images

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device
