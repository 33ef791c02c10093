"""The CelebA and CelebA-HQ attribute oracles of MNAC and CD, as ACE's scripts read them.

- **CelebA** (``eval_utils/oracle_celeba_metrics.py``, from BTE, ICCV 2021): the
  VGGFace2 ResNet-50 in its Caffe layout with a 1x1 convolution to 128 features
  (``Resnet50_128``), then ``Linear(128, 40)``; ``oracle.pth`` holds
  ``{"feat_extract": ..., "classifier": ...}``. Its forward takes [-1, 1] images and
  itself maps them to [0, 1], swaps RGB -> BGR, subtracts ``(131.0912, 103.8827,
  91.4953) / 255`` channel-wise in that (BGR) order, and resizes bicubically to 224 px.
- **CelebA-HQ** (``eval_utils/oracle_celebahq_metrics.py``, from STEEX): the same
  Caffe ResNet-50 (``Resnet50_ft_dag``) whose classifier is removed, its 2048 pooled
  features into ``Linear(2048, 40)``; ``oracle.pth`` holds ``{"model_state_dict": ...}``.
  It takes [-1, 1] images (``compute_CD.py`` feeds them so; ``compute_MNAC.py`` wraps a
  ``Normalizer(0.5, 0.5)`` around it on top, a second normalisation we do not copy:
  docs/parity.md) and resizes bicubically to 224 px.

Decisions are ``sigmoid(logits) > 0.5`` per attribute. Weights: ``path``, else
``$LIT_VCE_WEIGHTS_DIR/<celeba|celebahq>/oracle.pth``, else the torch hub's checkpoints.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MissingWeightsError

ORACLES = ("celeba", "celebahq")
_CAFFE_BGR_MEAN = (131.0912, 103.8827, 91.4953)  # subtracted after the RGB -> BGR swap, in this order (BTE's code)


def caffe_resnet50() -> nn.Module:
    """torchvision's ResNet-50 in the Caffe layout of the VGGFace2 models: the stride in each
    stage's first 1x1 convolution, max-pool without padding and rounding up; no ``fc``."""
    import torchvision

    net = torchvision.models.resnet50()
    for layer in (net.layer2, net.layer3, net.layer4):
        block = layer[0]
        block.conv1.stride, block.conv2.stride = (2, 2), (1, 1)
    net.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
    net.fc = nn.Identity()
    return net


_PARTS = {"1x1_reduce": "1", "3x3": "2", "1x1_increase": "3"}


def caffe_to_torchvision(key: str) -> str | None:
    """A Caffe-converted ResNet-50 key (``conv2_1_1x1_reduce_bn.weight``) as torchvision's
    (``layer1.0.bn1.weight``); ``None`` for a key outside the trunk."""
    m = re.fullmatch(r"conv1_7x7_s2(_bn)?\.(\w+)", key)
    if m:
        return f"{'bn1' if m.group(1) else 'conv1'}.{m.group(2)}"
    m = re.fullmatch(r"conv(\d)_(\d+)_(1x1_reduce|3x3|1x1_increase|1x1_proj)(_bn)?\.(\w+)", key)
    if not m:
        return None
    stage, block, part, bn, leaf = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4), m.group(5)
    prefix = f"layer{stage - 1}.{block - 1}"
    if part == "1x1_proj":
        return f"{prefix}.downsample.{1 if bn else 0}.{leaf}"
    return f"{prefix}.{'bn' if bn else 'conv'}{_PARTS[part]}.{leaf}"


class AttributeOracle(nn.Module):
    """An oracle: images in [0, 1] -> (N, 40) attribute probabilities."""

    def __init__(self, kind: str):
        super().__init__()
        if kind not in ORACLES:
            raise ValueError(f"oracle must be one of {ORACLES}, got {kind!r}")
        self.kind = kind
        self.trunk = caffe_resnet50()
        self.project = nn.Conv2d(2048, 128, 1, bias=False) if kind == "celeba" else nn.Identity()
        self.classifier = nn.Linear(128 if kind == "celeba" else 2048, 40)
        self.register_buffer("mean", torch.tensor(_CAFFE_BGR_MEAN).view(1, 3, 1, 1) / 255.0, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind == "celeba":
            x = images.flip(1) - self.mean  # (x+1)/2 of the [-1, 1] input is our [0, 1] image
        else:
            x = images * 2 - 1
        x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)
        t = self.trunk
        x = t.maxpool(t.relu(t.bn1(t.conv1(x))))
        x = t.avgpool(t.layer4(t.layer3(t.layer2(t.layer1(x)))))  # the 7x7 average pool at 224 px
        x = self.project(x).flatten(1)
        return torch.sigmoid(self.classifier(x))


