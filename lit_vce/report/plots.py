"""The report's SVG plots (no plotting library): flip rate against L2, and validity curves."""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np

#: one colour per method (Tableau 10, ordered for contrast), 20 more shades past ten methods
PALETTE = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#7f7f7f",
    "#bcbd22",
]
_MORE = ["#aec7e8", "#ff9896", "#98df8a", "#ffbb78", "#c5b0d5", "#c49c94", "#f7b6d2", "#9edae5", "#c7c7c7", "#dbdb8d"]
#: one line style (dash pattern) and marker per classifier
DASHES = ["", "6,3", "2,2", "8,3,2,3"]
MARKERS = ["circle", "square", "triangle", "diamond"]


def series_styles(runs: list[Any]) -> list[dict[str, str]]:
    """A style per run that holds for many series: the colour names the method (the same
    method has the same colour in every plot), the dash pattern and marker the classifier
    (10 methods x 2 classifiers: 20 distinct series). Each style: ``color``, ``dash``,
    ``marker``, ``method``, ``classifier``."""
    methods = sorted({r.results.method for r in runs})
    classifiers = sorted({r.results.classifier for r in runs})
    colours = PALETTE + _MORE
    out = []
    for r in runs:
        m, c = methods.index(r.results.method), classifiers.index(r.results.classifier)
        out.append(
            {
                "color": colours[m % len(colours)],
                "dash": DASHES[c % len(DASHES)],
                "marker": MARKERS[c % len(MARKERS)],
                "method": r.results.method,
                "classifier": r.results.classifier,
            }
        )
    return out


def _marker(kind: str, x: float, y: float, color: str, size: float = 6, title: str = "") -> str:
    tip = f"<title>{html.escape(title)}</title>" if title else ""
    if kind == "square":
        box = f"x='{x - size:.1f}' y='{y - size:.1f}' width='{2 * size}' height='{2 * size}'"
        return f"<rect {box} fill='{color}'>{tip}</rect>"
    if kind in ("triangle", "diamond"):
        pts = (
            [(x, y - size * 1.2), (x + size, y + size * 0.8), (x - size, y + size * 0.8)]
            if kind == "triangle"
            else [(x, y - size * 1.2), (x + size, y), (x, y + size * 1.2), (x - size, y)]
        )
        path = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
        return f"<polygon points='{path}' fill='{color}'>{tip}</polygon>"
    return f"<circle cx='{x:.1f}' cy='{y:.1f}' r='{size}' fill='{color}'>{tip}</circle>"


def legend(runs: list[Any], x0: float, y0: float, lines: bool) -> list[str]:
    """The legend beside a plot (not over its data): one entry per method (its colour),
    then one per classifier (its marker, or its dash pattern for ``lines``)."""
    styles = series_styles(runs)
    out, y = [], y0
    seen: dict[str, str] = {}
    for s in styles:
        seen.setdefault(s["method"], s["color"])
    for method, color in sorted(seen.items()):
        out.append(f"<rect x='{x0}' y='{y - 8}' width='14' height='10' fill='{color}'/>")
        out.append(f"<text x='{x0 + 20}' y='{y + 1}'>{html.escape(method)}</text>")
        y += 15
    y += 6
    kinds = {}
    for s in styles:
        kinds.setdefault(s["classifier"], (s["marker"], s["dash"]))
    for clf, (marker, dash) in sorted(kinds.items()):
        if lines:
            out.append(
                f"<line x1='{x0}' y1='{y - 3}' x2='{x0 + 22}' y2='{y - 3}' stroke='#444' stroke-width='2' "
                f"stroke-dasharray='{dash}'/>"
            )
        else:
            out.append(_marker(marker, x0 + 7, y - 3, "#444", 5))
        out.append(f"<text x='{x0 + 28}' y='{y + 1}'>{html.escape(clf)}</text>")
        y += 15
    return out


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


LEGEND_W = 150  # the legend's column right of the axes


def _svg_axes(w, h, pad, xlab, ylab, xmax, ymax, xticks, yticks, extra_w: int = LEGEND_W) -> list[str]:
    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{w + extra_w}' height='{max(h, 0)}' font-size='11' "
        "font-family='sans-serif'>",
        f"<line x1='{pad}' y1='{h - pad}' x2='{w - 10}' y2='{h - pad}' stroke='#333'/>",
        f"<line x1='{pad}' y1='10' x2='{pad}' y2='{h - pad}' stroke='#333'/>",
        f"<text x='{(w + pad) / 2}' y='{h - 8}' text-anchor='middle'>{html.escape(xlab)}</text>",
        f"<text x='12' y='{(h - pad) / 2}' transform='rotate(-90 12 {(h - pad) / 2})' "
        f"text-anchor='middle'>{html.escape(ylab)}</text>",
    ]
    for t in xticks:
        x = pad + t / xmax * (w - pad - 10)
        out.append(f"<text x='{x:.1f}' y='{h - pad + 14}' text-anchor='middle'>{t:.3g}</text>")
    for t in yticks:
        y = h - pad - t / ymax * (h - pad - 10)
        out.append(f"<text x='{pad - 4}' y='{y + 4:.1f}' text-anchor='end'>{t:.3g}</text>")
        out.append(f"<line x1='{pad}' y1='{y:.1f}' x2='{w - 10}' y2='{y:.1f}' stroke='#eee'/>")
    return out


