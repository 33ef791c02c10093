"""The embedded synthetic world: shapes on backgrounds with a planted spurious feature.

Every image is 32x32 RGB in [0, 1]: one of four shapes (the label) drawn in a
bright random colour, at a random size and position, on one of four clearly
different backgrounds. In the *biased* regime background ``k`` goes with class
``k`` for ``bias`` (default 98%) of the images, so a classifier trained there
can take the background as a shortcut; in the *balanced* regime the background
is independent of the class. Because each item carries its ground truth (shape,
background, foreground mask), the effect of a counterfactual can be audited
exactly.

A second planted shortcut, a "watermark" (the Clever-Hans case): in the
*watermark* regime every image carries a small black-and-white patch in its
top-left corner whose pattern (:data:`WATERMARKS`) goes with the class for
``bias`` of the images, the background being independent of the class; *watermark_balanced*
draws the pattern independently of the class (the test images on which a
classifier that learned the patch is explained). The patch is drawn last, over
the background and the shape, and is read back exactly from the pixels
(:func:`read_watermark`).

Items are a pure function of ``(seed, regime, split, index)``: no files, no
state, identical on every process.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
BACKGROUNDS: tuple[str, ...] = ("sky", "grass", "brick", "checker")
REGIMES: tuple[str, ...] = ("biased", "balanced", "watermark", "watermark_balanced")
#: regimes whose images carry the corner patch
WATERMARK_REGIMES: tuple[str, ...] = ("watermark", "watermark_balanced")
#: the patch's four black-and-white patterns (no shape or background has these
#: colours); pattern k goes with class k in the watermark regime
WATERMARKS: tuple[str, ...] = ("black", "white", "white-over-black", "white-left-of-black")
WATERMARK_SIZE = 6  # the patch covers pixels [0, 6) x [0, 6)


def watermark_pattern(kind: int, size: int = WATERMARK_SIZE) -> np.ndarray:
    """The (size, size) grey level (0 black, 1 white) of watermark ``kind``."""
    p = np.zeros((size, size), dtype=np.float32)
    if kind == 1:
        p[:] = 1
    elif kind == 2:
        p[: size // 2] = 1
    elif kind == 3:
        p[:, : size // 2] = 1
    elif kind != 0:
        raise ValueError(f"watermark must be in [0, {len(WATERMARKS)}), got {kind}")
    return p


#: a patch further than this (mean absolute grey-level difference, per pixel and
#: channel) from every pattern reads as no watermark (-1)
WATERMARK_TOLERANCE = 0.12
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
IMAGE_SIZE = 32
# Classes are the shapes; the background that the biased regime pairs with
# class k is BACKGROUNDS[k] ("circle" <-> "sky", ...).
CLASS_NAMES: tuple[str, ...] = SHAPES


def _rng(seed: int, regime: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, REGIMES.index(regime), SPLITS[split], index])


def _background(kind: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size, 3) float array for background ``kind``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    jitter = rng.uniform(-0.05, 0.05, size=3).astype(np.float32)
    if kind == 0:  # sky: dark-to-light blue vertical gradient
        top, bottom = np.array([0.05, 0.12, 0.45]), np.array([0.25, 0.45, 0.80])
        img = top[None, None] * (1 - yy[..., None]) + bottom[None, None] * yy[..., None]
    elif kind == 1:  # grass: green with speckle noise
        base = np.array([0.10, 0.42, 0.12], dtype=np.float32)
        noise = rng.normal(0.0, 0.06, size=(size, size, 1)).astype(np.float32)
        img = base[None, None] + noise * np.array([0.5, 1.0, 0.4])[None, None]
    elif kind == 2:  # brick: brown/orange horizontal bands
        phase = rng.uniform(0, 2 * math.pi)
        band = 0.5 + 0.5 * np.sign(np.sin(yy * size * math.pi / 4 + phase))
        dark, light = np.array([0.35, 0.15, 0.05]), np.array([0.62, 0.32, 0.12])
        img = dark[None, None] * (1 - band[..., None]) + light[None, None] * band[..., None]
    elif kind == 3:  # checker: grey/purple checkerboard
        off = rng.integers(0, 8)
        cells = (((yy * (size - 1) + off) // 8 + (xx * (size - 1) + off) // 8) % 2).astype(np.float32)
        a, b = np.array([0.30, 0.28, 0.32]), np.array([0.45, 0.22, 0.50])
        img = a[None, None] * (1 - cells[..., None]) + b[None, None] * cells[..., None]
    else:
        raise ValueError(f"unknown background {kind}")
    return np.clip(img + jitter[None, None], 0.0, 1.0).astype(np.float32)


def _shape_mask(kind: int, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """A boolean (size, size) mask of shape ``kind`` centred at (cx, cy) with radius r."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if kind == 0:  # circle
        return dx**2 + dy**2 <= r**2
    if kind == 1:  # square (side ~1.6 r so its area is close to the circle's)
        h = 0.8 * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if kind == 2:  # upright triangle
        h = 1.1 * r
        top, bottom = cy - h, cy + 0.75 * h
        frac = (yy - top) / (bottom - top)
        return (yy >= top) & (yy <= bottom) & (np.abs(dx) <= frac * h)
    if kind == 3:  # cross (plus sign)
        arm, w = r, 0.35 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= w)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= w))
    raise ValueError(f"unknown shape {kind}")


