"""``PairDataset``: the (original, counterfactual) pairs ``lit-vce evaluate`` reads from disk,
from a predict run folder or from a plain pair of folders with a CSV of targets.

Per-sample problems (a missing, unreadable or changed file, a size that differs) become
the item's ``error``, which the evaluation records as a failure; problems with the whole
input (no samples, a malformed CSV, an unknown class) are errors raised before any work.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..io import load_png, sample_key, verify_file
from ..metrics.suite import resize_to


def _image_size(path: Path) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception:  # unreadable: reported per sample later
        return None


class PairDataset(Dataset):
    """(original, counterfactual, source, target) pairs read from disk.

    Build it with :meth:`from_run` or :meth:`from_folders`. Items hold
    ``original`` and ``counterfactual`` (3, H, W) in [0, 1] (zeros when
    ``error`` is set), ``source``, ``target``, ``sample_id`` and ``error``.

    Args:
        entries: dicts with ``sample_id``, ``original`` and ``counterfactual``
            (paths), ``source``, ``target`` and optionally ``failure`` (a failure
            recorded upstream; the sample is then not evaluated).
        image_size: resize every image to this square size (None: keep; all
            images must then share the size of the first readable one).
        all_may_fail: a run folder whose every sample failed is evaluated (each a
            failure row); plain folders without one readable image are an error.
    """

    def __init__(self, entries: list[dict[str, Any]], image_size: int | None = None, all_may_fail: bool = False):
        if not entries:
            raise ValueError("nothing to evaluate: no samples found")
        ids = [e["sample_id"] for e in entries]
        if len(set(ids)) != len(ids):
            dup = sorted({s for s in ids if ids.count(s) > 1})[:5]
            raise ValueError(f"duplicate sample ids {dup}")
        self.entries = entries
        self.image_size = image_size
        self.shape: tuple[int, int] | None = (image_size, image_size) if image_size else None
        if self.shape is None:
            for e in entries:
                if not e.get("failure") and Path(e["counterfactual"]).is_file():
                    self.shape = _image_size(Path(e["counterfactual"]))
                    if self.shape is not None:
                        break
        if self.shape is None:
            for e in entries:  # a run whose every counterfactual failed: the originals tell the size
                if Path(e["original"]).is_file():
                    self.shape = _image_size(Path(e["original"]))
                    if self.shape is not None:
                        break
        if self.shape is None and all_may_fail:
            self.shape = (1, 1)  # nothing readable: every sample is a recorded failure
        if self.shape is None:
            raise ValueError("no readable counterfactual image among the samples")

    # --- constructors ----------------------------------------------------------
    @classmethod
    def from_run(cls, run_dir: str | Path, image_size: int | None = None) -> PairDataset:
        """The samples of a run folder written by ``lit-vce predict``."""
        run = Path(run_dir)
        if not (run / "samples").is_dir():
            raise FileNotFoundError(
                f"{run} is not a predict run folder (no samples/ inside); for plain folders use "
                "--originals/--counterfactuals/--targets"
            )
        entries = []
        for p in sorted((run / "samples").glob("*.json")):
            try:
                row = json.loads(p.read_text())
                sid = row["sample_id"]
            except (json.JSONDecodeError, KeyError, OSError) as e:
                raise ValueError(f"unreadable sample record {p}: {e}") from e
            key = sample_key(sid)
            entries.append(
                {
                    "sample_id": sid,
                    "source": int(row["source"]),
                    "target": int(row["target"]),
                    "original": run / "originals" / f"{key}.png",
                    "counterfactual": run / "counterfactuals" / f"{key}.png",
                    "failure": row.get("failure") or "",
                    "method": row.get("method"),
                    "sha256": row.get("files") or {},
                    "seconds": row.get("seconds"),
                }
            )
        known = {sample_key(e["sample_id"]) for e in entries}
        for png in sorted((run / "counterfactuals").glob("*.png")):
            if png.stem not in known:  # an image without its record: listed as a failure, not dropped
                entries.append(
                    {
                        "sample_id": f"(no metadata) {png.stem}",
                        "source": -1,
                        "target": -1,
                        "original": png,
                        "counterfactual": png,
                        "failure": f"sample metadata samples/{png.stem}.json is missing",
                    }
                )
        entries.sort(key=lambda e: e["sample_id"])
        return cls(entries, image_size, all_may_fail=True)

    @classmethod
    def from_folders(
        cls,
        originals: str | Path,
        counterfactuals: str | Path,
        targets_csv: str | Path,
        image_size: int | None = None,
        class_names: list[str] | None = None,
    ) -> PairDataset:
        """Pairs ``originals/<file>`` and ``counterfactuals/<file>`` listed in a CSV with
        columns ``file``, ``source``, ``target`` (ids, or names from ``class_names``) and
        optionally ``sample_id``."""
        o, c, t = Path(originals), Path(counterfactuals), Path(targets_csv)
        for p, what in ((o, "originals folder"), (c, "counterfactuals folder")):
            if not p.is_dir():
                raise FileNotFoundError(f"{what} {p} does not exist")
        if not t.is_file():
            raise FileNotFoundError(f"targets CSV {t} does not exist")
        with t.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = {"file", "source", "target"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{t}: missing column(s) {sorted(missing)}; expected file,source,target[,sample_id]")
            rows = list(reader)
        if not rows:
            raise ValueError(f"{t} lists no samples")
        lookup = {n: i for i, n in enumerate(class_names or [])}

        def cls_id(value: str, line: int, col: str) -> int:
            value = value.strip()
            try:
                return int(value)
            except ValueError:
                if value in lookup:
                    return lookup[value]
                raise ValueError(
                    f"{t} line {line}: unknown {col} class {value!r} (not an id, not a class name)"
                ) from None

        entries = []
        for line, r in enumerate(rows, start=2):
            rel = r["file"].strip()
            if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise ValueError(f"{t} line {line}: 'file' must be a relative path inside both folders, got {rel!r}")
            entries.append(
                {
                    "sample_id": (r.get("sample_id") or "").strip() or rel,
                    "source": cls_id(r["source"], line, "source"),
                    "target": cls_id(r["target"], line, "target"),
                    "original": o / rel,
                    "counterfactual": c / rel,
                    "failure": "",
                }
            )
        return cls(entries, image_size)

    # --- checks and items ------------------------------------------------------
    def check_classes(self, num_classes: int) -> None:
        """Raise before any work when a source/target id is outside the classifier's classes,
        or a target equals its source (the rule of predict and explain() as well)."""
        from ..metrics.accounting import check_distinct_targets

        bad = sorted(
            {
                v
                for e in self.entries
                if not e.get("failure")
                for v in (e["source"], e["target"])
                if not 0 <= v < num_classes
            }
        )
        if bad:
            raise ValueError(f"class ids {bad[:10]} are unknown to the classifier (classes 0..{num_classes - 1})")
        live = [e for e in self.entries if not e.get("failure")]
        check_distinct_targets([e["source"] for e in live], [e["target"] for e in live], [e["sample_id"] for e in live])

    def __len__(self) -> int:
        return len(self.entries)

    def _load(self, path: Path) -> torch.Tensor:
        return resize_to(load_png(path)[None], self.image_size)[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = self.entries[i]
        h, w = self.shape
        item = {
            "sample_id": e["sample_id"],
            "source": e["source"],
            "target": e["target"],
            "error": e.get("failure") or "",
            "seconds": float(e["seconds"]) if isinstance(e.get("seconds"), (int, float)) else float("nan"),
        }
        images: dict[str, torch.Tensor] = {}
        problems: dict[str, str] = {}
        for side in ("original", "counterfactual"):
            path = Path(e[side])
            if not path.is_file():
                problems[side] = f"missing {side} file {path}"
                continue
            sha = (e.get("sha256") or {}).get(side)
            problem = verify_file(path, sha) if sha else ""
            if problem:
                problems[side] = f"{side}: {problem}"
                continue
            try:
                images[side] = self._load(path)
            except Exception as err:  # PIL raises many types for corrupt files
                problems[side] = f"unreadable {side} {path}: {type(err).__name__}: {err}"
                continue
        if "original" in images and "counterfactual" in images:
            so, sc = tuple(images["original"].shape[-2:]), tuple(images["counterfactual"].shape[-2:])
            if so != sc:
                problems["counterfactual"] = f"size mismatch: original {so[0]}x{so[1]}, counterfactual {sc[0]}x{sc[1]}"
                del images["counterfactual"]
        for side in list(images):
            sz = tuple(images[side].shape[-2:])
            if sz != (h, w):
                problems.setdefault(
                    side, f"size {sz[0]}x{sz[1]} differs from the other images' {h}x{w} (set image_size to resize)"
                )
                del images[side]
        if not item["error"] and problems:
            item["error"] = problems.get("counterfactual") or problems["original"]
        # the original alone still tells whether the classifier got it right (flip_rate_source_correct)
        item["original_ok"] = "original" in images and e["source"] >= 0
        item["original"] = images.get("original", torch.zeros(3, h, w))
        item["counterfactual"] = images["counterfactual"] if not item["error"] else torch.zeros(3, h, w)
        return item
