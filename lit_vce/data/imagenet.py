"""ImageNet metadata (shipped as package data) and an ImageFolder-style dataset that
turns unreadable images into recorded per-sample failures instead of crashes."""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import Dataset

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "imagenet"
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG")


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names (first synonym of each class)."""
    table = ast.literal_eval("{" + (ASSETS / "imagenet_clsidx_to_label.txt").read_text().strip().strip("{}") + "}")
    return [table[i].split(",")[0].strip() for i in range(1000)]


@functools.lru_cache(maxsize=1)
def closest_classes() -> dict[int, list[int]]:
    """Class index -> its 4 WordNet-closest other classes (LCH similarity), closest first."""
    return {
        int(k): [int(x) for x in v] for k, v in yaml.safe_load((ASSETS / "synset_closest_idx.yaml").read_text()).items()
    }


@functools.lru_cache(maxsize=1)
def ldce_val_targets() -> dict[int, int]:
    """Validation image index (ImageFolder order) -> the LDCE all-class target."""
    return {int(k): int(v) for k, v in yaml.safe_load((ASSETS / "image_idx_to_tgt.yaml").read_text()).items()}


@functools.lru_cache(maxsize=1)
def digin_vce_targets() -> dict[int, tuple[int, list[int]]]:
    """DiG-IN's ImageNet VCE list: val image index (ImageFolder order) -> (start class, targets).

    From the official ``inet_vce_idcs.py`` (every target ``None``) with the rule of
    ``uvces_imagenet.py``'s ``fill_img_idcs``: a ``None`` target becomes every other class of
    the first ``in_hierarchy`` cluster that lists the start class; an image whose start class is
    in no cluster is skipped there and gets no targets here (``assets/imagenet/digin_vce_list.yaml``).
    """
    data = yaml.safe_load((ASSETS / "digin_vce_list.yaml").read_text())
    clusters = list(data["clusters"].values())
    out = {}
    for index, start in data["images"]:
        cluster = next((c for c in clusters if start in c), [])
        out[int(index)] = (int(start), [int(t) for t in cluster if t != start])
    return out


@functools.lru_cache(maxsize=1)
def imagenet_synsets() -> list[str]:
    """The WordNet synset id of each ImageNet class index."""
    table = yaml.safe_load((ASSETS / "index_synset.yaml").read_text())
    return [table[i] for i in range(1000)]


CLUSTER_SIZES = (3, 10)
CLUSTER_MIN_DEPTH = 5


@functools.lru_cache(maxsize=1)
def wordnet_clusters() -> list[tuple[str, tuple[int, ...]]]:
    """WordNet clusters of ImageNet classes: (synset id, its ImageNet classes).

    WordNet is a DAG (a synset may have several hypernyms); each synset is kept
    under its deepest hypernym, which makes a tree in which the specific taxonomy
    wins (a Persian cat stays a cat). A cluster is a maximal subtree with 3 to 10
    ImageNet classes whose root lies at depth >= 5 (the abstract top levels,
    such as "attribute" or "group", collect unrelated classes and are left out).
    Identical class sets count once.
    """
    from collections import defaultdict

    index = {wn: i for i, wn in enumerate(imagenet_synsets())}
    parents: dict[str, list[str]] = defaultdict(list)
    for line in (ASSETS / "wordnet_is_a.txt").read_text().splitlines():
        if line.strip():
            parent, child = line.split()
            parents[child].append(parent)
    depth: dict[str, int] = {}

    def depth_of(node: str) -> int:  # longest path from the root
        if node not in depth:
            depth[node] = 1 + max((depth_of(p) for p in parents.get(node, ())), default=-1)
        return depth[node]

    children: dict[str, list[str]] = defaultdict(list)
    for child, ps in list(parents.items()):
        children[max(ps, key=lambda p: (depth_of(p), p))].append(child)
    below: dict[str, frozenset[int]] = {}

    def classes_below(node: str) -> frozenset[int]:
        if node not in below:
            found = {index[node]} if node in index else set()
            for c in children.get(node, ()):
                found |= classes_below(c)
            below[node] = frozenset(found)
        return below[node]

    lo, hi = CLUSTER_SIZES
    by_set: dict[frozenset[int], str] = {}
    for node in sorted(set(parents) | set(children)):
        found = classes_below(node)
        if lo <= len(found) <= hi:
            by_set.setdefault(found, node)
    maximal = [
        (node, s)
        for s, node in by_set.items()
        if not any(s < t for t in by_set) and depth_of(node) >= CLUSTER_MIN_DEPTH
    ]
    return sorted((node, tuple(sorted(s))) for node, s in maximal)


@functools.lru_cache(maxsize=1)
def cluster_targets() -> dict[int, list[int]]:
    """Class index -> every other class of its WordNet cluster(s) (classes in none are absent)."""
    out: dict[int, set[int]] = {}
    for _, classes in wordnet_clusters():
        for c in classes:
            out.setdefault(c, set()).update(t for t in classes if t != c)
    return {c: sorted(ts) for c, ts in sorted(out.items())}


@functools.lru_cache(maxsize=1)
def synset_words() -> dict[str, str]:
    """WordNet words of the ImageNet classes' ancestors (synset id -> words)."""
    out = {}
    for line in (ASSETS / "wordnet_words.txt").read_text().splitlines():
        if "\t" in line:
            wn, words = line.split("\t", 1)
            out[wn] = words
    return out


