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

COPIED = ("imagenet_clsidx_to_label.txt", "synset_closest_idx.yaml", "image_idx_to_tgt.yaml", "LICENSE-ldce.txt")
#: corrections to LDCE's index_synset.yaml: 51 classes carry another sense of their name (class 8
#: hen: n07646067, the meat, for n01514859, the bird; class 134 crane: class 517's n03126707), so a
#: real val folder's synsets did not all match. ILSVRC's class indices are its synsets in sorted
#: order: each fix is the synset between its class's neighbours whose words hold the class name
#: (36 unique that way), the 15 ambiguous ones checked against ILSVRC's synset_words list.
SYNSET_FIXES = {
    8: "n01514859",
    21: "n01608432",
    78: "n01776313",
    85: "n01806567",
    86: "n01807496",
    99: "n01855672",
    114: "n01945685",
    134: "n02012849",
    151: "n02085620",
    308: "n02190166",
    309: "n02206856",
    337: "n02363005",
    356: "n02441942",
    357: "n02442845",
    360: "n02444819",
    390: "n02526121",
    411: "n02730930",
    462: "n02906734",
    488: "n02999410",
    516: "n03125729",
    538: "n03220513",
    542: "n03250847",
    549: "n03291819",
    578: "n03450230",
    595: "n03496892",
    599: "n03530642",
    616: "n03627232",
    624: "n03661043",
    666: "n03786901",
    677: "n03804744",
    692: "n03871628",
    698: "n03877845",
    733: "n03976657",
    743: "n04005630",
    748: "n04026417",
    753: "n04040759",
    758: "n04067472",
    784: "n04154565",
    816: "n04277352",
    819: "n04296562",
    843: "n04371774",
    908: "n04592741",
    913: "n04606251",
    923: "n07579787",
    939: "n07716358",
    940: "n07716906",
    941: "n07717410",
    947: "n07734744",
    949: "n07745940",
    950: "n07747607",
    968: "n07930864",
}


def main(src: str, dst: str | None = None) -> None:
    src_dir = Path(src)
    out = Path(dst) if dst else Path(__file__).resolve().parents[1] / "lit_vce" / "assets" / "imagenet"
    out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        shutil.copyfile(src_dir / name, out / name)
    table = {**yaml.safe_load((src_dir / "index_synset.yaml").read_text()), **SYNSET_FIXES}
    order = [table[i] for i in range(1000)]
    assert len(set(order)) == 1000 and order == sorted(order), "index_synset.yaml: not ILSVRC's sorted synsets"
    (out / "index_synset.yaml").write_text("".join(f"{i}: {table[i]}\n" for i in sorted(table)))
    classes = set(table.values())
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
