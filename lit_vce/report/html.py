"""An HTML report of one or more runs: ``lit-vce report RUN [RUN ...]``.

The page (``report.html`` plus a ``report_files/`` folder of PNGs) holds:

- the leaderboard of the runs (sortable);
- plots: every run's flip rate against its mean L2 (one point per run), and per
  run the fraction of samples that are valid counterfactuals within an L2
  budget (a curve: a method that flips more images with smaller edits is above
  and to the left);
- one section per run: its metrics, and original | counterfactual | difference
  triples for the best, median and worst samples by a chosen per-sample metric;
- a side-by-side section: the same images under every run.

Runs are read from their folders (``evaluation/`` results and table when
present, else the in-line ones), so a report can be rebuilt at any time.
"""

from __future__ import annotations

import csv
import html
import math
from pathlib import Path
from typing import Any

import torch

from ..io import load_png, sample_key, save_png, to_uint8
from .leaderboard import SORT_SCRIPT, TABLE_CSS, html_table
from .plots import PALETTE, _float, plot_flip_rate_vs_l2, plot_validity_curves  # noqa: F401  (PALETTE: part of this module's API)
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

CHECK_SCRIPT = """
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.imagesLoaded = ok + '/' + imgs.length;
});
"""

CSS = (
    TABLE_CSS
    + """
h2 { margin-top: 2em; border-bottom: 2px solid #444; }
.triples { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 0; text-align: center; font-size: 12px; }
figure img { width: 96px; height: 96px; image-rendering: pixelated; border: 1px solid #ccc; }
.group { margin: 0.6em 0 1.2em; }
.plots { display: flex; gap: 30px; flex-wrap: wrap; }
table.side td { text-align: center; }
table.side img { width: 80px; height: 80px; image-rendering: pixelated; }
.fail { color: #a00; }
"""
)


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


def _analysis_section(folder: Path, assets: _Assets, limit: int = 16) -> str:
    res = RunResults.load(folder / "results.json")
    table = folder / "samples.csv"
    rows = list(csv.DictReader(table.open()))[:limit] if table.is_file() else []
    figs = []
    for r in rows:
        key = sample_key(r["sample_id"])
        c, o = folder / "counterfactuals" / f"{key}.png", folder / "originals" / f"{key}.png"
        if not c.is_file():
            continue
        imgs = ""
        if o.is_file() and res.config.get("analysis") == "neurons":
            imgs += f"<img src='{assets.save(f'an-{folder.name}-{key}-o', load_png(o))}' alt='original'>"
        imgs += f"<img src='{assets.save(f'an-{folder.name}-{key}', load_png(c))}' alt='generated'>"
        cap = [f"class {r['class']}", f"p {_float(r.get('class_conf')):.2f}"]
        if r.get("class_conf_second"):
            cap.append(f"p₂ {_float(r['class_conf_second']):.2f}")
        if r.get("activation"):
            cap.append(f"act {_float(r['activation_before']):.2f}→{_float(r['activation']):.2f}")
        if r.get("oracle_shape"):
            cap.append(f"oracle: shape {r['oracle_shape']}, bg {r['oracle_background']}")
        figs.append(f"<figure>{imgs}<figcaption>{html.escape(' · '.join(cap))}</figcaption></figure>")
    metrics = " · ".join(f"<b>{html.escape(k)}</b> {v:.3g}" for k, v in res.metrics.items() if isinstance(v, float))
    return (
        f"<h2>{html.escape(res.run_name)} <small>({html.escape(str(folder))})</small></h2>"
        f"<p>Objective: <code>{html.escape(str(res.config.get('objective')))}</code>; N {res.n}. {metrics}</p>"
        f"<div class='triples'>{''.join(figs)}</div>"
    )