def _trunk_state(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        new = caffe_to_torchvision(k)
        if new is not None:
            out[new] = v
    if not out:
        raise MissingWeightsError(f"{path}: no Caffe ResNet-50 keys (conv1_7x7_s2, conv2_1_1x1_reduce, ...)")
    return out


def load_attribute_oracle(kind: str, path: str | Path | None = None) -> AttributeOracle:
    """The CelebA (``celeba``) or CelebA-HQ (``celebahq``) oracle with its ``oracle.pth``."""
    from ..weights import find_weights

    if kind not in ORACLES:
        raise ValueError(f"attribute_oracle must be one of {ORACLES} (or off), got {kind!r}")
    p = find_weights(kind, "oracle.pth", path)
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign
        raise MissingWeightsError(f"{p}: not a readable oracle checkpoint ({type(e).__name__}: {e})") from None
    oracle = AttributeOracle(kind)
    try:
        if kind == "celeba":
            trunk, head = dict(blob["feat_extract"]), dict(blob["classifier"])
            oracle.project.weight.data.copy_(trunk.pop("feat_extract.weight"))
        else:
            sd = blob["model_state_dict"]
            trunk = {k[len("feat_extract.") :]: v for k, v in sd.items() if k.startswith("feat_extract.")}
            head = {k[len("classifier.") :]: v for k, v in sd.items() if k.startswith("classifier.")}
        own = oracle.trunk.state_dict()
        state = _trunk_state(trunk, p)
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        if missing:
            raise KeyError(f"missing {missing[:3]}")
        oracle.trunk.load_state_dict({k: state.get(k, v) for k, v in own.items()})
        oracle.classifier.load_state_dict(head)
    except (KeyError, TypeError, RuntimeError) as e:
        raise MissingWeightsError(f"{p}: not ACE's {kind} oracle.pth ({str(e)[:200]})") from None
    return oracle.eval().requires_grad_(False)


def save_random_oracle(kind: str, path: str | Path, seed: int = 0) -> Path:
    """Random weights in the layout of ACE's ``oracle.pth`` for ``kind`` (tests, dry runs)."""
    torch.manual_seed(seed)
    oracle = AttributeOracle(kind)
    inverse = {}
    for k in oracle.trunk.state_dict():
        if k.endswith("num_batches_tracked"):
            continue
        inverse[k] = _torchvision_to_caffe(k)
    trunk = {inverse[k]: v.clone() for k, v in oracle.trunk.state_dict().items() if k in inverse}
    for k in trunk:  # non-trivial batch-norm statistics, so a wrong mapping shows
        if k.endswith("running_var"):
            trunk[k] = trunk[k] + torch.rand_like(trunk[k])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "celeba":
        trunk["feat_extract.weight"] = oracle.project.weight.detach().clone()
        blob = {"feat_extract": trunk, "classifier": oracle.classifier.state_dict()}
    else:
        sd = {f"feat_extract.{k}": v for k, v in trunk.items()}
        sd.update({f"classifier.{k}": v for k, v in oracle.classifier.state_dict().items()})
        blob = {"model_state_dict": sd}
    torch.save(blob, path)
    return path


def _torchvision_to_caffe(key: str) -> str:
    m = re.fullmatch(r"(conv1|bn1)\.(\w+)", key)
    if m:
        return f"conv1_7x7_s2{'_bn' if m.group(1) == 'bn1' else ''}.{m.group(2)}"
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(?:(conv|bn)(\d)|downsample\.(\d))\.(\w+)", key)
    stage, block = int(m.group(1)) + 1, int(m.group(2)) + 1
    if m.group(5) is not None:
        return f"conv{stage}_{block}_1x1_proj{'_bn' if m.group(5) == '1' else ''}.{m.group(6)}"
    part = {v: k for k, v in _PARTS.items()}[m.group(4)]
    return f"conv{stage}_{block}_{part}{'_bn' if m.group(3) == 'bn' else ''}.{m.group(6)}"


class OracleAttributes:
    """MNAC's and CD's inputs from an attribute oracle: decisions, changes, and per-attribute
    decision changes with the query attribute ``query`` (CD's dataset correlations ``corr``)."""

    num_attributes = 40

    def __init__(self, oracle: AttributeOracle, query: int, corr: list[float] | None, cd_dataset: str | None = None):
        self.oracle, self.query = oracle, int(query)
        self.corr = torch.tensor(corr, dtype=torch.float64) if corr is not None else None
        if self.corr is not None and self.corr.shape != (40,):
            raise ValueError(f"CD needs 40 dataset correlations, got {tuple(self.corr.shape)}")
        self.cd_dataset = cd_dataset

    def describe(self) -> dict:
        from ..data.celeba import CELEBA_ATTRIBUTES

        return {
            "attributes": "CelebA's 40",
            "reader": f"ACE's {self.oracle.kind} oracle.pth, decision > 0.5",
            "query": CELEBA_ATTRIBUTES[self.query],
            "cd_dataset": self.cd_dataset,
        }

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> torch.Tensor:
        return (self.oracle(images) > 0.5).double()

    def changes(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        return (before != after).double().sum(1)

    def deltas(self, before: torch.Tensor, after: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return after - before  # compute_CD with diff=True: cf_pred - cl_pred, per attribute
