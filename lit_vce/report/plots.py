"""The report's SVG plots (no plotting library): flip rate against L2, and validity curves."""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _svg_axes(w, h, pad, xlab, ylab, xmax, ymax, xticks, yticks) -> list[str]:
    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-size='11' font-family='sans-serif'>",
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


def plot_flip_rate_vs_l2(runs: list[Any], w: int = 420, h: int = 300, pad: int = 46) -> str:
    """SVG scatter: one point per run (mean L2, flip rate), with the 95 % intervals of both
    (from ``results.json``) as error bars."""
    pts = []
    for r in runs:
        m, ci = r.results.metrics, r.results.intervals or {}
        pts.append((m.get("l2", math.nan), m.get("flip_rate", math.nan), r.label, ci.get("l2"), ci.get("flip_rate")))
    pts = [p for p in pts if not (math.isnan(p[0]) or math.isnan(p[1]))]
    xs = [p[0] for p in pts] + [c[1] for p in pts if (c := p[3]) and math.isfinite(c[1])]
    xmax = max(xs + [1e-6]) * 1.15
    out = _svg_axes(
        w, h, pad, "mean L2 ↓", "flip rate ↑", xmax, 1.0, np.linspace(0, xmax, 5)[1:], [0, 0.25, 0.5, 0.75, 1.0]
    )
    px = lambda x: pad + x / xmax * (w - pad - 10)  # noqa: E731
    py = lambda y: h - pad - y * (h - pad - 10)  # noqa: E731
    for i, (x, y, label, cx_ci, cy_ci) in enumerate(pts):
        cx, cy = px(x), py(y)
        col = PALETTE[i % len(PALETTE)]
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
        out.append(
            f"<circle cx='{cx:.1f}' cy='{cy:.1f}' r='6' fill='{col}'><title>{html.escape(label)}</title></circle>"
        )
        # a legend rather than inline labels: runs often sit on top of each other
        out.append(
            f"<text x='{pad + 8}' y='{h - pad - 8 - 14 * (len(pts) - 1 - i)}' fill='{col}'>● "
            f"{html.escape(label)}</text>"
        )
    return "\n".join(out + ["</svg>"])


def plot_validity_curves(runs: list[Any], w: int = 420, h: int = 300, pad: int = 46) -> str:
    """SVG: per run, the fraction of all samples that are successful with per-sample L2 <= x."""
    curves = []
    for r in runs:
        n = len(r.rows)
        l2 = sorted(
            _float(x["l2"]) for x in r.rows if str(x.get("success")) == "True" and not math.isnan(_float(x.get("l2")))
        )
        if n:
            curves.append((r.label, l2, n))
    xmax = max([c[1][-1] for c in curves if c[1]] + [1e-6]) * 1.05
    out = _svg_axes(
        w, h, pad, "L2 budget", "valid within budget", xmax, 1.0, np.linspace(0, xmax, 5)[1:], [0, 0.25, 0.5, 0.75, 1.0]
    )
    for i, (label, l2, n) in enumerate(curves):
        col = PALETTE[i % len(PALETTE)]
        pts, frac = [(0.0, 0.0)], 0.0
        for j, v in enumerate(l2, start=1):
            pts += [(v, frac), (v, j / n)]
            frac = j / n
        pts.append((xmax, frac))
        path = " ".join(f"{pad + x / xmax * (w - pad - 10):.1f},{h - pad - y * (h - pad - 10):.1f}" for x, y in pts)
        out.append(
            f"<polyline points='{path}' fill='none' stroke='{col}' "
            f"stroke-width='2'><title>{html.escape(label)}</title></polyline>"
        )
        out.append(f"<text x='{pad + 8}' y='{20 + 14 * i}' fill='{col}'>{html.escape(label)}</text>")
    return "\n".join(out + ["</svg>"])
