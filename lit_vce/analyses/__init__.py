"""Analyses beyond VCEs with the DiG-IN machinery: classifier disagreement
(systematic errors), neuron visualisation, spurious features."""

from .generate import AnalysisModule, GenerationDataModule
from .spurious import spurious_units

__all__ = ["AnalysisModule", "GenerationDataModule", "spurious_units"]