def _load_image(path: Path, size: int | None, mask: bool = False) -> torch.Tensor:
    """An image (3, H, W) in [0, 1], or with ``mask`` a binary mask (1, H, W) (foreground:
    pixels above half intensity), shorter side resized to ``size`` and centre-cropped."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    with Image.open(path) as im:
        return resize_crop(pil_to_tensor(im.convert("L" if mask else "RGB")).float() / 255.0, size, mask)


def resize_crop(x: torch.Tensor, size: int | None, mask: bool = False) -> torch.Tensor:
    """An image (C, H, W) in [0, 1] with its shorter side resized to ``size`` and
    centre-cropped (``None``: as it is); with ``mask`` nearest resizing and binarised."""
    if size is not None:
        # shorter side to `size`, centre crop (the usual 256px VCE protocol)
        h, w = x.shape[-2:]
        s = size / min(h, w)
        nh, nw = max(size, round(h * s)), max(size, round(w * s))
        if (nh, nw) != (h, w):
            if mask:
                x = F.interpolate(x[None], size=(nh, nw), mode="nearest")[0]
            else:
                x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0].clamp(
                    0, 1
                )
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[:, top : top + size, left : left + size]
    if mask:
        x = (x > 0.5).float()
    return x.contiguous()


def read_captions(path: str | Path) -> dict[str, str]:
    """``file -> caption`` from a CSV with columns ``file`` and ``caption``."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file {path} does not exist")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"file", "caption"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"captions file {path} lacks column(s) {sorted(missing)} (expected file,caption)")
        return {row["file"].strip(): row["caption"].strip() for row in reader}


