"""The LightningDataModule feeding ``predict``: dataset + target protocol -> batches.

Every batch is a dict with ``image`` (N, 3, H, W) in [0, 1], ``source``,
``target``, ``sample_id`` (list of str; ``"<base id>-><target>"``, stable across
runs), ``error`` (list of str, "" when the image was read) and, for the world,
``mask`` and ``background``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from .protocols import CLASSIFIER_PROTOCOLS, INDEXED, assign_target, select_by_classifier, validate_protocol
from .world import CLASS_NAMES as WORLD_CLASSES
from .world import ShapesWorld

DATASETS = ("world", "imagefolder", "celeba", "celebahq")


class _Explained(Dataset):
    """A base dataset with one (item index, target) per explained sample."""

    def __init__(self, base: Dataset, entries: list[tuple[int, int, int]], region_folder: Path | None = None):
        self.base, self.entries, self.region_folder = base, entries, region_folder

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index, _, target = self.entries[i]
        item = dict(self.base[index])
        out = {
            "image": item["image"],
            "source": int(item["label"]),
            "target": int(target),
            "sample_id": f"{item['sample_id']}->{target}",
            "error": item.get("error", ""),
        }
        for key in ("mask", "background", "caption"):
            if key in item:
                out[key] = item[key]
        if self.region_folder is not None:  # a mask that cannot be read fails its sample, as an unreadable image
            from ..regions import read_region

            size = tuple(out["image"].shape[-2:])
            try:
                out["region"] = read_region(self.region_folder, out["sample_id"], size)
            except (FileNotFoundError, ValueError) as e:
                out["region"] = torch.zeros(1, *size)
                out["error"] = out["error"] or f"region: {e}"
        return out


class VCEDataModule(L.LightningDataModule):
    """Images to explain with their targets.

    Args:
        dataset: ``"world"`` (the embedded world), ``"imagefolder"``, ``"celeba"`` or
            ``"celebahq"`` (:mod:`lit_vce.data.celeba`: local files as DiME and ACE read them).
        root: the ImageFolder, CelebA or CelebA-HQ root.
        regime, split: world regime (``balanced``, ``biased``, ``watermark`` or
            ``watermark_balanced``) and split; for CelebA the partition (``train``, ``val``,
            ``test``; ACE explains CelebA's ``val`` and CelebA-HQ's ``test``).
        attribute: CelebA: the explained attribute (``Smiling`` = 31, ``Young`` = 39), the label.
        num_samples: world: number of images; imagefolder: cap on explained samples (None: all).
        image_size: imagefolder resize/crop resolution (default 256).
        images_per_class: imagefolder: first N images of each class.
        captions: imagefolder: a ``file,caption`` CSV (see :class:`ImageFolderDataset`).
        masks: imagefolder: a folder of foreground masks mirroring ``root`` (see
            :class:`ImageFolderDataset`); DiG-IN blends and regularises the background
            outside them.
        protocol: target protocol (``fixed``, ``pairs``, ``wordnet_closest``, ``ldce``, ``digin``,
            ``cluster``, ``misclassified``, ``random``, ``next``; see :mod:`lit_vce.data.protocols`).
        target: the class of the ``fixed`` protocol.
        pairs: ``[[source, target], ...]`` of the ``pairs`` protocol.
        num_classes: classes of the explained classifier (default: world 4, folder count).
        regions: where the counterfactuals may change the images (:mod:`lit_vce.regions`): a
            folder of masks (``<folder>/<base id>.png``), ``"objects"`` (the foreground masks:
            the world's, or an imagefolder's ``masks``) or ``"cells[:<cell px>:<area>]"``
            (RCSB's attribution cells of the explained classifier). Every method keeps to it
            as its ``region_mode`` says; a method without one refuses it.
        batch_size, num_workers: loader settings.
        seed: the seed of random target choices.
        class_names: the explained classifier's class names; ``lit-vce predict`` fills
            them from ``--model.classifier``. An imagefolder whose folders are class
            names (not synset ids) gets each folder's label by name, and a folder that
            names no class is an error (not a silent folder order).
        class_index: imagefolder: ``"auto"`` (synset ids, else names, else folder
            order) or ``"sorted"`` (always the sorted folder order).
    """

    def __init__(
        self,
        dataset: str = "world",
        root: str | None = None,
        regime: str = "balanced",
        split: str = "test",
        num_samples: int | None = 64,
        image_size: int = 256,
        images_per_class: int | None = None,
        captions: str | None = None,
        masks: str | None = None,
        protocol: str = "random",
        target: int | None = None,
        pairs: list[list[int]] | None = None,
        num_classes: int | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        class_names: list[str] | None = None,
        class_index: str = "auto",
        attribute: str | None = None,
        regions: str | None = None,
    ):
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
        if dataset != "world" and not root:
            raise ValueError(f"dataset {dataset!r} needs root=<folder>")
        if (attribute is None) != (dataset not in ("celeba", "celebahq")):
            raise ValueError("attribute=<CelebA attribute> is given for dataset celeba or celebahq, and only for them")
        if (captions or masks) and dataset != "imagefolder":
            raise ValueError("captions and masks are read for dataset 'imagefolder' only (the world ships its masks)")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if class_index not in ("auto", "sorted"):
            raise ValueError("class_index must be 'auto' or 'sorted'")
        from ..regions import parse_regions

        spec = parse_regions(regions)  # a bad value is refused here, before any work
        if spec is not None and spec.kind == "objects" and dataset != "world" and not masks:
            raise ValueError("regions 'objects' reads the foreground masks: the world's, or an imagefolder's masks=")
        self.region_spec = spec
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 (or null for all images), got {num_samples}")
        self.save_hyperparameters()
        self._data: _Explained | None = None
        self.class_names: list[str] = []

    def _build(self) -> _Explained:
        h = self.hparams
        if h.dataset == "world":
            base = ShapesWorld(h.regime, h.split, size=h.num_samples or 64, seed=0)
            labels = [(i, base.sample_label(i), base.base_id(i), i) for i in range(len(base))]
            names = list(WORLD_CLASSES)
        elif h.dataset in ("celeba", "celebahq"):
            from .celeba import CelebAFaces

            base = CelebAFaces(h.root, h.attribute, h.split, h.image_size, hq=h.dataset == "celebahq")
            labels = [(i, base.label(i), Path(base.files[i]).name, i) for i in range(len(base))]
            names = base.classes
        else:
            from .imagenet import ImageFolderDataset

            base = ImageFolderDataset(
                h.root,
                image_size=h.image_size,
                images_per_class=h.images_per_class,
                captions=h.captions,
                masks=h.masks,
                class_names=h.class_names,
                class_index=h.class_index,
            )
            labels = [(i, lab, rel, index) for i, (rel, lab, index) in enumerate(base.items)]
            names = base.classes
            if h.protocol in INDEXED and not base.full_imagenet:
                raise ValueError(
                    f"protocol {h.protocol!r} needs the full ImageNet val folder (1000 synset folders, 50 images "
                    "each): its images and targets are listed by image index"
                )
        num_classes = h.num_classes or len(names)
        validate_protocol(h.protocol, num_classes, h.target, h.pairs)
        entries = []
        for i, label, sid, index in labels:
            for t in assign_target(h.protocol, label, sid, num_classes, h.seed, h.target, h.pairs, index=index):
                entries.append((i, label, t))
        if h.dataset != "world" and h.num_samples:
            entries = entries[: h.num_samples]
        if not entries:
            raise ValueError(f"the {h.protocol!r} protocol selects no images from this dataset")
        self.class_names = names
        folder = self.region_spec.folder if self.region_spec is not None and self.region_spec.kind == "folder" else None
        if folder is not None:
            from ..regions import region_file

            bases = {str(labels[i][2]) for i, _, _ in entries}
            missing = sorted(b for b in bases if not region_file(folder, b).is_file())
            if missing:
                raise ValueError(
                    f"regions: {len(missing)} of {len(bases)} images have no mask in {folder} "
                    f"(first: {region_file(folder, missing[0])})"
                )
        return _Explained(base, entries, folder)

    def setup(self, stage: str | None = None) -> None:
        if self._data is None:
            from ..errors import ConfigError, LitVCEError

            try:
                self._data = self._build()
            except LitVCEError:
                raise
            except (ValueError, FileNotFoundError, NotADirectoryError) as e:  # a data setting that cannot work
                raise ConfigError(f"--data: {e}") from e

    def class_pairs(self) -> set[tuple[int, int]]:
        """The distinct (source, target) pairs to explain (for ``misclassified``: (label, label),
        the source becoming the classifier's prediction per batch)."""
        return {(s, t) for _, s, t in self.dataset.entries}

    def attribute_info(self) -> dict[str, Any] | None:
        """CelebA: the explained attribute's index and each attribute's correlation with it over
        the training partition (CD's reference, as ACE's ``compute_CD.py``); else None."""
        h = self.hparams
        if h.dataset not in ("celeba", "celebahq"):
            return None
        if getattr(self, "_attribute_info", None) is None:
            from .celeba import attribute_correlations, attribute_index

            q = attribute_index(h.attribute)
            self._attribute_info = {
                "query": q,
                "correlations": attribute_correlations(h.root, q, hq=h.dataset == "celebahq"),
                "cd_dataset": f"{h.dataset} training partition labels",
            }
        return self._attribute_info

    @property
    def selects_by_classifier(self) -> bool:
        """Whether the protocol picks images and sources by the explained classifier, per batch."""
        return self.hparams.protocol in CLASSIFIER_PROTOCOLS

    def select(
        self, images: torch.Tensor, source: torch.Tensor, classifier, target: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The protocol's classifier-dependent part for a batch: (keep (N,) bool, source (N,));
        see :func:`lit_vce.data.protocols.select_by_classifier`."""
        return select_by_classifier(self.hparams.protocol, images, source, classifier, target)

    @property
    def dataset(self) -> _Explained:
        self.setup()
        return self._data

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.hparams.batch_size,
            shuffle=False,
            num_workers=self.hparams.num_workers,
            collate_fn=collate,
        )


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        if isinstance(vals[0], torch.Tensor):
            out[key] = torch.stack(vals)
        elif isinstance(vals[0], (int, float)):
            out[key] = torch.tensor(vals)
        else:
            out[key] = vals
    return out
