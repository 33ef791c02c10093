"""FLOPs, parameters and activation memory of the real architectures, on the meta device (:mod:`lit_vce.cost`)."""

from __future__ import annotations

from typing import Any

import torch

from .counting import _Role


# --- real architectures on the meta device -----------------
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
        return (
            (lambda: timm.create_model(arch, pretrained=False)),
            (image_size if preprocessing == "none" else size),
            "",
        )
    if family in ("robustbench", "robustness"):
        import torchvision

        note = "" if "R50" in arg or family == "robustness" else f"{name}: a ResNet-50 assumed"
        return (lambda: torchvision.models.resnet50()), (image_size if preprocessing == "none" else 224), note
    if family in ("celeba", "celebahq"):
        import torchvision

        return (lambda: torchvision.models.densenet121(num_classes=1)), image_size, ""
    if name in ("biased", "robust", "watermarked"):
        from ..world.models import SmallCNN

        return (lambda: SmallCNN()), 32, ""
    return None, 0, f"classifier {name}: architecture unknown here, not counted"


def real_costs(role: _Role, image_size: int) -> tuple[float | None, float | None, float | None, float | None, str]:
    """FLOPs, parameters and activation memory of one evaluation of a role's real network."""
    try:
        if role.kind == "adm":
            from ..diffusion.adm import ADMUNet

            cfg = role.spec
            s = cfg.image_size

            def inputs():
                x = torch.randn(1, 3, s, s, requires_grad=True)
                t = torch.tensor([500])
                return (x, t, torch.tensor([1])) if cfg.class_cond else (x, t)

            return (*_measure(lambda: ADMUNet(cfg), inputs), "")
        if role.kind.startswith("sd_"):
            from ..testing import sd15_unet, sd15_vae

            lat = image_size // 8
            if role.kind == "sd_unet":
                return (
                    *_measure(
                        lambda: sd15_unet(image_size),
                        lambda: (
                            torch.randn(1, 4, lat, lat, requires_grad=True),
                            torch.tensor([500]),
                            torch.randn(1, 77, 768),
                        ),
                    ),
                    "",
                )
            if role.kind == "sd_vae_decoder":
                return (
                    *_measure(
                        lambda: sd15_vae(image_size).decoder, lambda: (torch.randn(1, 4, lat, lat, requires_grad=True),)
                    ),
                    "",
                )
            return (
                *_measure(
                    lambda: sd15_vae(image_size).encoder,
                    lambda: (torch.randn(1, 3, image_size, image_size, requires_grad=True),),
                ),
                "",
            )
        if role.kind == "vgg19":
            import torchvision

            layers = role.spec
            return (
                *_measure(
                    lambda: torchvision.models.vgg19().features[:layers],
                    lambda: (torch.randn(1, 3, image_size, image_size, requires_grad=True),),
                ),
                "",
            )
        if role.kind == "classifier":
            build, size, note = _classifier_arch(role.spec, image_size)
            if build is None:
                return None, None, None, None, note
            return (*_measure(build, lambda: (torch.randn(1, 3, size, size, requires_grad=True),)), note)
    except Exception as e:  # an architecture that cannot run on the meta device is reported, not guessed
        return None, None, None, None, f"{role.network}: not measured ({type(e).__name__}: {e})"
    return None, None, None, None, f"{role.network}: unknown kind"
