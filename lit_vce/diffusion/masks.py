"""Foreground masks from cross-attention, as the official DiG-IN code computes them.

``utils/foreground_segmentation.py`` of the DiG-IN repository (M4xim4l/DiG-IN):

1. the class word's cross-attention maps of the reconstruction trajectory at
   16x16 (SD at 512 px; here: the maps closest to a quarter of the latent size),
   over the first half of the steps, conditional half only, averaged over the
   word's tokens, heads, layers and steps, normalised to a maximum of 1;
2. resized bicubically to the image, clamped to [0, 1] and squashed
   (``sqrt_0.3``): ``sqrt(clamp((m - 0.3) / 0.7, 0, 1))``, a soft mask;
3. optionally refined by Segment Anything from 5 points drawn where the mask
   exceeds 0.35 (the official code uses SAM-HQ; here transformers' ``SamModel``);
4. post-processed: erosion 3, dilation 20, Gaussian blur (kernel 45, sigma 30),
   sizes at 512 px scaled with the resolution; the latent mask is the
   post-processed pixel mask resized to the latent size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: the official post-processing sizes at 512 px: erosion, dilation, blur kernel, blur sigma
OFFICIAL_POSTPROCESSING = (3, 20, 45, 30.0)


def attention_foreground(token_maps: torch.Tensor, tokens: list[list[int]], size: int, cutoff: float = 0.3) -> torch.Tensor:
    """Soft foreground masks (n, 1, size, size) from each sample's tokens' maps (n, L, r, r).

    A sample without tokens gets an all-ones mask (everything foreground: nothing is blended).
    """
    n = token_maps.shape[0]
    out = torch.ones(n, 1, size, size, device=token_maps.device)
    for i, toks in enumerate(tokens):
        if not toks:
            continue
        m = token_maps[i, toks].float().mean(0)
        m = (m / (m.max() + 1e-8))[None, None]
        m = F.interpolate(m, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        out[i] = ((m - cutoff).clamp(0, 1) / (1 - cutoff)).sqrt()[0] if cutoff < 1 else (m > cutoff).float()[0]
    return out


def _odd(k: int) -> int:
    return k if k % 2 else k + 1


def _dilate(x: torch.Tensor, k: int) -> torch.Tensor:
    """Flat k x k dilation (max filter), origin at k // 2 as kornia's; borders do not count."""
    if k <= 1:
        return x
    lo, hi = k // 2, k - 1 - k // 2
    return F.max_pool2d(F.pad(x, (lo, hi, lo, hi), value=float("-inf")), k, stride=1)


def _erode(x: torch.Tensor, k: int) -> torch.Tensor:
    return -_dilate(-x, k)


def postprocess_mask(mask: torch.Tensor, erosion: int = 3, dilation: int = 20, blur: int = 45, sigma: float = 30.0,
                     reference: int = 512) -> torch.Tensor:
    """Erosion, dilation and Gaussian blur of (n, 1, H, W) masks; sizes given at ``reference``
    pixels and scaled to H (a blur kernel stays odd)."""
    from torchvision.transforms.functional import gaussian_blur

    s = mask.shape[-1] / reference
    m = _erode(mask.float(), max(1, round(erosion * s)))
    m = _dilate(m, max(1, round(dilation * s)))
    k = _odd(max(1, round(blur * s)))
    if k > 1:
        m = gaussian_blur(m, [k, k], [max(sigma * s, 1e-3)] * 2)
    return m.clamp(0, 1)


def latent_mask_from_pixels(mask: torch.Tensor, size: int) -> torch.Tensor:
    """The pixel mask resized to the latent size (bilinear with antialiasing, as torchvision's resize)."""
    return F.interpolate(mask.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


class SamRefiner(torch.nn.Module):
    """Segment Anything refinement of soft attention masks (transformers' ``SamModel``).

    Per image, ``num_points`` points are drawn (from the sample's generator, with
    replacement) among the pixels where the soft mask exceeds ``threshold``, with
    probability proportional to the mask value, as the official code samples
    them; SAM predicts one mask from them (positive labels). An image without
    such pixels keeps its attention mask.

    Args:
        model: a ``SamModel`` or a folder / hub id it loads from (offline: a
            folder; a missing model raises :class:`MissingWeightsError`).
    """

    def __init__(self, model="facebook/sam-vit-huge", num_points: int = 5, threshold: float = 0.35):
        super().__init__()
        self.model = self._load(model) if isinstance(model, str) else model
        self.model.eval().requires_grad_(False)
        self.num_points, self.threshold = int(num_points), float(threshold)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def _load(spec: str):
        from transformers import SamModel

        from ..classifiers.loaders import MissingWeightsError

        try:
            return SamModel.from_pretrained(spec)
        except (OSError, ValueError) as e:
            raise MissingWeightsError(f"Segment Anything model {spec!r} could not be loaded ({type(e).__name__}); give a "
                                      "folder saved by SamModel.save_pretrained (e.g. a download of facebook/sam-vit-huge) "
                                      "or set sam_model=None to skip the refinement") from e

    def points(self, mask: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor | None:
        """(num_points, 2) x/y pixel coordinates drawn from one (1, H, W) soft mask, or None."""
        m = mask[0]
        ys, xs = torch.nonzero(m > self.threshold, as_tuple=True)
        if len(ys) == 0:
            return None
        w = m[ys, xs].float().cpu()
        idx = torch.multinomial(w / w.sum(), self.num_points, replacement=True, generator=generator)
        return torch.stack([xs.cpu()[idx], ys.cpu()[idx]], 1).float()

    @torch.no_grad()
    def forward(self, images: torch.Tensor, masks: torch.Tensor, rngs: list[torch.Generator] | None = None) -> torch.Tensor:
        """Refined binary masks (n, 1, H, W) for images in [0, 1] and their soft masks."""
        n, _, h, w = images.shape
        size = self.model.config.vision_config.image_size
        out = masks.clone().float()
        for i in range(n):
            pts = self.points(masks[i], None if rngs is None else rngs[i])
            if pts is None:
                continue
            x = F.interpolate(images[i : i + 1].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            x = (x - self.mean) / self.std
            p = (pts * torch.tensor([size / w, size / h]))[None, None].to(x.device)  # (1, 1, k, 2)
            lab = torch.ones(1, 1, len(pts), dtype=torch.long, device=x.device)
            pred = self.model(pixel_values=x.to(self.model.dtype), input_points=p, input_labels=lab,
                              multimask_output=False).pred_masks[:, 0, :1].float()  # (1, 1, h', w') logits
            out[i] = (F.interpolate(pred, size=(h, w), mode="bilinear", align_corners=False)[0] > 0).float()
        return out
