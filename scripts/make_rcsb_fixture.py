#!/usr/bin/env python
"""Write ``tests/fixtures/rcsb_official.safetensors``: RCSB's official sampler on tiny models.

    git clone https://github.com/sobieskibj/rcsb /tmp/rcsb
    python scripts/make_rcsb_fixture.py /tmp/rcsb

Runs the official ``CDDB.inpaint`` (``deep: true``: ``ddpm_dps_sampling`` of RCSB's I2SB
copy) with the official guidance ``CDDBTargetClassifierLPIPS`` as
``imagenet_cava_stable_adaptive.yaml`` configures it (scale 1.5, classifier scale 1,
Adam stabilisation, adaptive normalisation, OT-ODE, no LPIPS or data-consistency term)
on a tiny random bridge network (the world ddpm's architecture at 16 px, called through
``noise_levels[step]`` as ``Image256Net``) and a tiny random classifier. Logging and
plotting packages the code imports (wandb, seaborn, lpips, ipdb, ...) are stubbed; nothing
the sampler computes is. The fixture holds the inputs (weights, images, regions, targets,
the bridge's end-point noise the code drew) and the official output.
"""

from __future__ import annotations

import sys
import types
from functools import partial
from pathlib import Path

import torch
from _official import stub  # scripts/_official.py
from safetensors.torch import save_file
from torch import nn

START_STEP, NFE, SEED = 100, 8, 1234


def _package(name: str, path: Path) -> None:
    """An importable package whose ``__init__`` is not run (it pulls in unrelated code)."""
    mod = types.ModuleType(name)
    mod.__path__ = [str(path)]
    sys.modules[name] = mod


def import_official(path: str):
    """The official modules RCSB's sampler needs, with the logging packages stubbed."""
    root = Path(path).resolve() / "src"
    sys.path[:0] = [str(root), str(root / "inpainters" / "src_cddb")]
    noop = lambda *a, **k: None  # noqa: E731
    stub("wandb", log=noop, Image=noop, Plotly=types.SimpleNamespace(make_plot_media=noop))
    for name in ("seaborn", "ipdb", "lpips", "prefetch_generator"):
        stub(name)
    _package("classifiers", root / "classifiers")
    _package("i2sb", root / "inpainters" / "src_cddb" / "i2sb")
    _package("inpainters", root / "inpainters")
    _package("inpainters.src_cddb", root / "inpainters" / "src_cddb")
    _package("inpainters.src_cddb.i2sb", root / "inpainters" / "src_cddb" / "i2sb")

    def unlist(item):  # utils.misc.unlist
        if hasattr(item, "__len__") and hasattr(item, "__getitem__"):
            return item.flatten()[0].item() if isinstance(item, torch.Tensor) else unlist(item[0])
        return item

    stub("utils", unlist=unlist)
    stub("utils.misc", unlist=sys.modules["utils"].unlist)

    from guidance.cddb_target_clf_lpips import CDDBTargetClassifierLPIPS
    from guidance.utils.adam_stabilization import ADAMGradientStabilization
    from guidance.utils.loss_functions import LossFunctionCalculator
    from inpainters.cddb import CDDB
    from schedulers.const import ConstScheduler

    return CDDBTargetClassifierLPIPS, ADAMGradientStabilization, LossFunctionCalculator, CDDB, ConstScheduler


def main() -> None:
    import diffusers  # noqa: F401  (before the stubs below: it looks for wandb)

    from lit_vce.diffusion.bridge import world_bridge_network
    from lit_vce.methods.rcsb import _tiny_unet
    from lit_vce.testing import tiny_classifier

    CDDBTargetClassifierLPIPS, ADAMGradientStabilization, LossFunctionCalculator, CDDB, ConstScheduler = (
        import_official(sys.argv[1])
    )
    torch.manual_seed(0)
    unet = _tiny_unet()
    net = world_bridge_network(unet)

    class OfficialNet(nn.Module):  # Image256Net's interface around the tiny network
        def __init__(self, noise_levels, cond=False):
            super().__init__()
            self.net = net
            self.register_buffer("noise_levels", noise_levels)

        def forward(self, x, steps, cond=None):
            return self.net(x, self.noise_levels[steps].detach())

    ckpt = Path("/tmp/rcsb_fixture_net.pt")
    torch.save({"net": OfficialNet(torch.linspace(1e-4, 1.0, 1000) * 1000).state_dict()}, ckpt)  # as I2SB saves it
    clf = tiny_classifier(3).eval()
    config = types.SimpleNamespace(
        interval=1000,
        beta_max=1.0,
        t0=1e-4,
        T=1.0,
        load=str(ckpt),
        start_step=START_STEP,
        nfe=NFE,
        cond_x1=False,
        clip_denoise=False,
        step_size=0.0,
        ot_ode=True,
    )
    guidance = CDDBTargetClassifierLPIPS(
        model=clf,
        uses_target_clf=True,
        clf_scale=ConstScheduler(START_STEP, 1.0),
        scale=ConstScheduler(START_STEP, 1.5),
        lpips_net="vgg",
        lpips_scale=None,
        other_loss_functions=LossFunctionCalculator(0.0, 0.0, 0.0, 0.0),
        rescale_lpips=True,
        normalize=False,
        adaptive_normalize=True,
        stabilization=ADAMGradientStabilization(0.9, 0.999, 1e-8, reset_step=NFE),
        require_grad=True,
        keep_graph=True,
        from_tweedie=True,
        grad_from="x_t",
        log=False,
        task="multiclass",
    )
    cddb = CDDB(config, guidance, partial(OfficialNet), deep=True, log_trajs=False)
    # the sampler's state becomes float64 through the bridge tables; the network keeps float32
    torch.manual_seed(5)
    images = torch.rand(3, 3, 16, 16) * 0.9 + 0.05
    region = torch.zeros(3, 1, 16, 16)
    region[0, :, 4:12, 4:12] = 1
    region[1, :, 0:8, :] = 1
    region[2, :, 8:16, 4:16] = 1
    target = torch.tensor([1, 2, 3])
    torch.manual_seed(SEED)
    out = cddb.inpaint(images, region[:, 0], target)
    torch.manual_seed(SEED)
    torch.randn_like(images)  # inpaint's first draw, overwritten inside the region by the second
    noise = torch.randn_like(images)
    tensors = {
        **{f"net.{k}": v.contiguous() for k, v in unet.state_dict().items()},
        **{f"classifier.{k}": v.contiguous() for k, v in clf.state_dict().items()},
        "images": images,
        "region": region,
        "target": target,
        "noise": noise,
        "official_output": out.float(),
    }
    dest = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "rcsb_official.safetensors"
    meta = {
        "source": "sobieskibj/rcsb (src/inpainters/cddb.py, deep=True)",
        "start_step": str(START_STEP),
        "nfe": str(NFE),
        "scale": "1.5",
        "classifier": "lit_vce.testing.tiny_classifier(3)",
    }
    save_file(tensors, str(dest), metadata=meta)
    print(f"wrote {dest}: output range {float(out.min()):.3f}..{float(out.max()):.3f}")


if __name__ == "__main__":
    main()
