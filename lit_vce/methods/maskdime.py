"""MaskDiME (Guo et al., CVPR 2026): DiME's guidance confined, step by step, to a mask drawn
from the classifier's own gradient.

As the authors' code runs it (``get_MaskDiME_sampling_CelebA`` in ``core/sample_utils.py``,
the README's command): noise the image to ``tau`` (60 of 200 respaced steps), then at
every step

1. the classifier reads ``x = m2 * x0_hat + (1 - m2) * x`` (the image itself at the first
   step), with ``x0_hat`` the step's x0-prediction and ``m2`` the inner mask of the
   previous step;
2. ``g_c = grad(-scale * logit_target)(x) / sqrt(abar_t)``: its channel-mean magnitude
   gives two nested masks (``compute_grad_masks_nested2``): ``m1`` the top ``topk_ratio``
   pixels, ``m2`` the top ``x_t_rate`` of those, each blurred (kernel 5, sigma 3) and
   thresholded at 0 (a 2 px dilation);
3. the posterior mean moves by ``-variance * grad_scale * (g_c + l1 * sign(z_t - x))``
   and, without ancestral noise, becomes the next sample inside ``m1``; outside ``m1``
   the next sample is the image noised to the *current* step's level.

The result is the last sample. Samples that do not flip are retried with the next
classifier scale (8, 10, 15). Published settings (README): ``grad_scale`` 8, ``topk_ratio``
0.05, ``x_t_rate`` 0.5, blur kernel 5 / sigma 3, channel-mean masks, no gradient clipping,
L1 0.05, the target logit, and the VGG-19 perceptual term (30 at layer 18; off here
unless ``perceptual_weight`` is set, as for DiME and FastDiME, since its weights are not
shipped). ``docs/methods/maskdime.md`` lists what we read from the code that the paper
leaves open.
"""

from __future__ import annotations

import torch
from torchvision.transforms.functional import gaussian_blur

from ..objectives import ObjectiveContext, VGGPerceptual
from ..registry import METHODS
from .guided import PerStepGuidance, Step
from .parts import scale_attempts


