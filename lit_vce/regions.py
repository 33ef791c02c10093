"""Regions: where a counterfactual may change the image.

A region is a mask (N, 1, H, W) with 1 where the method may edit and 0 where the
image must stay (RCSB's region-constrained VCEs; Sobieski et al., ICLR 2025). Three
sources, chosen with ``--data.regions`` (or ``lit_vce.explain(regions=...)``):

- a **folder** of masks, one PNG per image: ``<folder>/<base id>.png`` where the base
  id is the sample id before ``->`` (for an ImageFolder, the image's path below the
  root with the suffix replaced), white (> 0.5) where the edit may go;
- ``"objects"``: the data's foreground masks (the world's shape masks, an
  ImageFolder's ``masks`` folder);
- ``"cells"`` or ``"cells:<cell size>:<area>"``: RCSB's automated rule
  (:func:`attribution_cells`): integrated gradients of the explained classifier for
  the source class, smoothed over noisy copies, summed into cells of ``cell size``
  px, and the top cells covering at most ``area`` of the image.

How each method keeps to the region (:attr:`lit_vce.methods.base.VCEMethod.region_mode`):
the per-step diffusion methods compose every step with the noised original outside
it and the result with the original; RCSB inpaints it; SVCE projects its
perturbation onto it; DiG-IN uses it as its foreground mask (its background terms
hold the rest, softly). The harness records each sample's region area and the
share of its change that lies outside (``region_change_outside``, 0 for the methods
that compose).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .rngs import per_sample_randn

#: default size (px) of RCSB's attribution cells and the fraction of the image they cover
#: (its README's recommended settings, for 256 px ImageNet images)
DEFAULT_CELL, DEFAULT_AREA = 16, 0.3


@dataclass(frozen=True)
class RegionSpec:
    """A parsed ``--data.regions`` value: ``kind`` is ``folder``, ``objects`` or ``cells``."""

    kind: str
    folder: Path | None = None
    cell_size: int = DEFAULT_CELL
    area: float = DEFAULT_AREA

    def describe(self) -> str:
        if self.kind == "folder":
            return f"folder:{self.folder}"
        return "objects" if self.kind == "objects" else f"cells:{self.cell_size}:{self.area}"


def parse_regions(value: str | None) -> RegionSpec | None:
    """``None``, ``"objects"``, ``"cells[:<cell>:<area>]"`` or an existing folder of masks."""
    if value is None or value == "":
        return None
    text = str(value)
    if text == "objects":
        return RegionSpec("objects")
    if text == "cells" or text.startswith("cells:"):
        parts = text.split(":")[1:]
        if len(parts) not in (0, 2):
            raise ValueError(f"regions {text!r}: use 'cells' or 'cells:<cell size px>:<area in (0, 1]>'")
        cell, area = (int(parts[0]), float(parts[1])) if parts else (DEFAULT_CELL, DEFAULT_AREA)
        if cell < 1 or not 0 < area <= 1:
            raise ValueError(f"regions {text!r}: the cell size must be >= 1 and the area in (0, 1]")
        return RegionSpec("cells", cell_size=cell, area=area)
    folder = Path(text).expanduser()
    if not folder.is_dir():
        raise ValueError(f"regions {text!r} is neither 'objects', 'cells[:<cell>:<area>]' nor an existing folder")
    return RegionSpec("folder", folder=folder)


def region_file(folder: Path, sample_id: str) -> Path:
    """The mask file of a sample: ``<folder>/<base id without suffix>.png``."""
    base = sample_id.split("->")[0]
    return folder / Path(base).with_suffix(".png")


def read_region(folder: Path, sample_id: str, size: tuple[int, int]) -> torch.Tensor:
    """The sample's region (1, H, W) from its PNG (grey level > 0.5: editable), resized
    (nearest) to ``size``; a missing or unreadable file is a clear error."""
    from PIL import Image, UnidentifiedImageError

    path = region_file(folder, sample_id)
    if not path.is_file():
        raise FileNotFoundError(f"no region mask for sample {sample_id!r}: expected {path}")
    try:
        with Image.open(path) as im:
            grey = np.asarray(im.convert("L").resize((size[1], size[0]), Image.NEAREST), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"region mask {path} cannot be read: {e}") from e
    return torch.from_numpy((grey > 0.5).astype(np.float32))[None]


# --- RCSB's automated rule ---------------------------------------------------------


def integrated_gradients(
    classifier, images: torch.Tensor, classes: torch.Tensor, steps: int = 50, chunk: int = 64
) -> torch.Tensor:
    """Integrated gradients of the ``classes`` logits from a black baseline (captum's defaults:
    ``n_steps=50``, Gauss-Legendre nodes and weights): ``x * sum_k w_k grad f(a_k x)``."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    alphas = torch.tensor(0.5 * (1 + nodes), dtype=images.dtype, device=images.device)
    w = torch.tensor(0.5 * weights, dtype=images.dtype, device=images.device)
    # the scaled inputs of every image, as captum expands them (step-major), in chunks
    scaled = (alphas.view(-1, 1, 1, 1, 1) * images[None]).reshape(-1, *images.shape[1:])
    labels = classes.repeat(steps)
    grads = []
    for i in range(0, len(scaled), chunk):
        x = scaled[i : i + chunk].detach().requires_grad_(True)
        with torch.enable_grad():
            out = classifier(x).gather(1, labels[i : i + chunk, None].to(x.device)).sum()
            grads.append(torch.autograd.grad(out, x)[0])
    g = torch.cat(grads).view(steps, *images.shape)
    total = (w.view(-1, 1, 1, 1, 1) * g).sum(0)
    return images * total


