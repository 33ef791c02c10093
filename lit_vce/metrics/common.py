"""What the metric suite and its callers share: the optional metrics and the images' resolution."""

from __future__ import annotations


from ..imageops import resize_to  # noqa: F401  (imported from here)


#: the metrics that can be left out (``metrics=[...]``, ``lit-vce evaluate --metrics``); validity
#: (flip rates, confidences) and L1/L2 are always computed: they are what a row is
OPTIONAL_METRICS = ("fid", "sfid", "cout", "lpips", "latent", "independent", "audit")


def check_metrics(metrics) -> frozenset[str]:
    """The selected optional metrics (all for None); a clear error for an unknown name."""
    if metrics is None:
        return frozenset(OPTIONAL_METRICS)
    names = [m.strip() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    bad = sorted(set(names) - set(OPTIONAL_METRICS))
    if bad:
        raise ValueError(
            f"unknown metric(s) {', '.join(bad)}: choose from {', '.join(OPTIONAL_METRICS)} "
            "(flip rates, confidences and L1/L2 are always computed)"
        )
    return frozenset(names)
