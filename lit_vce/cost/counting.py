"""Call counts of a method run with small random stand-ins for its networks (:mod:`lit_vce.cost`)."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: the stand-ins' image size (pixels)
STAND_IN_SIZE = 32


# --- counting calls with stand-ins -------------------------------------------------------
class _Counter:
    """Hooks on a stand-in: evaluations (batch elements, a forward repeated by gradient
    checkpointing included), backward passes through them, and the most evaluations'
    activations alive at once (per image).

    The activations are followed through autograd's saved tensors: each tensor saved while the
    network runs is wrapped, and its wrapper's release (the graph freed, after its backward
    pass or when dropped) subtracts its bytes. ``peak_live`` is the peak of the live bytes over
    the bytes one evaluation saves for one image."""

    def __init__(self, module: nn.Module, tracker: _SavedTracker):
        self.calls = self.grad_calls = 0
        self.per_image = 0.0  # bytes one evaluation saves per image (stand-in scale)
        self.live_bytes = self.peak_bytes = 0
        self.tracker = tracker
        module.register_forward_pre_hook(self._enter)
        module.register_forward_hook(self._forward)

    def _enter(self, module, inputs):
        self.tracker.stack.append([self, 0])

    def _forward(self, module, inputs, output):
        _, saved = self.tracker.stack.pop()
        x = next((t for t in _tensors(inputs) if t.dim() > 0), None)
        n = int(x.shape[0]) if x is not None else 1
        self.calls += n
        if saved:
            self.per_image = max(self.per_image, saved / n)
        # a backward pass through this evaluation: the gradient reaching its output. Not for the
        # forward that gradient checkpointing repeats inside the backward pass (counted as a call)
        if torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
            out = next((t for t in _tensors(output) if t.requires_grad), None)
            if out is not None:
                out.register_hook(lambda g, n=n: self._backward(n))

    def _backward(self, n: int) -> None:
        self.grad_calls += n

    @property
    def peak_live(self) -> float:
        return self.peak_bytes / self.per_image if self.per_image else 0.0


class _Saved:
    __slots__ = ("__weakref__", "t")

    def __init__(self, t):
        self.t = t


class _SavedTracker:
    """A ``saved_tensors_hooks`` pair attributing each saved tensor to the innermost counted network."""

    def __init__(self):
        self.stack: list[list] = []

    def pack(self, t):
        # always detached: returning a saved output itself makes a cycle through autograd's C++ graph
        # that no collector frees (the graph, and every tensor it saved, would live on)
        if not self.stack:
            return t.detach()
        import weakref

        frame = self.stack[-1]
        counter, size = frame[0], t.numel() * t.element_size()
        frame[1] += size
        counter.live_bytes += size
        counter.peak_bytes = max(counter.peak_bytes, counter.live_bytes)
        box = _Saved(t.detach())  # detached: a saved output would otherwise form a cycle that only gc frees
        weakref.finalize(box, _release, counter, size)
        return box

    @staticmethod
    def unpack(obj):
        return obj.t if isinstance(obj, _Saved) else obj


def _release(counter: _Counter, size: int) -> None:
    counter.live_bytes -= size


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


class _NeverFlips(nn.Module):
    """A small CNN whose logits carry a fixed margin of 50 for class 0: it never flips, so a
    method that retries or stops at the first flip shows its worst case."""

    def __init__(self, num_classes: int):
        super().__init__()
        from ..world.models import SmallCNN

        self.net = SmallCNN(num_classes, width=4)
        self.register_buffer("margin", torch.zeros(num_classes))
        self.margin[0] = 50.0

    def forward(self, x):
        return self.net(x) + self.margin


@dataclass
class _Role:
    network: str  # the display name
    kind: str  # "adm", "sd_unet", "sd_vae_encoder", "sd_vae_decoder", "classifier", "vgg19"
    spec: Any  # what the real architecture is built from
    counter: _Counter


class _StandIns:
    """Patches the loaders of networks with small random stand-ins and records each (role, real spec)."""

    def __init__(self):
        self.roles: list[_Role] = []
        self.tracker = _SavedTracker()

    def _add(self, module: nn.Module, network: str, kind: str, spec: Any) -> None:
        self.roles.append(_Role(network, kind, spec, _Counter(module, self.tracker)))

    def load_adm(self, preset=None, checkpoint=None, **overrides):
        from ..diffusion.adm import ADMConfig, ADMUNet, preset_for_file

        name = preset or preset_for_file(checkpoint)
        if name is None:
            raise ValueError(f"cannot tell the ADM architecture of {checkpoint}; give adm:<preset>")
        cfg = ADMConfig.preset(name, **overrides)
        tiny = ADMUNet(
            ADMConfig.preset(
                name,
                **{
                    **overrides,
                    "image_size": STAND_IN_SIZE,
                    "num_channels": 32,
                    "num_res_blocks": 1,
                    "num_heads": 1,
                    "num_head_channels": -1,
                    "attention_resolutions": "8",
                },
            )
        )
        self._add(tiny, f"diffusion UNet adm:{name}", "adm", cfg)
        return tiny

    def load_latent_components(self, model, dtype):
        from ..testing import stable_diffusion_components

        c = stable_diffusion_components("tiny", STAND_IN_SIZE)
        self._add(c["unet"], f"diffusion UNet {model} (SD 1.x)", "sd_unet", model)
        self._add(c["vae"].encoder, f"VAE encoder {model}", "sd_vae_encoder", model)
        self._add(c["vae"].decoder, f"VAE decoder {model}", "sd_vae_decoder", model)
        return c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler_config"]

    def load_classifier(self, spec, **kwargs):
        from ..classifiers import ImageClassifier

        if isinstance(spec, ImageClassifier):
            return spec
        name = spec.get("spec", "") if isinstance(spec, dict) else str(spec)
        k = (
            2
            if name.split(":", 1)[0] in ("celeba", "celebahq")
            else 4
            if name in ("biased", "robust", "watermarked")
            else 1000
        )
        clf = ImageClassifier(_NeverFlips(k), STAND_IN_SIZE, [f"class {i}" for i in range(k)], name=name)
        self._add(clf, f"classifier {name}", "classifier", spec)
        return clf

    def load_vgg19_features(self, layers, weights_path=None):
        from ..world.models import SmallCNN

        tiny = SmallCNN(8, width=4).trunk[:3]
        self._add(tiny, f"VGG-19 features[:{layers}] (perceptual loss)", "vgg19", int(layers))
        return tiny

    @contextlib.contextmanager
    def patched(self):
        from .. import objectives
        from ..classifiers import loaders
        from ..diffusion import adm, latent

        original = loaders.load_classifier
        targets = [
            (adm, "load_adm", self.load_adm),
            (latent, "load_latent_components", self.load_latent_components),
            (objectives, "load_vgg19_features", self.load_vgg19_features),
        ]
        # every module of the package that bound load_classifier by name
        for mod in [m for k, m in sys.modules.items() if k.startswith("lit_vce") and m is not None]:
            for attr, fn in list(vars(mod).items()):
                if fn is original:
                    targets.append((mod, attr, self.load_classifier))
        saved = [(m, a, getattr(m, a)) for m, a, _ in targets]
        try:
            for m, a, f in targets:
                setattr(m, a, f)
            yield self
        finally:
            for m, a, f in saved:
                setattr(m, a, f)
