"""The CelebA and CelebA-HQ classifiers the VCE papers explain, loadable by path.

``celeba:<attribute>`` is DiME's DenseNet-121 (``core/classifier/densenet.py``:
torchvision's DenseNet-121 without its classifier, then ``Linear(1024, 40)``; the
output for the query attribute is one logit, thresholded at 0), trained on CelebA at
128 px; ``celebahq:<attribute>`` is the same architecture as ACE's CelebA-HQ classifier
(STEEX's ``DecisionDensenetModel``) at 256 px. ``<attribute>`` is a CelebA attribute
name or index (``Smiling`` = 31, ``Young`` = 39).

Weights: ``checkpoint=<file>``, else ``$LIT_VCE_WEIGHTS_DIR/<celeba|celebahq>/classifier.pth``.
Both checkpoint layouts are read: DiME's (``{"feat_extract": ..., "classifier": ...}``)
and STEEX's (``{"model_state_dict": {"feat_extract.feat_extract....", "classifier...."}}``).

Both papers feed the classifier images normalised to [-1, 1] at their size
(``Normalize(0.5, 0.5)``; no resize). The binary logit ``z`` becomes two logits
``(0, z)``: class 1 (the attribute present) has probability ``sigmoid(z)`` and wins
exactly when ``z > 0``, so flip rates and confidences are the papers'.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import MissingWeightsError
from ..registry import CLASSIFIER_FAMILIES
from .base import ImageClassifier

DATASET_SIZES = {"celeba": 128, "celebahq": 256}


class AttributeDenseNet(nn.Module):
    """DenseNet-121 features -> ``Linear(1024, 40)``; forward gives the two logits ``(0, z)``
    of one attribute (``attribute``), ``all_logits`` the 40."""

    def __init__(self, attribute: int, num_attributes: int = 40):
        super().__init__()
        import torchvision

        net = torchvision.models.densenet121()
        net.classifier = nn.Identity()
        self.feat_extract = net
        self.classifier = nn.Linear(1024, num_attributes)
        self.attribute = int(attribute)

    def all_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.feat_extract(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.all_logits(x)[:, self.attribute]
        return torch.stack([torch.zeros_like(z), z], 1)


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A flat state dict (``feat_extract.<densenet key>``, ``classifier.<key>``) from either layout."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise MissingWeightsError(f"{path}: not a readable classifier checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(blob, dict) and "model_state_dict" in blob:  # STEEX: DecisionDensenetModel's own keys
        blob = blob["model_state_dict"]
        return {k.replace("feat_extract.feat_extract.", "feat_extract.", 1): v for k, v in blob.items()}
    if isinstance(blob, dict) and "feat_extract" in blob and "classifier" in blob:  # DiME
        out = {f"feat_extract.{k.replace('feat_extract.', '', 1)}": v for k, v in blob["feat_extract"].items()}
        out.update({f"classifier.{k}": v for k, v in blob["classifier"].items()})
        return out
    if isinstance(blob, dict) and all(isinstance(v, torch.Tensor) for v in blob.values()):
        return dict(blob)
    raise MissingWeightsError(f"{path}: neither DiME's nor STEEX's DenseNet-121 checkpoint layout")


def load_face_classifier(dataset: str, name: str, checkpoint: str | None = None, **kwargs) -> ImageClassifier:
    from ..data.celeba import CELEBA_ATTRIBUTES, attribute_index
    from ..weights import weights_dir

    try:
        k = attribute_index(name)
    except ValueError as e:
        from ..errors import UnknownNameError

        raise UnknownNameError(f"{dataset}:{name}: {e}") from None
    path = Path(checkpoint) if checkpoint else weights_dir() / dataset / "classifier.pth"
    if not path.is_file():
        raise MissingWeightsError(
            f"{dataset}:{name}: {path} is missing (the paper's DenseNet-121 classifier.pth; "
            "checkpoint=<file> or $LIT_VCE_WEIGHTS_DIR sets where)"
        )
    model = AttributeDenseNet(k)
    try:
        model.load_state_dict(_state_dict(path))
    except RuntimeError as e:
        raise MissingWeightsError(f"{path}: not a CelebA DenseNet-121 with 40 attributes ({str(e)[:200]})") from None
    kwargs.setdefault("preprocessing", "none")
    return ImageClassifier(
        model,
        kwargs.pop("input_size", DATASET_SIZES[dataset]),
        [f"not {CELEBA_ATTRIBUTES[k]}", CELEBA_ATTRIBUTES[k]],
        mean=kwargs.pop("mean", (0.5, 0.5, 0.5)),
        std=kwargs.pop("std", (0.5, 0.5, 0.5)),
        name=f"{dataset}:{CELEBA_ATTRIBUTES[k]}",
        **kwargs,
    )


@CLASSIFIER_FAMILIES.register("celeba")
def load_celeba(name: str, **kwargs) -> ImageClassifier:
    """DiME's CelebA DenseNet-121 on one attribute (``celeba:Smiling``); see the module docstring."""
    return load_face_classifier("celeba", name, **kwargs)


@CLASSIFIER_FAMILIES.register("celebahq")
def load_celebahq(name: str, **kwargs) -> ImageClassifier:
    """ACE's CelebA-HQ DenseNet-121 on one attribute (``celebahq:Young``); see the module docstring."""
    return load_face_classifier("celebahq", name, **kwargs)


def save_random_face_classifier(path: str | Path, layout: str = "dime", seed: int = 0) -> Path:
    """Random weights in a paper's checkpoint layout (``dime`` or ``steex``), for tests and dry runs."""
    torch.manual_seed(seed)
    model = AttributeDenseNet(0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "dime":
        blob = {
            "feat_extract": {f"feat_extract.{k}": v for k, v in model.feat_extract.state_dict().items()},
            "classifier": model.classifier.state_dict(),
        }
    elif layout == "steex":
        sd = {f"feat_extract.feat_extract.{k}": v for k, v in model.feat_extract.state_dict().items()}
        sd.update({f"classifier.{k}": v for k, v in model.classifier.state_dict().items()})
        blob = {"model_state_dict": sd}
    else:
        raise ValueError("layout must be 'dime' or 'steex'")
    torch.save(blob, path)
    return path
