"""An HTML report of one or more runs: ``lit-vce report RUN [RUN ...]``.

The page (``report.html`` plus a ``report_files/`` folder of PNGs) holds, after a
table of contents (a sticky column beside the page):

- the leaderboard of the runs (sortable, one line per run, scrolling sideways
  inside its box when it is wider than the page; a cell's tooltip has its 95 %
  interval);
- plots: every run's flip rate against its mean L2 (one point per run), and per
  run the fraction of samples that are valid counterfactuals within an L2
  budget (a curve: a method that flips more images with smaller edits is above
  and to the left); the colour names the method, the marker and dash pattern the
  classifier (:func:`~lit_vce.report.plots.series_styles`), the legend sits
  beside the axes;
- a side-by-side table: the same images under every run, a row per run;
- one section per run (closed past four runs; its summary line shows N, flip
  rate, L2, FID): a compact grid of its figures with their intervals, and
  original | counterfactual | difference triples for the best, median and worst
  samples by a chosen per-sample metric, captioned with class names (originals the
  classifier already read as the target are counted in a note, not ranked).

Runs are read from their folders (``evaluation/`` results and table when
present, else the in-line ones; :mod:`lit_vce.report.runs`), so a report can be
rebuilt at any time.
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
from .runs import (  # noqa: F401  (importable from here too)
    HIGHER_IS_BETTER,
    Run,
    _class,
    already_target,
    class_names,
    find_analyses,
    find_runs,
    rank_samples,
)

CHECK_SCRIPT = """
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.imagesLoaded = ok + '/' + imgs.length;
  const side = document.querySelector('table.side');
  if (side) {  // the side-by-side table inside the viewport, not cut off or scrolled
    const r = side.getBoundingClientRect();
    const box = side.parentElement;
    const fits = r.right <= document.documentElement.clientWidth && box.scrollWidth <= box.clientWidth;
    document.body.dataset.sideFits = fits ? 'yes' : 'no';
    document.body.dataset.sideBox = [r.left, r.top + scrollY, r.right, r.bottom + scrollY].map(Math.round).join(',');
  }
});
function openTarget() {
  const t = document.getElementById(decodeURIComponent(location.hash.slice(1)));
  if (t && t.tagName === 'DETAILS') t.open = true;
}
window.addEventListener('hashchange', openTarget);
window.addEventListener('load', openTarget);
"""

CSS = (
    TABLE_CSS
    + """
body { margin: 0; }
.layout { display: grid; grid-template-columns: 230px minmax(0, 1fr); gap: 24px; padding: 0 24px; }
nav.toc { position: sticky; top: 0; align-self: start; max-height: 100vh; overflow-y: auto; padding: 1em 0;
  font-size: 13px; }
