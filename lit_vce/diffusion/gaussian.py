"""guided-diffusion's respaced Gaussian diffusion: the sampler DVCE, ACE and DiME were published with.

:class:`RespacedDiffusion` reproduces the official ``SpacedDiffusion``
arithmetic (float64 schedule tables, per-step values cast to float32):

- ``space_timesteps``: ``T`` training steps respaced to a few evenly strided
  ones (``"200"``, sections ``"10,15,20"`` or ``"ddim50"``); the respaced betas
  are ``1 - abar_i / abar_prev`` over the kept steps, and the model is called
  at the original step of each respaced index (``timestep_map``).
- ``p_mean_variance``: x0 from eps (optionally clipped to [-1, 1]), the
  posterior mean, and the variance: learned (``learned_range``: the model's
  extra output v interpolates, in log space, between the posterior variance
  and beta), ``fixed_small`` (posterior variance) or ``fixed_large``.
- ``condition_mean``: guidance as Sohl-Dickstein et al.'s mean shift,
  ``mean + variance * gradient``.
- ``p_sample``: ancestral step ``mean + [i > 0] exp(log_variance / 2) noise``.

Parity with the official code: ``tests/test_adm.py``.
"""

from __future__ import annotations

import math

import torch


def linear_betas(num_steps: int) -> torch.Tensor:
    """guided-diffusion's ``linear`` schedule (scaled to ``num_steps``), float64."""
    scale = 1000 / num_steps
    return torch.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=torch.float64)


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule (Nichol & Dhariwal 2021; diffusers' ``squaredcos_cap_v2``), float64."""

    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor(
        [min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), max_beta) for i in range(num_steps)],
        dtype=torch.float64,
    )


def named_betas(schedule: str, num_steps: int) -> torch.Tensor:
    """Betas by name: ``linear`` (ADM; diffusers' ``linear`` with its defaults) or ``cosine``/``squaredcos_cap_v2``."""
    if schedule == "linear":
        return linear_betas(num_steps)
    if schedule in ("cosine", "squaredcos_cap_v2"):
        return cosine_betas(num_steps)
    raise ValueError(f"unknown noise schedule {schedule!r} (linear, cosine)")


def space_timesteps(num_timesteps: int, spacing: str | int | list[int]) -> list[int]:
    """The original steps kept by guided-diffusion's respacing, sorted ascending.

    ``spacing``: an int or ``"N"`` (N evenly strided steps, first and last
    included), comma-separated section counts (each section of the range
    strided on its own), or ``"ddimN"`` (a stride that gives exactly N steps
    starting at 0).
    """
    if isinstance(spacing, int):
        spacing = str(spacing)
    if isinstance(spacing, str) and spacing.startswith("ddim"):
        want = int(spacing[len("ddim") :])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == want:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot create exactly {want} steps with an integer stride")
    counts = [int(c) for c in spacing.split(",")] if isinstance(spacing, str) else list(spacing)
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(stride * j) for j in range(count)]
        start += size
    return sorted(set(kept))


