"""Target protocols: which target class each explained image gets.

- ``fixed``: one target class for every image (images of that class are left out);
- ``pairs``: ``[[source, target], ...]``: only images of a listed source, each
  to its paired target (ImageNet hard pairs: zebra 340 <-> sorrel 339, ...);
- ``wordnet_closest``: the WordNet-closest other class (ImageNet, LCH similarity);
- ``ldce``: the LDCE all-class list: each ImageNet val image (by its index in
  the full val folder's order) has one target among the 4 WordNet-closest
  classes of its class (use ``images_per_class=10`` for the 10,000-image set);
- ``digin``: DiG-IN's list: the ImageNet val images (by index in the full val folder's
  order) of the official ``inet_vce_idcs.py``, each to every other class of its class's
  cluster in the official ``in_hierarchy`` (images of a class in no cluster are skipped,
  as the official script skips them);
- ``cluster``: WordNet clusters (maximal subtrees with 3-10 ImageNet classes):
  one VCE per other class of the image's cluster;
- ``misclassified``: error analysis: images the explained classifier gets
  wrong, with the true label as target (the classifier's prediction becomes
  the source; correctly classified images are left out at predict time);
- ``flip_prediction``: binary classifiers (CelebA's smile and age): every image to
  the opposite of the explained classifier's prediction, as DiME and ACE do
  (``target = 1 - pred``); each image is listed with both targets and the one equal
  to the prediction is left out at predict time;
- ``random``: a uniformly random other class, drawn from (seed, sample id);
- ``next``: class ``(source + 1) mod C`` (handy for small worlds).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..rngs import sample_seed

PROTOCOLS = (
    "fixed",
    "pairs",
    "wordnet_closest",
    "ldce",
    "digin",
    "cluster",
    "misclassified",
    "flip_prediction",
    "random",
    "next",
)
#: protocols whose selection depends on the explained classifier (applied per batch: :func:`select_by_classifier`)
CLASSIFIER_PROTOCOLS = ("misclassified", "flip_prediction")
IMAGENET_ONLY = ("wordnet_closest", "ldce", "digin", "cluster")
#: protocols that list images by their index in the full ImageNet val folder
INDEXED = ("ldce", "digin")

IMAGENET_HARD_PAIRS = [[340, 339], [339, 340], [293, 286], [286, 293], [285, 283], [283, 285]]


def validate_protocol(
    protocol: str, num_classes: int, target: int | None = None, pairs: Sequence[Sequence[int]] | None = None
) -> None:
    """Raise a clear ``ValueError`` for a protocol that cannot run (before any work)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown target protocol {protocol!r}; choose one of {PROTOCOLS}")
    if protocol == "fixed":
        if target is None:
            raise ValueError("protocol 'fixed' needs target=<class id>")
        if not 0 <= int(target) < num_classes:
            raise ValueError(f"unknown class id {target}: the classifier has classes 0..{num_classes - 1}")
    if protocol == "pairs":
        if not pairs:
            raise ValueError("protocol 'pairs' needs pairs=[[source, target], ...]")
        for pair in pairs:
            if len(pair) != 2:
                raise ValueError(f"a pair must be [source, target], got {pair}")
            s, t = int(pair[0]), int(pair[1])
            for c in (s, t):
                if not 0 <= c < num_classes:
                    raise ValueError(f"unknown class id {c} in pair {list(pair)}: classes are 0..{num_classes - 1}")
            if s == t:
                raise ValueError(f"pair {list(pair)}: the target equals the source")
    if protocol in IMAGENET_ONLY and num_classes != 1000:
        raise ValueError(f"protocol {protocol!r} needs the 1000 ImageNet classes")
    if protocol == "flip_prediction" and num_classes != 2:
        raise ValueError(f"protocol 'flip_prediction' is for binary classifiers (2 classes), got {num_classes}")
    if protocol in ("random", "next") and num_classes < 2:
        raise ValueError("at least two classes are needed")


def assign_target(
    protocol: str,
    source: int,
    sample_id: str,
    num_classes: int,
    seed: int = 0,
    target: int | None = None,
    pairs: Sequence[Sequence[int]] | None = None,
    index: int | None = None,
) -> list[int]:
    """The target classes of one image (empty: the image is not explained).

    ``index`` is the image's position in the full ImageNet val folder (``ldce`` and ``digin``)."""
    if protocol == "fixed":
        return [] if source == int(target) else [int(target)]
    if protocol == "pairs":
        return [int(t) for s, t in pairs if int(s) == source]
    if protocol == "wordnet_closest":
        from .imagenet import closest_classes

        return [closest_classes()[source][0]]
    if protocol == "ldce":
        from .imagenet import ldce_val_targets

        if index is None or index not in ldce_val_targets():
            raise ValueError(
                f"protocol 'ldce' has no target for image index {index} (it needs the 50,000-image val folder)"
            )
        return [ldce_val_targets()[index]]
    if protocol == "digin":
        from .imagenet import digin_vce_targets

        if index not in digin_vce_targets():
            return []
        start, targets = digin_vce_targets()[index]
        if start != source:
            raise ValueError(
                f"protocol 'digin' lists val image {index} as class {start}, the folder has it as class {source}: "
                "give the ImageNet val folder in synset subfolders (ImageFolder order)"
            )
        return targets
    if protocol == "cluster":
        from .imagenet import cluster_targets

        return list(cluster_targets().get(source, []))
    if protocol == "misclassified":
        return [source]  # the true label; the explained classifier's prediction becomes the source at predict time
    if protocol == "flip_prediction":
        return [0, 1]  # the one equal to the prediction is dropped at predict time
    if protocol == "random":
        r = sample_seed(seed, f"target:{sample_id}") % (num_classes - 1)
        return [r if r < source else r + 1]
    if protocol == "next":
        return [(source + 1) % num_classes]
    raise ValueError(f"unknown target protocol {protocol!r}")


@torch.no_grad()
def select_by_classifier(
    protocol: str, images: torch.Tensor, source: torch.Tensor, classifier, target: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The part of a protocol that needs the explained classifier, for a batch of images:
    (keep (N,) bool, source (N,)). ``misclassified`` keeps the images the classifier gets
    wrong, with its prediction as the source (the target stays the true label);
    ``flip_prediction`` keeps the entries whose ``target`` differs from the prediction, with the
    prediction as the source; the other protocols keep every image as it is."""
    if protocol not in CLASSIFIER_PROTOCOLS:
        return torch.ones(len(images), dtype=torch.bool, device=images.device), source
    pred = classifier(images).argmax(1).to(source.device)
    if protocol == "flip_prediction":
        if target is None:
            raise ValueError("protocol 'flip_prediction' selects by the target: pass target=")
        return pred != target.to(source.device), pred
    return pred != source, torch.where(pred != source, pred, source)


def keep_unreadable(protocol: str, source: int, target: int) -> bool:
    """Whether an entry whose image cannot be read is recorded as a failed sample: once per
    image, so ``flip_prediction`` keeps the entry a prediction equal to the label would keep
    (target = 1 - label) and leaves the other out; other protocols keep every entry."""
    return target != source if protocol == "flip_prediction" else True