def _norm(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def folder_labels_by_name(folders: list[str], class_names: list[str], root: Path | str = "") -> list[int]:
    """The classifier's class index of each folder, matched by name (case, ``_``/``-``/space
    insensitive); a folder that names no class is an error naming it."""
    index = {}
    for i, n in enumerate(class_names):
        index.setdefault(_norm(n), i)
    unknown = [f for f in folders if _norm(f) not in index]
    if unknown:
        shown = ", ".join(repr(n) for n in class_names[:8])
        raise ValueError(
            f"class folder(s) {unknown[:5]} under {root} name no class of the classifier "
            f"({len(class_names)} classes: {shown}{', ...' if len(class_names) > 8 else ''}); rename them, "
            "use ImageNet synset ids, or --data.class_index sorted for the sorted folder order"
        )
    return [index[_norm(f)] for f in folders]


class ImageFolderDataset(Dataset):
    """An ImageFolder layout (``root/<class folder>/<image>``); class index = sorted folder order.

    Each item: ``image`` (3, size, size) in [0, 1], ``label``, ``sample_id`` (the
    relative path, stable across runs) and ``error`` ("" or why the image could
    not be read; the image is then all zeros and the sample is recorded as failed).

    Args:
        root: the folder.
        image_size: shorter side resize + centre crop (default 256).
        images_per_class: keep only the first N images of every class (sorted by name).
        classes: restrict to these class indices (of the full sorted folder list).
        class_index: ``"auto"``: when every folder is named by an ImageNet synset id
            (``n01440764``), labels are ImageNet class indices, so a folder with a few
            ImageNet classes keeps their ids; otherwise, with ``class_names`` (the
            classifier's), each folder's label is the class it names (an unknown
            folder name is an error); else the sorted folder order.
            ``"sorted"``: always the sorted folder order.
        class_names: the explained classifier's class names (the CLI passes them).
        captions: a CSV with columns ``file`` (the path relative to ``root``, e.g.
            ``n03445777/ILSVRC2012_val_00000001.JPEG``) and ``caption``; items then carry
            ``caption`` ("" for files it does not list). Text-conditioned methods
            (DiG-IN on Stable Diffusion) switch the class word inside it.
        masks: a folder of foreground masks mirroring ``root`` (``<class folder>/<image
            stem>.png``, white = object); items then carry ``mask`` (1, size, size),
            cropped like the image. A missing or unreadable mask fails that sample.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int = 256,
        images_per_class: int | None = None,
        classes: list[int] | None = None,
        class_index: str = "auto",
        captions: str | Path | None = None,
        masks: str | Path | None = None,
        class_names: list[str] | None = None,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.class_folders = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.class_folders:
            raise ValueError(f"{self.root} holds no class folders (expected root/<class>/<image>)")
        if class_index not in ("auto", "sorted"):
            raise ValueError("class_index must be 'auto' or 'sorted'")
        synsets = {wn: i for i, wn in enumerate(imagenet_synsets())}
        self.imagenet_labels = class_index == "auto" and all(f in synsets for f in self.class_folders)
        self.named_labels = False
        if self.imagenet_labels and class_names and list(class_names) != imagenet_class_names():
            # synset folders for a classifier of other classes: its classes by ImageNet name, or an error
            # (ImageNet ids read as another classifier's classes would explain a tench as a circle)
            names = imagenet_class_names()
            try:
                label_of = folder_labels_by_name(
                    [names[synsets[f]] for f in self.class_folders], list(class_names), self.root
                )
            except ValueError:
                shown = ", ".join(f"{f} ({names[synsets[f]]})" for f in self.class_folders[:4])
                raise ValueError(
                    f"the class folders under {self.root} are ImageNet synsets ({shown}"
                    f"{', ...' if len(self.class_folders) > 4 else ''}), but the classifier has other classes "
                    f"({', '.join(map(repr, list(class_names)[:6]))}{', ...' if len(class_names) > 6 else ''}): "
                    "explain them with an ImageNet classifier"
                ) from None
            self.imagenet_labels, self.named_labels = False, True
        elif self.imagenet_labels:
            label_of = [synsets[f] for f in self.class_folders]
        elif class_index == "auto" and class_names:
            label_of = folder_labels_by_name(self.class_folders, class_names, self.root)
            self.named_labels = True
        else:
            label_of = list(range(len(self.class_folders)))
        self.full_imagenet = self.imagenet_labels and len(self.class_folders) == 1000
        self.image_size = image_size
        wanted = set(range(len(self.class_folders))) if classes is None else set(classes)
        bad = sorted(c for c in wanted if not 0 <= c < len(self.class_folders))
        if bad:
            raise ValueError(f"class ids {bad} are outside [0, {len(self.class_folders)})")
        self.items: list[tuple[str, int, int]] = []  # (relative path, label, global index in full ImageFolder order)
        index = 0
        for label, folder in enumerate(self.class_folders):
            files = sorted(p for p in (self.root / folder).iterdir() if p.suffix in IMG_EXTENSIONS)
            for j, p in enumerate(files):
                if label in wanted and (images_per_class is None or j < images_per_class):
                    self.items.append((f"{folder}/{p.name}", label_of[label], index))
                index += 1
        if not self.items:
            raise ValueError(f"no images found under {self.root} for the requested classes")
        self.captions = None if captions is None else read_captions(captions)
        self.masks = None if masks is None else Path(masks)
        if self.masks is not None and not self.masks.is_dir():
            raise FileNotFoundError(f"mask folder {self.masks} does not exist")
        if self.imagenet_labels:
            self.classes = imagenet_class_names()
        elif self.named_labels:
            self.classes = list(class_names)
        else:
            self.classes = self.class_folders

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rel, label, index = self.items[i]
        error = ""
        try:
            image = _load_image(self.root / rel, self.image_size)
        except Exception as e:  # PIL raises many types for corrupt files
            error = f"unreadable image: {type(e).__name__}: {e}"
            image = torch.zeros(3, self.image_size, self.image_size)
        item = {"image": image, "label": label, "sample_id": rel, "index": index, "error": error}
        if self.captions is not None:
            item["caption"] = self.captions.get(rel, "")
        if self.masks is not None:
            path = (self.masks / rel).with_suffix(".png")
            try:
                from PIL import Image

                with Image.open(path) as m, Image.open(self.root / rel) as im:
                    if m.size != im.size:
                        raise ValueError(f"mask size {m.size} differs from the image's {im.size}")
                item["mask"] = _load_image(path, self.image_size, mask=True)
            except Exception as e:
                item["mask"] = torch.zeros(1, self.image_size, self.image_size)
                item["error"] = item["error"] or f"no usable foreground mask {path}: {type(e).__name__}: {e}"
        return item
