"""VCE metrics (torchmetrics ``Metric``s with sum states, exact under DDP)."""

from .vce import FeatureFID, FlipRate, LpDistance, TargetConfidence, WorldAudit, WorldFeatures, frechet_distance

__all__ = ["FlipRate", "TargetConfidence", "LpDistance", "FeatureFID", "WorldAudit", "WorldFeatures", "frechet_distance"]
