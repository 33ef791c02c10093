"""Expected GPU runtime and memory of a run, from a FLOP count (``lit-vce cost``).

    lit-vce cost --config presets/ace-imagenet-zs --config imagenet/methods/dvce
    lit-vce cost --config presets/digin-imagenet --config imagenet/methods/digin --tflops 150

Two measurements, combined:

1. **Calls.** The run's method is built from the same configs as ``predict``, with every
   network it loads replaced by a small random stand-in of the same kind (an ADM UNet of the
   preset's structure with few channels, a tiny Stable Diffusion, a small CNN classifier with
   the classifier's number of classes, a small VGG), and explains 2 images at 32 px. Hooks
   count, per network, the evaluations each explained image costs, the backward passes
   through them (a gradient hook on each output) and the evaluations whose activations
   autograd holds at once (its saved tensors, followed until freed). The stand-in classifier
   never flips (a fixed margin for the source class), so methods that stop early or retry
   with a larger scale show their **worst case**. Call counts do not depend on the network's
   size or the image resolution.
2. **FLOPs per call.** Each real architecture (the ADM preset, Stable Diffusion 1.x's UNet
   and VAE, the classifier's timm / torchvision architecture, VGG-19) is built on PyTorch's
   ``meta`` device (no weights, no memory) and run once, forward and backward with frozen
   weights, at the run's resolution under ``torch.utils.flop_counter.FlopCounterMode``; the
   tensors autograd saves are summed for the activation memory of one evaluation.

Runtime per VCE = sum over networks of (evaluations x forward FLOPs + backward passes x
backward FLOPs) / the sustained rate (``--tflops``: an assumption, not a measurement; the
default, 50 TFLOP/s, is an H100's float32 rate with cuDNN convolutions in TF32). A network
the method checkpoints itself pays one more forward per backward pass, and is counted so.
Memory = the float32 weights + the activations every network holds at once for one image,
times the batch size; with checkpointing, the largest single evaluation's instead. Not
counted: data loading, the metric suite (Inception, LPIPS, ...), text encoders and
elementwise operations (FlopCounterMode counts matrix products and convolutions, which
dominate).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .counting import STAND_IN_SIZE, _StandIns
from .flops import real_costs

#: the default sustained rate (TFLOP/s): float32 on one H100 with cuDNN convolutions in TF32
DEFAULT_TFLOPS = 50.0


def _num(x: float) -> str:
    """A figure with the digits that mean something: 2,556 / 6.9 / 0.031."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 1 else f"{x:.2g}"


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
    #: differentiated under the method's own gradient checkpointing (its forward saves nothing and
    #: runs again in the backward pass, outside the hooks): one more forward per backward pass
    recomputed: bool = False

    @property
    def gflops_per_vce(self) -> float | None:
        if self.gflops_forward is None:
            return None
        recompute = self.grad_calls * self.gflops_forward if self.recomputed else 0.0
        return self.calls * self.gflops_forward + self.grad_calls * (self.gflops_backward or 0.0) + recompute


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
        """With every differentiated call checkpointed: the weights + the largest single
        evaluation's activations x batch."""
        acts = max(((n.activations_mib or 0.0) for n in self.networks if n.grad_calls), default=0.0) * self.batch_size
        return self.weights_gib + acts / 1024

    @property
    def seconds_checkpointed_per_vce(self) -> float:
        """With checkpointing, each differentiated evaluation runs its forward once more."""
        extra = sum(n.grad_calls * (n.gflops_forward or 0.0) for n in self.networks if not n.recomputed) / 1e3
        return (self.tflop_per_vce + extra) / self.tflops

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            tflop_per_vce=self.tflop_per_vce,
            seconds_per_vce=self.seconds_per_vce,
            memory_gib=self.memory_gib,
            memory_checkpointed_gib=self.memory_checkpointed_gib,
            seconds_checkpointed_per_vce=self.seconds_checkpointed_per_vce,
        )
        if self.num_vces:
            d["gpu_hours"] = self.seconds_per_vce * self.num_vces / 3600
        return d

    def render(self) -> str:
        rows = [
            (
                "| network | calls / VCE | differentiated | held at once | GFLOP fwd | GFLOP bwd | params (M) | "
                "act. MiB / eval | TFLOP / VCE |"
            ),
            "|---|---|---|---|---|---|---|---|---|",
        ]

        def f(v, p=1):
            return "?" if v is None else f"{v:,.{p}f}"

        for n in self.networks:
            per_vce = None if n.gflops_per_vce is None else n.gflops_per_vce / 1e3
            rows.append(
                f"| {n.network} | {n.calls:,.1f} | {n.grad_calls:,.1f} | {n.live:,.1f} | {f(n.gflops_forward)} | "
                f"{f(n.gflops_backward)} | {f(n.params_m)} | {f(n.activations_mib)} | {f(per_vce, 2)} |"
            )
        out = [
            f"{self.method} at {self.image_size} px, batch {self.batch_size}:",
            "",
            *rows,
            "",
            (
                f"per VCE: {_num(self.tflop_per_vce)} TFLOP -> {_num(self.seconds_per_vce)} s at {self.tflops:g} "
                "TFLOP/s "
                "sustained (an assumption: --tflops)"
            ),
            (
                f"memory at batch {self.batch_size}: about {self.memory_gib:,.1f} GiB (float32 weights "
                f"{self.weights_gib:,.1f} GiB + the activations every differentiated evaluation holds until its "
                "backward pass)"
            ),
            (
                f"with gradient checkpointing (where the method offers it): about {self.memory_checkpointed_gib:,.1f} "
                "GiB "
                f"and {_num(self.seconds_checkpointed_per_vce)} s per VCE (one more forward per differentiated "
                "evaluation)"
            ),
        ]
        if self.num_vces:
            h = self.seconds_per_vce * self.num_vces / 3600
            out.append(f"the preset's {self.num_vces:,} VCEs: {_num(h)} GPU hours")
        else:
            out.append("the number of VCEs of this data is not known here: multiply by yours (--num-vces)")
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)


