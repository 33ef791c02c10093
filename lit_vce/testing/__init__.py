"""Offline stand-ins for tests and benchmarks: weight files with random values,
saved where the real loaders expect the real ones, so the real loading paths run
without a download; and the benchmarks' shared pieces (a world batch, sampled
peak memory, FLOP counts)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from unittest import mock

import torch
from lightning.pytorch.callbacks import Callback


def save_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Write a random-init state dict of torch-fidelity's Inception-v3 to ``path``
    (the layout of ``weights-inception-2015-12-05-6726825d.pth``)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    torch.manual_seed(seed)
    with (
        mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, *a, **k: None),
    ):
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    # variance-preserving init, so 2048-d features still vary between images after ~50 layers
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def save_random_alexnet_weights(path: str | Path, seed: int = 0) -> Path:
    """Write a random-init torchvision AlexNet state dict (LPIPS' backbone file) to ``path``."""
    import torchvision

    torch.manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.alexnet().state_dict(), path)
    return path


def save_tiny_latent_diffusion(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Stable Diffusion-layout folder (``unet/``, ``vae/``,
    ``text_encoder/``, ``tokenizer/``, ``scheduler/``) that ``LatentDiffusion(model=folder)``
    loads offline: 32 px images, 16 px latents, a toy word-level CLIP tokenizer."""
    import json

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=4,
        attention_head_dim=2,
    ).save_pretrained(folder / "unet")
    AutoencoderKL(
        block_out_channels=[8, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ).save_pretrained(folder / "vae")
    words = ["a", "photograph", "of", "the", "circle", "square", "triangle", "star", "zebra", "sorrel", "cat", "dog"]
    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for w in words:
        vocab[w + "</w>"] = len(vocab)
    for ch in sorted({c for w in words for c in w}):  # single letters, so unknown words still tokenize
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tok_dir = folder / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    merges = ["#version: 0.2"]
    for w in words:  # merge each word letter by letter into its whole-word token
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = CLIPTokenizer(
        str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77, pad_token="!"
    )
    tokenizer.save_pretrained(tok_dir)
    CLIPTextModel(
        CLIPTextConfig(
            hidden_size=8,
            intermediate_size=16,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=len(vocab),
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
            max_position_embeddings=77,
        )
    ).save_pretrained(folder / "text_encoder")
    DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    ).save_pretrained(folder / "scheduler")
    return folder


def write_hf_cache(cache_dir: str | Path, repo_id: str, folder: str | Path, revision: str = "main") -> Path:
    """Put the files of ``folder`` into a Hugging Face hub cache as ``repo_id`` at
    ``revision``, in the hub's own layout (``models--org--name/{blobs,snapshots,refs}``,
    snapshot files as relative links to content-addressed blobs), so that hub
    loaders (timm ``hf-hub:``, open_clip ``hf-hub:``, diffusers/transformers
    ``from_pretrained(repo_id)``) find them with ``HF_HUB_OFFLINE=1`` and
    ``HF_HUB_CACHE=cache_dir``. Returns the snapshot folder."""
    import hashlib
    import os
    import shutil

    folder = Path(folder)
    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    commit = hashlib.sha1("".join(f"{p.relative_to(folder)}:{p.stat().st_size}" for p in files).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for p in files:
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(p, blob)
        link = snapshot / p.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


class PreemptAfterBatches(Callback):
    """A Trainer callback that plays a SLURM preemption after ``batches`` batches: it
    sends this process the requeue signal (SIGUSR1, as ``sbatch --signal=SIGUSR1@90``
    does) and then stops the run with an error, as the kill that follows would
    (``--trainer.callbacks+=lit_vce.testing.PreemptAfterBatches``)."""

    def __init__(self, batches: int = 1):
        self.batches, self.seen = int(batches), 0

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        import os
        import signal

        if self.seen == self.batches:  # the first ``batches`` batches are written
            os.kill(os.getpid(), signal.SIGUSR1)
            raise RuntimeError("simulated preemption")
        self.seen += 1


def stable_diffusion_components(size: str = "tiny", image_size: int = 64, seed: int = 0) -> dict:
    """Random-weight Stable Diffusion components as :class:`~lit_vce.diffusion.LatentDiffusion`
    keyword arguments (``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler_config``),
    for benchmarks: ``size="tiny"`` (a 2-level UNet with 8/16 channels, a 2-level VAE:
    latents at ``image_size / 2``) or ``"sd15"`` (the Stable Diffusion 1.5 architecture:
    860M UNet, 84M VAE, 123M CLIP ViT-L/14 text encoder; latents at ``image_size / 8``).
    Random weights cost what real ones cost. The tokenizer is the toy word-level one of
    :func:`save_tiny_latent_diffusion` (token ids only matter for cost)."""
    import tempfile

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if size not in ("tiny", "sd15"):
        raise ValueError("size must be 'tiny' or 'sd15'")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(str(save_tiny_latent_diffusion(Path(tmp) / "sd", seed) / "tokenizer"))
    torch.manual_seed(seed)
    if size == "tiny":
        unet = UNet2DConditionModel(
            block_out_channels=(8, 16),
            layers_per_block=1,
            sample_size=image_size // 2,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=8,
            norm_num_groups=4,
            attention_head_dim=2,
        )
        vae = AutoencoderKL(
            block_out_channels=[8, 16],
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=image_size,
        )
        text = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=8,
                intermediate_size=16,
                num_attention_heads=2,
                num_hidden_layers=2,
                vocab_size=len(tokenizer),
                bos_token_id=0,
                eos_token_id=2,
                pad_token_id=1,
                max_position_embeddings=77,
            )
        )
    else:
        unet, vae = sd15_unet(image_size), sd15_vae(image_size)
        text = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_attention_heads=12,
                num_hidden_layers=12,
                vocab_size=49408,
                max_position_embeddings=77,
            )
        )
    sched = {
        "num_train_timesteps": 1000,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }
    return {"unet": unet, "vae": vae, "text_encoder": text, "tokenizer": tokenizer, "scheduler_config": sched}


def sd15_unet(image_size: int = 512):
    """Stable Diffusion 1.x's UNet architecture (860M parameters, random weights) for ``image_size`` px images."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=image_size // 8,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
    )