@dataclass(frozen=True)
class WorldSample:
    """One rendered world image with its ground truth."""

    image: np.ndarray  # (H, W, 3) float32 in [0, 1]
    mask: np.ndarray  # (H, W) bool, True on the shape
    shape: int
    background: int
    colour: tuple[float, float, float]
    centre: tuple[float, float]
    radius: float
    watermark: int = -1  # the corner patch's pattern; -1: none


def render(
    shape: int,
    background: int,
    rng: np.random.Generator,
    size: int = IMAGE_SIZE,
) -> WorldSample:
    """Draw ``shape`` on ``background`` with colour, size and position from ``rng``."""
    if not 0 <= shape < len(SHAPES):
        raise ValueError(f"shape must be in [0, {len(SHAPES)}), got {shape}")
    if not 0 <= background < len(BACKGROUNDS):
        raise ValueError(f"background must be in [0, {len(BACKGROUNDS)}), got {background}")
    img = _background(background, rng, size)
    r = rng.uniform(0.2, 0.3) * size
    margin = 1.15 * r + 1
    cx, cy = rng.uniform(margin, size - margin, size=2)
    hue = rng.uniform(0, 1)
    colour = colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 0.95), rng.uniform(0.9, 1.0))
    mask = _shape_mask(shape, cx, cy, r, size)
    img[mask] = np.asarray(colour, dtype=np.float32)
    return WorldSample(img, mask, shape, background, tuple(colour), (float(cx), float(cy)), float(r))


def add_watermark(sample: WorldSample, watermark: int) -> WorldSample:
    """``sample`` with the corner patch of pattern ``watermark`` drawn over it."""
    img = sample.image.copy()
    img[:WATERMARK_SIZE, :WATERMARK_SIZE] = watermark_pattern(watermark)[..., None]
    mask = sample.mask.copy()
    mask[:WATERMARK_SIZE, :WATERMARK_SIZE] = False  # the patch hides the shape where they overlap
    return WorldSample(
        img, mask, sample.shape, sample.background, sample.colour, sample.centre, sample.radius, watermark
    )


