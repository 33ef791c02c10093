"""Image operations every layer shares (one definition, so the diffusion models, the
methods and the metrics resize alike)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def resize_to(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Square ``size`` x ``size`` images (bilinear, antialiased, clamped to [0, 1]: the
    filter's weights are positive, so only float rounding can leave the range); unchanged
    when ``size`` is None or the images are that size already."""
    if size is None or (images.shape[-1] == size and images.shape[-2] == size):
        return images
    import torch.nn.functional as F

    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
