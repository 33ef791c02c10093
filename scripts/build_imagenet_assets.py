"""Rebuild ``lit_vce/assets/imagenet/`` from the LDCE / ImageNet devkit data files.

    python scripts/build_imagenet_assets.py ../shared/data/imagenet

Copies the small files as they are and derives the WordNet subset the package
needs: the hypernym edges among the ancestors of the 1000 ImageNet synsets
(``wordnet_is_a.txt``) and their words (``wordnet_words.txt``); 4 MB of full
WordNet become about 100 kB.
"""

from __future__ import annotations

import shutil
import sys
from collections import defaultdict
from pathlib import Path

import yaml

COPIED = ("index_synset.yaml", "imagenet_clsidx_to_label.txt", "synset_closest_idx.yaml", "image_idx_to_tgt.yaml",
          "LICENSE-ldce.txt")


def main(src: str, dst: str | None = None) -> None:
    src_dir = Path(src)
    out = Path(dst) if dst else Path(__file__).resolve().parents[1] / "lit_vce" / "assets" / "imagenet"
    out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        shutil.copyfile(src_dir / name, out / name)
    classes = set(yaml.safe_load((src_dir / "index_synset.yaml").read_text()).values())
    parents: dict[str, set[str]] = defaultdict(set)
    for line in (src_dir / "wordnet.is_a.txt").read_text().splitlines():
        if line.strip():
            p, c = line.split()
            parents[c].add(p)
    keep, stack = set(), list(classes)
    while stack:
        n = stack.pop()
        if n not in keep:
            keep.add(n)
            stack.extend(parents[n])
    edges = sorted((p, c) for c in keep for p in parents[c] if p in keep)
    (out / "wordnet_is_a.txt").write_text("".join(f"{p} {c}\n" for p, c in edges))
    words = [line for line in (src_dir / "words.txt").read_text().splitlines() if line.split("\t", 1)[0] in keep]
    (out / "wordnet_words.txt").write_text("\n".join(words) + "\n")
    print(f"{len(keep)} synsets, {len(edges)} hypernym edges -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
