"""SVCE: sparse visual counterfactual explanations in image space (Boreiko et al., GCPR 2022).

No diffusion model: a targeted attack that maximises the explained classifier's
target log-confidence within the l_p ball of radius ``eps`` around the image,
intersected with the [0, 1] box, as the authors' code runs it:

- ``afw`` (the paper's headline, p = 1.5): Auto-Frank-Wolfe. Each step moves a
  fraction ``step_size`` (0.75 at the start) towards the vertex ``x + v`` of the
  feasible set that maximises the linearised objective, ``v = argmax <g, v>``
  over ``||v||_p <= eps, 0 <= x + v <= 1`` (:func:`lp_box_lmo`, exact); the start
  is the vertex for a random direction;
- ``apgd`` (p = 2, the simpler sibling): Auto-PGD with normalised gradient steps
  (initial step 2 eps), momentum 0.75, projection onto the ball and the box;
- both with Auto-PGD's step-size schedule: checkpoints after 22 % of the
  iterations, then at intervals shrinking by 3 % to at least 6 %; where the
  objective rose in at most 75 % of the last interval's steps, or did not
  improve since the previous checkpoint, the step halves and the iterate
  restarts from the best one. The best iterate (highest target log-confidence)
  is returned.

It needs a robust classifier to give meaningful images; on a non-robust one it
finds adversarial noise, the benchmark's negative control.
"""

from __future__ import annotations

import torch

from ..objectives import ObjectiveContext, TargetCE
from ..registry import METHODS
from ..rngs import per_sample_randn
from .base import CounterfactualResult, VCEBatch, VCEMethod

_TINY = 1e-22


def lp_box_lmo(x: torch.Tensor, w: torch.Tensor, eps: float, p: float) -> torch.Tensor:
    """The exact linear maximiser ``argmax <w, d>`` over ``||d||_p <= eps`` and ``0 <= x + d <= 1``
    (p > 1), per sample.

    Coordinate j moves in the direction of ``w_j`` up to its box bound ``gamma_j``; with a
    multiplier mu for the ball, ``|d_j| = min(gamma_j, (|w_j| / (p mu))^(1 / (p - 1)))``. The
    coordinates saturate in the order of ``|w_j| / (p gamma_j^(p - 1))``, so after sorting
    by it the active set is found by bisection and mu in closed form.
    """
    if p <= 1:
        raise ValueError("the Frank-Wolfe vertex needs p > 1")
    shape, dtype = w.shape, w.dtype
    xf = x.detach().flatten(1).double().clamp(_TINY, 1 - _TINY)
    wf = w.detach().flatten(1).double()
    n, d = wf.shape
    gamma = torch.where(wf > 0, 1 - xf, torch.where(wf < 0, xf, torch.zeros_like(xf)))
    a = torch.where(gamma > 0, wf.abs(), torch.zeros_like(wf))  # a coordinate at its bound cannot move
    q = p / (p - 1)
    mu = a / (p * gamma.clamp_min(_TINY) ** (p - 1))
    mu_s, order = mu.sort(1)
    g_s, a_s = gamma.gather(1, order), a.gather(1, order)
    zeros = torch.zeros(n, 1, dtype=torch.float64, device=wf.device)
    tail = torch.cat([(g_s**p).flip(1).cumsum(1).flip(1), zeros], 1)  # tail[k] = sum_{j >= k} gamma^p
    head = torch.cat([zeros, (a_s**q).cumsum(1)], 1)  # head[k] = sum_{j < k} |w|^q
    budget = float(eps) ** p
    # F(k): the squared-p norm with coordinates j < k free at mu = mu_s[k] (decreasing in k)
    f = tail[:, :d] + head[:, :d] / (p * mu_s).clamp_min(_TINY) ** q
    active = tail[:, 0] > budget  # the box vertex lies outside the ball
    k = (f > budget).sum(1).clamp(1, d)  # free set: the first k coordinates
    rows = torch.arange(n, device=wf.device)
    scale = head[rows, k] / (budget - tail[rows, k]).clamp_min(_TINY)  # (p mu*)^q
    free = a ** (1 / (p - 1)) / scale[:, None] ** (1 / p)
    delta = torch.where(active[:, None], torch.minimum(gamma, free), gamma)
    return (delta * torch.sign(wf)).to(dtype).view(shape)


def lp_norm(v: torch.Tensor, p: float) -> torch.Tensor:
    return v.flatten(1).abs().pow(p).sum(1).pow(1 / p)


