"""Expected GPU runtime and memory of a run, from a FLOP count (``lit-vce cost``).

    lit-vce cost --config presets/ace-imagenet-zs --config imagenet/methods/dvce
    lit-vce cost --config presets/digin-imagenet --config imagenet/methods/digin --tflops 150

Two measurements, combined:

1. **Calls.** The run's method is built from the same configs as ``predict``, with every
   network it loads replaced by a small random stand-in of the same kind (an ADM UNet of the
   preset's structure with few channels, a tiny Stable Diffusion, a small CNN classifier with
   the classifier's number of classes, a small VGG), and explains 2 images at 32 px. Forward
   hooks count, per network, how many evaluations each explained image costs and how many of
   them are differentiated (gradient guidance, backpropagation through the sampler). The
   stand-in classifier never flips (a fixed margin for the source class), so methods that stop
   early or retry with a larger scale show their **worst case**. Call counts do not depend on
   the network's size or the image resolution.
2. **FLOPs per call.** Each real architecture (the ADM preset, Stable Diffusion 1.x's UNet
   and VAE, the classifier's timm / torchvision architecture, VGG-19) is built on PyTorch's
   ``meta`` device (no weights, no memory) and run once, forward and backward with frozen
   weights, at the run's resolution under ``torch.utils.flop_counter.FlopCounterMode``; the
   tensors autograd saves are summed for the activation memory of one evaluation.

Runtime per VCE = sum over networks of (calls x forward FLOPs + differentiated calls x
backward FLOPs) / the sustained rate (``--tflops``: an assumption, not a measurement; the
default, 50 TFLOP/s, is an H100's float32 rate with cuDNN convolutions in TF32). Memory =
the weights (float32) + the activations the largest differentiated chain holds at once, times
the batch size. Not counted: data loading, the metric suite (Inception, LPIPS, ...), the text
encoder, elementwise operations (FlopCounterMode counts matrix products and convolutions,
which dominate) and gradient checkpointing (it trades memory for about one more forward).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

#: the default sustained rate (TFLOP/s): float32 on one H100 with cuDNN convolutions in TF32
DEFAULT_TFLOPS = 50.0
#: the stand-ins' image size (pixels)
STAND_IN_SIZE = 32


@dataclass
class NetworkCost:
    """One network of a run: what one VCE asks of it and what one evaluation costs."""

    network: str  # e.g. "diffusion UNet adm:imagenet256_uncond"
    calls: float  # evaluations per VCE (one image each)
    grad_calls: float  # of which differentiated
    live: float  # the most differentiated evaluations held at once per image (their activations)
    gflops_forward: float | None = None  # one evaluation of the real architecture
    gflops_backward: float | None = None  # its backward pass (input gradient; weights frozen)
    params_m: float | None = None
    activations_mib: float | None = None  # saved for backward by one evaluation
    note: str = ""

    @property
    def gflops_per_vce(self) -> float | None:
        if self.gflops_forward is None:
            return None
        return self.calls * self.gflops_forward + self.grad_calls * (self.gflops_backward or 0.0)


@dataclass
class CostReport:
    """``lit-vce cost``'s answer (:func:`estimate`)."""

    method: str
    image_size: int
    batch_size: int
    networks: list[NetworkCost]
    tflops: float
    num_vces: int | None
    notes: list[str] = field(default_factory=list)

    @property
    def tflop_per_vce(self) -> float:
        return sum(n.gflops_per_vce or 0.0 for n in self.networks) / 1e3

    @property
    def seconds_per_vce(self) -> float:
        return self.tflop_per_vce / self.tflops

    @property
    def weights_gib(self) -> float:
        return sum((n.params_m or 0.0) * 4 for n in self.networks) / 1024  # float32: 4 MiB per M parameters

    @property
    def memory_gib(self) -> float:
        """Weights + every differentiated evaluation's activations held until the backward pass, x batch."""
        acts = sum((n.activations_mib or 0.0) * n.live for n in self.networks) * self.batch_size
        return self.weights_gib + acts / 1024

    @property
    def memory_checkpointed_gib(self) -> float:
        """With every differentiated call checkpointed: the weights + the largest single evaluation's activations x batch."""
        acts = max(((n.activations_mib or 0.0) for n in self.networks if n.grad_calls), default=0.0) * self.batch_size
        return self.weights_gib + acts / 1024

    @property
    def seconds_checkpointed_per_vce(self) -> float:
        """With checkpointing, each differentiated evaluation runs its forward once more."""
        extra = sum(n.grad_calls * (n.gflops_forward or 0.0) for n in self.networks) / 1e3
        return (self.tflop_per_vce + extra) / self.tflops

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(tflop_per_vce=self.tflop_per_vce, seconds_per_vce=self.seconds_per_vce, memory_gib=self.memory_gib,
                 memory_checkpointed_gib=self.memory_checkpointed_gib,
                 seconds_checkpointed_per_vce=self.seconds_checkpointed_per_vce)
        if self.num_vces:
            d["gpu_hours"] = self.seconds_per_vce * self.num_vces / 3600
        return d

    def render(self) -> str:
        rows = ["| network | calls / VCE | differentiated | held at once | GFLOP fwd | GFLOP bwd | params (M) | act. MiB / eval | TFLOP / VCE |",
                "|---|---|---|---|---|---|---|---|---|"]
        for n in self.networks:
            def f(v, p=1):
                return "?" if v is None else f"{v:,.{p}f}"
            rows.append(f"| {n.network} | {n.calls:,.1f} | {n.grad_calls:,.1f} | {n.live:,.1f} | {f(n.gflops_forward)} | {f(n.gflops_backward)} | "
                        f"{f(n.params_m)} | {f(n.activations_mib)} | {f(None if n.gflops_per_vce is None else n.gflops_per_vce / 1e3, 2)} |")
        out = [f"{self.method} at {self.image_size} px, batch {self.batch_size}:", "", *rows, "",
               f"per VCE: {self.tflop_per_vce:,.1f} TFLOP -> {self.seconds_per_vce:,.1f} s at {self.tflops:g} TFLOP/s sustained "
               "(an assumption: --tflops)",
               f"memory at batch {self.batch_size}: about {self.memory_gib:,.1f} GiB (float32 weights {self.weights_gib:,.1f} GiB "
               "+ the activations every differentiated evaluation holds until its backward pass)",
               f"with gradient checkpointing (where the method offers it): about {self.memory_checkpointed_gib:,.1f} GiB and "
               f"{self.seconds_checkpointed_per_vce:,.1f} s per VCE (one more forward per differentiated evaluation)"]
        if self.num_vces:
            h = self.seconds_per_vce * self.num_vces / 3600
            out.append(f"the preset's {self.num_vces:,} VCEs: {h:,.1f} GPU hours")
        else:
            out.append("the number of VCEs of this data is not known here: multiply by yours (--num-vces)")
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)


