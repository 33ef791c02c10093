"""Cross-attention control for text-conditioned UNets (prompt-to-prompt editing).

DiG-IN edits a real image by switching a word of its caption (``"a photograph of
a golf ball"`` -> ``"... of a baseball"``). To keep the layout, the cross-attention
maps of the original trajectory are injected into the edited one for its first
steps (Hertz et al., 2023), and the maps of the class word give a foreground mask.

The pieces:

- :class:`ControlledAttention`: a diffusers attention processor that wraps the
  installed one. Self-attention, and every call without a control, go to the
  wrapped processor unchanged; a cross-attention call with a control computes
  the attention probabilities explicitly and hands them to the control.
- :class:`AttentionRecorder`: stores the conditional half's maps per step (for
  injection) and accumulates every token's map per resolution over layers and
  steps (for masks: :mod:`lit_vce.diffusion.masks`).
- :class:`AttentionInjection`: for the samples where it is active, replaces the
  conditional half's maps by the recorded ones, re-indexed from the source
  prompt's tokens to the target prompt's tokens by an alignment matrix
  (:func:`token_alignment`); tokens of the target without a source keep their own
  attention.

The control travels as an argument of the UNet call (``cross_attention_kwargs``),
not as global state, so a gradient-checkpointed UNet call recomputes the same
injection in its backward pass.

Batch layout: under classifier-free guidance the UNet sees ``[conditional;
unconditional]``; a control acts on the first ``n`` rows (the conditional half),
as prompt-to-prompt does, so the (optimised) unconditional embeddings keep their
own attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def token_alignment(source_ids: list[int], target_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Align two token sequences of equal padded length that differ in one segment
    (a word swap): the common prefix and suffix map one to one; inside the differing
    segment each source token's attention is shared among the target tokens that cover
    the same relative span (by overlap), so the word's attention mass is kept: two source
    tokens -> one target token sums their maps, one -> two splits it.

    Returns ``(mapper, own)``: ``mapper`` (L_src, L_tgt) with ``maps_tgt = maps_src @ mapper``,
    and ``own`` (L_tgt,) bool, True for target tokens that have no source token and keep
    their own attention (e.g. tokens shifted past the end of the source sequence).
    """
    ls, lt = len(source_ids), len(target_ids)
    if ls == 0 or lt == 0:
        raise ValueError("token sequences must not be empty")
    pre = 0
    while pre < min(ls, lt) and source_ids[pre] == target_ids[pre]:
        pre += 1
    # the unpadded lengths decide the suffix: compare from each sequence's end-of-text on
    suf = 0
    src_end, tgt_end = _content_end(source_ids), _content_end(target_ids)
    while (
        suf < src_end - pre and suf < tgt_end - pre and source_ids[src_end - 1 - suf] == target_ids[tgt_end - 1 - suf]
    ):
        suf += 1
    mapper = torch.zeros(ls, lt)
    own = torch.zeros(lt, dtype=torch.bool)
    for j in range(pre):
        mapper[j, j] = 1.0
    s0, s1, t0, t1 = pre, src_end - suf, pre, tgt_end - suf
    ns, nt = s1 - s0, t1 - t0
    for j in range(t0, t1):
        if ns == 0:
            own[j] = True  # inserted words: nothing to copy
            continue
        lo_t, hi_t = (j - t0) / nt, (j - t0 + 1) / nt
        for s in range(s0, s1):
            overlap = min(hi_t, (s - s0 + 1) / ns) - max(lo_t, (s - s0) / ns)
            if overlap > 1e-9:
                mapper[s, j] = overlap * ns
    shift = src_end - tgt_end
    for j in range(t1, lt):  # the suffix, then the padding, aligned from the end of the content
        s = j + shift
        if 0 <= s < ls:
            mapper[s, j] = 1.0
        else:
            own[j] = True
    return mapper, own


def _content_end(ids: list[int]) -> int:
    """Length up to and including the first end-of-text token (the last token that
    differs from its successor padding); sequences without padding end at their length."""
    n = len(ids)
    end = n
    while end > 1 and ids[end - 1] == ids[end - 2]:
        end -= 1
    return end


def find_tokens(ids: list[int], word_ids: list[int]) -> list[int]:
    """Positions of the first occurrence of ``word_ids`` inside ``ids`` ([] when absent)."""
    k = len(word_ids)
    for i in range(len(ids) - k + 1):
        if k and ids[i : i + k] == word_ids:
            return list(range(i, i + k))
    return []


class AttentionControl:
    """Acts on the conditional half's cross-attention probabilities of one UNet call."""

    def __init__(self, n: int):
        self.n = int(n)

    def __call__(self, layer: str, probs: torch.Tensor) -> torch.Tensor:
        """``probs`` (B, heads, Q, L) with the conditional samples in rows ``[:n]``."""
        raise NotImplementedError


