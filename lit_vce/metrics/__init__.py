"""VCE metrics (torchmetrics ``Metric``s with sum states, exact under DDP).

The names below load :mod:`lit_vce.metrics.vce` on first use, so that a submodule without
torch (``accounting``'s counting rules, read by the leaderboard) imports without it."""

__all__ = [
    "COUT",
    "SplitFID",
    "cout_scores",
    "FlipRate",
    "TargetConfidence",
    "LpDistance",
    "FeatureFID",
    "WorldAudit",
    "WorldFeatures",
    "frechet_distance",
]


def __getattr__(name):
    if name in __all__:
        from . import vce

        return getattr(vce, name)
    raise AttributeError(f"module 'lit_vce.metrics' has no attribute {name!r}")
