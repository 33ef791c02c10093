"""Leaderboards rendered from ``results.json`` files (never typed by hand)."""

from __future__ import annotations

import math
from pathlib import Path

from .results import RunResults

COLUMNS = [
    # (header, getter, higher is better)
    ("FR", lambda r: r.metrics.get("flip_rate"), True),
    ("conf", lambda r: r.metrics.get("target_confidence"), True),
    ("FR indep.", lambda r: r.metrics.get("flip_rate_independent"), True),
    ("L1", lambda r: r.metrics.get("l1"), False),
    ("L2", lambda r: r.metrics.get("l2"), False),
    ("LPIPS", lambda r: r.metrics.get("lpips"), False),
    ("FID", lambda r: r.metrics.get("fid"), False),
    ("sFID", lambda r: r.metrics.get("sfid"), False),
    ("COUT", lambda r: r.metrics.get("cout"), True),
    ("shape changed", lambda r: (r.audit or {}).get("shape_changed"), None),
    ("background only", lambda r: (r.audit or {}).get("background_only"), None),
]


def load_results(root: str | Path) -> list[RunResults]:
    """Every ``results.json`` under ``root`` (recursively)."""
    paths = sorted(Path(root).rglob("results.json"))
    if not paths:
        raise FileNotFoundError(f"no results.json under {root}")
    return [RunResults.load(p) for p in paths]


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown_table(results: list[RunResults], sort_by: str = "FR") -> str:
    """A Markdown table, one row per run, sorted by ``sort_by`` in its declared direction."""
    col = {c[0]: c for c in COLUMNS}
    if sort_by not in col:
        raise ValueError(f"sort_by must be one of {list(col)}")
    _, get, higher = col[sort_by]

    def key(r):
        v = get(r)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return math.inf
        return -v if higher in (True, None) else v

    results = sorted(results, key=key)
    head = ["method", "classifier", "N"] + [c[0] for c in COLUMNS] + ["s/img"]
    arrows = {True: " ↑", False: " ↓", None: ""}
    head = head[:3] + [c[0] + arrows[c[2]] for c in COLUMNS] + head[-1:]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r.method, r.classifier, str(r.n)] + [_fmt(c[1](r)) for c in COLUMNS]
        cells.append(f"{r.wall_time_s / max(r.n, 1):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_leaderboard(root: str | Path, sort_by: str = "FR") -> Path:
    """Render ``leaderboard.md`` in ``root`` from the results below it; returns its path."""
    table = markdown_table(load_results(root), sort_by)
    out = Path(root) / "leaderboard.md"
    out.write_text("# Leaderboard\n\nRendered from the `results.json` files below this folder.\n\n" + table)
    return out
