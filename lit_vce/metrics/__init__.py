"""VCE metrics (torchmetrics ``Metric``s with sum states, exact under DDP)."""

from .vce import (
    COUT,
    FeatureFID,
    FlipRate,
    LpDistance,
    SplitFID,
    TargetConfidence,
    WorldAudit,
    WorldFeatures,
    cout_scores,
    frechet_distance,
)

__all__ = ["COUT", "SplitFID", "cout_scores", "FlipRate", "TargetConfidence", "LpDistance", "FeatureFID", "WorldAudit", "WorldFeatures", "frechet_distance"]
