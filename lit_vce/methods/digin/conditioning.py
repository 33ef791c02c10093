"""DiG-IN's conditioning: class embeddings or prompts (the data's captions with the class
word switched), and the classifier's views of a decoded image."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..base import VCEBatch
from .views import cutout_views, scaled_cutout_views, switch_word


class ConditioningMixin:
    """:class:`~lit_vce.methods.digin.DiGIN`'s conditioning and views (a mixin of the method)."""

    def class_names_for(self, classifier: nn.Module) -> list[str]:
        names = self.class_names or list(getattr(classifier, "class_names", []))
        if not names:
            raise ValueError(
                "a text-conditioned model needs class names (class_names=... or a classifier with class_names)"
            )
        return names

    def conditions(self, labels: torch.Tensor, classifier: nn.Module) -> torch.Tensor:
        """The conditioning of ``labels``: class embeddings (pixel) or the template prompt's text embedding."""
        bb = self.diffusion
        if not bb.text_conditioned:
            return bb.condition(labels)
        names = self.class_names_for(classifier)
        return bb.condition([self.prompt.format(names[int(c)]) for c in labels])

    def prompts(self, batch: VCEBatch, classifier: nn.Module) -> tuple[list[str], list[str], torch.Tensor]:
        """(source prompts, target prompts, whether each sample's own caption was used)."""
        names = self.class_names_for(classifier)
        src, tgt, used, unnamed = [], [], [], []
        for k in range(len(batch)):
            s_name, t_name = names[int(batch.source[k])], names[int(batch.target[k])]
            caption = batch.captions[k] if batch.captions else None
            switched = switch_word(caption, s_name, t_name) if caption else None
            if caption and switched is None:
                unnamed.append(f"{batch.sample_ids[k]!r} ({s_name!r})")
            if switched is None:
                src.append(self.prompt.format(s_name))
                tgt.append(self.prompt.format(t_name))
            else:
                src.append(caption)
                tgt.append(switched)
            used.append(switched is not None)
        if unnamed:
            warnings.warn(
                f"{len(unnamed)} caption(s) do not name their class, e.g. {unnamed[0]}; "
                f"the template prompt is used for them (diagnostic caption_used = 0)",
                stacklevel=2,
            )
        return src, tgt, torch.tensor(used, dtype=torch.float32)

    def _conditioning(self, batch: VCEBatch, classifier: nn.Module):
        """(source conditioning, target conditioning, (source prompts, target prompts) or None, captions used)."""
        bb = self.diffusion
        if not bb.text_conditioned:
            return self.conditions(batch.source, classifier), self.conditions(batch.target, classifier), None, None
        src_prompts, tgt_prompts, captions_used = self.prompts(batch, classifier)
        return bb.condition(src_prompts), bb.condition(tgt_prompts), (src_prompts, tgt_prompts), captions_used

    def _views(self, batch: VCEBatch, classifier: nn.Module, rngs: list[torch.Generator] | None = None):
        rngs, o = (batch.rngs if rngs is None else rngs), self.optimisation
        if o.cutouts == "scaled":
            return lambda x: scaled_cutout_views(x, rngs, o.num_cutouts, o.cutout_min_scale, o.noise_sd)
        size = getattr(classifier, "input_size", None)
        return lambda x: cutout_views(x, rngs, o.num_cutouts, o.noise_sd, size, o.cutout_power)
