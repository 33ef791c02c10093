"""Leaderboards rendered from ``results.json`` files (never typed by hand):
Markdown, a sortable HTML page and a LaTeX (booktabs) table, one row per run,
sorted by a column in its declared direction (higher or lower is better).

When a run folder holds both the in-line ``results.json`` of ``predict`` and an
``evaluation/results.json`` written by ``lit-vce evaluate``, the evaluation (read
back from the saved files) is the one shown.

Each figure with an interval in ``results.json`` is shown as ``value [lo, hi]``,
its 95 % bootstrap interval over samples (:mod:`lit_vce.metrics.uncertainty`).

Every row states N (attempted samples), the successes and the failures
(:mod:`lit_vce.metrics.accounting`); a run with failures or a warning is marked
``!`` and its warnings are listed under the table. A ``results.json`` that cannot
be read, breaks the schema or does not match the table beside it is skipped with a
one-line warning naming it.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .results import RunResults

Getter = Callable[[RunResults], Any]

COLUMNS: list[tuple[str, Getter, bool | None]] = [
    # (header, getter, higher is better; None: no direction)
    ("FR", lambda r: r.metrics.get("flip_rate"), True),
    ("conf", lambda r: r.metrics.get("target_confidence"), True),
    ("FR indep.", lambda r: r.metrics.get("flip_rate_independent"), True),
    ("L1", lambda r: r.metrics.get("l1"), False),
    ("L2", lambda r: r.metrics.get("l2"), False),
    ("LPIPS", lambda r: r.metrics.get("lpips"), False),
    ("lat. L2", lambda r: r.metrics.get("latent_l2"), False),
    ("FID", lambda r: r.metrics.get("fid"), False),
    ("FID N", lambda r: r.metrics.get("fid_n"), None),
    ("sFID", lambda r: r.metrics.get("sfid"), False),
    ("COUT", lambda r: r.metrics.get("cout"), True),
    ("S3", lambda r: r.metrics.get("s3"), True),
    ("FVA", lambda r: r.metrics.get("fva"), True),
    ("FS", lambda r: r.metrics.get("fs"), True),
    ("MNAC", lambda r: r.metrics.get("mnac"), False),
    ("CD", lambda r: r.metrics.get("cd"), False),
    ("shape changed", lambda r: (r.audit or {}).get("shape_changed"), None),
    ("background only", lambda r: (r.audit or {}).get("background_only"), None),
    ("watermark only", lambda r: (r.audit or {}).get("watermark_only"), None),
]
FORMATS = ("md", "html", "tex")
# the results.json metric behind each column, whose interval the cell shows
INTERVAL_KEYS = {
    "FR": "flip_rate",
    "conf": "target_confidence",
    "FR indep.": "flip_rate_independent",
    "L1": "l1",
    "L2": "l2",
    "LPIPS": "lpips",
    "lat. L2": "latent_l2",
    "FID": "fid",
    "sFID": "sfid",
    "COUT": "cout",
    "MNAC": "mnac",
    "CD": "cd",
    "S3": "s3",
    "FVA": "fva",
    "FS": "fs",
    "shape changed": "shape_changed",
    "background only": "background_only",
    "watermark only": "watermark_only",
}


def load_valid(paths, warn=None) -> list[tuple[Path, RunResults]]:
    """The results among ``paths`` that load and validate; each other one is skipped with a
    one-line warning naming it (``warn``: default, printed to stderr)."""
    import sys

    from .results import InvalidResultsError

    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    out = []
    for p in paths:
        try:
            out.append((Path(p), RunResults.load(p)))
        except InvalidResultsError as e:
            warn(f"warning: skipped {e}")
    return out


def load_results(root: str | Path) -> list[RunResults]:
    """Every run's results under ``root`` (recursively), preferring ``evaluation/results.json``
    over the in-line ``results.json`` of the same run folder; invalid files are skipped
    with a one-line warning (:func:`load_valid`)."""
    paths = sorted(Path(root).rglob("results.json"))
    if not paths:
        raise FileNotFoundError(f"no results.json under {root}")
    chosen = [p for p in paths if not (p.parent / "evaluation" / "results.json").is_file()]
    runs = [r for _, r in load_valid(chosen) if r.stage != "analysis"]  # analyses are not VCE runs
    if not runs:
        raise FileNotFoundError(f"no VCE results.json under {root}")
    return runs


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _fmt(v) -> str:
    if _missing(v):
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _interval(r: RunResults, header: str) -> list[float] | None:
    ci = (r.intervals or {}).get(INTERVAL_KEYS.get(header, ""))
    return ci if ci and len(ci) == 2 and not any(_missing(x) for x in ci) else None


def _fmt_ci(v, ci: list[float] | None) -> str:
    return _fmt(v) if ci is None or _missing(v) else f"{_fmt(v)} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _columns(results: list[RunResults]) -> list[tuple[str, Getter, bool | None]]:
    """The columns with at least one value (an all-empty column says nothing)."""
    return [c for c in COLUMNS if any(not _missing(c[1](r)) for r in results)]


def sort_results(results: list[RunResults], sort_by: str = "FR") -> list[RunResults]:
    col = {c[0]: c for c in COLUMNS}
    if sort_by not in col:
        raise ValueError(f"sort_by must be one of {list(col)}")
    _, get, higher = col[sort_by]

    def key(r):
        v = get(r)
        if _missing(v):
            return math.inf
        return -v if higher in (True, None) else v

    return sorted(results, key=key)


def seconds_per_image(r: RunResults) -> float:
    """Generation seconds per attempted sample: summed per sample over every attempt
    (``s_per_img``), for older results the last attempt's wall time over N."""
    if r.s_per_img is not None:
        return float(r.s_per_img)
    return float(r.wall_time_s) / max(r.n, 1)


