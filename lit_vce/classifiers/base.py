"""One wrapper type for every classifier: images in [0, 1] of any size -> logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: how a classifier brings an image to its input (see :class:`ImageClassifier`)
PREPROCESSING = ("resize_crop", "resize", "none")


class ImageClassifier(nn.Module):
    """A classifier that owns its differentiable preprocessing.

    ``classifier(images)`` takes a batch (N, 3, H, W) in [0, 1] at any resolution,
    brings it to the network's input as ``preprocessing`` says (tensor ops, so
    gradients reach every input pixel the network sees), normalises it with
    ``mean``/``std`` and returns logits (N, C). Weights are frozen.

    ``preprocessing`` is where the papers' codes differ, and it decides which pixels
    get gradient:

    - ``"resize_crop"`` (default; torchvision/timm evaluation, LDCE's
      ``Resize(256)`` + ``CenterCrop(224)``): shorter side to ``resize_size``, then a
      centre crop to ``input_size``: the border outside the crop is never seen;
    - ``"resize"`` (DVCE's and SVCE's code): the whole image resized to
      ``input_size`` x ``input_size``;
    - ``"none"`` (ACE's code, DiME's CelebA classifier): the image as it is (a
      convolutional network with global pooling at any size); only normalised.

    Args:
        model: the network, taking preprocessed images.
        input_size: the (square) resolution the network expects.
        class_names: one name per logit.
        mean, std: per-channel normalisation, or ``None`` when the model
            normalises itself (most robustbench models do).
        resize_size: shorter side before the centre crop (default: ``input_size``,
            i.e. no crop).
        interpolation: ``"bilinear"`` or ``"bicubic"``.
        preprocessing: ``"resize_crop"``, ``"resize"`` or ``"none"`` (above).
        temperature: logits are divided by it (calibration).
        name: a label stored with results.
    """

    def __init__(
        self,
        model: nn.Module,
        input_size: int,
        class_names: Sequence[str],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        resize_size: int | None = None,
        interpolation: str = "bilinear",
        temperature: float = 1.0,
        name: str = "classifier",
        preprocessing: str = "resize_crop",
    ):
        super().__init__()
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {interpolation!r}")
        if preprocessing not in PREPROCESSING:
            raise ValueError(f"preprocessing must be one of {PREPROCESSING}, got {preprocessing!r}")
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        self.model = model.eval()
        for param in self.model.parameters():  # (TorchScript modules have no requires_grad_)
            param.requires_grad_(False)
        self.input_size = int(input_size)
        self.resize_size = int(resize_size or input_size)
        self.class_names = list(class_names)
        self.interpolation = interpolation
        self.preprocessing = preprocessing
        self.temperature = float(temperature)
        self.name = name
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        if mean is not None:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        else:
            self.mean = self.std = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def train(self, mode: bool = True):  # the wrapped network always stays in eval mode
        super().train(mode)
        self.model.eval()
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable resize (and crop, per ``preprocessing``) and normalisation."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if self.preprocessing == "resize" and (h, w) != (self.input_size, self.input_size):
            images = F.interpolate(
                images,
                size=(self.input_size, self.input_size),
                mode=self.interpolation,
                align_corners=False,
                antialias=self.input_size < min(h, w),
            )
        elif self.preprocessing == "resize_crop" and (h, w) != (self.input_size, self.input_size):
            scale = self.resize_size / min(h, w)
            size = (max(self.input_size, round(h * scale)), max(self.input_size, round(w * scale)))
            if size != (h, w):
                images = F.interpolate(
                    images, size=size, mode=self.interpolation, align_corners=False, antialias=scale < 1
                )
            top = (images.shape[-2] - self.input_size) // 2
            left = (images.shape[-1] - self.input_size) // 2
            images = images[..., top : top + self.input_size, left : left + self.input_size]
        if self.mean is not None:
            images = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model(self.preprocess(images))
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        return logits / self.temperature if self.temperature != 1.0 else logits

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, input_size={self.input_size}, classes={self.num_classes}, "
            f"preprocessing={self.preprocessing!r}"
        )