def gradient_masks(
    grads: torch.Tensor, topk_ratio: float, x_t_rate: float, blur_kernel: int, blur_sigma: float, per_channel: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """MaskDiME's nested masks ``(m1, m2)`` from a gradient (N, C, H, W): the top ``topk_ratio``
    of the pixels by gradient magnitude (channel mean, or per channel), the top ``x_t_rate``
    of those, each Gaussian-blurred and thresholded at 0. Shapes (N, 1 or C, H, W)."""
    n, c, h, w = grads.shape
    mag = grads.abs() if per_channel else grads.abs().mean(1, keepdim=True)
    flat = mag.flatten(2)  # (N, 1 or C, H*W)
    k1 = max(1, int(topk_ratio * h * w))
    k2 = max(1, int(x_t_rate * k1))
    vals1, idx1 = torch.topk(flat, k1, dim=2)
    _, idx2 = torch.topk(vals1, k2, dim=2)
    idx2 = idx1.gather(2, idx2)
    masks = []
    for idx in (idx1, idx2):
        m = torch.zeros_like(flat).scatter_(2, idx, 1.0).view(n, -1, h, w)
        masks.append((gaussian_blur(m, kernel_size=blur_kernel, sigma=blur_sigma) > 0).to(grads.dtype))
    return masks[0], masks[1]


@METHODS.register("maskdime")
class MaskDiME(PerStepGuidance):
    """MaskDiME: DiME's one-step guidance inside adaptive gradient masks (published settings).

    Args:
        scales: classifier scales tried in turn for the samples not flipped yet.
        grad_scale: the factor on the classifier and L1 gradients together.
        l1_weight: weight of the L1 distance of the noisy sample to the image.
        use_logits: guide the target logit (published) instead of its log-probability.
        topk_ratio, x_t_rate: the outer mask's share of the pixels and the inner mask's
            share of the outer one.
        blur_kernel, blur_sigma: the Gaussian blur that dilates both masks.
        per_channel: masks per colour channel (the code's default) instead of from the
            channel mean (the README's run).
        grads_clip, clip_sigma: clip the classifier gradient to its mean +- ``clip_sigma``
            standard deviations (each sample's own statistics; off in the published run).
        perceptual_weight, perceptual_layer, perceptual_weights: the VGG-19 perceptual term on
            the masked estimate (published: 30 at layer 18; 0 = off, needs local weights).
        noise_offset: 1, as the code: the image is noised to ``start_step`` and the first
            guided step is the one below it.
        **kwargs: sampler settings (defaults: ``adm`` sampler, 200 steps, the last 60 guided).
    """

    ancestral_noise = False

    def __init__(
        self,
        scales: tuple[float, ...] = (8.0, 10.0, 15.0),
        grad_scale: float = 8.0,
        l1_weight: float = 0.05,
        use_logits: bool = True,
        topk_ratio: float = 0.05,
        x_t_rate: float = 0.5,
        blur_kernel: int = 5,
        blur_sigma: float = 3.0,
        per_channel: bool = False,
        grads_clip: bool = False,
        clip_sigma: float = 3.0,
        perceptual_weight: float = 0.0,
        perceptual_layer: int = 18,
        perceptual_weights: str | None = None,
        sampler: str = "adm",
        num_steps: int = 200,
        skip: float = 0.7,
        through_unet: bool = False,
        output: str = "sample",
        clip_sample: bool = True,
        noise_offset: int = 1,
        **kwargs,
    ):
        super().__init__(
            sampler=sampler,
            num_steps=num_steps,
            skip=skip,
            through_unet=through_unet,
            output=output,
            clip_sample=clip_sample,
            noise_offset=noise_offset,
            **kwargs,
        )
        if self.diffusion.sampler != "adm":
            raise ValueError("MaskDiME runs guided-diffusion's ancestral sampler (sampler='adm')")
        if not 0 < topk_ratio <= 1 or not 0 < x_t_rate <= 1:
            raise ValueError("topk_ratio and x_t_rate must be in (0, 1]")
        if blur_kernel % 2 != 1:
            raise ValueError("blur_kernel must be odd")
        self.scales, self.scale = tuple(scales), float(scales[0])
        self.grad_scale, self.l1_weight, self.use_logits = float(grad_scale), float(l1_weight), use_logits
        self.topk_ratio, self.x_t_rate = float(topk_ratio), float(x_t_rate)
        self.blur_kernel, self.blur_sigma, self.per_channel = int(blur_kernel), float(blur_sigma), per_channel
        self.grads_clip, self.clip_sigma = grads_clip, float(clip_sigma)
        self.perceptual_weight = float(perceptual_weight)
        self.perceptual = VGGPerceptual(perceptual_layer, perceptual_weights) if self.perceptual_weight else None

    @classmethod
    def test_kwargs(cls) -> dict:
        return {"num_steps": 10, "scales": (8.0, 15.0), "topk_ratio": 0.2}

    def guidance(self, x0, batch, classifier, eps, to_xt, step: Step):
        inner = step.state.get("inner")
        x = batch.images if inner is None else inner * step.x0 + (1 - inner) * batch.images
        x = x.detach().requires_grad_(True)
        logits = classifier(x)
        score = logits if self.use_logits else logits.log_softmax(1)
        objective = score.gather(1, batch.target[:, None]).sum() * self.scale
        (g,) = torch.autograd.grad(objective, x)
        # the code's grads_class (a gradient to descend, model space [-1, 1]): -scale * d logit / dx / sqrt(abar_t)
        grads_class = -0.5 * g / step.alpha_bar.sqrt().to(g)
        outer, inner = gradient_masks(
            grads_class, self.topk_ratio, self.x_t_rate, self.blur_kernel, self.blur_sigma, self.per_channel
        )
        if self.grads_clip:
            mean = grads_class.mean((1, 2, 3), keepdim=True)
            std = grads_class.flatten(1).std(1).view(-1, 1, 1, 1)
            lo, hi = mean - self.clip_sigma * std, mean + self.clip_sigma * std
            grads_class = torch.maximum(torch.minimum(grads_class, hi), lo)
        grads_dist = self.l1_weight * torch.sign(step.x_t - self.diffusion.encode(batch.images))
        if self.perceptual is not None:  # dist_cond_fn's l_perc on the masked estimate, / sqrt(abar_t)
            xp = x.detach().requires_grad_(True)
            ctx = ObjectiveContext(batch.images, batch.source, batch.target, classifier)
            (gp,) = torch.autograd.grad(self.perceptual_weight * self.perceptual(xp, ctx).sum(), xp)
            grads_dist = grads_dist + 0.5 * gp / step.alpha_bar.sqrt().to(gp)
        step.state["outer"], step.state["inner"] = outer, inner
        return -self.grad_scale * (grads_class + grads_dist)  # the ascent direction: the mean moves by +variance * it

    def post_step(self, x_t, step: Step, batch, state):
        from ..rngs import per_sample_randn

        outer = state["outer"]
        clean = self.diffusion.encode(batch.images)
        noise = per_sample_randn(clean.shape[1:], batch.rngs).to(clean)
        original = self.diffusion.add_noise(clean, noise, step.t)  # the code's q_sample(img, t): this step's level
        diag = state.setdefault("diagnostics", {})
        diag["mask_fraction"] = outer.float().mean((1, 2, 3)).cpu()
        return outer * x_t + (1 - outer) * original

    def attempts(self):
        return scale_attempts(self)
