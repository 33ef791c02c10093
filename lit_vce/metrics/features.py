"""Feature extractors for FID / sFID: the standard Inception-v3 (2048-d pool
features, torch-fidelity's TF-ported network) with offline weights, the world's
oracle features, or any ``nn.Module`` mapping images in [0, 1] to (N, d)
features with a ``num_features`` attribute.

Inception weights (``weights-inception-2015-12-05-6726825d.pth``, the file
torch-fidelity downloads) are looked up in this order:

1. the ``weights_path`` argument (config key ``inception_weights``);
2. ``$LIT_VCE_INCEPTION_WEIGHTS`` (a file path);
3. ``$LIT_VCE_WEIGHTS_DIR/inception/<file>``;
4. the torch hub cache ``$TORCH_HOME/hub/checkpoints/<file>``.

When none exists, an online machine downloads it; an offline one (or a failed
download) gets a :class:`MissingWeightsError` naming the file and where to put it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import MissingWeightsError
from ..weights import may_download, no_download_reason, weights_dir

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE


def inception_weight_locations() -> list[Path]:
    """Where the Inception weights are looked for, in order (after an explicit path)."""
    out = []
    if os.environ.get("LIT_VCE_INCEPTION_WEIGHTS"):
        out.append(Path(os.environ["LIT_VCE_INCEPTION_WEIGHTS"]))
    out.append(weights_dir() / "inception" / INCEPTION_FILE)
    out.append(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE)
    return out


def find_inception_weights(weights_path: str | Path | None = None) -> Path | None:
    """The local Inception weights file, or None (an explicit path must exist)."""
    if weights_path is not None:
        p = Path(weights_path).expanduser()
        if not p.is_file():
            raise MissingWeightsError(
                f"Inception weights file {p} does not exist (expected torch-fidelity's {INCEPTION_FILE})"
            )
        return p
    return next((p for p in inception_weight_locations() if p.is_file()), None)


class InceptionFeatures(nn.Module):
    """Standard FID features: Inception-v3 2048-d pool features of images in [0, 1].

    Images are quantised to uint8 (as FID tools read PNGs) and resized to 299 by
    torch-fidelity's TF1-compatible bilinear interpolation, so the features equal
    torch-fidelity's own on the same files.
    """

    num_features = 2048

    def __init__(self, weights_path: str | Path | None = None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = find_inception_weights(weights_path)
        if path is None:
            where = weights_dir() / "inception" / INCEPTION_FILE
            hint = (
                f"download {INCEPTION_URL} and put it at {where}, or point $LIT_VCE_INCEPTION_WEIGHTS "
                "(or the config key inception_weights) to it"
            )
            if not may_download():
                raise MissingWeightsError(f"Inception FID: no local weights ({no_download_reason()}); {hint}")
            try:
                torch.hub.load_state_dict_from_url(INCEPTION_URL, progress=False)
            except Exception as e:  # download errors come in many types
                raise MissingWeightsError(
                    f"Inception FID: could not download the weights ({type(e).__name__}: {e}); {hint}"
                ) from e
            path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
        self.weights_path = str(path)
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
        )
        # channels-last convolutions: 1.25x faster on CPU, features within 1e-6 relative of the default layout
        self.net.eval().requires_grad_(False).to(memory_format=torch.channels_last)

    def train(self, mode: bool = True):  # always in eval mode (batch norm statistics are frozen)
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        (features,) = self.net(x)
        return features


def build_features(spec: str | nn.Module | None, inception_weights: str | None = None) -> nn.Module | None:
    """A feature extractor from a spec: ``"inception"``, ``"world"``, ``"none"``/None or an ``nn.Module``."""
    if spec is None or spec == "none":
        return None
    if isinstance(spec, nn.Module):
        if not isinstance(getattr(spec, "num_features", None), int):
            raise ValueError("a feature extractor module needs an int attribute num_features (its output dimension)")
        return spec
    if spec == "inception":
        return InceptionFeatures(inception_weights)
    if spec == "world":
        from .vce import WorldFeatures

        return WorldFeatures()
    raise ValueError(f"unknown feature extractor {spec!r}: use 'inception', 'world', 'none' or an nn.Module")


class LatentEncoder(nn.Module):
    """A first-stage autoencoder's encoder: images in [0, 1] -> scaled latent means.

    ``autoencoder`` is a diffusers ``AutoencoderKL`` (or a folder / hub id /
    ``folder:subfolder`` of one, e.g. ``runwayml/stable-diffusion-v1-5:vae``).
    """

    def __init__(self, autoencoder: str | nn.Module):
        super().__init__()
        if isinstance(autoencoder, str):
            from diffusers import AutoencoderKL

            from ..errors import MissingWeightsError

            path, sub = autoencoder.rsplit(":", 1) if ":" in autoencoder else (autoencoder, "")
            try:
                autoencoder = AutoencoderKL.from_pretrained(path, subfolder=sub or None)
            except (OSError, ValueError) as e:
                raise MissingWeightsError(
                    f"latent distances: cannot load the autoencoder {path!r}{f' (subfolder {sub})' if sub else ''}: {e}"
                ) from e
        self.vae = autoencoder.eval().requires_grad_(False)
        self.scaling = float(getattr(getattr(self.vae, "config", None), "scaling_factor", 1.0) or 1.0)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(images * 2 - 1).latent_dist
        return dist.mean * self.scaling
