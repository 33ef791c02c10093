"""Published figures beside ours: ``lit-vce leaderboard RUNS --published PRESET``.

The package ships the figures the papers report (``lit_vce/assets/published/published.csv``:
paper, table, preset, method, metric, value, source, check), each under the
``results.json`` key that computes it in the paper's convention (ACE's FID is
``fid_successful``: all originals against the successful counterfactuals). A
preset name selects its own rows and those of its task presets (``ace-imagenet``
also takes ``ace-imagenet-zs``, ``-cc``, ``-ep``); our runs are those whose
``model.preset`` was that preset. Published rows are marked ``†`` with their
source and how they were checked under the table.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from .results import RunResults

#: a published metric's column: (header, convention)
METRIC_HEADERS = {
    "fid_successful": "FID (ACE: all originals vs successful CFs)",
    "sfid_successful": "sFID (ACE)",
    "fid": "FID (LDCE: all vs all)",
    "sfid_within": "sFID (LDCE: halves against themselves)",
    "l1": "L1 (sum over values)",
    "l2": "L2 (norm over values)",
    "s3": "S3",
    "cout_source_correct": "COUT (ACE: correct originals)",
    "flip_rate": "FR",
    "l1_per_value": "L1 (per value)",
    "fva": "FVA",
    "fs": "FS",
    "mnac": "MNAC",
    "cd": "CD",
    "lpips": "LPIPS",
}


def published_path() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "published" / "published.csv"


def load_published() -> list[dict[str, str]]:
    """The shipped figures, one dict per row (``value`` as a float)."""
    with published_path().open(newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["value"] = float(r["value"])
    return rows


def known_presets() -> list[str]:
    from ..config_files import shipped_configs

    return [c.split("/", 1)[1] for c in shipped_configs() if c.startswith("presets/")]


def _in_family(preset: str | None, family: str) -> bool:
    return preset is not None and (preset == family or preset.startswith(family + "-"))


def run_preset(r: RunResults) -> str | None:
    """The preset a run followed (its own config, or the predict run's for an evaluation)."""
    cfg = r.config or {}
    for c in (cfg, cfg.get("predict_config") or {}):
        p = (c.get("metric_settings") or {}).get("preset")
        if p:
            return p
    return None


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def published_table(results: list[RunResults], family: str) -> str:
    """A Markdown table of our runs of ``family`` (a preset or a task family) and the
    published figures for it, in the published metrics' conventions."""
    from .leaderboard import count_cell

    if family not in known_presets():
        from ..errors import suggest

        raise ValueError(
            f"unknown preset {family!r}{suggest(family, known_presets())}; presets: {', '.join(known_presets())}"
        )
    pub = [r for r in load_published() if _in_family(r["preset"], family)]
    ours = [r for r in results if _in_family(run_preset(r), family)]
    metrics = list(dict.fromkeys(["flip_rate"] + [r["metric"] for r in pub]))
    header = ["preset", "method", "source", "N"] + [METRIC_HEADERS.get(m, m) for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(ours, key=lambda r: (run_preset(r), r.method)):
        cells = [run_preset(r), r.method, f"ours ({r.run_name})", count_cell(r)] + [
            _fmt(r.metrics.get(m)) for m in metrics
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    notes = []
    groups: dict[tuple, dict[str, float]] = {}
    for p in pub:
        groups.setdefault((p["preset"], p["method"], p["variant"], p["paper"], p["table"]), {})[p["metric"]] = p[
            "value"
        ]
        note = f"{p['paper']}, {p['table']}: {p['source']} ({p['check']})"
        if note not in notes:
            notes.append(note)
    for (preset, method, variant, paper, table), values in groups.items():
        label = f"{method} ({variant})" if variant else method
        k = notes.index(next(n for n in notes if n.startswith(f"{paper}, {table}:"))) + 1
        cells = [preset, label, f"published † [{k}]", "-"] + [_fmt(values.get(m)) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    out = [f"## {family}: our runs beside the published figures", ""] + lines + [""]
    if not ours:
        out.append(
            f"No run under this folder followed preset {family} (model.preset); "
            f"`scripts/reproduce.sh {family} METHOD` makes one."
        )
        out.append("")
    if not pub:
        out.append(
            f"No published figure for {family} is shipped yet (lit_vce/assets/published/README.md says which are)."
        )
    for k, n in enumerate(notes, 1):
        out.append(f"[{k}] {n}")
    return "\n".join(out) + "\n"


def write_published(root: str | Path, family: str) -> Path:
    from .leaderboard import load_results

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    path = root / f"published-{family}.md"
    path.write_text(published_table(load_results(root), family))
    return path
