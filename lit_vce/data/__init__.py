"""Datasets, target protocols and the LightningDataModule."""

from .datamodule import VCEDataModule
from .imagenet import ImageFolderDataset, imagenet_class_names
from .protocols import IMAGENET_HARD_PAIRS, PROTOCOLS
from .world import ShapesWorld

__all__ = [
    "VCEDataModule",
    "ImageFolderDataset",
    "ShapesWorld",
    "imagenet_class_names",
    "IMAGENET_HARD_PAIRS",
    "PROTOCOLS",
]
