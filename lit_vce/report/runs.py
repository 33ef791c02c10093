"""The runs a report reads and how it picks their samples: :class:`Run` (a run folder, its
results and table, its images checked against their records), :func:`find_runs` and
:func:`find_analyses` below given paths, :func:`rank_samples` (best / median / worst by a
per-sample metric) and the class names of captions."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import torch

from ..io import load_png, sample_key
from .plots import _float
from .results import RunResults

HIGHER_IS_BETTER = {
    "l1": False,
    "l2": False,
    "lpips": False,
    "latent_l1": False,
    "latent_l2": False,
    "cout": True,
    "target_conf_after": True,
    "conf_after": True,
}


class Run:
    """A run folder as the report reads it."""

    def __init__(self, folder: Path):
        self.folder = folder
        ev = folder / "evaluation"
        res = ev / "results.json" if (ev / "results.json").is_file() else folder / "results.json"
        table = ev / "samples.csv" if (ev / "samples.csv").is_file() else folder / "samples.csv"
        if not res.is_file():
            raise FileNotFoundError(f"{folder}: no results.json (run predict or evaluate first)")
        self.results = RunResults.load(res)  # checks that the table beside it is its own
        self.rows: list[dict[str, Any]] = list(csv.DictReader(table.open())) if table.is_file() else []
        self.label = f"{self.results.method} · {self.results.classifier}"
        self.slug = folder.name
        self.anchor = f"run-{folder.name}"
        self.class_names = class_names(self.results)

    def images(self, sample_id: str) -> tuple[Path, Path]:
        key = sample_key(sample_id)
        return self.folder / "originals" / f"{key}.png", self.folder / "counterfactuals" / f"{key}.png"

    def load(self, sample_id: str, side: str) -> tuple[torch.Tensor | None, str]:
        """The sample's ``side`` image (``original`` or ``counterfactual``), checked against the
        sha256 in its record: ``(image, '')``, or ``(None, problem)`` naming the file."""
        import json

        from ..io import verify_file

        o, c = self.images(sample_id)
        path = o if side == "original" else c
        try:
            record = json.loads((self.folder / "samples" / f"{sample_key(sample_id)}.json").read_text())
        except (OSError, ValueError):
            record = {}
        problem = verify_file(path, ((record.get("files") if isinstance(record, dict) else None) or {}).get(side))
        if problem:
            return None, problem
        try:
            return load_png(path), ""
        except Exception as e:  # PIL raises many types for truncated files
            return None, f"{path} is unreadable ({type(e).__name__})"


def _warn(message: str) -> None:
    import sys

    print(message, file=sys.stderr)


def _stage(path: Path) -> str | None:
    """The stage of a results.json, or None (with a one-line warning) when it is invalid."""
    from .results import InvalidResultsError

    try:
        return RunResults.load(path).stage
    except InvalidResultsError as e:
        _warn(f"warning: skipped {e}")
        return None


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Run folders among ``paths`` (a path may be a run or hold runs below it). A run whose
    results cannot be read (or do not match their table) is skipped with a one-line warning."""
    from .results import InvalidResultsError

    folders: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        if (p / "results.json").is_file():
            folders.append(p)
        else:
            found = sorted({q.parent for q in p.rglob("results.json") if q.parent.name != "evaluation"})
            found = [
                f
                for f in found
                if (f / "counterfactuals").is_dir() and _stage(f / "results.json") not in (None, "analysis")
            ]
            if not found:
                raise FileNotFoundError(f"no run folders (with a valid results.json and counterfactuals/) under {p}")
            folders += found
    seen, runs = set(), []
    for f in folders:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            try:
                runs.append(Run(f))
            except InvalidResultsError as e:
                _warn(f"warning: skipped {e}")
    if not runs:
        raise FileNotFoundError(f"no readable run among {', '.join(map(str, paths))}")
    return runs


def find_analyses(paths: list[str | Path]) -> list[Path]:
    """Analysis run folders (``lit-vce disagree`` / ``neurons``) below ``paths``."""
    out = []
    for p in map(Path, paths):
        for q in sorted(p.rglob("results.json")):
            if q.parent.name != "evaluation" and (q.parent / "counterfactuals").is_dir() and _stage(q) == "analysis":
                out.append(q.parent)
    return out


def already_target(row: dict[str, Any]) -> bool:
    """A success whose original the classifier already predicted as the target
    (``pred_before == target``): counted in the flip rate by the accounting rule, but nothing
    was explained. A failed sample is never one (it is never a success)."""
    before, target = str(row.get("pred_before", "")), str(row.get("target", ""))
    return before != "" and before == target and str(row.get("success")) == "True" and not row.get("failure")


def rank_samples(rows: list[dict[str, Any]], metric: str, k: int) -> dict[str, list[dict[str, Any]]]:
    """Best, median and worst ``k`` samples by ``metric`` in its direction, among the successful
    counterfactuals of originals not already read as the target (:func:`already_target`; among
    all successful ones when there are no others; among all that did not fail when none succeeded)."""
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"rank_by must be one of {sorted(HIGHER_IS_BETTER)}")
    valid = [r for r in rows if not r.get("failure") and not math.isnan(_float(r.get(metric)))]
    successful = [r for r in valid if str(r.get("success")) == "True"]
    valid = [r for r in successful if not already_target(r)] or successful or valid
    valid.sort(key=lambda r: _float(r[metric]), reverse=HIGHER_IS_BETTER[metric])
    if not valid:
        return {"best": [], "median": [], "worst": []}
    mid = max(0, len(valid) // 2 - k // 2)
    return {"best": valid[:k], "median": valid[mid : mid + k], "worst": valid[-k:][::-1]}


def class_names(results: RunResults) -> list[str] | None:
    """The run's class names: the data's (``config.data.class_names``), else the
    classifier's when its spec names them without loading weights; ``None`` otherwise."""
    names = ((results.config or {}).get("data") or {}).get("class_names")
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    try:
        from ..classifiers.loaders import classifier_class_names

        found = classifier_class_names(results.classifier)
    except Exception:  # a caption falls back to ids; it never stops a report
        return None
    return list(found) if found else None


def _class(names: list[str] | None, value) -> str:
    try:
        i = int(value)
    except (TypeError, ValueError):
        return str(value)
    return names[i] if names and 0 <= i < len(names) else str(i)