nav.toc ol { padding-left: 1.2em; margin: 0.3em 0; } nav.toc a { color: #235; text-decoration: none; }
main { min-width: 0; padding-bottom: 4em; }
h2 { margin-top: 1.6em; border-bottom: 2px solid #444; }
.scroll { overflow-x: auto; max-width: 100%; }
.small { font-size: 12px; color: #555; }
.triples { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 0; text-align: center; font-size: 12px; }
figure img { width: 96px; height: 96px; image-rendering: pixelated; border: 1px solid #ccc; }
.group { margin: 0.4em 0 0.8em; } .group h4 { margin: 0.3em 0; }
.plots { display: flex; gap: 30px; flex-wrap: wrap; }
details.run { border-top: 1px solid #ddd; padding: 0.4em 0; }
details.run summary { cursor: pointer; }
.metrics { display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr)); gap: 2px 18px;
  font-size: 13px; margin: 0.4em 0; }
.metrics div { display: grid; grid-template-columns: minmax(0, 1fr) auto auto; gap: 6px; align-items: baseline;
  border-bottom: 1px dotted #ddd; min-width: 0; }
.metrics .k { color: #444; overflow-wrap: anywhere; }
.metrics .lead .k, .metrics .lead .v { font-weight: bold; color: #000; }
.metrics .ci { font-size: 11px; color: #777; white-space: nowrap; }
table.side td, table.side th { text-align: center; font-weight: normal; font-size: 12px; }
table.side th.name { text-align: left; white-space: nowrap; }
table.side img { width: 72px; height: 72px; image-rendering: pixelated; }
.fail { color: #a00; }
"""
)


def _analysis_section(folder: Path, assets: _Assets, limit: int = 16, anchor: str = "") -> str:
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
        f"<h3 id='{html.escape(anchor)}'>{html.escape(res.run_name)} <small>({html.escape(str(folder))})</small></h3>"
        f"<p>Objective: <code>{html.escape(str(res.config.get('objective')))}</code>; N {res.n}. {metrics}</p>"
        f"<div class='triples'>{''.join(figs)}</div>"
    )


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
    src, tgt = _class(run.class_names, row["source"]), _class(run.class_names, row["target"])
    caption = (
        f"<span title='{html.escape(row['sample_id'])} (classes {row['source']} → {row['target']})'>"
        f"{html.escape(src)} → {html.escape(tgt)}</span> {ok}<br>"
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


#: the figures a reader looks for first, in this order; the others follow
LEAD_METRICS = (
    "flip_rate",
    "target_confidence",
    "flip_rate_independent",
    "l1",
    "l2",
    "lpips",
    "fid",
    "sfid",
    "cout",
    "mnac",
    "cd",
    "s3",
)


def metric_table(r: RunResults) -> str:
    """A compact grid of the run's figures: name, value and 95 % interval per cell, the
    lead figures first (bold), the world audit's as ``audit.<name>``; N and the failures
    above it, wall time below."""
    head = f"N {r.n}: {r.n_success} successful, {r.n_failed} failed"
    if r.marked:
        head = f"<p class='fail'>! {html.escape(head)}: {html.escape('; '.join(r.warnings))}</p>"
    else:
        head = f"<p>{html.escape(head)}</p>"
    items = [(k, r.metrics[k], k) for k in LEAD_METRICS if k in r.metrics]
    items += [(k, v, k) for k, v in r.metrics.items() if k not in LEAD_METRICS]
    items += [(f"audit.{k}", v, k) for k, v in (r.audit or {}).items()]
    cells = []
    for name, v, key in items:
        value = f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))
        lead = " class='lead'" if name in LEAD_METRICS else ""
        cells.append(
            f"<div{lead}><span class='k'>{html.escape(name)}</span><span class='v'>{value}</span>"
            f"<span class='ci'>{_ci_text(r, key).strip()}</span></div>"
        )
    where = r.hardware.get("gpu") or r.hardware.get("cpu_model") or r.hardware.get("processor")
    tail = f"<p class='small'>wall time {r.wall_time_s:.1f} s on {html.escape(str(where))}</p>"
    return head + f"<div class='metrics'>{''.join(cells)}</div>" + tail


def _summary_line(r: RunResults) -> str:
    m = r.metrics
    parts = [f"N {r.n}", f"FR {_float(m.get('flip_rate')):.3f}", f"L2 {_float(m.get('l2')):.3g}"]
    if "fid" in m:
        parts.append(f"FID {_float(m.get('fid')):.3g}")
    if r.n_failed:
        parts.append(f"<span class='fail'>{r.n_failed} failed</span>")
    return " · ".join(parts)


def _run_section(run: Run, assets: _Assets, rank_by: str, examples: int, is_open: bool) -> str:
    parts = [metric_table(run.results)]
    for name, rows in rank_samples(run.rows, rank_by, examples).items():
        if rows:
            parts.append(
                f"<div class='group'><h4>{name}</h4><div class='triples'>"
                + "".join(_triple(run, r, assets, rank_by) for r in rows)
                + "</div></div>"
            )
    already = sum(already_target(r) for r in run.rows)
    if already:
        successes = sum(str(r.get("success")) == "True" and not r.get("failure") for r in run.rows)
        parts.append(
            f"<p class='small'>{already} of {successes} successes had an original already read as the target: "
            "counted in the flip rate by the accounting rule, but not explanations, so not shown above.</p>"
        )
    failed = [r for r in run.rows if r.get("failure")]
    if failed:
        parts.append(
            f"<p class='fail'>{len(failed)} failed sample(s), e.g. {html.escape(failed[0]['sample_id'])}: "
            f"{html.escape(failed[0]['failure'])}</p>"
        )
    return (
        f"<details class='run' id='{html.escape(run.anchor)}'{' open' if is_open else ''}><summary>"
        f"<b>{html.escape(run.label)}</b> <span class='small'>{_summary_line(run.results)} · "
        f"{html.escape(str(run.folder))}</span></summary>{''.join(parts)}</details>"
    )


def _side_by_side(runs: list[Run], assets: _Assets, count: int) -> str:
    """The same images under every run: a column per image, a row per run, so the table
    grows down with the number of runs and its width stays that of ``count`` images."""
    common = set.intersection(*({r["sample_id"] for r in run.rows if not r.get("failure")} for run in runs))
    ids = sorted(common)[:count]
    if not ids:
        return ""
    first = {r["sample_id"]: r for r in runs[0].rows}
    head = ["<th></th>"]
    for sid in ids:
        o, _ = runs[0].load(sid, "original")
        row = first[sid]
        label = f"{_class(runs[0].class_names, row['source'])} → {_class(runs[0].class_names, row['target'])}"
        img = f"<img src='{assets.save('side-' + sample_key(sid) + '-o', o)}' alt='original'>" if o is not None else "-"
        head.append(f"<th title='{html.escape(sid)}'>{img}<br>{html.escape(label)}</th>")
    lines = ["<tr><th class='name'>original</th>" + "".join(head[1:]) + "</tr>"]
    for run in runs:
        by_id = {r["sample_id"]: r for r in run.rows}
        cells = [f"<th class='name'><a href='#{html.escape(run.anchor)}'>{html.escape(run.label)}</a></th>"]
        for sid in ids:
            c, _ = run.load(sid, "counterfactual")
            row = by_id[sid]
            mark = "✓" if str(row.get("success")) == "True" else "✗"
            cells.append(
                f"<td><img src='{assets.save(f'side-{run.slug}-{sample_key(sid)}', c)}' alt='counterfactual'>"
                f"<br>{mark} L2 {_float(row.get('l2')):.2f}</td>"
                if c is not None
                else "<td>-</td>"
            )
        lines.append("<tr>" + "".join(cells) + "</tr>")
    return (
        "<section id='side-by-side'><h2>Side by side</h2><p>The same images under every run (✓ the run's "
        f"classifier reads the target).</p><div class='scroll'><table class='side'>{''.join(lines)}</table></div>"
        "</section>"
    )


def _toc(runs: list[Run], side: bool, analyses: list[tuple[str, str]]) -> str:
    items = ["<li><a href='#leaderboard'>Leaderboard</a></li>", "<li><a href='#plots'>Validity and closeness</a></li>"]
    if side:
        items.append("<li><a href='#side-by-side'>Side by side</a></li>")
    runs_list = "".join(
        f"<li><a href='#{html.escape(r.anchor)}'>{html.escape(r.label)}</a></li>"
        for r in sorted(runs, key=lambda r: r.label)
    )
    items.append(f"<li><a href='#runs'>Runs ({len(runs)})</a><ol>{runs_list}</ol></li>")
    if analyses:
        links = "".join(f"<li><a href='#{html.escape(a)}'>{html.escape(t)}</a></li>" for a, t in analyses)
        items.append(f"<li><a href='#analyses'>Analyses</a><ol>{links}</ol></li>")
    return f"<nav class='toc'><b>Contents</b><ol>{''.join(items)}</ol></nav>"


def render_report(
    runs: list[Run],
    out: Path,
    rank_by: str = "l2",
    examples: int = 4,
    side_by_side: int = 6,
    analyses: list[Path] | None = None,
) -> Path:
    """Write ``out`` (HTML) and ``<out stem>_files/`` (images); returns ``out``. With more
    than four runs the per-run sections start closed (their summary line shows N, flip
    rate, L2, FID); a link in the contents opens its section."""
    assets = _Assets(out.parent / f"{out.stem}_files")
    intro = (
        f"<h1>VCE report</h1><p>{len(runs)} run(s). Per run: best / median / worst successful counterfactuals "
        "of originals not already read as the target (all, when none succeeded) "
        f"ranked by <b>{html.escape(rank_by)}</b> "
        f"({'higher' if HIGHER_IS_BETTER.get(rank_by) else 'lower'} is better); triples: original | "
        "counterfactual | |difference| (scaled per image); ✓ the classifier reads the target.</p>"
    )
    side = _side_by_side(runs, assets, side_by_side) if len(runs) > 1 else ""
    ordered = sorted(runs, key=lambda r: r.label)
    sections = [
        "<section id='leaderboard'><h2>Leaderboard</h2><p class='small'>Click a header to sort; ↑/↓ the better "
        "direction, bold the best value; a cell's tooltip holds its 95 % interval.</p><div class='scroll'>"
        + html_table([r.results for r in runs], "FR", compact=True)
        + "</div></section>",
        "<section id='plots'><h2>Validity and closeness</h2><p class='small'>Colour: the method; marker and dash: "
        "the classifier.</p><div class='plots'>"
        + plot_flip_rate_vs_l2(runs)
        + plot_validity_curves(runs)
        + "</div></section>",
        side,
        "<section id='runs'><h2>Runs</h2>"
        + "".join(_run_section(r, assets, rank_by, examples, len(runs) <= 4) for r in ordered)
        + "</section>",
    ]
    found = [(f"analysis-{f.name}", RunResults.load(f / "results.json").run_name) for f in analyses or []]
    if analyses:
        sections.append(
            "<section id='analyses'><h2>Analyses</h2>"
            + "".join(_analysis_section(f, assets, anchor=a) for f, (a, _) in zip(analyses, found))
            + "</section>"
        )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>VCE report</title><style>{CSS}</style></head>"
        f"<body><div class='layout'>{_toc(runs, bool(side), found)}<main>{intro}{''.join(sections)}</main></div>"
        f"<script>{SORT_SCRIPT}{CHECK_SCRIPT}</script></body></html>\n"
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
