"""Foreground masks from cross-attention, as the official DiG-IN code computes them.

``utils/foreground_segmentation.py`` of the DiG-IN repository (M4xim4l/DiG-IN):

1. the class word's cross-attention maps of the reconstruction trajectory at
   16x16 (SD at 512 px; here: the maps closest to a quarter of the latent size),
   over the first half of the steps, conditional half only, averaged over the
   word's tokens, heads, layers and steps, normalised to a maximum of 1;
2. resized bicubically to the image, clamped to [0, 1] and squashed
   (``sqrt_0.3``): ``sqrt(clamp((m - 0.3) / 0.7, 0, 1))``, a soft mask;
3. optionally refined by Segment Anything from 5 points drawn where the mask
   exceeds 0.35: SAM-HQ as the official code runs it (``segment-anything-hq``'s
   predictor on a ``sam_hq_vit_h.pth`` checkpoint, HQ token only), or transformers'
   ``SamModel`` / ``SamHQModel`` from a saved folder;
4. post-processed: erosion 3, dilation 20, Gaussian blur (kernel 45, sigma 30),
   sizes at 512 px scaled with the resolution; the latent mask is the
   post-processed pixel mask resized to the latent size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: the official post-processing sizes at 512 px: erosion, dilation, blur kernel, blur sigma
OFFICIAL_POSTPROCESSING = (3, 20, 45, 30.0)


def attention_foreground(
    token_maps: torch.Tensor, tokens: list[list[int]], size: int, cutoff: float = 0.3
) -> torch.Tensor:
    """Soft foreground masks (n, 1, size, size) from each sample's tokens' maps (n, L, r, r).

    A sample without tokens gets an all-ones mask (everything foreground: nothing is blended).
    """
    n = token_maps.shape[0]
    out = torch.ones(n, 1, size, size, device=token_maps.device)
    for i, toks in enumerate(tokens):
        if not toks:
            continue
        m = token_maps[i, toks].float().mean(0)
        m = (m / (m.max() + 1e-8))[None, None]
        m = F.interpolate(m, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        out[i] = ((m - cutoff).clamp(0, 1) / (1 - cutoff)).sqrt()[0] if cutoff < 1 else (m > cutoff).float()[0]
    return out


def _odd(k: int) -> int:
    return k if k % 2 else k + 1


def _dilate(x: torch.Tensor, k: int) -> torch.Tensor:
    """Flat k x k dilation (max filter), origin at k // 2 as kornia's; borders do not count."""
    if k <= 1:
        return x
    lo, hi = k // 2, k - 1 - k // 2
    return F.max_pool2d(F.pad(x, (lo, hi, lo, hi), value=float("-inf")), k, stride=1)


def _erode(x: torch.Tensor, k: int) -> torch.Tensor:
    return -_dilate(-x, k)


def postprocess_mask(
    mask: torch.Tensor, erosion: int = 3, dilation: int = 20, blur: int = 45, sigma: float = 30.0, reference: int = 512
) -> torch.Tensor:
    """Erosion, dilation and Gaussian blur of (n, 1, H, W) masks; sizes given at ``reference``
    pixels and scaled to H (a blur kernel stays odd)."""
    from torchvision.transforms.functional import gaussian_blur

    s = mask.shape[-1] / reference
    m = _erode(mask.float(), max(1, round(erosion * s)))
    m = _dilate(m, max(1, round(dilation * s)))
    k = _odd(max(1, round(blur * s)))
    if k > 1:
        m = gaussian_blur(m, [k, k], [max(sigma * s, 1e-3)] * 2)
    return m.clamp(0, 1)