@dataclass
class AttentionStore:
    """What a recording pass keeps: ``maps[i][layer]`` (n, heads, Q, L) of step i (only
    the first ``len(maps)`` steps, for injection), and for masks every token's map
    averaged over heads, summed per spatial resolution over layers and recorded steps
    (``token_sums[r]`` (n, L, r, r), ``token_counts[r]`` layer-steps)."""

    maps: list[dict[str, torch.Tensor]] = field(default_factory=list)
    token_sums: dict[int, torch.Tensor] = field(default_factory=dict)
    token_counts: dict[int, int] = field(default_factory=dict)

    def token_maps(self, resolution: int) -> torch.Tensor | None:
        """Token maps (n, L, r, r) averaged over heads, layers and steps at the recorded
        resolution closest to ``resolution`` (DiG-IN: 16 at 512 px), or None."""
        if not self.token_sums:
            return None
        r = min(self.token_sums, key=lambda k: (abs(k - resolution), k))
        return self.token_sums[r] / self.token_counts[r]


class AttentionRecorder(AttentionControl):
    """Records step ``step``'s maps into ``store``: the full maps while ``keep_maps``
    (injection), the head-averaged token maps while ``record_tokens`` (masks)."""

    def __init__(self, n: int, store: AttentionStore, step: int, keep_maps: bool, record_tokens: bool = True):
        super().__init__(n)
        self.store, self.step, self.keep_maps, self.record_tokens = store, step, keep_maps, record_tokens
        if keep_maps:
            while len(store.maps) <= step:
                store.maps.append({})

    def __call__(self, layer: str, probs: torch.Tensor) -> torch.Tensor:
        cond = probs[: self.n].detach()
        if self.keep_maps:
            self.store.maps[self.step][layer] = cond.clone()
        r = math.isqrt(cond.shape[2])
        if self.record_tokens and r * r == cond.shape[2]:
            m = cond.float().mean(1).transpose(1, 2).reshape(self.n, -1, r, r)  # (n, L, r, r)
            s = self.store
            s.token_sums[r] = s.token_sums.get(r, 0) + m
            s.token_counts[r] = s.token_counts.get(r, 0) + 1
        return probs


class AttentionInjection(AttentionControl):
    """Replaces the maps of the ``active`` conditional samples by the recorded ``maps``
    of the same step, aligned to the target tokens by ``mapper`` (n, L_src, L_tgt);
    target tokens marked in ``own`` (n, L_tgt) keep the computed attention."""

    def __init__(self, maps: dict[str, torch.Tensor], mapper: torch.Tensor, own: torch.Tensor, active: torch.Tensor):
        super().__init__(len(active))
        self.maps, self.mapper, self.own, self.active = maps, mapper, own, active

    def __call__(self, layer: str, probs: torch.Tensor) -> torch.Tensor:
        if layer not in self.maps:
            raise RuntimeError(f"no recorded cross-attention map for layer {layer!r} at this step")
        n = self.n
        cond = probs[:n]
        src = self.maps[layer].to(cond.dtype)
        injected = torch.einsum("nhqs,nst->nhqt", src, self.mapper.to(cond.dtype))
        injected = torch.where(self.own[:, None, None, :], cond, injected)
        cond = torch.where(self.active.view(n, 1, 1, 1), injected, cond)
        return torch.cat([cond, probs[n:]]) if len(probs) > n else cond


class ControlledAttention:
    """A diffusers attention processor: cross-attention calls with a ``control`` compute
    their probabilities explicitly and pass them through it; everything else goes to
    the wrapped ``base`` processor (SDPA, sliced, ...)."""

    def __init__(self, name: str, base):
        self.name, self.base = name, base

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        control: AttentionControl | None = None,
        **kwargs,
    ):
        if control is None or encoder_hidden_states is None:
            if temb is not None:  # not every processor takes temb (e.g. the sliced one)
                kwargs["temb"] = temb
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, length, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, attention_mask)  # (B * heads, Q, L), batch-major
        heads = attn.heads
        probs = control(self.name, probs.view(batch, heads, *probs.shape[1:])).reshape(batch * heads, *probs.shape[1:])
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        out = attn.to_out[1](attn.to_out[0](out))
        if four_d:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_attention_control(unet) -> None:
    """Wrap every attention processor of ``unet`` in :class:`ControlledAttention` (idempotent)."""
    procs = unet.attn_processors
    if all(isinstance(p, ControlledAttention) for p in procs.values()):
        return
    unet.set_attn_processor(
        {name: p if isinstance(p, ControlledAttention) else ControlledAttention(name, p) for name, p in procs.items()}
    )
