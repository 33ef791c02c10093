"""CelebA and CelebA-HQ from local files, as DiME's and ACE's code read them.

**CelebA** (``dataset: celeba``; DiME and ACE at 128 px): ``root`` holds
``img_align_celeba/`` and the annotations either as torchvision writes them
(``list_attr_celeba.txt``, ``list_eval_partition.txt``; ``root/celeba/`` is looked in
too) or as the CSV files DiME's and ACE's loaders read (``list_attr_celeba.csv``,
``list_eval_partition.csv``). Partitions: 0 train, 1 val, 2 test; ACE explains the
``val`` partition (``get_dataset``: ``partition='val'``).

**CelebA-HQ** (``dataset: celebahq``; ACE at 256 px): ``root`` holds
``CelebA-HQ-img/<idx>.jpg``, ``CelebAMask-HQ-attribute-anno.txt``,
``CelebA-HQ-to-CelebA-mapping.txt`` and CelebA's ``list_eval_partition`` (CSV or
TXT): an HQ image's partition is its CelebA original's. ACE explains ``test``.

Images: torchvision's ``Resize(image_size)`` (shorter side, PIL bilinear) then
``CenterCrop(image_size)`` on the PIL image, as the papers' loaders (CelebA's 178x218
files become 128 px, CelebA-HQ's 1024 px files 256 px), values in [0, 1] (ACE's loaders with ``normalize=False``;
the classifiers normalise to [-1, 1] themselves). Labels: the 40 attributes as 0/1
(CelebA's -1 -> 0). A sample's label is the chosen attribute's value.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch
from torch.utils.data import Dataset

#: CelebA's 40 attributes in their file order (index 31 Smiling, 39 Young)
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
)
SPLITS = {"train": 0, "val": 1, "valid": 1, "test": 2}


def attribute_index(attribute: str | int) -> int:
    """The index of a CelebA attribute given by name (``Smiling``, case-insensitive) or index."""
    if isinstance(attribute, int) or str(attribute).isdigit():
        k = int(attribute)
        if not 0 <= k < len(CELEBA_ATTRIBUTES):
            raise ValueError(f"CelebA attribute index {k} is out of range 0..{len(CELEBA_ATTRIBUTES) - 1}")
        return k
    names = {a.lower(): i for i, a in enumerate(CELEBA_ATTRIBUTES)}
    key = str(attribute).lower()
    if key not in names:
        from ..errors import suggest

        raise ValueError(f"unknown CelebA attribute {attribute!r}{suggest(str(attribute), CELEBA_ATTRIBUTES)}")
    return names[key]


def _find(root: Path, *names: str) -> Path:
    for base in (root, root / "celeba", root / "Anno", root / "Eval"):
        for n in names:
            if (base / n).is_file():
                return base / n
    raise FileNotFoundError(f"{root}: none of {', '.join(names)} found (nor under celeba/, Anno/, Eval/)")


def _read_attribute_table(path: Path) -> tuple[list[str], torch.Tensor]:
    """(file names, (N, 40) 0/1 labels) of a CelebA-style attribute file: the CSV of DiME/ACE
    (``image_id,<40 names>``) or the text layout (a count line, a names line, then rows)."""
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        header, body = rows[0], [r for r in rows[1:] if r]
        names = header[1:]
        files = [r[0] for r in body]
        values = [[int(v) for v in r[1:]] for r in body]
    else:
        lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
        names = lines[1]
        files = [ln[0] for ln in lines[2:]]
        values = [[int(v) for v in ln[1:]] for ln in lines[2:]]
    if [n.lower() for n in names] != [a.lower() for a in CELEBA_ATTRIBUTES]:
        raise ValueError(f"{path}: its attribute columns are not CelebA's 40 ({names[:3]} ...)")
    bad = [f for f, v in zip(files, values) if len(v) != len(names)]
    if bad:
        raise ValueError(f"{path}: {len(bad)} rows without 40 values (first: {bad[0]})")
    labels = torch.tensor(values, dtype=torch.long).clamp_min(0)  # -1 -> 0, as DiME's and ACE's loaders
    return files, labels


def _read_partitions(root: Path) -> dict[str, int]:
    path = _find(root, "list_eval_partition.csv", "list_eval_partition.txt")
    out: dict[str, int] = {}
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                out[row["image_id"]] = int(row["partition"])
    else:
        for ln in path.read_text().splitlines():
            if ln.strip():
                name, part = ln.split()[:2]
                out[name] = int(part)
    return out


def read_annotations(root: str | Path, hq: bool = False) -> tuple[list[str], torch.Tensor, list[int]]:
    """(image paths relative to ``root``, (N, 40) labels, partitions) of CelebA or CelebA-HQ."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{'CelebA-HQ' if hq else 'CelebA'} root {root} is not a folder")
    parts = _read_partitions(root)
    if not hq:
        files, labels = _read_attribute_table(_find(root, "list_attr_celeba.csv", "list_attr_celeba.txt"))
        folder = "img_align_celeba"
        base = root / "celeba" if (root / "celeba" / folder).is_dir() and not (root / folder).is_dir() else root
        prefix = base.relative_to(root) / folder
        missing = [f for f in files if f not in parts]
        if missing:
            raise ValueError(f"{root}: {len(missing)} images have no partition (first: {missing[0]})")
        return [str(prefix / f) for f in files], labels, [parts[f] for f in files]
    files, labels = _read_attribute_table(_find(root, "CelebAMask-HQ-attribute-anno.txt"))
    mapping: dict[int, str] = {}
    for ln in _find(root, "CelebA-HQ-to-CelebA-mapping.txt").read_text().splitlines()[1:]:
        cols = ln.split()
        if len(cols) >= 3:
            mapping[int(cols[0])] = cols[2]
    out_parts = []
    for f in files:
        idx = int(Path(f).stem)
        if idx not in mapping or mapping[idx] not in parts:
            raise ValueError(f"{root}: CelebA-HQ image {f} has no CelebA original with a partition")
        out_parts.append(parts[mapping[idx]])
    return [str(Path("CelebA-HQ-img") / f) for f in files], labels, out_parts


