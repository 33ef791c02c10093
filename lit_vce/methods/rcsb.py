"""RCSB (Sobieski et al., ICLR 2025): region-constrained counterfactuals by classifier-guided
inpainting with an image-to-image Schrödinger bridge.

As the authors' code runs it (``src/inpainters/cddb.py`` with ``deep: true``,
``ddpm_dps_sampling`` of its I2SB copy, the guidance ``CDDBTargetClassifierLPIPS`` of
``imagenet_cava_stable_adaptive.yaml``):

1. the region ``m`` (1 = inpaint): the batch's (``--data.regions``) or the method's rule,
   RCSB's automated one by default (:func:`lit_vce.regions.attribution_cells`:
   integrated gradients for the source class, SmoothGrad, cells of ``cell_size`` px, the
   top ``area``);
2. ``x1 = (1 - m) x + m * noise`` and the start ``x = q(x_{start-1} | x, x1)`` of the bridge
   (its mean: OT-ODE), in [-1, 1];
3. for ``nfe`` steps over ``space_indices(start_step, nfe + 1)``, from the noisiest: the
   x0-prediction ``x0_hat``; the gradient ``g`` of ``classifier_scale * log p(target |
   minmax(x0_hat))`` with respect to ``x_t`` (through the bridge network); ``g`` through
   Adam's moment estimates (beta 0.9 / 0.999, eps 1e-8, reset per inpainting) and divided
   by the norm of the first step's stabilised gradient (adaptive normalisation);
   ``x_t += scale * g`` (not scaled by the posterior weights); the bridge posterior's mean
   from ``x0_hat`` and the guided ``x_t``; outside the region, the start again;
4. the result is the last sample, in [0, 1].

``minmax`` is the code's ``from_m1p1_to_01``: each image shifted and scaled to [0, 1]
(the code decides for the whole batch whether any image has a negative value; we decide
per image). The prediction and the state are float64, as the code's float64 bridge tables
make them. Defaults: the README's recommended settings (``s = 1.5``, ``start_step`` 600,
``c = 16``, ``a = 0.3``) and the ImageNet config's (``nfe`` 100, OT-ODE, LPIPS weight 0,
no data-consistency term).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..diffusion.bridge import I2SBBridge, space_indices
from ..registry import METHODS
from ..rngs import per_sample_randn
from .base import CounterfactualResult, VCEBatch, VCEMethod


def minmax01(x: torch.Tensor) -> torch.Tensor:
    """RCSB's ``from_m1p1_to_01``, per image: an image with a negative value is shifted and
    scaled to [0, 1]; one without is left as it is."""
    lo = x.flatten(1).min(1).values.view(-1, 1, 1, 1)
    shifted = x - lo
    scaled = shifted / shifted.flatten(1).max(1).values.view(-1, 1, 1, 1)
    return torch.where(lo < 0, scaled, x)


class AdamStabilizer:
    """RCSB's ``ADAMGradientStabilization``: ``m_hat / (sqrt(v_hat) + eps)`` of Adam's bias-corrected
    moment estimates over the steps of one inpainting."""

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.m = self.v = None
        self.step = 0

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        if self.m is None:
            self.m, self.v = torch.zeros_like(g), torch.zeros_like(g)
        self.step += 1
        self.m = self.beta1 * self.m + (1 - self.beta1) * g
        self.v = self.beta2 * self.v + (1 - self.beta2) * g.square()
        m_hat = self.m / (1 - self.beta1**self.step)
        v_hat = self.v / (1 - self.beta2**self.step)
        return m_hat / (v_hat.sqrt() + self.eps)


@METHODS.register("rcsb")
class RCSB(VCEMethod):
    """RCSB: classifier-guided I2SB inpainting of a region (the README's recommended settings).

    Args:
        bridge: an :class:`~lit_vce.diffusion.bridge.I2SBBridge` or its model spec (``"world"``,
            ``"i2sb:<latest.pt>"``).
        scale: the guidance scale ``s``.
        start_step: the bridge step the inpainting starts from (``tau * T``; of ``interval``).
        nfe: the number of guided steps.
        classifier_scale: the weight of the target log-probability.
        stabilize: Adam's moment estimates on the gradient (``beta1``, ``beta2``, ``eps``).
        adaptive_normalize: divide by the norm of the first step's stabilised gradient.
        create_graph: differentiate with a graph of the gradient, as the code does (its
            ``keep_graph: true``); the values are the same up to float rounding, which the
            first Adam step (about ``g / |g|``) magnifies where the gradient is near zero
            (``False``: less memory; on the parity fixture the images move by up to 9e-6).
        region: the rule when the batch brings no region: ``"cells"`` (RCSB's automated rule)
            or ``"objects"`` (the data's foreground masks).
        cell_size, area: the cells' size (px) and the fraction of the image they cover.
        ig_steps, smoothgrad_samples, smoothgrad_stdev: integrated gradients' steps and the
            noise tunnel (captum's defaults, RCSB's ``stdevs: 0.05``).
        inner_batch_size: split each batch into chunks of this size (memory).
    """

    supports_concurrency = True
    region_mode = "native"

    def __init__(
        self,
        bridge: I2SBBridge | str = "world",
        scale: float = 1.5,
        start_step: int = 600,
        nfe: int = 100,
        classifier_scale: float = 1.0,
        stabilize: bool = True,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        adaptive_normalize: bool = True,
        create_graph: bool = True,
        region: str = "cells",
        cell_size: int = 16,
        area: float = 0.3,
        ig_steps: int = 50,
        smoothgrad_samples: int = 5,
        smoothgrad_stdev: float = 0.05,
        inner_batch_size: int | None = None,
    ):
        super().__init__()
        self.bridge = I2SBBridge(bridge) if isinstance(bridge, str) else bridge
        interval = self.bridge.schedule.interval
        if not 1 <= start_step <= interval:
            raise ValueError(f"start_step must be in [1, {interval}] (the bridge's steps), got {start_step}")
        if not 1 <= nfe < start_step:
            raise ValueError(f"nfe must be in [1, start_step - 1] = [1, {start_step - 1}], got {nfe}")
        if region not in ("cells", "objects"):
            raise ValueError(f"region must be 'cells' or 'objects', got {region!r}")
        if not 0 < area <= 1 or cell_size < 1:
            raise ValueError("area must be in (0, 1] and cell_size >= 1")
        self.scale, self.start_step, self.nfe = float(scale), int(start_step), int(nfe)
        self.classifier_scale, self.stabilize = float(classifier_scale), stabilize
        self.betas, self.eps, self.adaptive_normalize = (float(beta1), float(beta2)), float(eps), adaptive_normalize
        self.create_graph = create_graph
        self.region, self.cell_size, self.area = region, int(cell_size), float(area)
        self.ig_steps, self.smoothgrad_samples = int(ig_steps), int(smoothgrad_samples)
        self.smoothgrad_stdev, self.inner_batch_size = float(smoothgrad_stdev), inner_batch_size

    @classmethod
    def test_kwargs(cls) -> dict:
        from ..diffusion.bridge import I2SBBridge, world_bridge_network

        with torch.random.fork_rng():
            torch.manual_seed(0)
            net = world_bridge_network(_tiny_unet())
        return {
            "bridge": I2SBBridge(net, image_size=16),
            "start_step": 100,
            "nfe": 4,
            "cell_size": 4,
            "ig_steps": 4,
            "smoothgrad_samples": 1,
        }

    def model_resolution(self) -> int:
        return int(self.bridge.image_size)

    def regions(self, batch: VCEBatch, classifier) -> torch.Tensor:
        """The batch's regions, or the method's rule's (cells for the source class, or objects)."""
        from ..regions import RegionSpec, resolve_regions

        if batch.region is not None:
            return batch.region
        spec = RegionSpec(self.region, cell_size=self.cell_size, area=self.area)
        if spec.kind == "objects":
            return resolve_regions(spec, batch.images, batch.source, batch.rngs, classifier, objects=batch.mask)
        from ..regions import attribution_cells, side_generators

        return attribution_cells(
            classifier,
            batch.images,
            batch.source,
            side_generators(batch.rngs),
            self.cell_size,
            self.area,
            self.smoothgrad_samples,
            self.smoothgrad_stdev,
            self.ig_steps,
        )

    def counterfactuals(self, batch: VCEBatch, classifier) -> CounterfactualResult:
        """The guided bridge inpainting of each image's region (at the bridge's resolution)."""
        region = self.regions(batch, classifier).to(batch.images)
        noise = per_sample_randn(batch.images.shape[1:], batch.rngs).to(batch.images)
        inpainted, failure = self.inpaint(batch.images, region, batch.target, classifier, noise)
        # outside the region the code's result is the image up to float64 rounding: here exactly the image
        images = region * inpainted + (1 - region) * batch.images
        n = len(batch)
        diag = {"region_area": region.flatten(1).mean(1).cpu(), "steps": torch.full((n,), float(self.nfe))}
        return CounterfactualResult(images, diag, failure)

    def inpaint(
        self, images: torch.Tensor, region: torch.Tensor, target: torch.Tensor, classifier, noise: torch.Tensor
    ) -> tuple[torch.Tensor, list[str | None]]:
        """RCSB's sampler: ``images`` (N, 3, H, W) in [0, 1] inpainted inside ``region`` (N, 1, H, W)
        towards ``target``, from the bridge's end point ``noise`` inside the region; returns
        the images in [0, 1] and a failure reason (or None) per image."""
        b, s, n = self.bridge, self.bridge.schedule, len(images)
        mask = region.expand_as(images)
        x_gt = b.encode(images)
        x1 = (1 - mask) * x_gt + mask * noise
        start = s.q_sample(self.start_step - 1, x_gt.double(), x1.double())  # float64, as the code's tables make it
        xt, mask64 = start, mask.double()
        steps = space_indices(self.start_step, self.nfe + 1)[::-1]
        adam = AdamStabilizer(*self.betas, self.eps) if self.stabilize else None
        first_norm = None
        ok = torch.ones(n, dtype=torch.bool, device=x_gt.device)
        failure: list[str | None] = [None] * n
        from ..progress import steps as bar

        for prev, step in bar(list(zip(steps[1:], steps[:-1])), f"{self.name} steps", n):
            with torch.enable_grad():
                xg = xt.detach().requires_grad_(True)
                x0 = b.pred_x0(xg, step)
                logp = F.log_softmax(classifier(minmax01(x0.float())), dim=-1).gather(1, target[:, None])
                (g,) = torch.autograd.grad(self.classifier_scale * logp.sum(), xg, create_graph=self.create_graph)
                g = g.detach()
            finite = torch.isfinite(g).flatten(1).all(1)
            for i in torch.nonzero(~finite & ok).flatten().tolist():
                failure[i] = f"non-finite guidance gradient at bridge step {step}"
            ok &= finite
            g = torch.where(ok.view(-1, 1, 1, 1), torch.nan_to_num(g, 0.0, 0.0, 0.0), torch.zeros_like(g))
            if adam is not None:
                g = adam(g)
            if self.adaptive_normalize:
                if first_norm is None:  # the code keeps this norm as a float32 buffer
                    first_norm = g.flatten(1).norm(dim=1).view(-1, 1, 1, 1).float().double()
                g = g / first_norm.clamp_min(1e-30)
            c0, cn, _ = s.posterior(prev, step)
            xt = (c0 * x0.detach() + cn * (xt + self.scale * g)).detach()
            xt = (1 - mask64) * start + mask64 * xt
        return b.decode(xt), failure


def _tiny_unet():
    from ..world.models import build_world_unet

    return build_world_unet(sample_size=16, block_out_channels=(8, 8, 8), attention_head_dim=8, norm_num_groups=4)