def _patch(images: torch.Tensor) -> torch.Tensor:
    """The corner patch (N, 3, k, k) of images at the world's size (others are area-resized)."""
    if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        images = torch.nn.functional.interpolate(images.float(), size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
    return images[:, :, :WATERMARK_SIZE, :WATERMARK_SIZE].float()


def read_watermark(images: torch.Tensor, tolerance: float | None = WATERMARK_TOLERANCE) -> torch.Tensor:
    """The watermark of each image (N, 3, H, W) in [0, 1] (at 32 px; other sizes are
    resized): the pattern of :data:`WATERMARKS` nearest to its corner patch (mean absolute
    difference), or -1 when none is within ``tolerance`` (``None``: always the nearest,
    as the oracle's argmax reads a background; for an edited patch)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    patch = _patch(images)
    patterns = torch.from_numpy(np.stack([watermark_pattern(k) for k in range(len(WATERMARKS))])).to(patch.device)
    dist = (patch[:, None] - patterns[None, :, None]).abs().mean((2, 3, 4))
    d, idx = dist.min(1)
    return idx if tolerance is None else torch.where(d <= tolerance, idx, torch.full_like(idx, -1))


#: the mean absolute change over the patch (grey levels in [0, 1]) from which an edit
#: counts as moving the watermark
WATERMARK_EDIT = 0.1


def watermark_change(original: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """Mean absolute change over the corner patch (at 32 px) of each image pair (N,)."""
    if original.shape != edited.shape:
        raise ValueError(f"images differ in shape: {tuple(original.shape)} vs {tuple(edited.shape)}")
    return (_patch(edited) - _patch(original)).abs().mean((1, 2, 3))


def sample_item(seed: int, regime: str, split: str, index: int, bias: float = 0.98) -> WorldSample:
    """The world item at ``index``: a pure function of its arguments."""
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    rng = _rng(seed, regime, split, index)
    shape = int(rng.integers(len(SHAPES)))
    if regime == "biased" and rng.uniform() < bias:
        background = shape
    else:
        background = int(rng.integers(len(BACKGROUNDS)))
    sample = render(shape, background, rng)
    if regime in WATERMARK_REGIMES:
        if regime == "watermark" and rng.uniform() < bias:
            mark = shape
        else:
            mark = int(rng.integers(len(WATERMARKS)))
        sample = add_watermark(sample, mark)
    return sample


class ShapesWorld(Dataset):
    """The world as a map-style dataset.

    Each item is a dict with ``image`` (3, 32, 32) float in [0, 1], ``label``
    (the shape), ``background``, ``watermark`` (the corner patch's pattern,
    -1 outside the watermark regimes), ``mask`` (1, 32, 32) float, and ``sample_id``
    (``"world-{regime}-{split}-{index:06d}"``, stable across runs).

    Args:
        regime: ``"biased"``, ``"balanced"``, ``"watermark"`` or ``"watermark_balanced"``.
        split: ``"train"``, ``"val"`` or ``"test"`` (disjoint random streams).
        size: number of items.
        seed: world seed; items depend only on (seed, regime, split, index).
        bias: probability that the background (biased regime) or the watermark
            (watermark regime) equals the class.
    """

    def __init__(
        self, regime: str = "balanced", split: str = "test", size: int = 1024, seed: int = 0, bias: float = 0.98
    ):
        if regime not in REGIMES:
            raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        if size < 0:
            raise ValueError("size must be non-negative")
        self.regime, self.split, self.size, self.seed, self.bias = regime, split, size, seed, bias
        self.classes = list(CLASS_NAMES)

    def __len__(self) -> int:
        return self.size

    def base_id(self, index: int) -> str:
        return f"world-{self.regime}-{self.split}-{index:06d}"

    def sample_label(self, index: int) -> int:
        """The shape class of item ``index`` without rendering it."""
        return int(_rng(self.seed, self.regime, self.split, index).integers(len(SHAPES)))

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        s = sample_item(self.seed, self.regime, self.split, index, self.bias)
        return {
            "image": torch.from_numpy(s.image).permute(2, 0, 1).contiguous(),
            "label": s.shape,
            "background": s.background,
            "watermark": s.watermark,
            "mask": torch.from_numpy(s.mask.astype(np.float32))[None],
            "sample_id": self.base_id(index),
        }