def attribute_correlations(root: str | Path, query: int, hq: bool = False) -> list[float]:
    """Each attribute's Pearson correlation with ``query`` over the training partition's
    labels (ACE's ``compute_CD.get_correlations``; a constant column gives NaN there and 0 here,
    as its per-sample correlations do)."""
    _, labels, parts = read_annotations(root, hq)
    train = labels[torch.tensor(parts) == 0].double()
    if len(train) < 2:
        raise ValueError(f"{root}: the training partition has {len(train)} images; CD's correlations need at least 2")
    q = train[:, query]
    out = []
    for j in range(train.shape[1]):
        c = float(torch.corrcoef(torch.stack([q, train[:, j]]))[0, 1])
        out.append(0.0 if math.isnan(c) else round(c, 10))
    return out


class CelebAFaces(Dataset):
    """CelebA (``hq=False``) or CelebA-HQ images of one partition with one attribute as the label.

    Items as :class:`~lit_vce.data.imagenet.ImageFolderDataset`'s: ``image`` (3, S, S) in
    [0, 1], ``label`` (the attribute's 0/1), ``sample_id`` (the file name), ``error`` (an
    unreadable file is a recorded failure, its image zeros)."""

    def __init__(
        self,
        root: str | Path,
        attribute: str | int = "Smiling",
        split: str = "val",
        image_size: int = 128,
        hq: bool = False,
        num_images: int | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        self.root, self.hq, self.image_size = Path(root), hq, int(image_size)
        self.attribute = attribute_index(attribute)
        files, labels, parts = read_annotations(root, hq)
        keep = [i for i, p in enumerate(parts) if p == SPLITS[split]]
        if num_images is not None:
            keep = keep[:num_images]
        if not keep:
            raise ValueError(f"{root}: the {split!r} partition has no images")
        self.files = [files[i] for i in keep]
        self.labels = labels[keep]
        self.classes = [f"not {CELEBA_ATTRIBUTES[self.attribute]}", CELEBA_ATTRIBUTES[self.attribute]]

    def __len__(self) -> int:
        return len(self.files)

    def label(self, i: int) -> int:
        return int(self.labels[i, self.attribute])

    def __getitem__(self, i: int) -> dict:
        from PIL import Image
        from torchvision.transforms import functional as TF

        sid = Path(self.files[i]).name
        try:
            with Image.open(self.root / self.files[i]) as im:  # torchvision's Resize + CenterCrop on PIL, as the papers
                im = TF.center_crop(TF.resize(im.convert("RGB"), self.image_size), [self.image_size] * 2)
                img, error = TF.pil_to_tensor(im).float() / 255.0, ""
        except Exception as e:  # PIL raises many types for corrupt files
            img, error = torch.zeros(3, self.image_size, self.image_size), f"unreadable image: {type(e).__name__}: {e}"
        return {"image": img, "label": self.label(i), "sample_id": sid, "error": error}
