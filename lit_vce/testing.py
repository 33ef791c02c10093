"""Offline stand-ins for tests and benchmarks: weight files with random values,
saved where the real loaders expect the real ones, so the real loading paths run
without a download."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import torch


def save_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Write a random-init state dict of torch-fidelity's Inception-v3 to ``path``
    (the layout of ``weights-inception-2015-12-05-6726825d.pth``)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    torch.manual_seed(seed)
    with mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, *a, **k: None):
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    # variance-preserving init, so 2048-d features still vary between images after ~50 layers
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def save_random_alexnet_weights(path: str | Path, seed: int = 0) -> Path:
    """Write a random-init torchvision AlexNet state dict (LPIPS' backbone file) to ``path``."""
    import torchvision

    torch.manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.alexnet().state_dict(), path)
    return path
