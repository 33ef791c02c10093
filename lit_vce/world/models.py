"""Architectures of the embedded world's models and the loader of their shipped weights.

- :class:`SmallCNN`: the ``biased``, ``robust`` and ``watermarked`` classifiers
  (4 shape logits; ``watermarked`` is trained on the watermark regime, whose
  corner patch colour goes with the class).
- :class:`OracleNet`: the same trunk with a shape head and a background head;
  used only for evaluation, its penultimate features are the world's FID features.
- :func:`build_world_unet`: the class-conditional pixel ``UNet2DModel`` of the
  ``ddpm`` model (classes 0..3 plus the null class 4 for classifier-free guidance).

Weights live in ``lit_vce/assets/world/*.safetensors`` (or in the folder named by
``$LIT_VCE_WORLD_DIR``) and are produced by ``scripts/train_world.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

NUM_CLASSES = 4
NULL_CLASS = NUM_CLASSES  # class-embedding index used for unconditional prediction
WORLD_MODELS = ("biased", "robust", "oracle", "watermarked", "ddpm", "bridge")
WORLD_CLASSIFIERS = WORLD_MODELS[:4]  # the world's models that are classifiers


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """A 140k-parameter CNN for 32x32 images in [0, 1].

    ``fc`` is the final linear layer; its input (128-d) is the penultimate layer
    that neuron and spurious-feature analyses hook.
    """

    def __init__(self, num_outputs: int = NUM_CLASSES, width: int = 32):
        super().__init__()
        w = width
        self.trunk = nn.Sequential(
            _block(3, w),
            _block(w, w),
            nn.MaxPool2d(2),
            _block(w, 2 * w),
            _block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            _block(2 * w, 4 * w),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(4 * w, num_outputs)
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (pre-``fc``) features of images in [0, 1]."""
        return self.trunk((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class OracleNet(SmallCNN):
    """Predicts shape and background; ``forward`` gives the 4 shape logits."""

    def __init__(self, width: int = 32):
        super().__init__(num_outputs=2 * NUM_CLASSES, width=width)

    def both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shape logits, background logits)."""
        out = self.fc(self.features(x))
        return out[:, :NUM_CLASSES], out[:, NUM_CLASSES:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.both(x)[0]


UNET_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=32,
    num_class_embeds=NUM_CLASSES + 1,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="epsilon",
    clip_sample=True,
)


def build_world_unet(**overrides):
    """The world's class-conditional ``UNet2DModel`` with random weights."""
    from diffusers import UNet2DModel

    return UNet2DModel(**{**UNET_CONFIG, **overrides})


def world_dir() -> Path:
    """Folder holding the world's weights: ``$LIT_VCE_WORLD_DIR`` or the shipped assets."""
    env = os.environ.get("LIT_VCE_WORLD_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "assets" / "world"


def weights_path(name: str) -> Path:
    if name not in WORLD_MODELS:
        raise ValueError(f"unknown world model {name!r}; choose one of {WORLD_MODELS}")
    return world_dir() / f"{name}.safetensors"


def _load_state(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = weights_path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"world model weights {path} are missing. Re-create them with "
            f"`python scripts/train_world.py --models {name}` or point $LIT_VCE_WORLD_DIR at a folder "
            f"holding {path.name}."
        )
    return load_file(str(path))


def load_world_network(name: str) -> nn.Module:
    """The trained world network ``name`` (``biased``, ``robust``, ``oracle``, ``watermarked``,
    ``ddpm`` or ``bridge``) in eval mode."""
    state = _load_state(name)
    if name in ("ddpm", "bridge"):  # the bridge (RCSB's I2SB prior) shares the ddpm's architecture
        net = build_world_unet()
    elif name == "oracle":
        net = OracleNet()
    else:
        net = SmallCNN()
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)
