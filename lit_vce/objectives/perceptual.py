"""Perceptual objective terms: LPIPS (AlexNet) and a VGG-19 feature distance (FastDiME's
and DiME's perceptual term)."""

from __future__ import annotations

import torch

from .core import Objective


class LPIPSDistance(Objective):
    """LPIPS-AlexNet distance to the original (differentiable). ``net`` defaults to the
    network of :func:`lit_vce.metrics.lpips.build_lpips` (local weights, see there)."""

    def __init__(self, net: torch.nn.Module | None = None):
        if net is None:
            from ..metrics.lpips import build_lpips

            net = build_lpips().net
        self.net = net

    def loss(self, images, ctx):
        return self.net(images.float(), ctx.original.float(), normalize=True).reshape(len(images))


VGG19_FILE = "vgg19-dcbbe73f.pth"  # torchvision's ImageNet VGG-19 weights
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_vgg19_features(layers: int, weights_path: str | None = None) -> torch.nn.Module:
    """The first ``layers`` modules of torchvision's VGG-19 ``features`` with ImageNet weights
    from a local file: ``weights_path``, ``$LIT_VCE_VGG_WEIGHTS``,
    ``$LIT_VCE_WEIGHTS_DIR/vgg/vgg19-dcbbe73f.pth`` or the torch hub cache
    (``$TORCH_HOME/hub/checkpoints/vgg19-dcbbe73f.pth``, where torchvision downloads it;
    downloaded only when online)."""
    import os
    from pathlib import Path

    import torchvision

    from ..errors import MissingWeightsError
    from ..weights import may_download, no_download_reason, weights_dir

    value = weights_path or os.environ.get("LIT_VCE_VGG_WEIGHTS")
    candidates = (
        [Path(value).expanduser()]
        if value
        else [weights_dir() / "vgg" / VGG19_FILE, Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILE]
    )
    path = next((p for p in candidates if p.is_file()), None)
    if path is not None:
        features = torchvision.models.vgg19().features[:layers]
        state = torch.load(path, map_location="cpu", weights_only=True)
        # only the layers used (a file holding just those, or the whole network, both load)
        used = {
            k[len("features.") :]: v
            for k, v in state.items()
            if k.startswith("features.") and int(k.split(".")[1]) < layers
        }
        features.load_state_dict(used)
    elif value or not may_download():
        where = " or ".join(str(p) for p in candidates)
        why = "" if value else f" ({no_download_reason()})"
        raise MissingWeightsError(
            f"VGG-19 weights: {VGG19_FILE} not found{why}; put torchvision's file at {where} "
            f"(or point $LIT_VCE_VGG_WEIGHTS to it)"
        )
    else:
        features = torchvision.models.vgg19(weights="IMAGENET1K_V1").features[:layers]
    return features.eval().requires_grad_(False)


class VGGPerceptual(Objective):
    """DiME's perceptual distance: the mean squared difference of VGG-19 features (the first
    ``layer`` modules of ``features``, ImageNet-normalised inputs clamped to [0, 1]) between the
    image and the original, per sample. ``features``: a prebuilt module (tests)."""

    def __init__(self, layer: int = 18, weights_path: str | None = None, features: torch.nn.Module | None = None):
        self.layer = int(layer)
        self.features = features if features is not None else load_vgg19_features(self.layer, weights_path)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.new_tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(_IMAGENET_STD).view(1, 3, 1, 1)
        self.features.to(x.device)
        return self.features((x.clamp(0, 1) - mean) / std).flatten(1)

    def loss(self, images, ctx):
        return (self._embed(images) - self._embed(ctx.original)).pow(2).mean(1)

    def describe(self):
        return f"VGGPerceptual(layer {self.layer})"
