"""LPIPS (AlexNet, or VGG as ACE and DiME use it) with offline weights.

torchmetrics ships the LPIPS linear heads; the backbone comes from torchvision's
checkpoint (``alexnet-owt-7be5be79.pth``, or ``vgg16-397923af.pth`` for ``net="vgg"``),
normally downloaded into ``$TORCH_HOME/hub/checkpoints`` at first use. Offline
machines point the config key ``lpips_weights`` or ``$LIT_VCE_LPIPS_WEIGHTS`` to that
file, or put it in ``$LIT_VCE_WEIGHTS_DIR/lpips/checkpoints/`` (or the torch hub folder).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import torch

from ..errors import MissingWeightsError
from ..weights import may_download, no_download_reason, weights_dir
from .vce import _SumMean

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
VGG16_FILE = "vgg16-397923af.pth"
#: the backbone checkpoint of each LPIPS network
BACKBONE_FILES = {"alex": ALEXNET_FILE, "vgg": VGG16_FILE}


def lpips_weight_locations() -> list[Path]:
    """Hub roots searched for ``checkpoints/alexnet-owt-7be5be79.pth``, in order."""
    return [weights_dir() / "lpips", Path(torch.hub.get_dir())]


def _explicit(weights_path: str | Path | None, net: str = "alex") -> Path | None:
    value = weights_path or (os.environ.get("LIT_VCE_LPIPS_WEIGHTS") if net == "alex" else None)
    if not value:
        return None
    p = Path(value).expanduser()
    if not p.is_file():
        raise MissingWeightsError(
            f"LPIPS backbone weights {p} do not exist (expected torchvision's {BACKBONE_FILES[net]})"
        )
    return p


def _check_net(net: str) -> str:
    if net not in BACKBONE_FILES:
        raise ValueError(f"LPIPS net must be one of {sorted(BACKBONE_FILES)}, got {net!r}")
    return net


def lpips_available(weights_path: str | Path | None = None, net: str = "alex") -> bool:
    """Whether LPIPS (``net``: ``alex`` or ``vgg``) can be built without a download."""
    _check_net(net)
    if weights_path or (net == "alex" and os.environ.get("LIT_VCE_LPIPS_WEIGHTS")):
        return _explicit(weights_path, net) is not None
    return any((root / "checkpoints" / BACKBONE_FILES[net]).is_file() for root in lpips_weight_locations())


@contextlib.contextmanager
def _hub_dir(path: Path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(path))
    try:
        yield
    finally:
        torch.hub.set_dir(old)


class LPIPSDistance(_SumMean):
    """Mean LPIPS-AlexNet distance (inputs in [0, 1]) as (sum, count) states, exact under
    DDP; ``per_sample`` gives the per-pair values. Build it with :func:`build_lpips`."""

    higher_is_better = False

    def __init__(self, net: torch.nn.Module, **kwargs):
        super().__init__(**kwargs)
        self.net = net.eval().requires_grad_(False)

    @torch.no_grad()
    def per_sample(self, counterfactual: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        """LPIPS of each pair (no state change)."""
        return self.net(counterfactual.float(), original.float(), normalize=True).reshape(len(original))

    def update(
        self,
        counterfactual: torch.Tensor | None = None,
        original: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
    ) -> None:
        self._add(values if values is not None else self.per_sample(counterfactual, original))


def _lpips_net(net: str = "alex"):
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity as LPIPS

    return LPIPSDistance(LPIPS(net_type=net, normalize=True).net)


def build_lpips(weights_path: str | Path | None = None, net: str = "alex") -> LPIPSDistance:
    """LPIPS (torchmetrics' heads) on ``net`` (``alex``, our default; ``vgg``, ACE's and DiME's)
    using local backbone weights: ``weights_path``, ``$LIT_VCE_LPIPS_WEIGHTS`` (AlexNet), then
    the folders of :func:`lpips_weight_locations`."""
    file = BACKBONE_FILES[_check_net(net)]
    explicit = _explicit(weights_path, net)
    if explicit is not None:
        # torchvision looks for <hub>/checkpoints/<file>: show it the given file under that name
        with tempfile.TemporaryDirectory() as hub:
            (Path(hub) / "checkpoints").mkdir()
            (Path(hub) / "checkpoints" / file).symlink_to(explicit.resolve())
            with _hub_dir(Path(hub)):
                return _lpips_net(net)
    for root in lpips_weight_locations():
        if (root / "checkpoints" / file).is_file():
            with _hub_dir(root):
                return _lpips_net(net)
    hint = (
        f"put {file} (torchvision's {'AlexNet' if net == 'alex' else 'VGG-16'} weights) in "
        f"{weights_dir() / 'lpips' / 'checkpoints'}"
        + (", or point $LIT_VCE_LPIPS_WEIGHTS (config key lpips_weights) to it" if net == "alex" else "")
    )
    if not may_download():
        raise MissingWeightsError(f"LPIPS: no local backbone weights ({no_download_reason()}); {hint}")
    try:
        return _lpips_net(net)
    except Exception as e:  # download errors come in many types
        raise MissingWeightsError(
            f"LPIPS: could not download the {net} backbone ({type(e).__name__}: {e}); {hint}"
        ) from e
