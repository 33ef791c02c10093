"""Classifier loaders by name.

``load_classifier(spec)`` understands:

- ``biased``, ``robust``, ``oracle`` (or ``world:<name>``): the embedded world's models;
- ``timm:<model name>``: any timm ImageNet model;
- ``robustbench:<model id>`` (``robustbench:<threat>/<model id>``, default ``Linf``):
  robustbench ImageNet models;
- ``celeba:<attribute>``, ``celebahq:<attribute>``: the papers' CelebA / CelebA-HQ
  DenseNet-121 on one attribute (:mod:`lit_vce.classifiers.faces`);
- ``robustness:<file>``: a robustness-library ResNet-50 (Madry's, DVCE's "Madry + FT";
  :mod:`lit_vce.classifiers.robustness`);
- ``openclip:<arch>/<pretrained>``: an open_clip model as a zero-shot ImageNet
  classifier (``<pretrained>`` is a tag such as ``openai`` or a local file);
- ``file:<path>`` or a path ending in ``.pt``/``.pth``/``.safetensors``: a local
  checkpoint (a pickled / TorchScript module, or a state dict with ``arch=<timm name>``).

Offline use: weights are looked up under ``$LIT_VCE_WEIGHTS_DIR`` (default
``~/.cache/lit_vce``) first: ``timm/<name>.{safetensors,pth}``,
``robustbench/imagenet/<threat>/<id>.pt``. When a file is absent and cannot be
downloaded, the error names the file and where to put it.

New families register with ``@CLASSIFIER_FAMILIES.register("prefix")`` (a function
``(name, **kwargs) -> ImageClassifier``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..errors import MissingDependencyError, MissingWeightsError, UnknownNameError, suggest
from ..registry import CLASSIFIER_FAMILIES
from ..weights import is_offline as _is_offline
from ..weights import may_download, no_download_reason, weights_dir
from .base import ImageClassifier

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_class_names() -> list[str]:
    from ..data.imagenet import imagenet_class_names as names

    return names()


def load_classifier(spec: str | dict | ImageClassifier, **kwargs) -> ImageClassifier:
    """Build the classifier named by ``spec`` (see the module docstring).

    ``spec`` may also be a mapping: ``{"spec": "file:/path/model.pt", "input_size": 224,
    "class_names": [...], "mean": [...], "std": [...], ...}``: the other keys are the
    family loader's arguments (checkpoint, class names, input size, normalisation,
    zero-shot templates, ...).
    """
    if isinstance(spec, ImageClassifier):
        return spec
    if isinstance(spec, dict):
        args = dict(spec)
        if "spec" not in args:
            raise ValueError(f"a classifier mapping needs a 'spec' key (e.g. 'timm:resnet50'), got keys {sorted(args)}")
        return load_classifier(args.pop("spec"), **{**args, **kwargs})
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a classifier spec must be a non-empty string, got {spec!r}")
    family, name = _split_spec(spec)
    return CLASSIFIER_FAMILIES.get(family)(name, **kwargs)


def _split_spec(spec: str) -> tuple[str, str]:
    if spec.endswith((".pt", ".pth", ".safetensors")) and ":" not in spec.split("/")[0]:
        return "file", spec
    if ":" in spec:
        family, name = spec.split(":", 1)
        return family, name
    return "world", spec


def check_classifier_spec(spec) -> None:
    """Reject a spec whose family or name is unknown without loading anything (so a run
    stops at once, before its models are built): an unknown family, a world name that
    is none of the world's classifiers, a timm name timm does not know."""
    if isinstance(spec, dict):
        if "spec" not in spec:
            raise ValueError(f"a classifier mapping needs a 'spec' key (e.g. 'timm:resnet50'), got keys {sorted(spec)}")
        spec = spec["spec"]
    if not isinstance(spec, str):
        return  # a built classifier
    if not spec:
        raise ValueError("a classifier spec must be a non-empty string")
    family, name = _split_spec(spec)
    CLASSIFIER_FAMILIES.get(family)
    if family == "world":
        from ..world.models import WORLD_CLASSIFIERS

        if name not in WORLD_CLASSIFIERS:
            raise UnknownNameError(f"unknown classifier {name!r}{_spec_hint(name)}")
    elif family in ("celeba", "celebahq"):
        from ..data.celeba import attribute_index

        try:
            attribute_index(name)
        except ValueError as e:
            raise UnknownNameError(f"{family}:{name}: {e}") from None
    elif family == "timm" and not name.startswith("hf-hub:"):
        import timm

        if not timm.is_model(name):
            raise UnknownNameError(f"timm has no model {name!r}{suggest(name, timm.list_models())}")


