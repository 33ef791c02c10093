"""Reusable parts of guided methods: gradient post-processing and augmentations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..rngs import per_sample_rand


def _flat_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.flatten(1) * b.flatten(1)).sum(1)


def angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample angle (radians) between a and b."""
    cos = _flat_dot(a, b) / (a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1)).clamp_min(1e-30)
    return torch.arccos(cos.clamp(-1, 1))


def cone_projection(axis: torch.Tensor, vector: torch.Tensor, alpha_deg: float = 30.0) -> torch.Tensor:
    """Project ``vector`` onto the cone of half-angle ``alpha`` around ``axis``, per sample.

    DVCE (Augustin et al., NeurIPS 2022) calls it with the **explained**
    classifier's gradient as ``axis`` and the robust partner's gradient as
    ``vector``: the guidance then always lies within ``alpha`` of the explained
    classifier's ascent direction while following the robust model's
    perceptually aligned gradient as closely as that allows. Where the angle
    between the two exceeds ``alpha``, ``vector`` is replaced by the vector of
    the same norm in the plane of both at exactly ``alpha`` from ``axis``;
    inside the cone it is returned unchanged (the official code returns the
    unit axis there; see ``docs/parity.md``). DVCE rescales the result, so only
    its direction matters.
    """
    alpha = math.radians(alpha_deg)
    shape = vector.shape
    a, v = axis.flatten(1), vector.flatten(1)
    a_hat = a / a.norm(dim=1, keepdim=True).clamp_min(1e-30)
    ortho = v - (v * a_hat).sum(1, keepdim=True) * a_hat
    ortho_norm = ortho.norm(dim=1, keepdim=True)
    u = torch.where(ortho_norm > 1e-30, ortho / ortho_norm.clamp_min(1e-30), torch.zeros_like(ortho))
    projected = v.norm(dim=1, keepdim=True) * (math.cos(alpha) * a_hat + math.sin(alpha) * u)
    outside = angle(axis, vector) > alpha
    return torch.where(outside[:, None], projected, v).view(shape)


