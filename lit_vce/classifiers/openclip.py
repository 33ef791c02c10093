"""open_clip zero-shot classifiers (``openclip:<arch>/<tag>``, ``openclip:hf-hub:org/name``):
the image tower with a head of class-name prompts, cached per model, class names and
templates under ``$LIT_VCE_WEIGHTS_DIR/openclip_heads/``."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import MissingDependencyError, MissingWeightsError, UnknownNameError, suggest
from ..progress import progress_enabled
from ..registry import CLASSIFIER_FAMILIES
from ..weights import is_offline as _is_offline
from ..weights import weights_dir
from .base import ImageClassifier


class _ZeroShotCLIP(torch.nn.Module):
    def __init__(self, model, weights: torch.Tensor):
        super().__init__()
        self.clip = model
        self.register_buffer("weights", weights)

    def forward(self, x):
        feats = self.clip.encode_image(x, normalize=True)
        return self.clip.logit_scale.exp() * feats @ self.weights


@CLASSIFIER_FAMILIES.register("openclip")
def load_openclip(
    name: str, class_names=None, templates=None, model_kwargs: dict | None = None, head_cache: bool = True, **kwargs
) -> ImageClassifier:
    """open_clip as a zero-shot classifier over ``class_names`` (default ImageNet's, with
    the 80 OpenAI templates).

    ``name`` is ``<arch>/<pretrained>`` (``RN50/openai``, ``ViT-B-32/laion2b_s34b_b79k``,
    or ``<arch>/<local checkpoint file>``), or a hub id ``hf-hub:org/name``. Weights:
    ``$LIT_VCE_WEIGHTS_DIR/openclip/<arch>/<pretrained>.{safetensors,bin,pt}`` first,
    else open_clip's own download (its Hugging Face cache is read offline). The
    zero-shot head (one text embedding per class, averaged over templates) is
    cached under ``$LIT_VCE_WEIGHTS_DIR/openclip_heads/``, keyed by the model, the
    class names and the templates (``head_cache=False`` rebuilds it)."""
    try:
        import open_clip
    except ImportError as e:
        raise MissingDependencyError(
            f"openclip classifiers need open_clip_torch ({e}): pip install 'lit_vce[openclip]'"
        ) from e
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    arch, pretrained = (name, None) if name.startswith("hf-hub:") else name.partition("/")[::2]
    if not arch:
        raise ValueError(f"openclip:{name}: the spec is openclip:<arch>/<pretrained> or openclip:hf-hub:<org>/<name>")
    if not arch.startswith("hf-hub:") and arch not in open_clip.list_models():
        raise UnknownNameError(f"open_clip has no architecture {arch!r}{suggest(arch, open_clip.list_models())}")
    tag = pretrained or None
    pretrained = _openclip_weights(name, arch, tag)
    model_kwargs = dict(model_kwargs or {})
    if tag is not None and "force_quick_gelu" not in model_kwargs and _needs_quick_gelu(open_clip, arch, tag):
        # OpenAI's CLIP was trained with QuickGELU; open_clip's plain configs use GELU and only warn
        # (from its hub cache) or say nothing (from a local file) when OpenAI weights go into them
        model_kwargs["force_quick_gelu"] = True
    try:
        model = open_clip.create_model(arch, pretrained=pretrained, **model_kwargs)
    except Exception as e:  # RuntimeError for unknown tags; OSError/hub errors when a download fails
        mode = "offline and not cached" if _is_offline() else "could not load the weights"
        raise MissingWeightsError(
            f"openclip:{name}: {mode} ({type(e).__name__}: {str(e)[:200]}); put the checkpoint at "
            f"{weights_dir() / 'openclip' / arch / ((pretrained or 'NAME') + '.safetensors')} or in the Hugging Face "
            "cache ($HF_HOME/hub), or pass <arch>/<file>"
        ) from e
    names = list(class_names or IMAGENET_CLASSNAMES)
    texts = [t if isinstance(t, str) else t("{}") for t in (templates or OPENAI_IMAGENET_TEMPLATES)]
    cacheable = head_cache and (pretrained is not None or arch.startswith("hf-hub:"))  # random weights: nothing to key
    weights = zero_shot_head(
        model, open_clip.get_tokenizer(arch), names, texts, key=(name, pretrained, model_kwargs) if cacheable else None
    )
    cfg = model.visual.preprocess_cfg if hasattr(model.visual, "preprocess_cfg") else {}
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return ImageClassifier(
        _ZeroShotCLIP(model, weights),
        size,
        names,
        mean=cfg.get("mean", open_clip.OPENAI_DATASET_MEAN),
        std=cfg.get("std", open_clip.OPENAI_DATASET_STD),
        interpolation="bicubic",
        name=f"openclip:{name}",
        **kwargs,
    )


def _needs_quick_gelu(open_clip, arch: str, tag: str) -> bool:
    """Whether weights ``tag`` of ``arch`` were trained with QuickGELU (OpenAI's CLIP, and any tag
    open_clip's registry marks so), while the architecture's config uses GELU."""
    if arch.endswith("-quickgelu") or arch.startswith("hf-hub:"):
        return False
    cfg = {}
    try:
        cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
    except Exception:  # unknown arch/tag (a local file): judged by the tag's name
        cfg = {}
    return bool(cfg.get("quick_gelu", False)) or Path(tag).stem == "openai"


def _openclip_weights(name: str, arch: str, pretrained: str | None) -> str | None:
    """A local file for ``pretrained`` when there is one, else the tag as given."""
    if pretrained is None:
        return None
    if Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors"):
        if not Path(pretrained).is_file():
            raise MissingWeightsError(f"openclip:{name}: checkpoint {pretrained} does not exist")
        return pretrained
    for ext in ("safetensors", "bin", "pt"):
        cand = weights_dir() / "openclip" / arch / f"{pretrained}.{ext}"
        if cand.is_file():
            return str(cand)
    return pretrained


def zero_shot_head(model, tokenizer, class_names: list[str], templates: list[str], key=None) -> torch.Tensor:
    """The (d, K) zero-shot weights (open_clip's ``build_zero_shot_classifier``: per
    class the normalised mean of the normalised text embeddings of
    ``template.format(name)``). With ``key`` (anything that identifies the weights:
    spec, checkpoint, overrides) the result is cached on disk, keyed by ``key``,
    ``class_names`` and ``templates``; a cached head is only reused for exactly those."""
    import hashlib
    import json

    from safetensors.torch import load_file, save

    path = None
    if key is not None:
        blob = json.dumps([repr(key), class_names, templates], sort_keys=True).encode()
        path = weights_dir() / "openclip_heads" / f"{hashlib.sha256(blob).hexdigest()[:24]}.safetensors"
        if path.is_file():
            return load_file(str(path))["weights"]
    import open_clip

    with torch.no_grad():
        weights = open_clip.build_zero_shot_classifier(
            model,
            tokenizer,
            class_names,
            templates,
            num_classes_per_batch=50,
            device="cpu",
            use_tqdm=len(class_names) >= 50 and progress_enabled(),
        )
    weights = weights.float().contiguous()
    if path is not None:
        from ..io import atomic_write_bytes

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save({"weights": weights}))  # concurrent ranks never read a half-written head
    return weights