# --- 1. counting calls with stand-ins -------------------------------------------------------
class _Counter:
    """Hooks on a stand-in: evaluations (batch elements), differentiated ones, and the most
    evaluations' activations alive at once (per image).

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
            self.grad_calls += n
            self.per_image = max(self.per_image, saved / n)

    @property
    def peak_live(self) -> float:
        return self.peak_bytes / self.per_image if self.per_image else 0.0


class _Saved:
    __slots__ = ("t", "__weakref__")

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
        from .world.models import SmallCNN

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
        from .diffusion.adm import ADMConfig, ADMUNet, preset_for_file

        name = preset or preset_for_file(checkpoint)
        if name is None:
            raise ValueError(f"cannot tell the ADM architecture of {checkpoint}; give adm:<preset>")
        cfg = ADMConfig.preset(name, **overrides)
        tiny = ADMUNet(ADMConfig.preset(name, **{**overrides, "image_size": STAND_IN_SIZE, "num_channels": 32,
                                                 "num_res_blocks": 1, "num_heads": 1, "num_head_channels": -1,
                                                 "attention_resolutions": "8"}))
        self._add(tiny, f"diffusion UNet adm:{name}", "adm", cfg)
        return tiny

    def load_latent_components(self, model, dtype):
        from .testing import stable_diffusion_components

        c = stable_diffusion_components("tiny", STAND_IN_SIZE)
        self._add(c["unet"], f"diffusion UNet {model} (SD 1.x)", "sd_unet", model)
        self._add(c["vae"].encoder, f"VAE encoder {model}", "sd_vae_encoder", model)
        self._add(c["vae"].decoder, f"VAE decoder {model}", "sd_vae_decoder", model)
        return c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler_config"]

    def load_classifier(self, spec, **kwargs):
        from .classifiers import ImageClassifier

        if isinstance(spec, ImageClassifier):
            return spec
        name = spec.get("spec", "") if isinstance(spec, dict) else str(spec)
        k = 2 if name.split(":", 1)[0] in ("celeba", "celebahq") else 4 if name in ("biased", "robust", "watermarked") else 1000
        clf = ImageClassifier(_NeverFlips(k), STAND_IN_SIZE, [f"class {i}" for i in range(k)], name=name)
        self._add(clf, f"classifier {name}", "classifier", spec)
        return clf

    def load_vgg19_features(self, layers, weights_path=None):
        from .world.models import SmallCNN

        tiny = SmallCNN(8, width=4).trunk[:3]
        self._add(tiny, f"VGG-19 features[:{layers}] (perceptual loss)", "vgg19", int(layers))
        return tiny

    @contextlib.contextmanager
    def patched(self):
        from . import objectives
        from .classifiers import loaders
        from .diffusion import adm, latent

        original = loaders.load_classifier
        targets = [(adm, "load_adm", self.load_adm), (latent, "load_latent_components", self.load_latent_components),
                   (objectives, "load_vgg19_features", self.load_vgg19_features)]
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


# --- 2. FLOPs and activations of the real architectures, on the meta device -----------------
def _measure(build, make_inputs) -> tuple[float, float, float, float]:
    """(GFLOP forward, GFLOP backward, M parameters, MiB saved for backward) of one evaluation."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = build().eval().requires_grad_(False)
        inputs = make_inputs()
    params = sum(p.numel() for p in net.parameters()) / 1e6
    saved: dict[int, int] = {}

    def pack(t):
        saved.setdefault(id(t), t.numel() * t.element_size())
        return t

    fwd = FlopCounterMode(display=False)
    with fwd, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(*inputs)
    out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
    total = FlopCounterMode(display=False)
    with total:
        o2 = net(*inputs)
        o2 = o2[0] if isinstance(o2, (tuple, list)) else getattr(o2, "sample", o2)
        o2.float().sum().backward()
    f = fwd.get_total_flops()
    return f / 1e9, (total.get_total_flops() - f) / 1e9, params, sum(saved.values()) / 2**20