def classifier_class_names(spec) -> list[str] | None:
    """The class names a classifier spec stands for, without loading weights: the world's
    four shapes, or ImageNet's for the timm, robustbench and open_clip families; ``None``
    when only the weights can tell (local files)."""
    if isinstance(spec, dict):
        return list(spec["class_names"]) if spec.get("class_names") else classifier_class_names(spec.get("spec"))
    if not isinstance(spec, str) or not spec:
        return list(getattr(spec, "class_names", [])) or None
    family = _split_spec(spec)[0]
    if family == "world":
        from ..data.world import CLASS_NAMES

        return list(CLASS_NAMES)
    if family in ("timm", "robustbench", "openclip", "robustness"):
        return imagenet_class_names()
    if family in ("celeba", "celebahq"):
        from ..data.celeba import CELEBA_ATTRIBUTES, attribute_index

        a = CELEBA_ATTRIBUTES[attribute_index(_split_spec(spec)[1])]
        return [f"not {a}", a]
    return None


def _spec_hint(name: str) -> str:
    """``; did you mean timm:resnet50?`` for a bare timm name, else the world's names and the families."""
    from ..world.models import WORLD_CLASSIFIERS

    close = suggest(name, WORLD_CLASSIFIERS)
    if close:
        return close
    try:
        import timm

        if timm.is_model(name):
            return f"; did you mean timm:{name}?"
    except ImportError:
        pass
    return (
        "; a classifier is biased, robust, oracle, watermarked (the world's) or <family>:<name> with family "
        f"{', '.join(CLASSIFIER_FAMILIES.names())} (e.g. timm:resnet50)"
    )


@CLASSIFIER_FAMILIES.register("world")
def load_world_classifier(name: str, **kwargs) -> ImageClassifier:
    """``biased``, ``robust``, ``oracle`` or ``watermarked`` from the embedded world (32x32, 4 shape classes)."""
    from ..data.world import CLASS_NAMES, IMAGE_SIZE
    from ..world.models import WORLD_CLASSIFIERS, load_world_network

    if name not in WORLD_CLASSIFIERS:
        raise UnknownNameError(f"unknown classifier {name!r}{_spec_hint(name)}")
    return ImageClassifier(load_world_network(name), IMAGE_SIZE, CLASS_NAMES, name=name, **kwargs)


@CLASSIFIER_FAMILIES.register("timm")
def load_timm(name: str, checkpoint: str | None = None, class_names=None, **kwargs) -> ImageClassifier:
    """A timm model with its own data config (size, crop, interpolation, mean/std).

    ``name`` is a timm model name (``resnet50``, ``convnext_base.fb_in1k``) or a
    Hugging Face hub id (``hf-hub:org/name``). Weights come from ``checkpoint``, else
    ``$LIT_VCE_WEIGHTS_DIR/timm/<name>.{safetensors,pth,pt}``, else timm's own
    download (the Hugging Face hub, its cache read offline under ``HF_HUB_OFFLINE=1``
    or ``LIT_VCE_OFFLINE=1``)."""
    import timm
    from timm.data import resolve_data_config

    hub = name.startswith("hf-hub:")
    if not hub and not timm.is_model(name):
        raise UnknownNameError(f"timm has no model {name!r}{suggest(name, timm.list_models())}")
    local = Path(checkpoint) if checkpoint else None
    if local is None and not hub:
        for ext in ("safetensors", "pth", "pt"):
            cand = weights_dir() / "timm" / f"{name}.{ext}"
            if cand.is_file():
                local = cand
                break
    if local is not None:
        if not local.is_file():
            raise MissingWeightsError(f"timm:{name}: checkpoint {local} does not exist")
        model = timm.create_model(name, pretrained=False, checkpoint_path=str(local))
    else:
        model = _timm_pretrained(name, hub)
    cfg = resolve_data_config({}, model=model)
    size = cfg["input_size"][-1]
    if class_names is None:
        class_names = (
            imagenet_class_names() if model.num_classes == 1000 else [str(i) for i in range(model.num_classes)]
        )
    return ImageClassifier(
        model,
        size,
        class_names,
        mean=cfg["mean"],
        std=cfg["std"],
        resize_size=int(round(size / cfg.get("crop_pct", 1.0))),
        interpolation="bicubic" if cfg.get("interpolation") == "bicubic" else "bilinear",
        name=f"timm:{name}",
        **kwargs,
    )


