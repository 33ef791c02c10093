"""Do two runs on the same samples differ? A paired bootstrap on per-sample values.

    lit-vce compare runs/world/dvce-biased-random runs/world/classifier_guidance-biased-random [--metrics l2]

Both runs' ``samples.csv`` (``evaluation/samples.csv`` when ``lit-vce evaluate``
wrote one; checked against the ``results.json`` beside it) are joined on
``sample_id``; only samples present in both count. The accounting rule
(:mod:`lit_vce.metrics.accounting`) holds here as everywhere: a failed sample
counts as not flipped in the flip rates, and is left out of every measured
figure, so each metric states the N it was paired over (a sample measured in
only one run is not a pair). For each metric the per-sample differences are resampled together
(:func:`lit_vce.metrics.uncertainty.paired_bootstrap`): pairing removes the
variation between images that both runs share, so it detects differences that
two separate intervals would hide. Set-level figures (FID, sFID) have no
per-sample value and are not compared here.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

import torch

from ..metrics.uncertainty import LEVEL, paired_bootstrap

# metric -> the samples.csv column holding its per-sample value (the metric is that column's mean)
PER_SAMPLE_COLUMNS = {
    "flip_rate": "success",
    "target_confidence": "target_conf_after",
    "flip_rate_independent": "success_independent",
    "l1": "l1",
    "l2": "l2",
    "l1_per_value": "l1_per_value",
    "lpips": "lpips",
    "latent_l1": "latent_l1",
    "latent_l2": "latent_l2",
    "cout": "cout",
}


def _table(run: str | Path) -> Path:
    run = Path(run)
    for cand in (run / "evaluation" / "samples.csv", run / "samples.csv", run):
        if cand.is_file():
            results = cand.parent / "results.json"
            if results.is_file():
                from .results import RunResults

                RunResults.load(results)  # the table must be the one these results were written with
            return cand
    raise FileNotFoundError(f"{run}: no samples.csv (give a run folder or its samples.csv)")


def _value(v: str | None) -> float:
    if v is None or v == "":
        return math.nan
    if v in ("True", "False"):
        return float(v == "True")
    try:
        return float(v)
    except ValueError:
        return math.nan


def read_samples(run: str | Path) -> dict[str, dict[str, str]]:
    """``sample_id -> row`` of a run's per-sample table."""
    with _table(run).open(newline="") as f:
        return {row["sample_id"]: row for row in csv.DictReader(f)}


def compare_runs(
    run_a: str | Path,
    run_b: str | Path,
    metrics: list[str] | None = None,
    resamples: int = 10000,
    seed: int = 0,
    level: float = LEVEL,
) -> dict[str, Any]:
    """Paired comparison of ``run_a`` and ``run_b`` (run folders or ``samples.csv`` files).

    Returns ``{"n_a", "n_b", "n_paired", "metrics": {name: paired_bootstrap(...)}}`` for each
    metric in ``metrics`` (default: every one both tables have). A failed sample counts as
    not flipped; a sample without a value for a metric is left out of that metric.
    """
    from ..metrics.accounting import count_rows

    a, b = read_samples(run_a), read_samples(run_b)
    ids = sorted(set(a) & set(b))
    if not ids:
        raise ValueError(f"{run_a} and {run_b} share no sample_id: a paired comparison needs the same samples")
    cols_a, cols_b = set(next(iter(a.values()))), set(next(iter(b.values())))
    available = [m for m, c in PER_SAMPLE_COLUMNS.items() if c in cols_a and c in cols_b]
    if metrics is None:
        metrics = available
    unknown = [m for m in metrics if m not in PER_SAMPLE_COLUMNS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; per-sample metrics: {sorted(PER_SAMPLE_COLUMNS)}")
    missing = [m for m in metrics if m not in available]
    if missing:
        raise ValueError(f"metric(s) {missing} are not in both runs' samples.csv")
    ca, cb = count_rows([_row(a[i]) for i in ids]), count_rows([_row(b[i]) for i in ids])
    out: dict[str, Any] = {
        "run_a": str(run_a),
        "run_b": str(run_b),
        "n_a": len(a),
        "n_b": len(b),
        "n_paired": len(ids),
        "n_failed_a": ca["n_failed"],
        "n_failed_b": cb["n_failed"],
        "n_success_a": ca["n_success"],
        "n_success_b": cb["n_success"],
        "level": level,
        "resamples": resamples,
        "seed": seed,
        "metrics": {},
    }
    for m in metrics:
        col = PER_SAMPLE_COLUMNS[m]
        va = torch.tensor([_value(a[i].get(col)) for i in ids], dtype=torch.float64)
        vb = torch.tensor([_value(b[i].get(col)) for i in ids], dtype=torch.float64)
        if col.startswith("success"):  # the accounting rule: a failed sample (or an empty cell) did not flip
            fa = torch.tensor([bool(a[i].get("failure")) for i in ids])
            fb = torch.tensor([bool(b[i].get("failure")) for i in ids])
            va, vb = torch.nan_to_num(va, nan=0.0), torch.nan_to_num(vb, nan=0.0)
            va[fa], vb[fb] = 0.0, 0.0
        out["metrics"][m] = paired_bootstrap(va, vb, resamples, seed, level)  # its "n": the pairs used
    return out


def _row(r: dict[str, str]) -> dict[str, Any]:
    return {"failure": r.get("failure") or "", "success": r.get("success") == "True"}


def format_comparison(result: dict[str, Any]) -> str:
    def failed(side: str) -> str:
        k = result.get(f"n_failed_{side}", 0)
        return f", {k} of them failed (!)" if k else ""

    lines = [
        f"A = {result['run_a']} ({result['n_a']} samples), B = {result['run_b']} ({result['n_b']}); "
        f"{result['n_paired']} samples in both (A: {result.get('n_success_a', '?')} flipped{failed('a')}; "
        f"B: {result.get('n_success_b', '?')} flipped{failed('b')}); paired bootstrap ({result['resamples']} "
        "resamples, "
        f"{100 * result['level']:.0f} % intervals). A failed sample counts as not flipped and is left out of the "
        "measured metrics; N: the pairs each metric used",
        f"{'metric':24s} {'N':>6s} {'A':>10s} {'B':>10s} {'A - B':>10s} {'interval':>24s} {'p':>8s}  differ?",
    ]
    for m, r in result["metrics"].items():
        lo, hi = r["interval"]
        lines.append(
            f"{m:24s} {r['n']:6d} {r['mean_a']:10.4f} {r['mean_b']:10.4f} {r['difference']:10.4f} "
            f"{f'[{lo:.4f}, {hi:.4f}]':>24s} {r['p_value']:8.4f}  {'yes' if r['significant'] else 'no'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="lit-vce compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument(
        "--metrics", nargs="*", default=None, help=f"default: every one both have ({', '.join(PER_SAMPLE_COLUMNS)})"
    )
    p.add_argument("--resamples", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the comparison to this file")
    a = p.parse_args(argv)
    try:
        result = compare_runs(a.run_a, a.run_b, a.metrics, a.resamples, a.seed)
    except (FileNotFoundError, ValueError, KeyError) as e:
        p.exit(2, f"lit-vce compare: {e}\n")
    print(format_comparison(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