# --- the run ---------------------------------------------------------------------------------
def _held(c) -> float:
    """Evaluations' activations held at once per image (the stand-ins explain 2 images). A network
    differentiated under the method's own gradient checkpointing saves nothing in its forward
    pass; its backward pass holds one recomputed evaluation at a time."""
    return max(c.peak_live / 2, 1.0 if c.grad_calls else 0.0)


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
        from ..data.imagenet import digin_vce_targets

        return sum(len(t) for _, t in digin_vce_targets().values())
    return None


def estimate(args: list[str], tflops: float = DEFAULT_TFLOPS, num_vces: int | None = None) -> CostReport:
    """The cost of ``lit-vce predict ARGS`` (the same ``--config``/flag arguments), see the module docstring."""
    import warnings

    from ..lightning.cli import VCECLI, resolve_method_names
    from ..data import VCEDataModule
    from ..lightning.module import VCEModule
    from ..methods import VCEBatch
    from ..rngs import sample_rngs

    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    stand = _StandIns()
    with stand.patched():
        argv = resolve_method_names(list(args)) + [
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "1",
            "--trainer.logger",
            "false",
        ]
        cli = VCECLI(
            VCEModule, VCEDataModule, args=argv, run=False, save_config_callback=None, seed_everything_default=False
        )
        module = cli.model
        classifier = stand.load_classifier(module._classifier_arg)
        method = module.method_factory() if module.method_factory is not None else module.method
        method.setup(torch.device("cpu"))
        data = dict(cli.datamodule.hparams)
        ids = ["cost-0", "cost-1"]
        batch = VCEBatch(
            torch.rand(2, 3, STAND_IN_SIZE, STAND_IN_SIZE),
            torch.tensor([0, 0]),
            torch.tensor([1, 1]),
            ids,
            sample_rngs(0, ids),
            captions=["a photograph of a class 0"] * 2,
        )
        with torch.autograd.graph.saved_tensors_hooks(stand.tracker.pack, stand.tracker.unpack):
            method.generate(batch, classifier)
    image_size = int(data.get("image_size") or STAND_IN_SIZE)
    notes: list[str] = []
    merged: dict[tuple[str, str], NetworkCost] = {}
    for role in stand.roles:
        c = role.counter
        key = (role.network, role.kind)
        if key in merged:  # the same network loaded twice (e.g. the explained classifier and its copy): add the calls
            n = merged[key]
            n.calls += c.calls / 2
            n.grad_calls += c.grad_calls / 2
            n.live = max(n.live, _held(c))
            continue
        if c.calls == 0:
            continue
        gf, gb, pm, act, note = real_costs(role, image_size)
        if note:
            notes.append(note)
        merged[key] = NetworkCost(
            role.network,
            c.calls / 2,
            c.grad_calls / 2,
            _held(c),
            gf,
            gb,
            pm,
            act,
            recomputed=bool(c.grad_calls) and not c.per_image,
        )
        if merged[key].recomputed:
            notes.append(
                f"{role.network}: checkpointed by the method; its forward is counted once more per backward pass"
            )
    networks = list(merged.values())
    notes.append(
        "call counts are the worst case: the stand-in classifier never flips, so every retry and every "
        "step of a method that stops at the first flip runs"
    )
    return CostReport(
        method.name,
        image_size,
        int(data.get("batch_size") or 1),
        networks,
        float(tflops),
        num_vces if num_vces else expected_vces(data),
        notes,
    )


def main(argv: list[str] | None = None) -> None:
    """``lit-vce cost [--tflops R] [--num-vces N] [--json FILE] <predict arguments>``."""
    p = argparse.ArgumentParser(
        prog="lit-vce cost", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tflops", type=float, default=DEFAULT_TFLOPS, help="sustained TFLOP/s of the GPU (an assumption)")
    p.add_argument(
        "--num-vces", type=int, default=None, help="VCEs of the run (default: the preset's protocol, when known)"
    )
    p.add_argument("--json", default=None, help="also write the estimate as JSON to this file")
    known, rest = p.parse_known_args(argv)
    if known.tflops <= 0:
        p.error("--tflops must be > 0")
    if not rest:
        p.error(
            "give the run's predict arguments, e.g. --config presets/ace-imagenet-zs --config imagenet/methods/dvce"
        )
    report = estimate(rest, known.tflops, known.num_vces)
    print(report.render())
    if known.json:
        from pathlib import Path

        Path(known.json).write_text(json.dumps(report.as_dict(), indent=2))