def smoothed_integrated_gradients(
    classifier, images, classes, rngs: list[torch.Generator], samples: int = 5, stdev: float = 0.05, steps: int = 50
) -> torch.Tensor:
    """Integrated gradients averaged over ``samples`` noisy copies (captum's ``NoiseTunnel``,
    SmoothGrad: Gaussian noise of std ``stdev`` on the input), the noise from each sample's generator."""
    if samples < 1:
        return integrated_gradients(classifier, images, classes, steps)
    noise = per_sample_randn((samples, *images.shape[1:]), rngs).to(images)  # (N, samples, C, H, W)
    total = torch.zeros_like(images)
    for k in range(samples):
        total = total + integrated_gradients(classifier, images + stdev * noise[:, k], classes, steps)
    return total / samples


def normalize_attributions(attr: torch.Tensor, outlier_perc: float = 2.0) -> torch.Tensor:
    """RCSB's (captum's) visual normalisation with ``sign="absolute_value"``: the channel
    sum's magnitude divided by the value at which the sorted magnitudes' cumulative sum
    passes ``100 - outlier_perc`` % of the total, clipped to 1. (N, H, W)."""
    a = attr.sum(1).abs()
    flat = a.flatten(1).sort(1).values
    cums = flat.cumsum(1)
    idx = (cums > cums[:, -1:] * 0.01 * (100 - outlier_perc)).int().argmax(1)
    threshold = flat.gather(1, idx[:, None]).flatten()
    threshold = torch.where(threshold == 0, torch.full_like(threshold, 1e-5), threshold)
    return (a / threshold.view(-1, 1, 1)).clip(-1, 1)


def top_area(cells: torch.Tensor, area: float) -> torch.Tensor:
    """RCSB's ``filter_area`` on cell sums (N, h, w): each map keeps its cells at or above the
    largest of 200 quantile levels (1 down to 0) whose cells cover at most ``area`` (a
    map already within ``area`` is kept whole)."""
    total = cells.shape[-1] ** 2
    out = cells.clone()
    levels = torch.linspace(1.0, 0.0, 200, dtype=cells.dtype, device=cells.device)
    for i, m in enumerate(cells):
        if float((m > 0).sum()) / total <= area:
            best = 0.0
        else:
            q = m.quantile(levels)
            j = next((j for j, v in enumerate(q) if float((m >= v).sum()) / total > area), len(q) - 1)
            best = q[j - 1]  # j == 0 reads q[-1], the minimum, as the official loop does
        out[i] = (m >= best) * m
    return out


def attribution_cells(
    classifier,
    images: torch.Tensor,
    classes: torch.Tensor,
    rngs: list[torch.Generator],
    cell_size: int = DEFAULT_CELL,
    area: float = DEFAULT_AREA,
    samples: int = 5,
    stdev: float = 0.05,
    steps: int = 50,
) -> torch.Tensor:
    """RCSB's automated region (N, 1, H, W): smoothed integrated gradients for ``classes``,
    normalised, summed into ``cell_size`` px cells, the top cells covering ``area``, binarised."""
    n, _, h, w = images.shape
    if h % cell_size or w % cell_size:
        raise ValueError(f"cell size {cell_size} does not divide the {h}x{w} images (RCSB's cells tile the image)")
    attr = smoothed_integrated_gradients(classifier, images, classes, rngs, samples, stdev, steps)
    maps = normalize_attributions(attr.detach())
    cells = maps.view(n, h // cell_size, cell_size, w // cell_size, cell_size).sum((2, 4))
    keep = (top_area(cells, area) > 0).to(images.dtype)
    return keep.repeat_interleave(cell_size, 1).repeat_interleave(cell_size, 2)[:, None]


def resolve_regions(
    spec: RegionSpec | None,
    images: torch.Tensor,
    source: torch.Tensor,
    rngs: list[torch.Generator],
    classifier,
    loaded: torch.Tensor | None = None,
    objects: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The batch's regions under ``spec``: the masks read by the data (folder), the foreground
    masks (objects) or RCSB's attribution cells for the source class (cells), their noise from
    :func:`side_generators`."""
    if spec is None:
        return None
    if spec.kind == "folder":
        if loaded is None:
            raise ValueError("regions from a folder: the data did not load them")
        return loaded.to(images)
    if spec.kind == "objects":
        if objects is None:
            raise ValueError("regions 'objects': these data carry no foreground masks (the world's do)")
        return (objects > 0.5).to(images)
    return attribution_cells(classifier, images, source, side_generators(rngs), spec.cell_size, spec.area)


def side_generators(rngs: list[torch.Generator]) -> list[torch.Generator]:
    """Generators of the region rule's own, seeded from the samples' (a method's random numbers
    then do not depend on whether a region was computed)."""
    return [torch.Generator(device=g.device).manual_seed(int(g.initial_seed()) ^ 0x5EC7) for g in rngs]


def change_outside(original: torch.Tensor, edited: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Per sample, the share of the absolute change that lies outside ``region`` (0 when the
    image did not change)."""
    diff = (edited - original).abs().sum(1, keepdim=True)
    total = diff.flatten(1).sum(1)
    outside = (diff * (1 - region)).flatten(1).sum(1)
    return torch.where(total > 0, outside / total.clamp_min(1e-30), torch.zeros_like(total))


def region_area(region: torch.Tensor) -> torch.Tensor:
    """Per sample, the fraction of the image inside the region."""
    return region.flatten(1).mean(1)


def compose(inside: torch.Tensor, outside: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """``region * inside + (1 - region) * outside``, the region resized (nearest) to the tensors'
    resolution when it differs (latent space)."""
    if region.shape[-2:] != inside.shape[-2:]:
        region = F.interpolate(region.float(), size=inside.shape[-2:], mode="nearest").to(inside)
    return region * inside + (1 - region) * outside
