"""The accounting rule: how attempted, failed and successful samples enter every figure.

One rule for every stage (``predict``, ``evaluate``, :func:`lit_vce.explain`,
``compare``, the leaderboard and the report), enforced here:

- **Attempted** (``n``): every sample a stage tried to explain or evaluate: the
  samples of the run's data that reached the method (a protocol that drops an
  image before the method sees it does not attempt it).
- **Failed** (``n_failed``): an attempted sample without a usable counterfactual:
  the method reported a failure (non-finite gradient, iterate, ...), its output
  or the classifier's logits are not finite, or a file is missing, unreadable,
  truncated or does not match its recorded sha256.
- A failed sample counts as **not flipped** in every flip rate: the denominator of
  a flip rate is every attempted sample. ACE's ``main.py`` (``stats[...] /=
  stats['n']``) and DiME's ``main.py`` (``'cf acc': stats['flipped'] / n``) divide
  by every image processed too; neither has a failure state (every image yields a
  counterfactual), so for runs without failures the conventions agree exactly.
- A failed sample is **left out** of every measured figure: target confidence,
  closeness (L1, L2, LPIPS, latent distances, COUT), realism (FID, sFID) and the
  world audit. Each of these states its own N (``fid_n``; ``n - n_failed`` for
  means).
- ``n``, ``n_success`` and ``n_failed`` stand in every ``results.json``, leaderboard
  row, report and comparison, and a run with failures is marked.

The invariants (checked by :func:`check_counts` whenever results are built):
``n_success + n_failed <= n`` and ``flip_rate <= 1 - n_failed / n``; no figure is
computed from a non-finite image (:func:`nonfinite_failures`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where used: reading results (the leaderboard) needs none
    import torch

#: a failure reason for a counterfactual with NaN or infinite values
NONFINITE_IMAGE = "non-finite values in the counterfactual"


def nonfinite_failures(images: torch.Tensor) -> list[str | None]:
    """Per sample: :data:`NONFINITE_IMAGE` when the image holds NaN or inf, else None."""
    import torch

    ok = torch.isfinite(images.detach().flatten(1)).all(1).tolist()
    return [None if good else NONFINITE_IMAGE for good in ok]


def merge_failures(*lists: list[str | None]) -> list[str]:
    """Per sample, the first reason of any list ('' when none)."""
    return [next((f for f in fs if f), "") for fs in zip(*lists)]


def score_batch(
    suite,
    originals: torch.Tensor,
    counterfactuals: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    sample_ids: list[str],
    failures: list[str | None] | None = None,
    diagnostics: dict[str, torch.Tensor] | None = None,
    original_ok: list[bool] | None = None,
) -> list[dict[str, Any]]:
    """The one place where a batch of attempted samples enters the metrics.

    ``originals`` are quantised images, ``counterfactuals`` the method's output as it
    came (checked for NaN and inf, then quantised as a PNG stores them); ``failures``
    holds the method's per-sample reasons (None: none). Samples with a reason or a non-finite
    counterfactual are failures (:meth:`VCEMetrics.update_failed`); the others are
    measured (:meth:`VCEMetrics.update`, which itself fails a sample whose logits are
    not finite). ``original_ok`` (default: every finite original) says which originals
    are real images, so a failed sample's original may still be classified (for
    ``flip_rate_source_correct``). Returns one row per sample, in order, each with
    ``success`` (False for every failure) and ``failure`` (the reason, or '')."""
    import torch

    from ..io import quantize

    n = len(sample_ids)
    # before quantising: clamping would turn inf into a valid pixel value
    failures = merge_failures(
        list(failures) if failures is not None else [None] * n, nonfinite_failures(counterfactuals)
    )
    counterfactuals = quantize(counterfactuals.detach())
    bad = [i for i, f in enumerate(failures) if f]
    good = [i for i, f in enumerate(failures) if not f]
    rows: list[dict[str, Any] | None] = [None] * n
    if good:
        idx = torch.tensor(good, device=counterfactuals.device)
        measured = suite.update(
            originals[idx], counterfactuals[idx], source[idx], target[idx], [sample_ids[i] for i in good]
        )
        for i, row in zip(good, measured):
            rows[i] = row
        if diagnostics and "region_change_outside" in diagnostics and hasattr(suite, "update_regions"):
            kept = [i for i in good if rows[i] is not None and not rows[i].get("failure")]
            if kept:
                pick = torch.tensor(kept)
                suite.update_regions(
                    diagnostics["region_change_outside"].cpu()[pick], diagnostics["region_area"].cpu()[pick]
                )
    finite = torch.isfinite(originals.detach().flatten(1)).all(1).tolist()
    usable = [bool(f) and (original_ok is None or bool(original_ok[i])) for i, f in enumerate(finite)]
    for group, with_original in (([i for i in bad if usable[i]], True), ([i for i in bad if not usable[i]], False)):
        if not group:
            continue
        idx = torch.tensor(group, device=counterfactuals.device)
        failed = suite.update_failed(
            source[idx],
            target[idx],
            [sample_ids[i] for i in group],
            [failures[i] for i in group],
            originals=originals[idx] if with_original else None,
        )
        for i, row in zip(group, failed):
            rows[i] = row
    out = []
    for i, row in enumerate(rows):
        row = dict(row)
        row["failure"] = row.get("failure") or ""
        row["success"] = bool(row.get("success")) and not row["failure"]
        if diagnostics:
            row["diagnostics"] = {k: _finite_or_none(v[i]) for k, v in diagnostics.items()}
        out.append(row)
    return out


def plain_rows(clf, cf, src, tgt, ids, failures, diagnostics) -> list[dict[str, Any]]:
    """Per-sample success and target confidence when the metric suite is off (the same
    accounting rule: a failed or non-finite sample is not a success)."""
    import torch

    from ..io import quantize

    failures = merge_failures(list(failures), nonfinite_failures(cf))
    with torch.no_grad():
        logits = clf(quantize(torch.nan_to_num(cf)))
    rows = []
    for i, (s, a, b) in enumerate(zip(ids, src, tgt)):
        fail = failures[i] or (
            ""
            if bool(torch.isfinite(logits[i]).all())
            else "non-finite logits from the classifier on the counterfactual"
        )
        p = logits[i].softmax(0)
        row = {
            "sample_id": s,
            "source": int(a),
            "target": int(b),
            "failure": fail,
            "success": not fail and bool(p.argmax() == b),
        }
        if not fail:
            row["target_conf_after"] = float(p[b])
        row["diagnostics"] = {k: float(d[i]) for k, d in diagnostics.items()}
        rows.append(row)
    return rows


def _finite_or_none(value) -> float | None:
    v = float(value)
    return v if math.isfinite(v) else None


def failure_row(sample_id: str, source: int, target: int, reason: str) -> dict[str, Any]:
    """The row of a failed sample: not a success, no measured value, the reason."""
    if not reason:
        raise ValueError("a failure row needs its reason")
    return {"sample_id": sample_id, "source": int(source), "target": int(target), "success": False, "failure": reason}


def count_rows(rows: list[dict[str, Any]]) -> dict[str, int]:
    """``n``, ``n_success`` and ``n_failed`` of per-sample rows (the rule above)."""
    n_failed = sum(1 for r in rows if r.get("failure"))
    n_success = sum(1 for r in rows if r.get("success") and not r.get("failure"))
    return {"n": len(rows), "n_success": n_success, "n_failed": n_failed}


def check_counts(n: int, n_success: int, n_failed: int, flip_rate: float | None = None, where: str = "results") -> None:
    """Raise ``ValueError`` when the counts break the accounting invariants."""
    if min(n, n_success, n_failed) < 0:
        raise ValueError(f"{where}: counts must be non-negative (n={n}, n_success={n_success}, n_failed={n_failed})")
    if n_success + n_failed > n:
        raise ValueError(
            f"{where}: n_success ({n_success}) + n_failed ({n_failed}) exceed n ({n}): "
            "the figures do not come from the same samples"
        )
    if flip_rate is not None and n > 0 and isinstance(flip_rate, (int, float)) and math.isfinite(flip_rate):
        if flip_rate > 1 - n_failed / n + 1e-9:
            raise ValueError(
                f"{where}: flip rate {flip_rate:.4f} exceeds 1 - n_failed/n = {1 - n_failed / n:.4f}: "
                "a failed sample was counted as flipped"
            )
        if abs(flip_rate * n - n_success) > 1e-6 * max(n, 1) + 1e-9:
            raise ValueError(f"{where}: flip rate {flip_rate:.4f} over n={n} is not n_success={n_success}")


def failure_note(n: int, n_failed: int) -> str:
    """'' or e.g. ``'3 of 8 failed'`` (the mark of a run with failures)."""
    return f"{n_failed} of {n} failed" if n_failed else ""


def check_distinct_targets(sources, targets, labels=None, what: str = "samples") -> None:
    """The one rule of predict, :func:`lit_vce.explain` and evaluate: a counterfactual needs a
    target other than its source. Raises :class:`~lit_vce.errors.ConfigError` naming up to
    ten offending ``labels`` (default: positions)."""
    from ..errors import ConfigError

    sources, targets = [int(s) for s in sources], [int(t) for t in targets]
    labels = list(range(len(sources))) if labels is None else list(labels)
    same = [lab for lab, s, t in zip(labels, sources, targets) if s == t]
    if same:
        shown = ", ".join(map(str, same[:10])) + (" ..." if len(same) > 10 else "")
        raise ConfigError(
            f"target equals source for {len(same)} {what} ({shown}): a counterfactual needs a different target"
        )