def _project_l2_box(x: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
    """Auto-PGD's l2 projection: onto the ball around ``x``, then clipped to the box."""
    d = z - x
    norm = d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
    return (x + d * torch.clamp(eps / norm, max=1.0)).clamp(0, 1)


@METHODS.register("svce")
class SVCE(VCEMethod):
    """SVCE: the target log-confidence maximised within an l_p ball and the [0, 1] box (no diffusion).

    Args:
        eps: radius of the l_p ball at the image's own resolution (published: 150 at 256 px for
            p = 1.5; the l_1.5 radius scales with the number of pixels to the power 1/1.5).
        p: the norm (``afw``: any p > 1, published 1.5; ``apgd``: 2).
        steps: iterations (published: 75).
        attack: ``"afw"`` (Auto-Frank-Wolfe) or ``"apgd"`` (Auto-PGD, l2).
        momentum: Frank-Wolfe momentum on the gradient (0: none, the authors' default).
        rho: the oscillation threshold of the step-size schedule (0.75).
    """

    name = "svce"

    def __init__(self, eps: float = 150.0, p: float = 1.5, steps: int = 75, attack: str = "afw", momentum: float = 0.0,
                 rho: float = 0.75):
        super().__init__()
        if attack not in ("afw", "apgd"):
            raise ValueError("attack must be 'afw' or 'apgd'")
        if attack == "apgd" and p != 2:
            raise ValueError("apgd runs the l2 ball (p=2); use attack='afw' for other p")
        if p <= 1 or eps <= 0 or steps < 1:
            raise ValueError("SVCE needs p > 1, eps > 0 and steps >= 1")
        self.eps, self.p, self.steps, self.attack = float(eps), float(p), int(steps), attack
        self.momentum, self.rho = float(momentum), float(rho)
        self.objective = TargetCE()

    @classmethod
    def test_kwargs(cls) -> dict:
        return {"eps": 3.0, "steps": 8}

    def _value_and_grad(self, x_adv: torch.Tensor, batch: VCEBatch, classifier) -> tuple[torch.Tensor, torch.Tensor]:
        """(target log-confidence (N,), its gradient)."""
        with torch.enable_grad():
            z = x_adv.detach().requires_grad_(True)
            value = -self.objective(z, ObjectiveContext(batch.images, batch.source, batch.target, classifier))
            (g,) = torch.autograd.grad(value.sum(), z)
        return value.detach(), g

    def _start(self, batch: VCEBatch) -> torch.Tensor:
        x = batch.images
        r = per_sample_randn(x.shape[1:], batch.rngs).to(x)
        if self.attack == "afw":
            return (x + lp_box_lmo(x, r, self.eps, self.p)).clamp(0, 1)
        return _project_l2_box(x, x + self.eps * r / r.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1), self.eps)

    def generate(self, batch: VCEBatch, classifier) -> CounterfactualResult:
        x = batch.images
        n, shape = len(batch), (-1,) + (1,) * (x.dim() - 1)
        x_adv = self._start(batch)
        value, grad = self._value_and_grad(x_adv, batch, classifier)
        best, best_value, best_grad = x_adv.clone(), value.clone(), grad.clone()
        step = torch.full((n,), 0.75 if self.attack == "afw" else 2 * self.eps, device=x.device)
        k, k_min, k_decr = max(int(0.22 * self.steps), 1), max(int(0.06 * self.steps), 1), max(int(0.03 * self.steps), 1)
        history = torch.zeros(self.steps, n, device=x.device)
        last_best, reduced, counter = best_value.clone(), torch.ones(n, dtype=torch.bool, device=x.device), 0
        m, prev = grad, x_adv
        for i in range(self.steps):
            if self.attack == "afw":
                m = grad if i == 0 else self.momentum * m + (1 - self.momentum) * grad
                new = x_adv + step.view(shape) * (x + lp_box_lmo(x, m, self.eps, self.p) - x_adv)
            else:
                unit = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
                z = _project_l2_box(x, x_adv + step.view(shape) * unit, self.eps)
                a = 1.0 if i == 0 else 0.75
                new = _project_l2_box(x, x_adv + a * (z - x_adv) + (1 - a) * (x_adv - prev), self.eps)
            prev, x_adv = x_adv, new.detach()
            value, grad = self._value_and_grad(x_adv, batch, classifier)
            history[i] = value
            up = value > best_value
            best[up], best_value[up], best_grad[up] = x_adv[up], value[up], grad[up]
            counter += 1
            if counter == k:  # Auto-PGD's checkpoint: halve the step where progress stalled
                rises = sum((history[i - j] > history[i - j - 1]).float() for j in range(k))
                halve = (rises <= k * self.rho) | (~reduced & (last_best >= best_value))
                reduced, last_best = halve.clone(), best_value.clone()
                step[halve] /= 2
                x_adv[halve], grad[halve] = best[halve], best_grad[halve]
                k, counter = max(k - k_decr, k_min), 0
        with torch.no_grad():
            probs = classifier(best).softmax(1)
        ok = torch.isfinite(best).flatten(1).all(1)
        failure = [None if bool(f) else "non-finite attack iterate" for f in ok]
        images = torch.where(ok.view(shape), best, x)
        diag = {"target_confidence": probs.gather(1, batch.target[:, None]).squeeze(1),
                "distance": lp_norm(images - x, self.p).detach(), "steps": torch.full((n,), float(self.steps))}
        return CounterfactualResult(images.detach(), diag, failure)