def count_cell(r: RunResults) -> str:
    """``N`` as ``n (k ok, f failed)``; ``!`` marks a run with failures or warnings."""
    text = f"{r.n} ({r.n_success} ok" + (f", {r.n_failed} failed" if r.n_failed else "") + ")"
    return text + (" !" if r.marked else "")


def _rows(results: list[RunResults], cols) -> tuple[list[str], list[list[str]], list[list[Any]]]:
    head = ["method", "classifier", "protocol", "N"] + [c[0] for c in cols] + ["s/img"]
    cells, raw = [], []
    for r in results:
        vals = [r.method, r.classifier, r.protocol or "-", r.n] + [c[1](r) for c in cols] + [seconds_per_image(r)]
        raw.append(vals)
        cis = [None] * 4 + [_interval(r, c[0]) for c in cols] + [None]
        cells.append(
            [
                (count_cell(r) if i == 3 else str(v))
                if i < 4
                else (_fmt_ci(v, cis[i]) if i < len(vals) - 1 else f"{v:.2f}")
                for i, v in enumerate(vals)
            ]
        )
    return head, cells, raw


def warnings_block(results: list[RunResults]) -> list[str]:
    """``method · classifier: warning`` lines of the marked runs."""
    return [
        f"{r.method} · {r.classifier}{f' ({r.protocol})' if r.protocol else ''}: "
        f"{'; '.join(r.warnings or [f'{r.n_failed} of {r.n} failed'])}"
        for r in results
        if r.marked
    ]


ARROWS = {True: " ↑", False: " ↓", None: ""}


def _best(cols, raw: list[list[Any]]) -> dict[int, float]:
    """Column index (in ``_rows`` order) -> its best value, for columns with a direction."""
    best: dict[int, float] = {}
    for j, c in enumerate(cols, start=4):
        vals = [row[j] for row in raw if not _missing(row[j])]
        if vals and c[2] is not None:
            best[j] = max(vals) if c[2] else min(vals)
    return best


