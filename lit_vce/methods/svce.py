"""SVCE: sparse visual counterfactual explanations in image space (Boreiko et al., GCPR 2022).

No diffusion model: a targeted attack that maximises the explained classifier's
target log-confidence within the l_p ball of radius ``eps`` around the image,
intersected with the [0, 1] box, as the authors' code runs it:

- ``afw`` (the paper's headline, p = 1.5): Auto-Frank-Wolfe. Each step moves a
  fraction ``step_size`` (0.75 at the start) towards the vertex ``x + v`` of the
  feasible set that maximises the linearised objective, ``v = argmax <g, v>``
  over ``||v||_p <= eps, 0 <= x + v <= 1`` (:func:`lp_box_lmo`, exact); the start
  is the vertex for a random direction;
- ``apgd`` (the simpler sibling), p = 2: Auto-PGD with normalised gradient
  steps (initial step 2 eps), momentum 0.75, projection onto the ball and the box;
  p = 1: l1-APGD (Croce & Hein, 2021): sign steps on the top 20 % of the gradient's
  coordinates, normalised by their count (initial step eps), the exact projection
  onto the l1 ball and the box (:func:`project_l1_box`), no momentum;
- Auto-PGD's step-size schedule: for ``afw`` and l2, checkpoints after 22 % of the
  iterations, then at intervals shrinking by 3 % to at least 6 %; where the
  objective rose in at most 75 % of the last interval's steps, or did not improve
  since the previous checkpoint, the step halves and the iterate restarts from the
  best one; for l1, every 4 % of the iterations the sparsity follows the best
  iterate's (its count of changed coordinates / 1.5), and the step resets to eps
  where that count fell by 5 % (restarting from the best iterate) or else shrinks
  by 1.5 (at least eps / 10). The best iterate (highest target log-confidence) is
  returned.

It needs a robust classifier to give meaningful images; on a non-robust one it
finds adversarial noise, the benchmark's negative control.
"""

from __future__ import annotations

import torch

from ..objectives import ObjectiveContext, TargetCE
from ..registry import METHODS
from ..rngs import per_sample_randn
from .base import CounterfactualResult, VCEBatch, VCEMethod
from .parts import project_l2_box

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


def project_l1_box(x: torch.Tensor, delta: torch.Tensor, eps: float, iterations: int = 60) -> torch.Tensor:
    """The Euclidean projection of ``delta`` onto ``{d: ||d||_1 <= eps, 0 <= x + d <= 1}``, per
    sample: ``d_j = sign(delta_j) * clip(|delta_j| - lam, 0, room_j)`` with the box's room in
    ``delta_j``'s direction and ``lam >= 0`` the smallest value that meets the ball (bisection
    in float64; the projection l1-APGD's ``L1_projection`` makes)."""
    xf, df = x.detach().flatten(1).double(), delta.detach().flatten(1).double()
    room = torch.where(df > 0, 1 - xf, xf).clamp_min(0)
    a = df.abs()

    def size(lam):
        return (a - lam[:, None]).clamp_min(0).minimum(room).sum(1)

    lo = torch.zeros(len(df), dtype=torch.float64, device=df.device)
    hi = a.amax(1)
    inside = size(lo) <= eps
    for _ in range(iterations):
        mid = (lo + hi) / 2
        big = size(mid) > eps
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    lam = torch.where(inside, torch.zeros_like(hi), hi)
    out = (a - lam[:, None]).clamp_min(0).minimum(room) * torch.sign(df)
    return out.to(delta.dtype).view_as(delta)


