"""OpenAI's ADM UNet (guided-diffusion), loadable from the published checkpoints.

DVCE, ACE and DiME run on guided-diffusion's ImageNet checkpoints
(``256x256_diffusion_uncond.pt`` and the class-conditional 64/128/256/512 px
ones). :class:`ADMUNet` is the same architecture with the same parameter names,
so those files load with ``load_state_dict`` as they are: residual blocks with
scale-shift normalisation and optional resampling inside the block, multi-head
self-attention at chosen resolutions (legacy or new QKV channel order), a
sinusoidal time embedding (cos first) plus an optional class embedding, and a
6-channel output (noise and the learned-variance interpolation) when sigma is
learned. Outputs equal the official code's to float rounding
(``tests/test_adm.py`` against ``tests/fixtures/adm_tiny_*.safetensors``).

Architectures come from :data:`ADM_PRESETS` (the published ImageNet
configurations) with per-key overrides; :func:`load_adm` builds one and loads a
checkpoint, with a clear error naming the expected file when it is absent.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# The published ImageNet configurations (guided-diffusion's README flags) and
# the file names of their checkpoints.
ADM_PRESETS: dict[str, dict] = {
    "imagenet64_cond": dict(
        image_size=64,
        num_channels=192,
        num_res_blocks=3,
        num_head_channels=64,
        class_cond=True,
        use_new_attention_order=True,
        noise_schedule="cosine",
        file="64x64_diffusion.pt",
    ),
    "imagenet128_cond": dict(
        image_size=128,
        num_channels=256,
        num_res_blocks=2,
        num_heads=4,
        num_head_channels=-1,
        class_cond=True,
        file="128x128_diffusion.pt",
    ),
    "imagenet256_uncond": dict(
        image_size=256,
        num_channels=256,
        num_res_blocks=2,
        num_head_channels=64,
        class_cond=False,
        file="256x256_diffusion_uncond.pt",
    ),
    "imagenet256_cond": dict(
        image_size=256,
        num_channels=256,
        num_res_blocks=2,
        num_head_channels=64,
        class_cond=True,
        file="256x256_diffusion.pt",
    ),
    # DiME's and ACE's CelebA DDPM (their scripts' MODEL_FLAGS: 500 steps, 128 channels, 4 heads) and
    # ACE's CelebA-HQ DDPM (celebahq-attack.sh); the file names are ours: put the authors' files there
    "celeba128": dict(
        image_size=128,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_head_channels=-1,
        class_cond=False,
        diffusion_steps=500,
        file="ddpm-celeba.pt",
    ),
    "celebahq256": dict(
        image_size=256,
        num_channels=128,
        num_res_blocks=2,
        num_head_channels=64,
        class_cond=False,
        diffusion_steps=500,
        file="ddpm-celebahq.pt",
    ),
    "imagenet512_cond": dict(
        image_size=512,
        num_channels=256,
        num_res_blocks=2,
        num_head_channels=64,
        class_cond=True,
        file="512x512_diffusion.pt",
    ),
}

_DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}


@dataclass
class ADMConfig:
    """Architecture and noise schedule of an ADM model (guided-diffusion's flag names)."""

    image_size: int = 256
    num_channels: int = 256
    num_res_blocks: int = 2
    attention_resolutions: str = "32,16,8"
    channel_mult: str | tuple = ""  # "" = the default for image_size
    num_heads: int = 4
    num_heads_upsample: int = -1
    num_head_channels: int = 64
    class_cond: bool = False
    num_classes: int = 1000
    learn_sigma: bool = True
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = False
    dropout: float = 0.0
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    extra: dict = field(default_factory=dict)  # keys of other tools' configs, kept for the record

    @classmethod
    def from_dict(cls, cfg: dict) -> "ADMConfig":
        known = set(cls.__dataclass_fields__) - {"extra"}
        return cls(
            **{k: v for k, v in cfg.items() if k in known}, extra={k: v for k, v in cfg.items() if k not in known}
        )

    @classmethod
    def preset(cls, name: str, **overrides) -> "ADMConfig":
        if name not in ADM_PRESETS:
            raise ValueError(f"unknown ADM preset {name!r}; known: {sorted(ADM_PRESETS)}")
        cfg = {k: v for k, v in ADM_PRESETS[name].items() if k != "file"}
        return replace(cls.from_dict(cfg), **overrides)

    def mults(self) -> tuple[float, ...]:
        cm = self.channel_mult
        if cm in ("", None, ()):
            if self.image_size not in _DEFAULT_CHANNEL_MULT:
                raise ValueError(f"no default channel_mult for image_size {self.image_size}; set channel_mult")
            return _DEFAULT_CHANNEL_MULT[self.image_size]
        if isinstance(cm, str):
            return tuple(float(m) if "." in m else int(m) for m in cm.split(","))
        return tuple(cm)

    def attention_ds(self) -> set[int]:
        return {self.image_size // int(r) for r in str(self.attention_resolutions).split(",") if r.strip()}

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


class GroupNorm32(nn.GroupNorm):
    """Group norm computed in float32 (as ADM does under fp16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def _norm(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


class Resample(nn.Module):
    """2x nearest upsampling or 2x2 average-pool downsampling, with an optional conv (``conv`` / ``op``)."""

    def __init__(self, channels: int, up: bool, use_conv: bool):
        super().__init__()
        self.up, self.use_conv = up, use_conv
        if use_conv and up:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        elif use_conv:
            self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            return self.conv(x) if self.use_conv else x
        return self.op(x) if self.use_conv else F.avg_pool2d(x, kernel_size=2, stride=2)


class ResBlock(nn.Module):
    """Residual block conditioned on the embedding; resampling inside the block when ``up``/``down``."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        scale_shift: bool,
        up: bool = False,
        down: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.resample = Resample(channels, up=up, use_conv=False) if (up or down) else None
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if scale_shift else out_channels)
        )
        self.out_layers = nn.Sequential(
            _norm(out_channels), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample is not None:
            h = self.in_layers[:-1](x)
            h, x = self.resample(h), self.resample(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over spatial positions with a residual connection.

    ``legacy_order``: the fused qkv channels are grouped per head (q, k, v of
    head 0, then head 1, ...), as in the 128/256/512 px checkpoints; otherwise
    all queries, then all keys, then all values (the 64 px checkpoint).
    """

    def __init__(self, channels: int, num_heads: int, legacy_order: bool):
        super().__init__()
        self.num_heads, self.legacy_order = num_heads, legacy_order
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        n, ch, length = self.num_heads, c // self.num_heads, x.shape[-1]
        if self.legacy_order:
            q, k, v = qkv.reshape(b, n, 3 * ch, length).split(ch, dim=2)
        else:
            q, k, v = (t.reshape(b, n, ch, length) for t in qkv.chunk(3, dim=1))
        # (b, heads, length, ch) for SDPA; softmax(q k^T / sqrt(ch)) v as ADM computes it
        a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        h = self.proj_out(a.transpose(-1, -2).reshape(b, c, length))
        return (x + h).reshape(b, c, *spatial)


class _Sequential(nn.ModuleList):
    """A block list whose residual blocks also take the embedding (ADM's TimestepEmbedSequential)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t f), sin(t f)]`` with ``f = max_period^(-i/half)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


class ADMUNet(nn.Module):
    """guided-diffusion's ``UNetModel`` (2-D), parameter names included.

    ``forward(x, timesteps, y=None)``: ``x`` in model space ([-1, 1]),
    ``timesteps`` on the 1000-step scale (floats allowed, as the respaced
    wrapper passes them), ``y`` class ids for class-conditional models.
    Returns 6 channels (noise, variance interpolation) when sigma is learned.
    """

    def __init__(self, config: ADMConfig):
        super().__init__()
        self.config = config
        mc, mults, att = config.num_channels, config.mults(), config.attention_ds()
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if config.class_cond:
            self.label_emb = nn.Embedding(config.num_classes, emb_dim)
        ch = int(mults[0] * mc)
        self.input_blocks = nn.ModuleList([_Sequential([nn.Conv2d(3, ch, 3, padding=1)])])
        skip_chans, ds = [ch], 1
        for level, mult in enumerate(mults):
            for _ in range(config.num_res_blocks):
                layers = [self._res(ch, int(mult * mc))]
                ch = int(mult * mc)
                if ds in att:
                    layers.append(self._attn(ch, config.num_heads))
                self.input_blocks.append(_Sequential(layers))
                skip_chans.append(ch)
            if level != len(mults) - 1:
                down = self._res(ch, ch, down=True) if config.resblock_updown else Resample(ch, up=False, use_conv=True)
                self.input_blocks.append(_Sequential([down]))
                skip_chans.append(ch)
                ds *= 2
        self.middle_block = _Sequential([self._res(ch, ch), self._attn(ch, config.num_heads), self._res(ch, ch)])
        heads_up = config.num_heads if config.num_heads_upsample == -1 else config.num_heads_upsample
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(mults))[::-1]:
            for i in range(config.num_res_blocks + 1):
                layers = [self._res(ch + skip_chans.pop(), int(mc * mult))]
                ch = int(mc * mult)
                if ds in att:
                    layers.append(self._attn(ch, heads_up))
                if level and i == config.num_res_blocks:
                    layers.append(
                        self._res(ch, ch, up=True) if config.resblock_updown else Resample(ch, up=True, use_conv=True)
                    )
                    ds //= 2
                self.output_blocks.append(_Sequential(layers))
        out_ch = 6 if config.learn_sigma else 3
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(int(mults[0] * mc), out_ch, 3, padding=1))

    def _res(self, cin: int, cout: int, up: bool = False, down: bool = False) -> ResBlock:
        c = self.config
        return ResBlock(cin, c.num_channels * 4, cout, c.use_scale_shift_norm, up=up, down=down, dropout=c.dropout)

    def _attn(self, ch: int, num_heads: int) -> AttentionBlock:
        heads = num_heads if self.config.num_head_channels == -1 else ch // self.config.num_head_channels
        return AttentionBlock(ch, heads, legacy_order=not self.config.use_new_attention_order)

    @property
    def dtype(self) -> torch.dtype:
        return self.out[-1].weight.dtype

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(len(x))
        emb = self.time_embed(timestep_embedding(timesteps, self.config.num_channels).to(self.dtype))
        if self.config.class_cond:
            if y is None:
                raise ValueError("this ADM model is class-conditional: pass class ids y")
            emb = emb + self.label_emb(y)
        h, skips = x.type(self.dtype), []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h).type(x.dtype)


