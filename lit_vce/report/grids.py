"""Image grids: original | counterfactual | difference, one row per sample."""

from __future__ import annotations

from pathlib import Path

import torch

from ..io import load_png, sample_key


def triples(originals: torch.Tensor, counterfactuals: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3, H, W): per sample its original, counterfactual and difference (|x' - x| summed
    over channels, clipped to 1, grey), the row of ``grid.png`` and of the loggers' sample image."""
    o, c = originals.float().clamp(0, 1), counterfactuals.float().clamp(0, 1)
    diff = (c - o).abs().sum(-3, keepdim=True).clamp(0, 1).expand_as(o)
    return torch.stack([o, c, diff], dim=1)


def save_grid(run_dir: str | Path, rows: list[dict], path: str | Path | None = None, scale: int = 4) -> Path | None:
    """Write ``grid.png`` for ``rows`` (samples with images only); returns its path."""
    import torchvision

    run_dir = Path(run_dir)
    tiles = []
    for r in rows:
        key = sample_key(r["sample_id"])
        o, c = run_dir / "originals" / f"{key}.png", run_dir / "counterfactuals" / f"{key}.png"
        if not (o.is_file() and c.is_file()):
            continue
        tiles += list(triples(load_png(o)[None], load_png(c)[None])[0])
    if not tiles:
        return None
    grid = torchvision.utils.make_grid(torch.stack(tiles), nrow=3, padding=2, pad_value=1.0)
    if scale > 1:
        grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    out = Path(path) if path else run_dir / "grid.png"
    torchvision.utils.save_image(grid, out)
    return out