def _classifier_arch(spec: Any, image_size: int) -> tuple[Any, int, str]:
    """(a builder of the real architecture, its input size, a note) for a classifier spec."""
    import timm

    name = spec.get("spec", "") if isinstance(spec, dict) else str(spec)
    preprocessing = spec.get("preprocessing", "resize_crop") if isinstance(spec, dict) else "resize_crop"
    family, _, arg = name.partition(":")
    if family == "timm":
        arch = arg.split("@")[0]
        cfg = timm.models.get_pretrained_cfg(arch)
        size = int(cfg.input_size[-1]) if cfg is not None else 224
        return (lambda: timm.create_model(arch, pretrained=False)), (image_size if preprocessing == "none" else size), ""
    if family in ("robustbench", "robustness") or name in ("madry_ft",):
        import torchvision

        note = "" if "R50" in arg or family == "robustness" else f"{name}: a ResNet-50 assumed"
        return (lambda: torchvision.models.resnet50()), (image_size if preprocessing == "none" else 224), note
    if family in ("celeba", "celebahq"):
        import torchvision

        return (lambda: torchvision.models.densenet121(num_classes=1)), image_size, ""
    if name in ("biased", "robust", "watermarked"):
        from .world.models import SmallCNN

        return (lambda: SmallCNN()), 32, ""
    return None, 0, f"classifier {name}: architecture unknown here, not counted"


def real_costs(role: _Role, image_size: int) -> tuple[float | None, float | None, float | None, float | None, str]:
    """FLOPs, parameters and activation memory of one evaluation of a role's real network."""
    try:
        if role.kind == "adm":
            from .diffusion.adm import ADMUNet

            cfg = role.spec
            s = cfg.image_size

            def inputs():
                x = torch.randn(1, 3, s, s, requires_grad=True)
                t = torch.tensor([500])
                return (x, t, torch.tensor([1])) if cfg.class_cond else (x, t)

            return (*_measure(lambda: ADMUNet(cfg), inputs), "")
        if role.kind.startswith("sd_"):
            from .testing import sd15_unet, sd15_vae

            lat = image_size // 8
            if role.kind == "sd_unet":
                return (*_measure(lambda: sd15_unet(image_size), lambda: (torch.randn(1, 4, lat, lat, requires_grad=True),
                                                                         torch.tensor([500]), torch.randn(1, 77, 768))), "")
            if role.kind == "sd_vae_decoder":
                return (*_measure(lambda: sd15_vae(image_size).decoder,
                                  lambda: (torch.randn(1, 4, lat, lat, requires_grad=True),)), "")
            return (*_measure(lambda: sd15_vae(image_size).encoder,
                              lambda: (torch.randn(1, 3, image_size, image_size, requires_grad=True),)), "")
        if role.kind == "vgg19":
            import torchvision

            layers = role.spec
            return (*_measure(lambda: torchvision.models.vgg19().features[:layers],
                              lambda: (torch.randn(1, 3, image_size, image_size, requires_grad=True),)), "")
        if role.kind == "classifier":
            build, size, note = _classifier_arch(role.spec, image_size)
            if build is None:
                return None, None, None, None, note
            return (*_measure(build, lambda: (torch.randn(1, 3, size, size, requires_grad=True),)), note)
    except Exception as e:  # an architecture that cannot run on the meta device is reported, not guessed
        return None, None, None, None, f"{role.network}: not measured ({type(e).__name__}: {e})"
    return None, None, None, None, f"{role.network}: unknown kind"


