"""Files of a run, in one place: sample keys, atomic writes, PNG and CSV round trips.

Used by the prediction writer, ``lit-vce evaluate``, the analyses and the reports,
so every stage reads and writes images and tables the same way. Every write is
atomic (a temporary file beside the target, then a rename), so a killed process
never leaves a half-written file; :func:`remove_stray_temporaries` cleans the
temporaries such a kill can leave.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch


def sample_key(sample_id: str) -> str:
    """A filesystem-safe, unique file stem for a sample id."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", sample_id)[-80:]
    return f"{safe}-{hashlib.sha1(sample_id.encode()).hexdigest()[:8]}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def remove_stray_temporaries(folder: Path) -> int:
    """Delete ``.<name>.<pid>.tmp`` files a killed atomic write left in a run folder; returns how many."""
    n = 0
    for sub in (folder, *(folder / d for d in ("counterfactuals", "originals", "samples", "evaluation"))):
        for tmp in sub.glob(".*.tmp") if sub.is_dir() else ():
            tmp.unlink(missing_ok=True)
            n += 1
    return n


def write_rows_csv(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> Path:
    """Per-sample rows as CSV, columns ``fields`` in order, written atomically."""
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=fields)
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in fields})
    atomic_write_bytes(path, out.getvalue().encode())
    return path


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """``data`` as indented JSON, written atomically."""
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=str) + "\n").encode())
    return path


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (N, H, W, 3) uint8, rounding as PNG writers do."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def quantize(images: torch.Tensor) -> torch.Tensor:
    """The values a PNG round trip gives back (so metrics match what is on disk)."""
    return (images.clamp(0, 1) * 255).round() / 255


def save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def load_png(path: Path) -> torch.Tensor:
    """An image file (any format PIL reads) as (3, H, W) in [0, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255
