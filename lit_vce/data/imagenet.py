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
    return {int(k): [int(x) for x in v] for k, v in yaml.safe_load((ASSETS / "synset_closest_idx.yaml").read_text()).items()}


@functools.lru_cache(maxsize=1)
def ldce_val_targets() -> dict[int, int]:
    """Validation image index (ImageFolder order) -> the LDCE all-class target."""
    return {int(k): int(v) for k, v in yaml.safe_load((ASSETS / "image_idx_to_tgt.yaml").read_text()).items()}


def _load_image(path: Path, size: int | None) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    with Image.open(path) as im:
        im = im.convert("RGB")
        x = pil_to_tensor(im).float() / 255.0
    if size is not None:
        # shorter side to `size`, centre crop (the usual 256px VCE protocol)
        h, w = x.shape[-2:]
        s = size / min(h, w)
        nh, nw = max(size, round(h * s)), max(size, round(w * s))
        if (nh, nw) != (h, w):
            x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[:, top : top + size, left : left + size]
    return x.contiguous()


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
    """

    def __init__(self, root: str | Path, image_size: int = 256, images_per_class: int | None = None, classes: list[int] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.class_folders = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.class_folders:
            raise ValueError(f"{self.root} holds no class folders (expected root/<class>/<image>)")
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
                    self.items.append((f"{folder}/{p.name}", label, index))
                index += 1
        if not self.items:
            raise ValueError(f"no images found under {self.root} for the requested classes")
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
        return {"image": image, "label": label, "sample_id": rel, "index": index, "error": error}