def markdown_table(results: list[RunResults], sort_by: str = "FR") -> str:
    """A Markdown table, one row per run, sorted by ``sort_by`` in its declared direction."""
    results = sort_results(results, sort_by)
    cols = _columns(results)
    head, cells, _ = _rows(results, cols)
    head = head[:4] + [c[0] + ARROWS[c[2]] for c in cols] + head[-1:]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    notes = warnings_block(results)
    if notes:
        lines += [
            "",
            "N: attempted samples (successes, failures); a failed sample counts as not flipped and is in no "
            "other figure. Runs marked !:",
        ] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def latex_table(results: list[RunResults], sort_by: str = "FR") -> str:
    """A booktabs LaTeX table (best value per column in bold)."""
    results = sort_results(results, sort_by)
    cols = _columns(results)
    head, cells, raw = _rows(results, cols)
    best = _best(cols, raw)

    def esc(s: str) -> str:
        for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"), ("$", r"\$")):
            s = s.replace(a, b)
        return s

    arrows = {True: r" $\uparrow$", False: r" $\downarrow$", None: ""}
    header = [esc(h) for h in head[:4]] + [esc(c[0]) + arrows[c[2]] for c in cols] + ["s/img"]
    out = [
        r"\begin{tabular}{lll" + "r" * (len(header) - 3) + "}",
        r"\toprule",
        " & ".join(header) + r" \\",
        r"\midrule",
    ]
    for row, vals in zip(cells, raw):
        tex = [esc(v) for v in row]
        for j, b in best.items():
            if not _missing(vals[j]) and vals[j] == b:
                tex[j] = r"\textbf{" + tex[j] + "}"
        out.append(" & ".join(tex) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    out += [f"% ! {esc(n)}" for n in warnings_block(results)]
    return "\n".join(out) + "\n"


SORT_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach((th, col) => {
  th.addEventListener('click', () => {
    const table = th.closest('table'), body = table.tBodies[0];
    const asc = th.dataset.order !== 'asc';
    table.querySelectorAll('th').forEach(h => delete h.dataset.order);
    th.dataset.order = asc ? 'asc' : 'desc';
    const value = tr => { const c = tr.cells[col]; const v = c.dataset.value;
                          return v === undefined || v === '' ? c.textContent : parseFloat(v); };
    const rows = Array.from(body.rows).sort((a, b) => {
      const x = value(a), y = value(b);
      if (typeof x === 'number' && typeof y === 'number') {
        if (isNaN(x)) return 1; if (isNaN(y)) return -1; return asc ? x - y : y - x; }
      return asc ? String(x).localeCompare(y) : String(y).localeCompare(x);
    });
    rows.forEach(r => body.appendChild(r));
  });
});
"""

TABLE_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 14px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: right; }
th { cursor: pointer; background: #f4f4f4; position: sticky; top: 0; }
th[data-order=asc]::after { content: " ▲"; } th[data-order=desc]::after { content: " ▼"; }
td:nth-child(-n+3), th:nth-child(-n+3) { text-align: left; }
td.best { font-weight: bold; }
"""


def html_table(results: list[RunResults], sort_by: str = "FR", compact: bool = False) -> str:
    """A ``<table class="sortable">`` (click a header to sort; best value per column in bold).
    ``compact``: one line per run, each 95 % interval in its cell's tooltip (the report)."""
    results = sort_results(results, sort_by)
    cols = _columns(results)
    head, cells, raw = _rows(results, cols)
    tips = [[""] * len(row) for row in cells]
    if compact:
        for r, row, vals, tip in zip(results, cells, raw, tips):
            for j, c in enumerate(cols, start=4):
                ci = _interval(r, c[0])
                row[j] = _fmt(vals[j])
                tip[j] = f"95 % interval [{ci[0]:.3f}, {ci[1]:.3f}]" if ci is not None and not _missing(vals[j]) else ""
    titles = (
        ["", "", "", "attempted samples (successes, failures); ! marks a run with failures or warnings"]
        + [{True: "higher is better", False: "lower is better", None: ""}[c[2]] for c in cols]
        + ["seconds per image"]
    )
    head = head[:4] + [c[0] + ARROWS[c[2]] for c in cols] + head[-1:]
    best = _best(cols, raw)
    out = ['<table class="sortable"><thead><tr>']
    out += [f'<th title="{t}">{html.escape(h)}</th>' for h, t in zip(head, titles)]
    out.append("</tr></thead><tbody>")
    for row, vals, tip in zip(cells, raw, tips):
        out.append("<tr>")
        for j, (c, v, t) in enumerate(zip(row, vals, tip)):
            num = "" if isinstance(v, str) or _missing(v) else f' data-value="{v}"'
            cls = ' class="best"' if j in best and not _missing(v) and v == best[j] else ""
            title = f' title="{html.escape(t)}"' if t else ""
            out.append(f"<td{num}{cls}{title}>{html.escape(c)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    notes = warnings_block(results)
    if notes:
        out.append('<ul class="warnings">' + "".join(f"<li>! {html.escape(n)}</li>" for n in notes) + "</ul>")
    return "".join(out)


def html_page(results: list[RunResults], sort_by: str = "FR", title: str = "Leaderboard") -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{TABLE_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>Rendered from the <code>results.json</code> files below this folder. Click a header to sort; "
        f"↑/↓ mark the better direction, bold the best value; brackets hold 95 % bootstrap intervals "
        f"over samples.</p>{html_table(results, sort_by)}"
        f"<script>{SORT_SCRIPT}</script></body></html>\n"
    )


def write_leaderboard(root: str | Path, sort_by: str = "FR", formats: tuple[str, ...] = FORMATS) -> dict[str, Path]:
    """Render ``leaderboard.{md,html,tex}`` in ``root`` from the results below it; returns the paths."""
    bad = set(formats) - set(FORMATS)
    if bad:
        raise ValueError(f"unknown leaderboard format(s) {sorted(bad)}; choose from {FORMATS}")
    results = load_results(root)
    sort_results(results, sort_by)  # validates sort_by before anything is written
    out: dict[str, Path] = {}
    render = {
        "md": lambda: (
            "# Leaderboard\n\nRendered from the `results.json` files below this folder; brackets hold 95 % "
            "bootstrap intervals over samples.\n\n" + markdown_table(results, sort_by)
        ),
        "html": lambda: html_page(results, sort_by),
        "tex": lambda: latex_table(results, sort_by),
    }
    for fmt in formats:
        path = Path(root) / f"leaderboard.{fmt}"
        path.write_text(render[fmt]())
        out[fmt] = path
    return out
