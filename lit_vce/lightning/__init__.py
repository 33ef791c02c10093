"""Lightning glue: the VCE LightningModule and the prediction writer."""

from .module import VCEModule
from .writer import VCEPredictionWriter

__all__ = ["VCEModule", "VCEPredictionWriter"]