def rank_samples(rows: list[dict[str, Any]], metric: str, k: int) -> dict[str, list[dict[str, Any]]]:
    """Best, median and worst ``k`` samples by ``metric`` in its direction, among the successful
    counterfactuals (among all that did not fail when none succeeded)."""
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"rank_by must be one of {sorted(HIGHER_IS_BETTER)}")
    valid = [r for r in rows if not r.get("failure") and not math.isnan(_float(r.get(metric)))]
    successful = [r for r in valid if str(r.get("success")) == "True"]
    valid = successful or valid
    valid.sort(key=lambda r: _float(r[metric]), reverse=HIGHER_IS_BETTER[metric])
    if not valid:
        return {"best": [], "median": [], "worst": []}
    mid = max(0, len(valid) // 2 - k // 2)
    return {"best": valid[:k], "median": valid[mid : mid + k], "worst": valid[-k:][::-1]}


def difference_map(original: torch.Tensor, counterfactual: torch.Tensor) -> torch.Tensor:
    """|x' - x| summed over channels, scaled to its maximum, as a white-to-red heat map (3, H, W)."""
    d = (counterfactual - original).abs().sum(0)
    d = d / d.max().clamp_min(1e-8)
    return torch.stack([torch.ones_like(d), 1 - d, 1 - d])


class _Assets:
    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def save(self, name: str, image: torch.Tensor) -> str:
        path = self.folder / f"{name}.png"
        save_png(path, to_uint8(image[None])[0])
        self.count += 1
        return f"{self.folder.name}/{path.name}"


def _triple(run: Run, row: dict[str, Any], assets: _Assets, metric: str) -> str:
    x, problem = run.load(row["sample_id"], "original")
    y, problem_c = run.load(row["sample_id"], "counterfactual") if x is not None else (None, "")
    if x is None or y is None:
        return f"<figure class='fail'>{html.escape(row['sample_id'])}<br>{html.escape(problem or problem_c)}</figure>"
    stem = f"{run.slug}-{sample_key(row['sample_id'])}"
    srcs = [assets.save(f"{stem}-o", x), assets.save(f"{stem}-c", y), assets.save(f"{stem}-d", difference_map(x, y))]
    ok = "✓" if str(row.get("success")) == "True" else "✗"
    caption = (
        f"{html.escape(row['sample_id'])}<br>{row['source']}→{row['target']} {ok} · "
        f"{metric} {_float(row.get(metric)):.3g} · p(target) {_float(row.get('target_conf_after')):.2f}"
    )
    imgs = "".join(
        f"<img src='{s}' alt='{a}' title='{a}'>" for s, a in zip(srcs, ("original", "counterfactual", "difference"))
    )
    return f"<figure>{imgs}<figcaption>{caption}</figcaption></figure>"


def _ci_text(r: RunResults, key: str) -> str:
    """`` [lo, hi]``: the figure's 95 % interval, when results.json has a finite one."""
    ci = (r.intervals or {}).get(key)
    return f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci and all(isinstance(c, float) and math.isfinite(c) for c in ci) else ""


def _metrics_list(r: RunResults) -> str:
    items = [f"<b>N</b> {r.n} ({r.n_success} successful, {r.n_failed} failed)"]
    if r.marked:
        items[0] = "<span class='fail'>! " + items[0] + ": " + html.escape("; ".join(r.warnings)) + "</span>"
    for k, v in r.metrics.items():
        items.append(
            f"<b>{html.escape(k)}</b> {v:.4g}{_ci_text(r, k)}"
            if isinstance(v, float)
            else f"<b>{html.escape(k)}</b> {v}"
        )
    for k, v in (r.audit or {}).items():
        items.append(
            f"<b>audit.{html.escape(k)}</b> {v:.3g}{_ci_text(r, k)}"
            if isinstance(v, float)
            else f"<b>audit.{html.escape(k)}</b> {v}"
        )
    where = r.hardware.get("gpu") or r.hardware.get("cpu_model") or r.hardware.get("processor")
    items.append(f"<b>wall time</b> {r.wall_time_s:.1f} s on {html.escape(str(where))}")
    return "<p>" + " · ".join(items) + "</p>"


def render_report(
    runs: list[Run],
    out: Path,
    rank_by: str = "l2",
    examples: int = 4,
    side_by_side: int = 6,
    analyses: list[Path] | None = None,
) -> Path:
    """Write ``out`` (HTML) and ``<out stem>_files/`` (images); returns ``out``."""
    assets = _Assets(out.parent / f"{out.stem}_files")
    body = [
        f"<h1>VCE report</h1><p>{len(runs)} run(s). Best / median / worst: successful counterfactuals (all, "
        f"when none succeeded) ranked by <b>{html.escape(rank_by)}</b> "
        f"({'higher' if HIGHER_IS_BETTER.get(rank_by) else 'lower'} is better). Triples: original | counterfactual | "
        "|difference| (scaled per image). ✓ the classifier reads the target.</p>"
    ]
    body.append("<h2>Leaderboard</h2>" + html_table([r.results for r in runs], "FR"))
    body.append(
        "<h2>Validity against closeness</h2><div class='plots'>"
        + plot_flip_rate_vs_l2(runs)
        + plot_validity_curves(runs)
        + "</div>"
    )
    for run in runs:
        body.append(
            f"<h2 id='{html.escape(run.slug)}'>{html.escape(run.label)} "
            f"<small>({html.escape(str(run.folder))})</small></h2>" + _metrics_list(run.results)
        )
        groups = rank_samples(run.rows, rank_by, examples)
        for name, rows in groups.items():
            if rows:
                body.append(
                    f"<div class='group'><h3>{name}</h3><div class='triples'>"
                    + "".join(_triple(run, r, assets, rank_by) for r in rows)
                    + "</div></div>"
                )
        failed = [r for r in run.rows if r.get("failure")]
        if failed:
            body.append(
                f"<p class='fail'>{len(failed)} failed sample(s), e.g. {html.escape(failed[0]['sample_id'])}: "
                f"{html.escape(failed[0]['failure'])}</p>"
            )
    if len(runs) > 1:
        common = set.intersection(*({r["sample_id"] for r in run.rows if not r.get("failure")} for run in runs))
        ids = sorted(common)[:side_by_side]
        if ids:
            head = "<tr><th>original</th>" + "".join(f"<th>{html.escape(r.label)}</th>" for r in runs) + "</tr>"
            lines = []
            for sid in ids:
                o, _ = runs[0].load(sid, "original")
                cells = (
                    [
                        f"<td><img src='{assets.save('side-' + sample_key(sid) + '-o', o)}' alt='original'>"
                        f"<br>{html.escape(sid)}</td>"
                    ]
                    if o is not None
                    else ["<td>-</td>"]
                )
                for run in runs:
                    c, _ = run.load(sid, "counterfactual")
                    row = next(r for r in run.rows if r["sample_id"] == sid)
                    mark = "✓" if str(row.get("success")) == "True" else "✗"
                    cells.append(
                        f"<td><img src='{assets.save(f'side-{run.slug}-{sample_key(sid)}', c)}' "
                        f"alt='counterfactual'><br>{mark} L2 {_float(row.get('l2')):.2f}</td>"
                        if c is not None
                        else "<td>-</td>"
                    )
                lines.append("<tr>" + "".join(cells) + "</tr>")
            body.append(
                "<h2>Side by side</h2><p>The same images under every run.</p>"
                f"<table class='side'>{head}{''.join(lines)}</table>"
            )
    for folder in analyses or []:
        body.append(_analysis_section(folder, assets))
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>VCE report</title><style>{CSS}</style></head>"
        f"<body>{''.join(body)}<script>{SORT_SCRIPT}{CHECK_SCRIPT}</script></body></html>\n"
    )
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page)
    tmp.replace(out)
    return out


def write_report(
    paths: list[str | Path], out: str | Path | None = None, rank_by: str = "l2", examples: int = 4
) -> Path:
    """Find the runs under ``paths`` and render their report; returns the HTML path."""
    runs = find_runs(paths)
    out = Path(out) if out else Path(paths[0]) / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    if rank_by not in HIGHER_IS_BETTER:
        raise ValueError(f"rank_by must be one of {sorted(HIGHER_IS_BETTER)}")
    return render_report(runs, out, rank_by, examples, analyses=find_analyses(paths))