def latent_mask_from_pixels(mask: torch.Tensor, size: int) -> torch.Tensor:
    """The pixel mask resized to the latent size (bilinear with antialiasing, as torchvision's resize)."""
    return F.interpolate(mask.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(
        0, 1
    )


def _import_sam_hq():
    """``segment_anything_hq``, imported without its side effect on timm: on import it registers
    its own ``tiny_vit_*`` models over timm's (a ``timm:tiny_vit_5m_224`` classifier would be
    built from its code); timm's registry is restored afterwards."""
    import warnings

    try:
        import timm.models._registry as reg
    except ImportError:  # pragma: no cover - timm is a dependency
        reg = None
    import copy

    # the registry's dicts and sets (and the sets inside its defaultdicts, which registering extends)
    saved = (
        {
            k: copy.deepcopy(v) if isinstance(v, __import__("collections").defaultdict) else copy.copy(v)
            for k, v in vars(reg).items()
            if k.startswith(("_model", "_module"))
        }
        if reg
        else {}
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import segment_anything_hq
    except ImportError as e:
        from ..errors import MissingWeightsError

        raise MissingWeightsError(
            "a .pth Segment Anything checkpoint is run with SAM-HQ's own code, as DiG-IN's: "
            "pip install 'lit_vce[samhq]' (segment-anything-hq)"
        ) from e
    finally:
        for k, v in saved.items():
            setattr(reg, k, v)
    return segment_anything_hq


def build_sam_hq(state_dict: dict[str, torch.Tensor]):
    """A SAM-HQ ``Sam`` (ViT-B/L/H image encoder) built for ``state_dict`` and loaded strictly.

    The encoder's width, depth, heads and global-attention blocks are read from the weights
    (``sam_hq_vit_h.pth``: 1280, 32, 16, blocks 7/15/23/31), so a checkpoint of any ViT size,
    or a small one saved for a test, builds the model it was trained as.
    """
    _import_sam_hq()
    from segment_anything_hq.build_sam import _build_sam

    key = "image_encoder.patch_embed.proj.weight"
    if key not in state_dict:
        raise ValueError(f"not a SAM-HQ ViT checkpoint (no {key}; the TinyViT variant is not supported)")
    dim = state_dict[key].shape[0]
    blocks = sorted({int(k.split(".")[2]) for k in state_dict if k.startswith("image_encoder.blocks.")})
    head_dim = state_dict["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
    tokens = 1024 // 16  # SAM's input size over its patch size: a global block's relative positions span it
    glob = [i for i in blocks if state_dict[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] == 2 * tokens - 1]
    model = _build_sam(
        encoder_embed_dim=dim,
        encoder_depth=len(blocks),
        encoder_num_heads=dim // head_dim,
        encoder_global_attn_indexes=glob,
        checkpoint=None,
    )
    model.load_state_dict(state_dict, strict=True)
    return model.eval().requires_grad_(False)


class SamRefiner(torch.nn.Module):
    """Segment Anything refinement of soft attention masks.

    Per image, ``num_points`` points are drawn (from the sample's generator, with
    replacement) among the pixels where the soft mask exceeds ``threshold``, with
    probability proportional to the mask value, as the official code samples
    them; SAM predicts one mask from them (positive labels). An image without
    such pixels keeps its attention mask.

    Two backends:

    - SAM-HQ as DiG-IN runs it (``model`` a ``.pth`` checkpoint such as
      ``sam_hq_vit_h.pth``, or a ``segment_anything_hq`` ``Sam``): its
      ``SamPredictor`` on the image as 8-bit RGB (``255 * x`` truncated, as the
      official code converts it), ``multimask_output=False``, ``hq_token_only=True``.
      Needs ``pip install 'lit_vce[samhq]'``.
    - transformers (``model`` a folder saved by ``save_pretrained`` or a hub id, or a
      ``SamModel`` / ``SamHQModel``): the image resized to the model's input and
      normalised with ImageNet's mean/std; a ``SamHQModel`` predicts with the HQ token only.

    Args:
        model: see above (offline: a file or folder; a missing one raises
            :class:`MissingWeightsError`).
    """

    def __init__(self, model="facebook/sam-vit-huge", num_points: int = 5, threshold: float = 0.35):
        super().__init__()
        self.model = self._load(model) if isinstance(model, str) else model
        self.model.eval().requires_grad_(False)
        #: "sam_hq" (segment_anything_hq's predictor) or "transformers"
        self.backend = "transformers" if hasattr(self.model, "config") else "sam_hq"
        self.num_points, self.threshold = int(num_points), float(threshold)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def _load(spec: str):
        from pathlib import Path

        from ..errors import MissingWeightsError

        if spec.endswith((".pth", ".pt")):
            if not Path(spec).is_file():
                raise MissingWeightsError(
                    f"SAM-HQ checkpoint {spec} not found (DiG-IN uses sam_hq_vit_h.pth from the "
                    "SAM-HQ repository); or set sam_model=None to skip the refinement"
                )
            state = torch.load(spec, map_location="cpu", weights_only=True)
            try:
                return build_sam_hq(state.get("model", state) if isinstance(state, dict) else state)
            except (KeyError, RuntimeError, ValueError) as e:
                raise MissingWeightsError(f"{spec} is not a SAM-HQ checkpoint this version can load: {e}") from e
        from transformers import AutoModel

        try:
            model = AutoModel.from_pretrained(spec)
        except (OSError, ValueError) as e:
            from ..weights import hub_model_missing

            line = hub_model_missing("Segment Anything model", spec, ["config.json", "model.safetensors"], e)
            raise MissingWeightsError(
                f"{line} (or a SAM-HQ .pth checkpoint; sam_model=None skips the refinement)"
            ) from e
        if type(model).__name__ not in ("SamModel", "SamHQModel"):
            raise MissingWeightsError(f"{spec!r} holds a {type(model).__name__}, not a Segment Anything model")
        return model

    def points(self, mask: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor | None:
        """(num_points, 2) x/y pixel coordinates drawn from one (1, H, W) soft mask, or None."""
        m = mask[0]
        ys, xs = torch.nonzero(m > self.threshold, as_tuple=True)
        if len(ys) == 0:
            return None
        w = m[ys, xs].float().cpu()
        idx = torch.multinomial(w / w.sum(), self.num_points, replacement=True, generator=generator)
        return torch.stack([xs.cpu()[idx], ys.cpu()[idx]], 1).float()

    def _predict_sam_hq(self, image: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
        """SAM-HQ's predictor, as DiG-IN's ``sam_segmentation``: (1, H, W) binary mask."""
        predictor = _import_sam_hq().SamPredictor(self.model)  # a Sam given as an object: its package, imported safely
        predictor.set_image((255 * image.float().clamp(0, 1)).permute(1, 2, 0).cpu().numpy().astype("uint8"))
        masks, _, _ = predictor.predict(
            point_coords=pts.numpy(),
            point_labels=torch.ones(len(pts)).numpy(),
            box=None,
            multimask_output=False,
            hq_token_only=True,
        )
        return torch.from_numpy(masks).float()

    def _predict_transformers(self, image: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        size = self.model.config.vision_config.image_size
        x = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = (x - self.mean) / self.std
        p = (pts * torch.tensor([size / w, size / h]))[None, None].to(x.device)  # (1, 1, k, 2)
        lab = torch.ones(1, 1, len(pts), dtype=torch.long, device=x.device)
        extra = {"hq_token_only": True} if type(self.model).__name__ == "SamHQModel" else {}
        pred = (
            self.model(
                pixel_values=x.to(self.model.dtype), input_points=p, input_labels=lab, multimask_output=False, **extra
            )
            .pred_masks[:, 0, :1]
            .float()
        )  # (1, 1, h', w') logits
        return (F.interpolate(pred, size=(h, w), mode="bilinear", align_corners=False)[0] > 0).float()

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, masks: torch.Tensor, rngs: list[torch.Generator] | None = None
    ) -> torch.Tensor:
        """Refined binary masks (n, 1, H, W) for images in [0, 1] and their soft masks."""
        out = masks.clone().float()
        predict = self._predict_sam_hq if self.backend == "sam_hq" else self._predict_transformers
        for i in range(images.shape[0]):
            pts = self.points(masks[i], None if rngs is None else rngs[i])
            if pts is None:
                continue
            out[i] = predict(images[i], pts).to(out)
        return out