def sd15_vae(image_size: int = 512):
    """Stable Diffusion 1.x's VAE architecture (84M parameters, random weights)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=image_size,
    )


def count_flops(fn) -> tuple[object, int]:
    """(``fn()``, the floating-point operations it ran, backward passes included), by
    PyTorch's ``FlopCounterMode`` (matrix multiplications and convolutions: what dominates)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return out, int(counter.get_total_flops())


def world_batch(n: int, seed: int = 0, masks: bool = False):
    """The first ``n`` balanced test images of the world as a :class:`~lit_vce.methods.VCEBatch`,
    each explained into the next class (with the foreground ``masks`` when asked)."""
    from ..data.world import ShapesWorld
    from ..methods import VCEBatch
    from ..rngs import sample_rngs

    d = ShapesWorld("balanced", "test", n)
    items = [d[i] for i in range(n)]
    ids = [it["sample_id"] for it in items]
    src = torch.tensor([it["label"] for it in items])
    return VCEBatch(
        torch.stack([it["image"] for it in items]),
        src,
        (src + 1) % 4,
        ids,
        sample_rngs(seed, ids),
        torch.stack([it["mask"] for it in items]) if masks else None,
    )


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def sampled_peak_growth(fn) -> float:
    """How far the resident memory rose above its level before ``fn()`` (MiB), sampled every 2 ms (Linux)."""
    start, peak, stop = _rss_mib(), [0.0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mib())
            stop.wait(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    return max(peak[0], _rss_mib()) - start


from .methods import check_method, tiny_batch, tiny_classifier, tiny_pixel_diffusion  # noqa: E402, F401  (the method contract)