def plot_flip_rate_vs_l2(runs: list[Any], w: int = 380, h: int = 300, pad: int = 46) -> str:
    """SVG scatter: one point per run (mean L2, flip rate), with the 95 % intervals of both
    (from ``results.json``) as error bars."""
    pts = []
    for r, style in zip(runs, series_styles(runs)):
        m, ci = r.results.metrics, r.results.intervals or {}
        pts.append(
            (m.get("l2", math.nan), m.get("flip_rate", math.nan), r.label, ci.get("l2"), ci.get("flip_rate"), style)
        )
    pts = [p for p in pts if not (math.isnan(p[0]) or math.isnan(p[1]))]
    h = max(h, 40 + 15 * (len({p[5]["method"] for p in pts}) + len({p[5]["classifier"] for p in pts})))
    xs = [p[0] for p in pts] + [c[1] for p in pts if (c := p[3]) and math.isfinite(c[1])]
    xmax = max(xs + [1e-6]) * 1.15
    out = _svg_axes(
        w, h, pad, "mean L2 ↓", "flip rate ↑", xmax, 1.0, np.linspace(0, xmax, 5)[1:], [0, 0.25, 0.5, 0.75, 1.0]
    )
    px = lambda x: pad + x / xmax * (w - pad - 10)  # noqa: E731
    py = lambda y: h - pad - y * (h - pad - 10)  # noqa: E731
    for x, y, label, cx_ci, cy_ci, style in pts:
        cx, cy = px(x), py(y)
        col = style["color"]
        if cx_ci and all(math.isfinite(v) for v in cx_ci):
            out.append(
                f"<line class='ci' x1='{px(cx_ci[0]):.1f}' y1='{cy:.1f}' x2='{px(cx_ci[1]):.1f}' y2='{cy:.1f}' "
                f"stroke='{col}' stroke-width='1.5'/>"
            )
        if cy_ci and all(math.isfinite(v) for v in cy_ci):
            out.append(
                f"<line class='ci' x1='{cx:.1f}' y1='{py(cy_ci[0]):.1f}' x2='{cx:.1f}' y2='{py(cy_ci[1]):.1f}' "
                f"stroke='{col}' stroke-width='1.5'/>"
            )
        out.append(_marker(style["marker"], cx, cy, col, 6, f"{label}: L2 {x:.3g}, flip rate {y:.3f}"))
    # a legend beside the axes rather than labels on the data: runs often sit on top of each other
    out += legend(runs, w + 10, 20, lines=False)
    return "\n".join(out + ["</svg>"])


def plot_validity_curves(runs: list[Any], w: int = 380, h: int = 300, pad: int = 46) -> str:
    """SVG: per run, the fraction of all samples that are successful with per-sample L2 <= x."""
    curves = []
    for r, style in zip(runs, series_styles(runs)):
        n = len(r.rows)
        l2 = sorted(
            _float(x["l2"]) for x in r.rows if str(x.get("success")) == "True" and not math.isnan(_float(x.get("l2")))
        )
        if n:
            curves.append((r.label, l2, n, style))
    h = max(h, 40 + 15 * (len({c[3]["method"] for c in curves}) + len({c[3]["classifier"] for c in curves})))
    xmax = max([c[1][-1] for c in curves if c[1]] + [1e-6]) * 1.05
    out = _svg_axes(
        w, h, pad, "L2 budget", "valid within budget", xmax, 1.0, np.linspace(0, xmax, 5)[1:], [0, 0.25, 0.5, 0.75, 1.0]
    )
    for label, l2, n, style in curves:
        col = style["color"]
        pts, frac = [(0.0, 0.0)], 0.0
        for j, v in enumerate(l2, start=1):
            pts += [(v, frac), (v, j / n)]
            frac = j / n
        pts.append((xmax, frac))
        path = " ".join(f"{pad + x / xmax * (w - pad - 10):.1f},{h - pad - y * (h - pad - 10):.1f}" for x, y in pts)
        out.append(
            f"<polyline points='{path}' fill='none' stroke='{col}' stroke-dasharray='{style['dash']}' "
            f"stroke-width='2'><title>{html.escape(label)}</title></polyline>"
        )
    out += legend(runs, w + 10, 20, lines=True)
    return "\n".join(out + ["</svg>"])
