"""Embedding similarities the VCE literature reports, as ACE's evaluation scripts compute them.

- **S3** (ACE's ``compute_SimSiamSimilarity.py``, ``eval_utils/simsiam.py``): the
  cosine similarity of SimSiam ResNet-50 embeddings of the original and the
  counterfactual, over the correctly classified originals (ACE reads ``CC/CCF`` and
  ``CC/ICF``). The embedding is the encoder's output: torchvision's ResNet-50 whose
  ``fc`` is SimSiam's 3-layer projector ending in an affine-free BatchNorm (the
  predictor is not used). Images at their size, ImageNet mean/std normalisation.
  Weights: SimSiam's ``checkpoint_0099.pth.tar`` (its ``state_dict``, keys
  prefixed ``module.``).
- **FVA / FS** (ACE's and DiME's ``compute_FVA.py``,
  ``eval_utils/resnet50_facevgg2_FVA.py``): the VGGFace2 ResNet-50 (Caffe layout:
  the stride in each block's first 1x1 convolution, max-pool without padding and
  rounding up) without its classifier; images resized (shorter side) to 224 px,
  RGB -> BGR, 0-255 minus the BGR mean (91.4953, 103.8827, 131.0912). Over the
  successful counterfactuals (``CC/CCF`` and ``IC/CCF``): FVA is the fraction with
  cosine similarity > 0.5, FS the mean similarity. Weights: ``resnet50_ft_weight.pkl``
  (a pickle of numpy arrays converted from Caffe), read with an unpickler that only
  builds numpy arrays and dicts.

Weights are looked up in ``$LIT_VCE_WEIGHTS_DIR/<family>/<file>`` and the torch hub
checkpoint folder; a missing file is a one-line error naming both.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MissingWeightsError
from ..weights import find_weights
from .vce import _SumMean

SIMSIAM_FILE = "checkpoint_0099.pth.tar"
VGGFACE2_FILE = "resnet50_ft_weight.pkl"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VGGFACE2_MEAN_BGR = (91.4953, 103.8827, 131.0912)


# --- SimSiam (S3) --------------------------------------------------------------------
class SimSiamEncoder(nn.Module):
    """SimSiam's encoder: ResNet-50 with the 3-layer projector as ``fc`` (dim 2048)."""

    def __init__(self, dim: int = 2048):
        super().__init__()
        import torchvision

        enc = torchvision.models.resnet50(num_classes=dim, zero_init_residual=True)
        prev = enc.fc.weight.shape[1]
        enc.fc = nn.Sequential(
            nn.Linear(prev, prev, bias=False),
            nn.BatchNorm1d(prev),
            nn.ReLU(inplace=True),
            nn.Linear(prev, prev, bias=False),
            nn.BatchNorm1d(prev),
            nn.ReLU(inplace=True),
            enc.fc,
            nn.BatchNorm1d(dim, affine=False),
        )
        self.encoder = enc
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] at any size -> (N, dim) embeddings."""
        return self.encoder((images - self.mean) / self.std)


def load_simsiam(path: str | Path | None = None) -> SimSiamEncoder:
    """SimSiam's encoder with ``checkpoint_0099.pth.tar`` (the predictor's weights are not used)."""
    p = find_weights("simsiam", SIMSIAM_FILE, path)
    ckpt = torch.load(p, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise MissingWeightsError(f"{p}: not a SimSiam checkpoint (no state_dict)")
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    enc = {k: v for k, v in state.items() if k.startswith("encoder.")}
    model = SimSiamEncoder()
    missing, unexpected = model.load_state_dict(enc, strict=False)
    if missing:
        raise MissingWeightsError(f"{p}: not a SimSiam ResNet-50 checkpoint (missing {missing[:3]} ...)")
    return model.eval().requires_grad_(False)


# --- VGGFace2 ResNet-50 (FVA, FS) ------------------------------------------------------
class VGGFace2ResNet50(nn.Module):
    """The VGGFace2 ResNet-50 in its Caffe layout, without the classifier: (N, 2048) features."""

    def __init__(self):
        super().__init__()
        from .oracle import caffe_resnet50

        self.net = caffe_resnet50()
        self.register_buffer("mean_bgr", torch.tensor(VGGFACE2_MEAN_BGR).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB -> the shorter side at 224 px, 0-255 BGR minus the mean (ACE's CFDataset)."""
        h, w = images.shape[-2:]
        s = 224 / min(h, w)
        if (h, w) != (round(h * s), round(w * s)):
            images = F.interpolate(
                images, size=(round(h * s), round(w * s)), mode="bilinear", align_corners=False, antialias=True
            )
        x = (images.clamp(0, 1) * 255).round().flip(1)  # uint8 values, BGR
        return x - self.mean_bgr

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(images))


class _NumpyOnly(pickle.Unpickler):
    """Unpickles dicts of numpy arrays, nothing else (the Caffe-converted VGGFace2 weights)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights pickle")


def load_vggface2(path: str | Path | None = None) -> VGGFace2ResNet50:
    """The VGGFace2 ResNet-50 with ``resnet50_ft_weight.pkl`` (its classifier is dropped)."""
    p = find_weights("vggface2", VGGFACE2_FILE, path)
    with open(p, "rb") as f:
        try:
            weights = _NumpyOnly(f, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise MissingWeightsError(f"{p}: not a VGGFace2 weights pickle ({e})") from None
    model = VGGFace2ResNet50()
    own = model.net.state_dict()
    missing = [k for k in own if k not in weights and not k.endswith("num_batches_tracked")]
    if missing:
        raise MissingWeightsError(f"{p}: not the VGGFace2 ResNet-50 weights (missing {missing[:3]} ...)")
    model.net.load_state_dict({k: torch.as_tensor(weights[k]) if k in weights else v for k, v in own.items()})
    return model.eval().requires_grad_(False)


# --- the metrics -------------------------------------------------------------------
def cosine_similarity(encoder: nn.Module, original: torch.Tensor, counterfactual: torch.Tensor) -> torch.Tensor:
    """Per-pair cosine similarity of ``encoder``'s embeddings (N,), float64."""
    with torch.no_grad():
        a, b = encoder(original).flatten(1), encoder(counterfactual).flatten(1)
    return F.cosine_similarity(a, b, dim=1).double()


class S3(_SumMean):
    """Mean SimSiam similarity over the correctly classified originals (ACE)."""

    higher_is_better = True

    def update(self, similarity: torch.Tensor, source_correct: torch.Tensor) -> None:
        self._add(similarity[source_correct.bool()])


class _Values(_SumMean):
    def update(self, values: torch.Tensor) -> None:
        self._add(values)


class FaceVerification(nn.Module):
    """FVA (fraction of successful counterfactuals with face similarity > ``threshold``) and
    FS (their mean similarity), as two sum/count metrics (exact under DDP)."""

    def __init__(self, threshold: float = 0.5):
        super().__init__()
        self.threshold = float(threshold)
        self.fva, self.fs = _Values(), _Values()

    def update(self, similarity: torch.Tensor, success: torch.Tensor) -> None:
        s = similarity[success.bool()]
        self.fva.update((s > self.threshold).double())
        self.fs.update(s)

    def compute(self) -> dict[str, float]:
        return {"fva": float(self.fva.compute()), "fs": float(self.fs.compute())}
