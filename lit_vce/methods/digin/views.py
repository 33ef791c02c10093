"""DiG-IN's small parts: the classifier's views of a decoded image (cutouts), schedule
fractions, caption editing and generator copies."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from ...rngs import per_sample_rand, per_sample_randn


def cutout_views(
    images: torch.Tensor,
    rngs: list[torch.Generator],
    num: int,
    noise_sd: float = 0.005,
    cut_size: int | None = None,
    power: float = 0.3,
) -> torch.Tensor:
    """DiG-IN's published cutouts: ``num`` random square crops per image whose side is
    ``int(U^power * (min(H, W) - s) + s)`` with ``s = min(H, W, cut_size)`` (the
    classifier's input size), at a uniform position, average-pooled to ``cut_size``,
    plus Gaussian noise of sd ``noise_sd`` after pooling; no full view is forced.
    Returns (N * num, C, cut_size, cut_size), image-major."""
    n, c, h, w = images.shape
    big = min(h, w)
    cut = big if cut_size is None else int(cut_size)
    small = min(big, cut)
    u = per_sample_rand((num, 3), rngs)  # side, top, left in [0, 1)
    noise = per_sample_randn((num, c, cut, cut), rngs).to(images) * noise_sd
    boxes = torch.zeros(n, num, 3, dtype=torch.long)
    for i in range(n):
        for k in range(num):
            side = int(float(u[i, k, 0]) ** power * (big - small) + small)
            boxes[i, k] = torch.tensor(
                [side, int(float(u[i, k, 1]) * (h - side + 1)), int(float(u[i, k, 2]) * (w - side + 1))]
            )
    return crop_views(images, boxes, cut) + noise.reshape(n * num, c, cut, cut)


def crop_views(images: torch.Tensor, boxes: torch.Tensor, cut_size: int) -> torch.Tensor:
    """The square crops ``boxes`` (N, num, 3: side, top, left) of each image, average-pooled
    to ``cut_size``: (N * num, C, cut_size, cut_size), image-major."""
    views = []
    for i, per_image in enumerate(boxes.tolist()):
        for side, top, left in per_image:
            views.append(F.adaptive_avg_pool2d(images[i : i + 1, :, top : top + side, left : left + side], cut_size))
    return torch.cat(views)


def scaled_cutout_views(
    images: torch.Tensor, rngs: list[torch.Generator], num: int, min_scale: float = 0.7, noise_sd: float = 0.005
) -> torch.Tensor:
    """The earlier scheme (``cutouts="scaled"``): crops with side in [min_scale, 1] of the
    image, resized back to the image size; view 0 of every image is the whole image."""
    n, c, h, w = images.shape
    u = per_sample_rand((num, 3), rngs).to(images.device)  # side, top, left in [0, 1)
    noise = per_sample_randn((num, c, h, w), rngs).to(images) * noise_sd
    views = []
    for i in range(n):
        for k in range(num):
            if k == 0:
                crop = images[i : i + 1]
            else:
                side = max(2, int(round((min_scale + (1 - min_scale) * float(u[i, k, 0])) * min(h, w))))
                top = int(float(u[i, k, 1]) * (h - side + 1))
                left = int(float(u[i, k, 2]) * (w - side + 1))
                crop = images[i : i + 1, :, top : top + side, left : left + side]
                crop = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
            views.append(crop)
    return torch.cat(views) + noise.reshape(n * num, c, h, w)


def copy_generator(g: torch.Generator) -> torch.Generator:
    """A generator in ``g``'s state (drawing from it leaves ``g`` untouched)."""
    copy = torch.Generator(device=g.device)
    copy.set_state(g.get_state())
    return copy


def fraction_steps(fraction: float, num_steps: int) -> int:
    """How many of the first steps a schedule fraction covers: the steps i with
    ``i / num_steps < fraction`` (the official ``threshold_0.0_<fraction>`` schedule;
    0.3 of 20 steps = steps 0-5)."""
    return sum(1 for i in range(num_steps) if i / num_steps < fraction)


def switch_word(caption: str, old: str, new: str) -> str | None:
    """``caption`` with every whole-word, case-insensitive occurrence of ``old`` replaced
    by ``new``; ``None`` when ``old`` does not occur."""
    pattern = re.compile(r"(?<!\w)" + re.escape(old) + r"(?!\w)", re.IGNORECASE)
    out, k = pattern.subn(new, caption)
    return out if k else None
