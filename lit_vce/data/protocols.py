"""Target protocols: which target class each explained image gets.

- ``fixed``: one target class for every image (images of that class are left out);
- ``pairs``: ``[[source, target], ...]``: only images of a listed source, each
  to its paired target (ImageNet hard pairs: zebra 340 <-> sorrel 339, ...);
- ``wordnet_closest``: the WordNet-closest other class (ImageNet, LCH similarity);
- ``random``: a uniformly random other class, drawn from (seed, sample id);
- ``next``: class ``(source + 1) mod C`` (handy for small worlds).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..generators.noise import sample_seed

PROTOCOLS = ("fixed", "pairs", "wordnet_closest", "random", "next")

IMAGENET_HARD_PAIRS = [[340, 339], [339, 340], [293, 286], [286, 293], [285, 283], [283, 285]]


def validate_protocol(protocol: str, num_classes: int, target: int | None = None, pairs: Sequence[Sequence[int]] | None = None) -> None:
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
    if protocol == "wordnet_closest" and num_classes != 1000:
        raise ValueError("protocol 'wordnet_closest' needs the 1000 ImageNet classes")
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
) -> list[int]:
    """The target classes of one image (empty: the image is not explained)."""
    if protocol == "fixed":
        return [] if source == int(target) else [int(target)]
    if protocol == "pairs":
        return [int(t) for s, t in pairs if int(s) == source]
    if protocol == "wordnet_closest":
        from .imagenet import closest_classes

        return [closest_classes()[source][0]]
    if protocol == "random":
        r = sample_seed(seed, f"target:{sample_id}") % (num_classes - 1)
        return [r if r < source else r + 1]
    if protocol == "next":
        return [(source + 1) % num_classes]
    raise ValueError(f"unknown target protocol {protocol!r}")