# --- the run ---------------------------------------------------------------------------------
def expected_vces(data: dict[str, Any]) -> int | None:
    """How many VCEs a preset's protocol makes on its full dataset (None when unknown here)."""
    protocol = data.get("protocol")
    if data.get("num_samples"):
        return int(data["num_samples"])
    if data.get("dataset") != "imagefolder":
        return None
    if protocol == "pairs" and data.get("pairs"):
        return 50 * len(data["pairs"])
    if protocol == "ldce":
        return 10 * 1000 if data.get("images_per_class") == 10 else 50 * 1000
    if protocol == "digin":
        from .data.imagenet import digin_vce_targets

        return sum(len(t) for _, t in digin_vce_targets().values())
    return None


def estimate(args: list[str], tflops: float = DEFAULT_TFLOPS, num_vces: int | None = None) -> CostReport:
    """The cost of ``lit-vce predict ARGS`` (the same ``--config``/flag arguments), see the module docstring."""
    from .cli import VCECLI, resolve_method_names
    from .data import VCEDataModule
    from .lightning.module import VCEModule
    from .methods import VCEBatch
    from .rngs import sample_rngs

    if tflops <= 0:
        raise ValueError("--tflops must be > 0")
    import warnings

    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    stand = _StandIns()
    with stand.patched():
        argv = resolve_method_names(list(args)) + ["--trainer.accelerator", "cpu", "--trainer.devices", "1",
                                                   "--trainer.logger", "false"]
        cli = VCECLI(VCEModule, VCEDataModule, args=argv, run=False, save_config_callback=None,
                     seed_everything_default=False)
        module = cli.model
        classifier = stand.load_classifier(module._classifier_arg)
        method = module.method_factory() if module.method_factory is not None else module.method
        method.setup(torch.device("cpu"))
        data = dict(cli.datamodule.hparams)
        ids = ["cost-0", "cost-1"]
        batch = VCEBatch(torch.rand(2, 3, STAND_IN_SIZE, STAND_IN_SIZE), torch.tensor([0, 0]), torch.tensor([1, 1]), ids,
                         sample_rngs(0, ids), captions=["a photograph of a class 0"] * 2)
        with torch.autograd.graph.saved_tensors_hooks(stand.tracker.pack, stand.tracker.unpack):
            method.generate(batch, classifier)
    image_size = int(data.get("image_size") or STAND_IN_SIZE)
    networks, notes = [], []
    merged: dict[tuple[str, str], NetworkCost] = {}
    for role in stand.roles:
        c = role.counter
        key = (role.network, role.kind)
        if key in merged:  # the same network loaded twice (e.g. the explained classifier and its copy): add the calls
            n = merged[key]
            n.calls += c.calls / 2
            n.grad_calls += c.grad_calls / 2
            n.live = max(n.live, c.peak_live / 2)
            continue
        if c.calls == 0:
            continue
        gf, gb, pm, act, note = real_costs(role, image_size)
        if note:
            notes.append(note)
        merged[key] = NetworkCost(role.network, c.calls / 2, c.grad_calls / 2, c.peak_live / 2, gf, gb, pm, act)
    networks = list(merged.values())
    notes.append("call counts are the worst case: the stand-in classifier never flips, so every retry and every "
                 "step of a method that stops at the first flip runs")
    return CostReport(method.name, image_size, int(data.get("batch_size") or 1), networks, float(tflops),
                      num_vces if num_vces else expected_vces(data), notes)


def main(argv: list[str] | None = None) -> None:
    """``lit-vce cost [--tflops R] [--num-vces N] [--json FILE] <predict arguments>``."""
    p = argparse.ArgumentParser(prog="lit-vce cost", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tflops", type=float, default=DEFAULT_TFLOPS, help="sustained TFLOP/s of the GPU (an assumption)")
    p.add_argument("--num-vces", type=int, default=None, help="VCEs of the run (default: the preset's protocol, when known)")
    p.add_argument("--json", default=None, help="also write the estimate as JSON to this file")
    known, rest = p.parse_known_args(argv)
    if not rest:
        p.error("give the run's predict arguments, e.g. --config presets/ace-imagenet-zs --config imagenet/methods/dvce")
    report = estimate(rest, known.tflops, known.num_vces)
    print(report.render())
    if known.json:
        from pathlib import Path

        Path(known.json).write_text(json.dumps(report.as_dict(), indent=2))
