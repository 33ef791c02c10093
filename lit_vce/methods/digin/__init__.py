"""DiG-IN (Augustin et al., CVPR 2024): guidance by optimising the inputs of a whole
diffusion sampling trajectory against a classifier-derived loss.

For a real image (a VCE):

1. encode it and invert the sampler: DDIM inversion under the source
   conditioning, then null-text inversion (per-step unconditional embeddings
   optimised so the guided trajectory reconstructs the image;
   :mod:`lit_vce.diffusion.inversion`, optionally cached per image: ``cache.py``);
2. switch the conditioning to the target (pixel model: the class; Stable
   Diffusion: the class word in the caption, prompt-to-prompt), injecting the
   original trajectory's cross-attention maps for the first ``injection``
   fraction of steps (Stable Diffusion; the pixel model has no cross-attention,
   so it keeps the source class for those steps instead: the layout is fixed
   early either way), and blending the reconstruction trajectory's background
   into the inputs of the first ``blend`` fraction of steps (z_T included) where
   a foreground mask is known (given with the data, or from the class word's
   cross-attention maps as the official code computes them:
   :mod:`lit_vce.diffusion.masks`); the combinations are tried once and the one
   with the lowest loss is kept, per sample (``edit.py``, ``trajectory.py``);
3. optimise the initial latent z_T and one additive delta per step on the
   conditional and on the unconditional embedding with Adam (z_T at a tenth of
   the learning rate, renormalised to its starting norm after each update),
   the loss being the objective on the decoded x0-predictions of the last k
   steps with weights 1..k (normalised), gradients through the decoder and
   every UNet call (``optimise.py``; checkpointing planned in ``memory.py``);
4. return, per sample, the iterate with the lowest loss measured without
   augmentation (the start counts as iterate 0).

The classifier terms see ``num_cutouts`` random square cutouts of each decoded
image (:func:`cutout_views`) plus Gaussian noise. All randomness is drawn from
the per-sample rngs. The settings come in groups (``settings.py``). Official quirks
deliberately not copied, and other deviations: ``docs/parity.md``.
"""

from .build import default_objective
from .method import DiGIN
from .settings import (
    InversionSettings,
    LossSettings,
    MaskSettings,
    MemorySettings,
    OptimisationSettings,
    SearchSettings,
)
from .views import crop_views, cutout_views, fraction_steps, scaled_cutout_views, switch_word

__all__ = [
    "DiGIN",
    "default_objective",
    "InversionSettings",
    "SearchSettings",
    "MaskSettings",
    "OptimisationSettings",
    "LossSettings",
    "MemorySettings",
    "crop_views",
    "cutout_views",
    "scaled_cutout_views",
    "fraction_steps",
    "switch_word",
]
