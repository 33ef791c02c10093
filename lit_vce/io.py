"""Files of a run, in one place: sample keys, atomic writes, PNG and CSV round trips.

Used by the prediction writer, ``lit-vce evaluate``, the analyses and the reports,
so every stage reads and writes images and tables the same way. Every write is
atomic (a temporary file beside the target, then a rename), so a killed process
never leaves a half-written file; :func:`remove_stray_temporaries` cleans the
temporaries such a kill can leave.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import re
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where used: reading and verifying files needs none
    import torch

from .errors import LitVCEError


def sample_key(sample_id: str) -> str:
    """A filesystem-safe, unique file stem for a sample id."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", sample_id)[-80:]
    return f"{safe}-{hashlib.sha1(sample_id.encode()).hexdigest()[:8]}"


class DiskFullError(LitVCEError, OSError):
    """No space left where a run writes: the message names the folder and the space left."""


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown"
    return f"{free / 2**20:.1f} MB"


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (the file is whole or
    absent; the old content stays until the rename). A full disk raises :class:`DiskFullError`
    naming the folder and the space left, with nothing half-written left behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        _write_file(tmp, data)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                f"no space left on the device of {path.parent} ({_free_space(path.parent)} free) while "
                f"writing {path.name}: free some space and run the same command again (finished "
                "samples are kept and skipped)"
            ) from None
        raise


def file_sha256(path: Path) -> str:
    """The sha256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Path, sha256: str | None) -> str:
    """'' when ``path`` exists and (with ``sha256``) matches it, else the problem, naming the file."""
    path = Path(path)
    if not path.is_file():
        return f"{path} is missing"
    if sha256:
        try:
            actual = file_sha256(path)
        except OSError as e:
            return f"{path} is unreadable ({e})"
        if actual != sha256:
            return f"{path} does not match its recorded sha256 (corrupt or changed since it was written)"
    return ""


def remove_stray_temporaries(folder: Path) -> int:
    """Delete ``.<name>.<pid>.tmp`` files a killed atomic write left in a run folder; returns how many."""
    n = 0
    for sub in (folder, *(folder / d for d in ("counterfactuals", "originals", "samples", "evaluation", "logs"))):
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
    import torch

    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def quantize(images: torch.Tensor) -> torch.Tensor:
    """The values a PNG round trip gives back (so metrics match what is on disk)."""
    return (images.clamp(0, 1) * 255).round() / 255


def save_png(path: Path, array: np.ndarray) -> str:
    """Write ``array`` (H, W, 3) uint8 as a PNG, atomically; returns the sha256 of the bytes written."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_png(path: Path) -> torch.Tensor:
    """An image file (any format PIL reads) as (3, H, W) in [0, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    import torch

    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255
