"""The inversion cache: one inversion per image, reused for every target it is explained
into (the multi-target protocols explain each image into several classes).

Each entry is one sample's inversion, stored as ``<key>.pt`` in the cache folder; the key
is a hash of the image's values, its source conditioning (class or source prompt), the
diffusion model's description and the inversion settings, so a changed setting never
reads a stale entry. Files are written atomically; an unreadable one is recomputed."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch

from ...diffusion import Inversion


class InversionCache:
    """A folder of per-sample inversions (see the module docstring)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        self.hits = self.misses = 0

    @staticmethod
    def key(image: torch.Tensor, source: str, settings: dict[str, Any]) -> str:
        """The entry name of ``image`` (its exact values) inverted under ``source`` with ``settings``."""
        h = hashlib.sha256()
        h.update(image.detach().float().contiguous().cpu().numpy().tobytes())
        h.update(str(tuple(image.shape)).encode())
        h.update(json.dumps({"source": source, **settings}, sort_keys=True, default=str).encode())
        return h.hexdigest()[:32]

    def load(self, key: str, device: torch.device) -> Inversion | None:
        """The stored one-sample inversion, or ``None`` (absent or unreadable)."""
        path = self.folder / f"{key}.pt"
        if not path.is_file():
            self.misses += 1
            return None
        try:
            data = torch.load(path, map_location=device, weights_only=True)
            inv = Inversion(
                list(data["latents"].unbind(0)),
                list(data["uncond"].unbind(0)),
                float(data["error"]),
                None if data.get("trajectory") is None else list(data["trajectory"].unbind(0)),
                None,
                data["error"].reshape(1).cpu(),
            )
        except (OSError, RuntimeError, KeyError, ValueError, EOFError):
            self.misses += 1
            return None
        self.hits += 1
        return inv

    def save(self, key: str, inv: Inversion) -> None:
        """Store a one-sample inversion (atomically: a reader never sees half a file)."""
        from ...io import atomic_write_bytes

        data = {
            "latents": torch.stack([x.detach().cpu() for x in inv.latents]),
            "uncond": torch.stack([u.detach().cpu() for u in inv.uncond]),
            "error": torch.tensor(float(inv.errors[0]) if inv.errors is not None else float("nan")),
        }
        if inv.trajectory is not None:
            data["trajectory"] = torch.stack([x.detach().cpu() for x in inv.trajectory])
        buf = io.BytesIO()
        torch.save(data, buf)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.folder / f"{key}.pt", buf.getvalue())
