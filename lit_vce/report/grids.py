"""Image grids: original | counterfactual | difference, one row per sample."""

from __future__ import annotations

from pathlib import Path

import torch

from ..io import load_png, sample_key


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
        x, y = load_png(o), load_png(c)
        diff = (y - x).abs().sum(0, keepdim=True).clamp(0, 1).expand(3, -1, -1)
        tiles += [x, y, diff]
    if not tiles:
        return None
    grid = torchvision.utils.make_grid(torch.stack(tiles), nrow=3, padding=2, pad_value=1.0)
    if scale > 1:
        grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    out = Path(path) if path else run_dir / "grid.png"
    torchvision.utils.save_image(grid, out)
    return out