@METHODS.register("svce")
class SVCE(VCEMethod):
    """SVCE: the target log-confidence maximised within an l_p ball and the [0, 1] box (no diffusion).

    Args:
        eps: radius of the l_p ball at the image's own resolution (published: 150 at 256 px for
            p = 1.5; the l_1.5 radius scales with the number of pixels to the power 1/1.5).
        p: the norm (``afw``: any p > 1, published 1.5; ``apgd``: 1 or 2).
        steps: iterations (published: 75).
        attack: ``"afw"`` (Auto-Frank-Wolfe) or ``"apgd"`` (Auto-PGD, l1 or l2).
        momentum: Frank-Wolfe momentum on the gradient (0: none, the authors' default).
        rho: the oscillation threshold of the step-size schedule (0.75).
    """

    supports_concurrency = True
    region_mode = "project"

    def __init__(
        self,
        eps: float = 150.0,
        p: float = 1.5,
        steps: int = 75,
        attack: str = "afw",
        momentum: float = 0.0,
        rho: float = 0.75,
    ):
        super().__init__()
        if attack not in ("afw", "apgd"):
            raise ValueError("attack must be 'afw' or 'apgd'")
        if attack == "apgd" and p not in (1, 2):
            raise ValueError("apgd runs the l1 or l2 ball (p=1 or p=2); use attack='afw' for other p > 1")
        if attack == "afw" and p <= 1:
            raise ValueError("afw needs p > 1 (its vertex is not unique for p = 1); use attack='apgd' with p=1")
        if eps <= 0 or steps < 1:
            raise ValueError("SVCE needs eps > 0 and steps >= 1")
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
        if self.p == 1:
            return x + project_l1_box(x, r, self.eps)
        return project_l2_box(
            x, x + self.eps * r / r.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1), self.eps
        )

    def _move(self, i: int, x, x_adv, prev, grad, run: dict) -> torch.Tensor:
        """One iterate from ``x_adv``: the Frank-Wolfe step, or Auto-PGD's l2 (momentum 0.75)
        or l1 (sparse sign step over the top ``topk`` coordinates, no momentum) step."""
        shape, step = (-1,) + (1,) * (x.dim() - 1), run["step"].view(-1, *([1] * (x.dim() - 1)))
        if self.attack == "afw":
            run["m"] = grad if i == 0 else self.momentum * run["m"] + (1 - self.momentum) * grad
            return x_adv + step * (x + lp_box_lmo(x, run["m"], self.eps, self.p) - x_adv)
        if self.p == 1:
            flat = grad.abs().flatten(1)
            kth = ((1 - run["topk"]) * flat.shape[1]).long().clamp(0, flat.shape[1] - 1)
            cut = flat.sort(1).values.gather(1, kth[:, None]).view(shape)
            sparse = torch.sign(grad) * (grad.abs() >= cut).to(grad)
            moved = x_adv + step * sparse / (sparse.abs().flatten(1).sum(1).view(shape) + 1e-10)
            return x + project_l1_box(x, moved - x, self.eps)
        unit = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
        z = project_l2_box(x, x_adv + step * unit, self.eps)
        a = 1.0 if i == 0 else 0.75
        return project_l2_box(x, x_adv + a * (z - x_adv) + (1 - a) * (x_adv - prev), self.eps)

    def _checkpoint(self, i: int, x, best, history, run: dict) -> torch.Tensor:
        """Auto-PGD's step-size rule at a checkpoint; returns the samples that restart from their best."""
        if self.attack == "apgd" and self.p == 1:  # l1-APGD: adapt the sparsity, reset or shrink the step
            full = self.eps
            sparsity = (best - x).flatten(1).ne(0).sum(1).to(run["step"])
            reset = sparsity / run["sparsity"] < 0.95
            run["topk"], run["sparsity"] = sparsity / sparsity.new_tensor(x[0].numel()) / 1.5, sparsity
            run["step"] = torch.where(reset, torch.full_like(run["step"], full), run["step"] / 1.5).clamp(
                full / 10, full
            )
            return reset
        k = run["k"]
        rises = sum((history[i - j] > history[i - j - 1]).float() for j in range(k))
        halve = (rises <= k * self.rho) | (~run["reduced"] & (run["last_best"] >= run["best_value"]))
        run["reduced"], run["last_best"] = halve.clone(), run["best_value"].clone()
        run["step"][halve] /= 2
        run["k"] = max(k - max(int(0.03 * self.steps), 1), max(int(0.06 * self.steps), 1))
        return halve

    def counterfactuals(self, batch: VCEBatch, classifier) -> CounterfactualResult:
        """The attack in image space, at the batch's resolution (the classifier resizes)."""
        x = batch.images
        n, shape = len(batch), (-1,) + (1,) * (x.dim() - 1)
        region = batch.region  # the projection onto the region: the perturbation and the gradient vanish outside

        def inside(z):
            return z if region is None else x + region * (z - x)

        x_adv = inside(self._start(batch))
        value, grad = self._value_and_grad(x_adv, batch, classifier)
        grad = grad if region is None else grad * region
        best, best_grad = x_adv.clone(), grad.clone()
        l1 = self.attack == "apgd" and self.p == 1
        first = 0.75 if self.attack == "afw" else (1.0 if l1 else 2.0) * self.eps
        run = {
            "step": torch.full((n,), first, device=x.device),
            "best_value": value.clone(),
            "last_best": value.clone(),
            "reduced": torch.ones(n, dtype=torch.bool, device=x.device),
            "topk": torch.full((n,), 0.2, device=x.device),
            "sparsity": torch.full((n,), float(x[0].numel()), device=x.device),
            "k": max(int((0.04 if l1 else 0.22) * self.steps), 1),
        }
        history, counter, prev = torch.zeros(self.steps, n, device=x.device), 0, x_adv
        from ..progress import steps as bar

        for i in bar(range(self.steps), f"{self.name} steps", n):
            prev, x_adv = x_adv, inside(self._move(i, x, x_adv, prev, grad, run)).detach()
            value, grad = self._value_and_grad(x_adv, batch, classifier)
            if region is not None:
                grad = grad * region
            history[i] = value
            up = value > run["best_value"]
            best[up], run["best_value"][up], best_grad[up] = x_adv[up], value[up], grad[up]
            counter += 1
            if counter == run["k"]:
                restart = self._checkpoint(i, x, best, history, run)
                x_adv[restart], grad[restart] = best[restart], best_grad[restart]
                counter = 0
        ok = torch.isfinite(best).flatten(1).all(1)
        failure = [None if bool(f) else "non-finite attack iterate" for f in ok]
        images = torch.where(ok.view(shape), best, x)
        diag = {"distance": lp_norm(images - x, self.p).detach(), "steps": torch.full((n,), float(self.steps))}
        return CounterfactualResult(images.detach(), diag, failure)