class RespacedDiffusion:
    """A discrete Gaussian diffusion respaced as guided-diffusion does (eps prediction).

    Args:
        betas: the training schedule (float64, length T).
        spacing: see :func:`space_timesteps` (``None``: all T steps).
        variance: ``"learned_range"`` (the model outputs 2C channels),
            ``"fixed_small"`` or ``"fixed_large"``.
    """

    def __init__(self, betas: torch.Tensor, spacing: str | int | None = None, variance: str = "learned_range"):
        if variance not in ("learned_range", "fixed_small", "fixed_large"):
            raise ValueError(f"variance must be learned_range, fixed_small or fixed_large, got {variance!r}")
        base_abar = torch.cumprod(1 - betas.double(), 0)
        kept = space_timesteps(len(betas), spacing) if spacing is not None else list(range(len(betas)))
        last, new_betas = 1.0, []
        for i in kept:
            new_betas.append(1 - base_abar[i].item() / last)
            last = base_abar[i].item()
        self.timestep_map = torch.tensor(kept, dtype=torch.long)
        self.num_train_timesteps = len(betas)
        self.variance = variance
        b = torch.tensor(new_betas, dtype=torch.float64)
        self.betas = b
        abar = torch.cumprod(1 - b, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        self.alphas_cumprod, self.alphas_cumprod_prev = abar, abar_prev
        self.sqrt_recip_alphas_cumprod = (1 / abar).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / abar - 1).sqrt()
        post_var = b * (1 - abar_prev) / (1 - abar)
        self.posterior_variance = post_var
        # log of the posterior variance, clipped because it is 0 at the first step
        self.posterior_log_variance_clipped = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        self.posterior_mean_coef1 = b * abar_prev.sqrt() / (1 - abar)
        self.posterior_mean_coef2 = (1 - abar_prev) * (1 - b).sqrt() / (1 - abar)

    def __len__(self) -> int:
        return len(self.betas)

    @staticmethod
    def _at(table: torch.Tensor, i: int, like: torch.Tensor) -> torch.Tensor:
        """``table[i]`` as a float32 scalar on ``like``'s device (the official cast), in ``like``'s dtype."""
        return (
            table[i].float().to(like.device).to(like.dtype)
            if like.dtype != torch.float32
            else table[i].float().to(like.device)
        )

    def model_timestep(self, i: int) -> float:
        """The model's timestep input at respaced index ``i`` (on the 1000-step scale)."""
        return float(self.timestep_map[i]) * (1000.0 / self.num_train_timesteps)

    def q_sample(self, x0: torch.Tensor, i: int, noise: torch.Tensor) -> torch.Tensor:
        """Noise ``x0`` to respaced index ``i``."""
        return (
            self._at(self.alphas_cumprod.sqrt(), i, x0) * x0 + self._at((1 - self.alphas_cumprod).sqrt(), i, x0) * noise
        )

    def predict_xstart(self, x_t: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
        return (
            self._at(self.sqrt_recip_alphas_cumprod, i, x_t) * x_t
            - self._at(self.sqrt_recipm1_alphas_cumprod, i, x_t) * eps
        )

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, i: int) -> torch.Tensor:
        return self._at(self.posterior_mean_coef1, i, x_t) * x0 + self._at(self.posterior_mean_coef2, i, x_t) * x_t

    def p_mean_variance(
        self, model_output: torch.Tensor, x_t: torch.Tensor, i: int, clip_denoised: bool = False
    ) -> dict:
        """Mean, variance, log variance, x0 and eps of p(x_{i-1} | x_i) from the model output at index ``i``."""
        c = x_t.shape[1]
        if self.variance == "learned_range":
            if model_output.shape[1] != 2 * c:
                raise ValueError(f"learned variance needs {2 * c} output channels, got {model_output.shape[1]}")
            eps, v = model_output[:, :c], model_output[:, c:]
            min_log = self._at(self.posterior_log_variance_clipped, i, x_t)
            max_log = self._at(self.betas.log(), i, x_t)
            frac = (v + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
            var = torch.exp(log_var)
        else:
            eps = model_output[:, :c]
            if self.variance == "fixed_small":
                var_t, log_t = self.posterior_variance, self.posterior_log_variance_clipped
            else:
                var_t = torch.cat([self.posterior_variance[1:2], self.betas[1:]])
                log_t = var_t.log()
            var = self._at(var_t, i, x_t).expand_as(x_t)
            log_var = self._at(log_t, i, x_t).expand_as(x_t)
        x0 = self.predict_xstart(x_t, eps, i)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        return {
            "mean": self.posterior_mean(x0, x_t, i),
            "variance": var,
            "log_variance": log_var,
            "pred_xstart": x0,
            "eps": eps,
        }

    @staticmethod
    def condition_mean(out: dict, gradient: torch.Tensor) -> torch.Tensor:
        """Sohl-Dickstein conditioning: the mean shifted by variance times the guidance gradient."""
        return out["mean"].float() + out["variance"] * gradient.float()

    @staticmethod
    def p_sample(mean: torch.Tensor, log_variance: torch.Tensor, i: int, noise: torch.Tensor) -> torch.Tensor:
        """An ancestral step from ``mean``; no noise at the last step (``i == 0``)."""
        return mean if i == 0 else mean + torch.exp(0.5 * log_variance) * noise