def rescale_to(grad: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Rescale each sample's ``grad`` to the L2 norm of ``reference`` (DVCE's norm rescaling)."""
    gn = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    rn = reference.flatten(1).norm(dim=1)
    return grad * (rn / gn).view(-1, *([1] * (grad.ndim - 1)))


def project_l2_box(x: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
    """``z`` projected onto the l2 ball of radius ``eps`` around ``x``, then clipped to the
    [0, 1] box (Auto-PGD's and ACE's l2 projection)."""
    d = z - x
    norm = d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
    return (x + d * torch.clamp(eps / norm, max=1.0)).clamp(0, 1)


def ascent(objective, x0: torch.Tensor, ctx) -> torch.Tensor:
    """The gradient of ``-objective`` (lower is better) with respect to the image ``x0``, per sample."""
    (g,) = torch.autograd.grad(-objective(x0, ctx).sum(), x0, retain_graph=True)
    return g


def objective_guidance(
    objective, x0: torch.Tensor, ctx, to_xt, rescale_like: torch.Tensor | None = None
) -> torch.Tensor:
    """The guidance of an objective on x_t: ``to_xt`` of its ascent direction at ``x0``; with
    ``rescale_like``, each weighted term's direction is rescaled to that tensor's per-sample
    norm before its weight is applied (DVCE's normalisation to the noise prediction)."""
    if rescale_like is None:
        return to_xt(ascent(objective, x0, ctx))
    total = 0
    for weight, term in objective.weighted_terms():
        total = total + weight * rescale_to(to_xt(ascent(term, x0, ctx)), rescale_like)
    return total


def scale_attempts(method) -> list:
    """DiME's and FastDiME's retries as :meth:`~lit_vce.methods.base.VCEMethod.attempts`: one
    attempt per classifier scale in ``method.scales``, in turn, each on the samples not
    flipped yet (a sample keeps the first that flips it, or the last; diagnostic ``scale``).
    Each is a shallow copy of ``method`` (same modules) at ``scale``, so ``method`` itself
    never changes and concurrent calls do not see each other's scale."""
    import copy

    runs = []
    for scale in method.scales:
        run = copy.copy(method)
        run.scale = float(scale)
        runs.append(({"scale": float(scale)}, run))
    return runs


def _homography(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Batched 3x3 homographies mapping 4 points src -> dst, each (B, 4, 2)."""
    b = src.shape[0]
    rows = []
    for i in range(4):
        x, y = src[:, i, 0], src[:, i, 1]
        u, v = dst[:, i, 0], dst[:, i, 1]
        z, o = torch.zeros_like(x), torch.ones_like(x)
        rows.append(torch.stack([x, y, o, z, z, z, -u * x, -u * y], 1))
        rows.append(torch.stack([z, z, z, x, y, o, -v * x, -v * y], 1))
    a = torch.stack(rows, 1)
    rhs = dst.reshape(b, 8)
    h = torch.linalg.solve(a, rhs)
    return torch.cat([h, torch.ones(b, 1, dtype=h.dtype, device=h.device)], 1).view(b, 3, 3)


def random_affine_perspective(
    images: torch.Tensor,
    rngs: list[torch.Generator],
    n: int,
    degrees: float = 15.0,
    translate: float = 0.1,
    distortion: float = 0.7,
    include_clean: bool = True,
) -> torch.Tensor:
    """``n`` differentiable augmentations per image, sample-major: (N*n, C, H, W).

    Each view composes a random rotation (+-degrees), translation (+-translate of
    the size) and perspective distortion (corners moved by up to distortion/2 of
    the half-size), drawn from the sample's own generator. With
    ``include_clean`` the first view of every sample is the image itself.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    N, C, H, W = images.shape
    dev, dt = images.device, images.dtype
    p = per_sample_rand((n, 11), rngs).to(dev, torch.float64)  # (N, n, 11)
    p = p.view(N * n, 11)
    theta = (p[:, 0] * 2 - 1) * math.radians(degrees)
    tx, ty = (p[:, 1] * 2 - 1) * translate * 2, (p[:, 2] * 2 - 1) * translate * 2
    corners = torch.tensor([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=torch.float64, device=dev).expand(N * n, 4, 2)
    jitter = (p[:, 3:11].view(-1, 4, 2) * 2 - 1) * distortion / 2
    moved = corners + jitter
    # rotation + translation of the distorted corners
    c, s = torch.cos(theta)[:, None], torch.sin(theta)[:, None]
    rx = c * moved[..., 0] - s * moved[..., 1] + tx[:, None]
    ry = s * moved[..., 0] + c * moved[..., 1] + ty[:, None]
    dst = torch.stack([rx, ry], -1)
    # sampling grid: for each output pixel, where to read in the input (inverse map dst -> src)
    h = _homography(dst, corners)
    ys = torch.linspace(-1 + 1 / H, 1 - 1 / H, H, dtype=torch.float64, device=dev)
    xs = torch.linspace(-1 + 1 / W, 1 - 1 / W, W, dtype=torch.float64, device=dev)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx, gy, torch.ones_like(gx)], -1).view(1, -1, 3)
    mapped = pts @ h.transpose(1, 2)
    grid = (mapped[..., :2] / mapped[..., 2:].clamp_min(1e-8)).view(N * n, H, W, 2).to(dt)
    if include_clean:
        ident = F.affine_grid(
            torch.eye(2, 3, dtype=dt, device=dev)[None].expand(N, 2, 3), (N, C, H, W), align_corners=False
        )
        grid = grid.view(N, n, H, W, 2).clone()
        grid[:, 0] = ident
        grid = grid.view(N * n, H, W, 2)
    src = images.repeat_interleave(n, dim=0)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
