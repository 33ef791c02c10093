"""``robustness:<file>``: ResNet-50 checkpoints saved by MadryLab's ``robustness`` library.

The robust ImageNet models of Madry's lab, and the DVCE/SVCE authors' multiple-norm
fine-tuned "Madry + FT" (``Madry_l2_improved_ep_3``, their ``MadryFT.zip``), are
torchvision ResNet-50s saved by that library: a dict whose ``model`` (or
``state_dict``) holds ``module.model.<torchvision key>`` next to the attacker's copy
(``module.attacker.model.``) and the normaliser's buffers. The loader takes the
``model.`` weights and normalises with ImageNet's mean/std, as the library's
``InputNormalize`` does. ``<file>`` is a path, or a name under
``$LIT_VCE_WEIGHTS_DIR/robustness/``. The layout is read as documented by the library;
it has been tested here with random weights saved in it, not with the authors' file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import MissingWeightsError
from ..registry import CLASSIFIER_FAMILIES
from .base import ImageClassifier

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def robustness_state_dict(blob) -> dict[str, torch.Tensor]:
    """The torchvision ResNet-50 weights inside a robustness-library checkpoint."""
    sd = blob.get("model", blob.get("state_dict", blob)) if isinstance(blob, dict) else blob
    if not isinstance(sd, dict):
        raise ValueError("no state dict under 'model' or 'state_dict'")
    out = {}
    for k, v in sd.items():
        key = k[len("module.") :] if k.startswith("module.") else k
        if key.startswith("model."):
            out[key[len("model.") :]] = v
    return out or {
        k: v for k, v in sd.items() if isinstance(v, torch.Tensor) and not k.startswith(("attacker.", "normalizer."))
    }


@CLASSIFIER_FAMILIES.register("robustness")
def load_robustness(name: str, **kwargs) -> ImageClassifier:
    """A robustness-library ResNet-50 (``robustness:madry_ft.pt``); see the module docstring."""
    import torchvision

    from ..data.imagenet import imagenet_class_names
    from ..weights import weights_dir

    path = Path(name) if Path(name).is_absolute() or Path(name).is_file() else weights_dir() / "robustness" / name
    if not path.is_file():
        raise MissingWeightsError(
            f"robustness:{name}: {path} is missing (a robustness-library ResNet-50 checkpoint, e.g. "
            "the DVCE authors' Madry + FT from MadryFT.zip)"
        )
    try:
        state = robustness_state_dict(torch.load(path, map_location="cpu", weights_only=False))
        model = torchvision.models.resnet50()
        model.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        raise MissingWeightsError(f"{path}: not a robustness-library ResNet-50 checkpoint ({str(e)[:200]})") from None
    kwargs.setdefault("resize_size", 256)
    kwargs.setdefault("interpolation", "bilinear")
    return ImageClassifier(
        model,
        kwargs.pop("input_size", 224),
        imagenet_class_names(),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        name=f"robustness:{name}",
        **kwargs,
    )