def resolve_adm_checkpoint(preset: str | None, checkpoint: str | Path | None) -> Path:
    """The checkpoint file: ``checkpoint`` if given, else ``$LIT_VCE_WEIGHTS_DIR/adm/<official file name>``."""
    from ..errors import MissingWeightsError
    from ..weights import weights_dir

    if checkpoint is None:
        if preset is None:
            raise ValueError("give an ADM preset or a checkpoint path")
        checkpoint = weights_dir() / "adm" / ADM_PRESETS[preset]["file"]
        hint = (
            f"put OpenAI's guided-diffusion checkpoint {ADM_PRESETS[preset]['file']} there "
            "($LIT_VCE_WEIGHTS_DIR sets the folder)"
        )
    else:
        hint = "check the path"
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise MissingWeightsError(f"ADM checkpoint {path} does not exist; {hint}")
    return path


def preset_for_file(path: str | Path) -> str | None:
    """The preset whose official checkpoint file name is ``path``'s name, if any."""
    name = Path(path).name
    return next((k for k, v in ADM_PRESETS.items() if v["file"] == name), None)


def load_adm(preset: str | None = None, checkpoint: str | Path | None = None, **overrides) -> ADMUNet:
    """Build an ADM UNet from a preset (plus overrides) and load a guided-diffusion checkpoint.

    ``preset`` may be omitted when ``checkpoint`` carries an official file name.
    The state dict must match exactly (a mismatch names the differing keys).
    """
    if preset is None and checkpoint is not None:
        preset = preset_for_file(checkpoint)
        if preset is None:
            raise ValueError(
                f"cannot tell the architecture of {checkpoint}: give an ADM preset ({sorted(ADM_PRESETS)})"
            )
    path = resolve_adm_checkpoint(preset, checkpoint)
    model = ADMUNet(ADMConfig.preset(preset, **overrides))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{path} does not fit ADM preset {preset!r} {overrides or ''}: {str(e)[:500]}") from e
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit ADM preset {preset!r} {overrides or ''}: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    return model.eval().requires_grad_(False)