def _timm_pretrained(name: str, hub: bool):
    """``timm.create_model(name, pretrained=True)`` with a :class:`MissingWeightsError`
    naming where the weights can go when neither the hub (or its cache) nor a URL has them."""
    import timm
    from timm.models._hub import has_hf_hub

    if not has_hf_hub():
        raise MissingWeightsError(
            f"timm:{name}: timm {timm.__version__} cannot use the installed huggingface_hub "
            "(timm.models._hub.has_hf_hub() "
            "is False); install a matching pair (`pip install 'timm>=1.0.22' 'huggingface_hub>=1'`) or give a local "
            "checkpoint"
        )
    where = (
        "the Hugging Face cache ($HF_HOME/hub, filled by `hf download` on a machine online)"
        if hub
        else f"{weights_dir() / 'timm' / (name + '.safetensors')} (or checkpoint=...; $LIT_VCE_WEIGHTS_DIR sets the "
        "folder) "
        "or the Hugging Face cache ($HF_HOME/hub)"
    )
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as e:  # network/hub/cache errors come in many types
        mode = "offline and not cached" if _is_offline() else "could not download the weights"
        raise MissingWeightsError(
            f"timm:{name}: {mode} ({type(e).__name__}: {str(e)[:200]}); put them in {where}"
        ) from e


ROBUSTBENCH_INSTALL = (
    "pip install 'lit_vce[robustbench]' && pip install --no-deps robustbench==1.1.1 "
    "(its timm==1.0.9 pin would break timm's hub loading; docs/getting-started.md, Installation)"
)


def _import_robustbench():
    """Import robustbench 1.1.1, which imports ``autoattack`` while its PyPI
    dependency installs the module as ``pyautoattack``: alias it first."""
    if "robustbench" not in sys.modules:
        import importlib.util

        missing = [
            m for m in ("robustbench", "pyautoattack", "geotorch", "torchdiffeq") if importlib.util.find_spec(m) is None
        ]
        if missing:
            raise MissingDependencyError(f"robustbench models need {', '.join(missing)}: {ROBUSTBENCH_INSTALL}")
        import pyautoattack
        import pyautoattack.state

        sys.modules.setdefault("autoattack", pyautoattack)
        sys.modules.setdefault("autoattack.state", pyautoattack.state)
    import robustbench
    from robustbench import utils

    return robustbench, utils


@CLASSIFIER_FAMILIES.register("robustbench")
def load_robustbench(
    name: str, model_dir: str | None = None, resize_size: int | None = None, **kwargs
) -> ImageClassifier:
    """A robustbench ImageNet model; ``name`` is ``<id>`` or ``<threat model>/<id>``.

    The checkpoint is read from ``{model_dir}/imagenet/{threat}/{id}.pt`` (default
    ``model_dir``: ``$LIT_VCE_WEIGHTS_DIR/robustbench``). Downloads happen only where
    :func:`lit_vce.weights.may_download` allows (a run's fetching process; never offline).
    """
    threat, _, model_id = name.rpartition("/")
    threat = threat or "Linf"
    root = Path(model_dir) if model_dir else weights_dir() / "robustbench"
    path = root / "imagenet" / threat / f"{model_id}.pt"
    _, utils = _import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    table = model_dicts[BenchmarkDataset.imagenet][ThreatModel(threat)]
    if model_id not in table:
        raise UnknownNameError(f"robustbench has no ImageNet {threat} model {model_id!r}{suggest(model_id, table)}")
    if not path.is_file() and not may_download():
        raise MissingWeightsError(
            f"robustbench:{name}: {path} is missing ({no_download_reason()}); download it once or copy it there"
        )
    try:
        model = utils.load_model(model_id, model_dir=str(root), dataset="imagenet", threat_model=threat)
    except Exception as e:
        if path.is_file():
            raise
        raise MissingWeightsError(
            f"robustbench:{name}: could not fetch {path} ({type(e).__name__}: {e}); copy the checkpoint there"
        ) from e
    # robustbench ImageNet models normalise inside (or expect raw [0, 1]): feed [0, 1]
    return ImageClassifier(
        model,
        224,
        imagenet_class_names(),
        resize_size=resize_size or 256,
        interpolation="bicubic",
        name=f"robustbench:{name}",
        **kwargs,
    )


@CLASSIFIER_FAMILIES.register("file")
def load_file(
    name: str,
    arch: str | None = None,
    input_size: int = 224,
    class_names=None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    **kwargs,
) -> ImageClassifier:
    """A local checkpoint: a TorchScript or pickled module, or a state dict for timm ``arch``."""
    path = Path(name)
    if not path.is_file():
        raise MissingWeightsError(f"classifier checkpoint {path} does not exist")
    if arch:
        import timm

        model = timm.create_model(arch, pretrained=False, checkpoint_path=str(path))
    else:
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError:
            model = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(model, torch.nn.Module):
            raise ValueError(
                f"{path} holds a {type(model).__name__}, not a module; pass arch=<timm name> for a state dict"
            )
    k = getattr(model, "num_classes", None)
    if k is None and not class_names:  # e.g. TorchScript: count the outputs
        with torch.no_grad():
            k = int(model.eval()(torch.zeros(1, 3, input_size, input_size)).shape[-1])
    n = class_names or (imagenet_class_names() if (k or 1000) == 1000 else [str(i) for i in range(k)])
    return ImageClassifier(model, input_size, n, mean=mean, std=std, name=f"file:{path.name}", **kwargs)
