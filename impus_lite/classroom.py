"""The classroom model: a small text-to-image latent diffusion model trained on colour emoji.

It has exactly the Stable Diffusion layout (``AutoencoderKL`` VAE, ``UNet2DConditionModel``,
``CLIPTextModel`` + ``CLIPTokenizer``, DDIM scheduler with the SD 1.x noise schedule) so that
every stage of the morph runs on it unchanged, on a laptop CPU, in seconds.

* Data: the single-code-point emoji of Noto Color Emoji (SIL Open Font License 1.1), rendered
  with Pillow, composited on white, cropped to their content and resized to 64x64; each is
  captioned by its lower-case Unicode name ("cat face", "dog face").
* Tokenizer: CLIP's byte-level BPE with merges that make every caption word one token.
* Training, in two stages: the VAE (64x64x3 images <-> 16x16x4 latents, L1 + L2 + a small KL),
  then the UNet and the text encoder jointly on the epsilon loss, with caption dropout for
  classifier-free guidance. Latents are scaled by ``vae.config.scaling_factor`` = 1 / std.

Conventions: images are float tensors (B, 3, 64, 64) in [-1, 1] (white = 1); stored images are
uint8 (N, 64, 64, 3). Command line::

    python -m impus_lite.classroom build-data
    python -m impus_lite.classroom train --threads 1
    python -m impus_lite.classroom export
    python -m impus_lite.classroom evaluate
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .models import CLASSROOM_DIR, SD_SCHEDULER_CONFIG, impus_cache_dir, write_clip_tokenizer

IMAGE_SIZE = 64
NOTO_EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
NOTO_BITMAP_SIZE = 109  # the one size of the CBDT bitmaps in NotoColorEmoji.ttf
MAX_WEIGHTS_MB = 40.0
LICENSE_TEXT = """The classroom model (weights in this folder) is trained only on images of the emoji of
Noto Color Emoji (https://github.com/googlefonts/noto-emoji), rendered from the Debian package
fonts-noto-color-emoji. The font is licensed under the SIL Open Font License, Version 1.1
(https://openfontlicense.org). The images were rendered, composited on white and resized to
64x64 by `python -m impus_lite.classroom build-data`; the captions are the Unicode names of
the emoji. The code that builds and trains the model is part of impus_lite (MIT licence).
"""


def default_data_dir() -> Path:
    """Where ``build-data`` writes the emoji data set (under the impus_lite cache)."""
    return impus_cache_dir() / "classroom-data"


def default_train_dir() -> Path:
    """Where ``train`` keeps its checkpoints and log (under the impus_lite cache, not in git)."""
    return impus_cache_dir() / "classroom-train"


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

_EXCLUDED_CATEGORIES = {"Cc", "Cf", "Cn", "Co", "Me", "Mn", "Sk", "Zs", "Zl", "Zp"}
_REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)


def is_pictographic(codepoint: int) -> bool:
    """True for a code point that draws a picture on its own: not ASCII, not a joiner,
    variation selector, skin-tone modifier, tag or regional-indicator letter, and named in
    this Python's Unicode database (its name becomes the caption)."""
    char = chr(codepoint)
    return (codepoint >= 0xA9 and unicodedata.category(char) not in _EXCLUDED_CATEGORIES
            and codepoint not in _REGIONAL_INDICATORS and unicodedata.name(char, None) is not None)


def emoji_codepoints(font_path: Union[str, Path] = NOTO_EMOJI_FONT) -> list[int]:
    """The single code points the font maps to a glyph and that :func:`is_pictographic` keeps,
    in code point order."""
    from fontTools.ttLib import TTFont

    cmap = TTFont(str(font_path), lazy=True).getBestCmap()
    return [cp for cp in sorted(cmap) if is_pictographic(cp)]


def caption_of(char: str) -> str:
    """The caption of an emoji: its Unicode name in lower case ("cat face")."""
    return unicodedata.name(char).lower()


def fit_on_white(rgba, size: int = IMAGE_SIZE, margin: float = 0.04):
    """Composite an RGBA image on white, crop a square around its opaque content (plus a
    ``margin`` fraction on each side) and resize it to ``size`` x ``size`` (RGB).

    Returns None when the image has no opaque pixel."""
    from PIL import Image

    box = rgba.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
    if box is None:
        return None
    left, top, right, bottom = box
    side = max(right - left, bottom - top) * (1 + 2 * margin)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    square = tuple(round(v) for v in (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    white.alpha_composite(rgba)
    return white.convert("RGB").crop(square).resize((size, size), Image.LANCZOS)


def render_emoji(font, char: str, size: int = IMAGE_SIZE):
    """Draw one emoji with its embedded colour bitmap; an RGB ``size`` x ``size`` PIL image on
    white, or None when the font draws nothing for it."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGBA", (2 * NOTO_BITMAP_SIZE, 2 * NOTO_BITMAP_SIZE), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((NOTO_BITMAP_SIZE // 4, NOTO_BITMAP_SIZE // 4), char, font=font,
                                embedded_color=True)
    return fit_on_white(canvas, size)


@dataclass
class EmojiDataset:
    """Images and captions of the classroom data set.

    Attributes:
        images: uint8 tensor (N, 64, 64, 3), RGB, white background.
        captions: N captions, lower-case words ("cat face").
        codepoints: N Unicode code points (0 for images not made from a font).
    """

    images: torch.Tensor
    captions: list[str]
    codepoints: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)

    def pixels(self) -> torch.Tensor:
        """All images as float32 (N, 3, 64, 64) in [-1, 1] (white = 1)."""
        return self.images.permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def index_of(self, caption: str) -> int:
        """Position of the image whose caption is ``caption``."""
        return self.captions.index(caption)

    def save(self, folder: Union[str, Path]) -> Path:
        """Write ``images.safetensors``, ``captions.json`` and the caption tokenizer in
        ``folder/tokenizer``; returns the folder."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"images": self.images.contiguous()}, str(folder / "images.safetensors"))
        (folder / "captions.json").write_text(json.dumps(
            {"captions": self.captions, "codepoints": self.codepoints}, indent=0))
        write_caption_tokenizer(folder / "tokenizer", self.captions)
        return folder

    @classmethod
    def load(cls, folder: Union[str, Path]) -> "EmojiDataset":
        """Read a data set written by :meth:`save`."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "images.safetensors").is_file():
            raise FileNotFoundError(
                f"No classroom data set in '{folder}': run `python -m impus_lite.classroom "
                "build-data` first (it needs the Debian package fonts-noto-color-emoji).")
        meta = json.loads((folder / "captions.json").read_text())
        return cls(load_file(str(folder / "images.safetensors"))["images"], meta["captions"],
                   meta.get("codepoints", []))


def dataset_from_images(images: Sequence, captions: Sequence[str],
                        size: int = IMAGE_SIZE) -> EmojiDataset:
    """A data set from PIL images (RGB, or RGBA composited on white) and their captions;
    each image is resized to ``size`` x ``size``."""
    from PIL import Image

    arrays = []
    for image in images:
        if image.mode == "RGBA":
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            white.alpha_composite(image)
            image = white
        arrays.append(np.asarray(image.convert("RGB").resize((size, size), Image.LANCZOS)))
    return EmojiDataset(torch.from_numpy(np.stack(arrays)).to(torch.uint8),
                        [c.lower() for c in captions], [0] * len(captions))


def build_emoji_dataset(font_path: Union[str, Path] = NOTO_EMOJI_FONT,
                        size: int = IMAGE_SIZE, progress: bool = True) -> EmojiDataset:
    """Render every pictographic single-code-point emoji of the font (see the module
    docstring); about 1,360 images for Noto Color Emoji and Python's Unicode 14 names."""
    from PIL import ImageFont
    from tqdm.auto import tqdm

    font_path = Path(font_path)
    if not font_path.is_file():
        raise FileNotFoundError(
            f"Emoji font '{font_path}' not found: install it with `apt-get install "
            "fonts-noto-color-emoji` or pass --font.")
    font = ImageFont.truetype(str(font_path), NOTO_BITMAP_SIZE)
    images, captions, codepoints = [], [], []
    for cp in tqdm(emoji_codepoints(font_path), desc="render emoji", disable=not progress):
        image = render_emoji(font, chr(cp), size)
        if image is None:
            continue
        images.append(np.asarray(image))
        captions.append(caption_of(chr(cp)))
        codepoints.append(cp)
    return EmojiDataset(torch.from_numpy(np.stack(images)), captions, codepoints)


# --------------------------------------------------------------------------------------------
# Tokenizer: whole caption words as single CLIP tokens
# --------------------------------------------------------------------------------------------

_CLIP_PRETOKEN = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def caption_words(captions: Sequence[str]) -> list[str]:
    """The distinct words of the captions as CLIP's pre-tokenizer splits them (runs of
    letters, single digits, runs of punctuation), lower-case, sorted."""
    words = set()
    for caption in captions:
        words.update(_CLIP_PRETOKEN.findall(caption.lower()))
    return sorted(words)


def _bpe_pieces(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one word with the merge ranks given (lowest rank merges first)."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, math.inf), i, pair) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, _, best = min(pairs)
        if rank == math.inf:
            break
        merged, i = [], 0
        while i < len(pieces):
            if i < len(pieces) - 1 and (pieces[i], pieces[i + 1]) == best:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def word_merges(words: Sequence[str]) -> list[str]:
    """BPE merges (``"c a"``, ``"ca t</w>"``, ...) after which each word is one token.

    Merges are appended until every word is whole; a merge appended last has the lowest
    priority, so it never splits a word that was already whole."""
    merges: list[str] = []
    ranks: dict[tuple[str, str], int] = {}
    unfinished = sorted(set(words), key=lambda w: (len(w), w))
    while unfinished:
        still = []
        for word in unfinished:
            pieces = _bpe_pieces(word, ranks)
            if len(pieces) > 1:
                pair = (pieces[0], pieces[1])
                if pair not in ranks:
                    ranks[pair] = len(merges)
                    merges.append(f"{pair[0]} {pair[1]}")
                still.append(word)
        unfinished = still
    return merges


def write_caption_tokenizer(folder: Union[str, Path], captions: Sequence[str]) -> Path:
    """Write a ``CLIPTokenizer`` (vocab.json, merges.txt, ...) in which every word of the
    captions is a single token; other text falls back to characters. Returns the folder."""
    return write_clip_tokenizer(folder, word_merges(caption_words(captions)))


# --------------------------------------------------------------------------------------------
# Model configurations
# --------------------------------------------------------------------------------------------

#: Architecture presets: "classroom" is the shipped model, "tiny" is for tests.
ARCHITECTURES = {
    "classroom": dict(
        vae=dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16),
        unet=dict(block_out_channels=(64, 128, 192), layers_per_block=1, norm_num_groups=32,
                  attention_head_dim=8,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
        text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4),
    ),
    "tiny": dict(
        vae=dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=8),
        unet=dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                  attention_head_dim=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4),
    ),
}


def build_vae(arch: str, image_size: int = IMAGE_SIZE):
    """An ``AutoencoderKL`` with scale factor 4: (B, 3, 64, 64) <-> (B, 4, 16, 16)."""
    from diffusers import AutoencoderKL

    spec = ARCHITECTURES[arch]["vae"]
    levels = len(spec["block_out_channels"])
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=image_size,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, **spec)


def build_unet(arch: str, cross_attention_dim: int, latent_size: int = IMAGE_SIZE // 4):
    """A ``UNet2DConditionModel`` on (B, 4, 16, 16) latents with cross attention to text
    embeddings of width ``cross_attention_dim``."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=latent_size, in_channels=4, out_channels=4,
                                cross_attention_dim=cross_attention_dim,
                                **ARCHITECTURES[arch]["unet"])


def build_text_encoder(arch: str, tokenizer):
    """A ``CLIPTextModel`` for ``tokenizer`` (77 positions, SD's text length)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = ARCHITECTURES[arch]["text"]
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
        projection_dim=spec["hidden_size"], bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **spec))


def load_tokenizer(folder: Union[str, Path]):
    """The ``CLIPTokenizer`` saved in ``folder``."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Token ids (B, 77), padded to the tokenizer's full length as Stable Diffusion does."""
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Settings of a training run; stored in the checkpoint folder.

    Steps are totals: running ``train`` again with larger ``unet_steps`` resumes and extends a
    finished run. The architecture, seed and batch sizes of an existing run are kept.
    """

    data_dir: str = field(default_factory=lambda: str(default_data_dir()))
    checkpoint_dir: str = field(default_factory=lambda: str(default_train_dir()))
    arch: str = "classroom"
    seed: int = 0
    vae_steps: int = 1000
    vae_batch_size: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    unet_steps: int = 6000
    unet_batch_size: int = 32
    unet_lr: float = 5e-4
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    checkpoint_every: int = 200
    log_every: int = 50
    threads: Optional[int] = None
    progress: bool = True


def set_threads(threads: Optional[int]) -> None:
    """Limit PyTorch to ``threads`` CPU threads (None: PyTorch's default)."""
    if threads:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:  # only settable before the first parallel work
            pass


def vae_loss(vae, images: torch.Tensor, generator: torch.Generator,
             kl_weight: float) -> tuple[torch.Tensor, dict]:
    """L1 + L2 reconstruction of images (B, 3, H, W) in [-1, 1] through a sampled latent,
    plus ``kl_weight`` times the KL to N(0, I) summed over latent cells (mean over batch)."""
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample(generator=generator)).sample
    l1 = (recon - images).abs().mean()
    l2 = (recon - images).pow(2).mean()
    kl = posterior.kl().mean()
    return l1 + l2 + kl_weight * kl, {"l1": l1.item(), "l2": l2.item(), "kl": kl.item()}


def diffusion_loss(unet, text_encoder, latents: torch.Tensor, token_ids: torch.Tensor,
                   noise: torch.Tensor, timesteps: torch.Tensor, scheduler,
                   min_snr_gamma: Optional[float] = None) -> torch.Tensor:
    """The epsilon loss ||eps - eps_theta(z_t, t, c)||^2 of scaled latents (B, 4, h, w).

    With ``min_snr_gamma`` each sample is weighted by min(SNR(t), gamma) / SNR(t) (Min-SNR,
    Hang et al. 2023), which speeds up training; the weight is 1 for noisy steps."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    context = text_encoder(token_ids)[0]
    prediction = unet(noisy, timesteps, context).sample
    per_sample = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
    if min_snr_gamma:
        alphas = scheduler.alphas_cumprod[timesteps]
        snr = alphas / (1 - alphas)
        per_sample = per_sample * (snr.clamp(max=min_snr_gamma) / snr)
    return per_sample.mean()


def _save_atomic(state: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _progress(total: int, start: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=desc, disable=not enabled, mininterval=5,
                dynamic_ncols=True)


def _log(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"[{time.strftime('%H:%M:%S')}] {message}")
    sys.stdout.flush()


def train_vae(config: TrainConfig, data: EmojiDataset, folder: Path) -> dict:
    """Train (or resume) the VAE stage up to ``config.vae_steps``; returns its checkpoint.

    Checkpoint ``vae.pt``: step, model and optimizer state, data/noise generator state,
    history (step, mean loss of the last ``log_every`` steps)."""
    path = folder / "vae.pt"
    torch.manual_seed(config.seed)  # the initial weights
    vae = build_vae(config.arch)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    state = {"step": 0, "history": []}
    if path.is_file():
        state = torch.load(path, weights_only=False)
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
    if state["step"] >= config.vae_steps:
        return state
    images = data.pixels()
    vae.train()
    recent = []
    bar = _progress(config.vae_steps, state["step"], "vae", config.progress)

    def checkpoint():
        state.update(model=vae.state_dict(), optimizer=optimizer.state_dict(),
                     generator=generator.get_state(), config=asdict(config))
        _save_atomic(state, path)

    for step in range(state["step"], config.vae_steps):
        batch = images[torch.randint(len(images), (config.vae_batch_size,), generator=generator)]
        loss, parts = vae_loss(vae, batch, generator, config.kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        state["step"] = step + 1
        recent.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", l1=f"{parts['l1']:.4f}", refresh=False)
        if state["step"] % config.log_every == 0 or state["step"] == config.vae_steps:
            state["history"].append((state["step"], float(np.mean(recent))))
            _log(f"vae step {state['step']}: loss {np.mean(recent):.5f} (l1 {parts['l1']:.4f}, "
                 f"kl {parts['kl']:.1f})")
            recent = []
        if state["step"] % config.checkpoint_every == 0:
            checkpoint()
    bar.close()
    checkpoint()
    return state


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Posterior means (N, 4, 16, 16) of images (N, 3, 64, 64) in [-1, 1], unscaled."""
    vae.eval()
    return torch.cat([vae.encode(images[i:i + batch_size]).latent_dist.mean
                      for i in range(0, len(images), batch_size)])


def latent_scaling_factor(latents: torch.Tensor) -> float:
    """1 / std of the latents: multiplying by it gives latents of unit standard deviation
    (the role 0.18215 plays for SD's VAE)."""
    return float(1.0 / latents.float().std())


class _Diffuser(torch.nn.Module):
    """The UNet and the text encoder trained together: one module, one optimizer."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder


def train_unet(config: TrainConfig, data: EmojiDataset, folder: Path, vae_state: dict) -> dict:
    """Train (or resume) the UNet + text encoder stage up to ``config.unet_steps``.

    Checkpoint ``unet.pt``: step, model, EMA and optimizer state, generator state, the latent
    scaling factor, history (step, mean loss of the last ``log_every`` steps)."""
    from diffusers.training_utils import EMAModel

    path = folder / "unet.pt"
    tokenizer = load_tokenizer(Path(config.data_dir) / "tokenizer")
    torch.manual_seed(config.seed + 1)  # the initial weights
    text_encoder = build_text_encoder(config.arch, tokenizer)
    unet = build_unet(config.arch, text_encoder.config.hidden_size)
    model = _Diffuser(unet, text_encoder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.unet_lr, weight_decay=1e-2)
    warmup = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, config.warmup_steps)))
    ema = EMAModel(model.parameters(), decay=config.ema_decay)
    generator = torch.Generator().manual_seed(config.seed + 1)
    scheduler = training_noise_scheduler()

    vae = build_vae(config.arch)
    vae.load_state_dict(vae_state["model"])
    raw_latents = encode_dataset(vae, data.pixels())
    state = {"step": 0, "history": [], "scaling_factor": latent_scaling_factor(raw_latents)}
    if path.is_file():
        state = torch.load(path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        warmup.load_state_dict(state["lr_schedule"])
        ema.load_state_dict(state["ema"])
        generator.set_state(state["generator"])
    if state["step"] >= config.unet_steps:
        return state
    latents = raw_latents * state["scaling_factor"]
    token_ids = tokenize(tokenizer, data.captions)
    empty_ids = tokenize(tokenizer, [""])
    model.train()
    recent = []
    bar = _progress(config.unet_steps, state["step"], "unet", config.progress)

    def checkpoint():
        state.update(model=model.state_dict(), optimizer=optimizer.state_dict(),
                     lr_schedule=warmup.state_dict(), ema=ema.state_dict(),
                     generator=generator.get_state(), config=asdict(config))
        _save_atomic(state, path)

    for step in range(state["step"], config.unet_steps):
        index = torch.randint(len(latents), (config.unet_batch_size,), generator=generator)
        ids = token_ids[index].clone()
        drop = torch.rand(len(index), generator=generator) < config.caption_dropout
        ids[drop] = empty_ids
        noise = torch.randn(latents[index].shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),),
                                  generator=generator)
        loss = diffusion_loss(unet, text_encoder, latents[index], ids, noise, timesteps,
                              scheduler, config.min_snr_gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        ema.step(model.parameters())
        state["step"] = step + 1
        recent.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if state["step"] % config.log_every == 0 or state["step"] == config.unet_steps:
            state["history"].append((state["step"], float(np.mean(recent))))
            _log(f"unet step {state['step']}: loss {np.mean(recent):.5f}")
            recent = []
        if state["step"] % config.checkpoint_every == 0:
            checkpoint()
    bar.close()
    checkpoint()
    return state


def _stored_config(folder: Path, config: TrainConfig) -> TrainConfig:
    """The run's config: architecture, seed and batch sizes come from an existing run in
    ``folder`` (so a resumed run continues the same experiment); step counts, intervals,
    threads and paths from ``config``."""
    path = folder / "config.json"
    if not path.is_file():
        return config
    stored = json.loads(path.read_text())
    kept = ("arch", "seed", "vae_batch_size", "unet_batch_size", "caption_dropout",
            "kl_weight", "min_snr_gamma", "ema_decay", "vae_lr", "unet_lr", "warmup_steps")
    return TrainConfig(**{**asdict(config), **{k: stored[k] for k in kept if k in stored}})


def train(config: TrainConfig) -> dict:
    """Run (or resume) both training stages; returns {"vae": state, "unet": state}.

    Everything lives in ``config.checkpoint_dir``: ``config.json``, ``vae.pt``, ``unet.pt``.
    Interrupt at any time; the same command resumes from the last checkpoint."""
    set_threads(config.threads)
    folder = Path(config.checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    config = _stored_config(folder, config)
    (folder / "config.json").write_text(json.dumps(asdict(config), indent=2))
    data = EmojiDataset.load(config.data_dir)
    _log(f"data: {len(data)} images from {config.data_dir}; checkpoints in {folder}")
    vae_state = train_vae(config, data, folder)
    unet_state = train_unet(config, data, folder, vae_state) if config.unet_steps > 0 else None
    return {"vae": vae_state, "unet": unet_state}


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------

def pipeline_from_checkpoints(checkpoint_dir: Union[str, Path], use_ema: bool = True):
    """A ``StableDiffusionPipeline`` (fp32, CPU) from a training folder: the trained VAE with
    its latent scaling factor, the (EMA) UNet and text encoder, the caption tokenizer and a
    DDIM scheduler with the SD 1.x schedule."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = Path(checkpoint_dir)
    config = TrainConfig(**json.loads((folder / "config.json").read_text()))
    vae_state = torch.load(folder / "vae.pt", weights_only=False)
    unet_state = torch.load(folder / "unet.pt", weights_only=False)
    tokenizer = load_tokenizer(Path(config.data_dir) / "tokenizer")
    vae = build_vae(config.arch)
    vae.load_state_dict(vae_state["model"])
    vae.register_to_config(scaling_factor=unet_state["scaling_factor"])
    text_encoder = build_text_encoder(config.arch, tokenizer)
    unet = build_unet(config.arch, text_encoder.config.hidden_size)
    model = _Diffuser(unet, text_encoder)
    model.load_state_dict(unet_state["model"])
    if use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(model.parameters(), decay=config.ema_decay)
        ema.load_state_dict(unet_state["ema"])
        ema.copy_to(model.parameters())
    for module in (vae, unet, text_encoder):
        module.eval()
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


def weights_megabytes(folder: Union[str, Path]) -> float:
    """Total size in MB (10^6 bytes) of the ``*.safetensors`` files under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors")) / 1e6


def training_noise_scheduler():
    """The forward process the UNet is trained on: ``DDPMScheduler`` on SD's schedule
    (scaled-linear betas from 0.00085 to 0.012 over 1000 steps), the one DDIM later samples."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**{k: v for k, v in SD_SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})


def export(checkpoint_dir: Union[str, Path] = None, out_dir: Union[str, Path] = CLASSROOM_DIR,
           use_ema: bool = True, dtype: Optional[torch.dtype] = None,
           max_mb: float = MAX_WEIGHTS_MB) -> Path:
    """Save the trained model with ``StableDiffusionPipeline.save_pretrained`` (safetensors)
    into ``out_dir`` (default ``data/classroom``) with a LICENSE file; the folder is replaced
    only once the new copy is complete.

    ``dtype`` None stores fp32 when the weights fit in ``max_mb`` and fp16 otherwise
    (``from_pretrained(torch_dtype=torch.float32)`` upcasts them on load). Raises ValueError
    when even that is above ``max_mb``."""
    checkpoint_dir = Path(checkpoint_dir or default_train_dir())
    out_dir = Path(out_dir)
    pipe = pipeline_from_checkpoints(checkpoint_dir, use_ema=use_ema)
    if dtype is None:
        params = sum(count_parameters(m) for m in (pipe.vae, pipe.unet, pipe.text_encoder))
        dtype = torch.float32 if params * 4 / 1e6 <= max_mb else torch.float16
    pipe.to(dtype=dtype)
    staging = out_dir.with_name(out_dir.name + f".staging{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    size = weights_megabytes(staging)
    if size > max_mb:
        shutil.rmtree(staging)
        raise ValueError(f"Exported weights are {size:.1f} MB, above the {max_mb} MB limit.")
    (staging / "LICENSE").write_text(LICENSE_TEXT)
    unet_state = torch.load(checkpoint_dir / "unet.pt", weights_only=False)
    (staging / "training.json").write_text(json.dumps({
        "vae_steps": torch.load(checkpoint_dir / "vae.pt", weights_only=False)["step"],
        "unet_steps": unet_state["step"], "ema": use_ema, "dtype": str(dtype),
        "unet_loss_history": unet_state["history"][-20:]}, indent=1))
    old = out_dir.with_name(out_dir.name + f".old{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def embed_prompts(model, prompts: Sequence[str]) -> torch.Tensor:
    """Text embeddings (B, 77, D) of prompts with the model's tokenizer and text encoder."""
    ids = tokenize(model.tokenizer, prompts).to(model.device)
    return model.text_encoder(ids)[0]


def nearest_indices(images: torch.Tensor, references: torch.Tensor, k: int = 1) -> torch.Tensor:
    """For each image (B, 3, H, W), the indices (B, k) of its ``k`` nearest references
    (N, 3, H, W) in pixel space (Euclidean distance), nearest first; k is capped at N."""
    distances = torch.cdist(images.flatten(1).float(), references.flatten(1).float())
    return distances.topk(min(k, len(references)), largest=False).indices


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


@dataclass
class EvaluationReport:
    """Figures of :func:`evaluate`.

    Attributes:
        nearest_accuracy: fraction of prompts whose generated image has the prompted emoji as
            nearest training image in pixel space.
        top5_accuracy: same, with the prompted emoji among the 5 nearest.
        vae_psnr: PSNR (dB) of training images through VAE encode/decode.
        roundtrip_psnr: PSNR (dB) of training images through DDIM inversion then sampling.
        roundtrip_latent_rmse: RMS difference of the scaled latents before and after the
            inversion round trip.
        inverted_std: standard deviation of the inverted codes (about 1 when well inverted).
    """

    prompts: int
    nearest_accuracy: float
    top5_accuracy: float
    vae_psnr: float
    roundtrip_psnr: float
    roundtrip_latent_rmse: float
    inverted_std: float
    seconds: float

    def lines(self) -> list[str]:
        return [
            f"generation: {self.nearest_accuracy:.1%} of {self.prompts} prompts give their emoji "
            f"as nearest training image (top-5: {self.top5_accuracy:.1%})",
            f"VAE reconstruction PSNR: {self.vae_psnr:.2f} dB",
            f"DDIM inversion + sampling round trip: PSNR {self.roundtrip_psnr:.2f} dB, latent "
            f"RMSE {self.roundtrip_latent_rmse:.4f}, inverted code std {self.inverted_std:.3f}",
            f"({self.seconds:.0f} s)",
        ]


def evaluate(model_name: str = "classroom", data_dir: Union[str, Path, None] = None,
             prompts: int = 100, steps: int = 25, guidance: float = 4.0,
             inversion_steps: int = 50, roundtrip_images: int = 8, seed: int = 0,
             grid_path: Union[str, Path, None] = None) -> EvaluationReport:
    """Measure the classroom model (see :class:`EvaluationReport`) on ``prompts`` captions of
    the training set chosen with ``seed``; optionally save the generated images as a grid.

    Generation: DDIM (eta 0) with ``steps`` steps and classifier-free ``guidance`` from seeded
    noise. Round trip: the first ``roundtrip_images`` chosen images are DDIM-inverted with
    their caption (guidance 1, ``inversion_steps``) and sampled back the same way; both use
    :mod:`impus_lite.inversion`, the code the morph runs."""
    from .inversion import ddim_invert, ddim_sample
    from .models import load_model

    start_time = time.time()
    model = load_model(model_name, device="cpu", dtype=torch.float32)
    data = EmojiDataset.load(data_dir or default_data_dir())
    references = data.pixels()
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(data), generator=generator)[:prompts].sort().values
    captions = [data.captions[i] for i in chosen]
    side = model.unet.config.sample_size
    noise = torch.randn(len(chosen), model.latent_channels, side, side, generator=generator)
    uncond = embed_prompts(model, [""])
    generated = []
    for i in range(0, len(chosen), 50):
        context = embed_prompts(model, captions[i:i + 50])
        latents = ddim_sample(model, noise[i:i + 50], context, uncond, guidance, steps,
                              progress=False)
        generated.append(model.decode(latents))
    generated = torch.cat(generated)
    top5 = nearest_indices(generated, references, k=5)
    nearest_accuracy = (top5[:, 0] == chosen).float().mean().item()
    top5_accuracy = (top5 == chosen[:, None]).any(dim=1).float().mean().item()
    if grid_path:
        save_grid(torch.stack([generated, references[top5[:, 0]]], 1).flatten(0, 1), grid_path,
                  columns=20)

    originals = references[chosen[:roundtrip_images]]
    latents = model.encode(originals)
    context = embed_prompts(model, captions[:roundtrip_images])
    codes = ddim_invert(model, latents, context, inversion_steps, progress=False)
    back = ddim_sample(model, codes, context, uncond, 1.0, inversion_steps, progress=False)
    return EvaluationReport(
        prompts=len(chosen), nearest_accuracy=nearest_accuracy, top5_accuracy=top5_accuracy,
        vae_psnr=psnr(model.decode(latents), originals),
        roundtrip_psnr=psnr(model.decode(back), originals),
        roundtrip_latent_rmse=(back - latents).pow(2).mean().sqrt().item(),
        inverted_std=codes.std().item(), seconds=time.time() - start_time)


def save_grid(images: torch.Tensor, path: Union[str, Path], columns: int = 10) -> Path:
    """Save images (B, 3, H, W) in [-1, 1] as one PNG grid, ``columns`` per row."""
    from PIL import Image

    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    rows = math.ceil(len(pixels) / columns)
    h, w = pixels.shape[1:3]
    grid = np.full((rows * h, columns * w, 3), 255, np.uint8)
    for i, image in enumerate(pixels.numpy()):
        grid[(i // columns) * h:(i // columns + 1) * h, (i % columns) * w:(i % columns + 1) * w] = image
    Image.fromarray(grid).save(path)
    return Path(path)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m impus_lite.classroom",
        description="Build the emoji data set, train, export and evaluate the classroom model.")
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build-data", help="render the emoji data set and tokenizer")
    build.add_argument("--font", default=NOTO_EMOJI_FONT, help="path of NotoColorEmoji.ttf")
    build.add_argument("--out", default=str(default_data_dir()), help="data set folder")

    run = commands.add_parser("train", help="train (or resume) the VAE, then UNet + text encoder")
    run.add_argument("--data", default=defaults.data_dir, help="data set folder")
    run.add_argument("--checkpoints", default=defaults.checkpoint_dir,
                     help="checkpoint folder; an existing run there is resumed")
    run.add_argument("--arch", default=defaults.arch, choices=sorted(ARCHITECTURES))
    run.add_argument("--seed", type=int, default=defaults.seed)
    run.add_argument("--vae-steps", type=int, default=defaults.vae_steps, help="total VAE steps")
    run.add_argument("--unet-steps", type=int, default=defaults.unet_steps,
                     help="total UNet steps (raise it to extend a finished run)")
    run.add_argument("--vae-batch-size", type=int, default=defaults.vae_batch_size)
    run.add_argument("--unet-batch-size", type=int, default=defaults.unet_batch_size)
    run.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    run.add_argument("--log-every", type=int, default=defaults.log_every)
    run.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    run.add_argument("--export", action="store_true",
                     help="export to data/classroom when training ends")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    out = commands.add_parser("export", help="save the trained model into data/classroom")
    out.add_argument("--checkpoints", default=defaults.checkpoint_dir)
    out.add_argument("--out", default=str(CLASSROOM_DIR))
    out.add_argument("--no-ema", action="store_true", help="export the raw, not the EMA weights")

    check = commands.add_parser("evaluate", help="measure generation and inversion quality")
    check.add_argument("--model", default="classroom", help="'classroom' or a model folder")
    check.add_argument("--data", default=str(default_data_dir()))
    check.add_argument("--prompts", type=int, default=100)
    check.add_argument("--steps", type=int, default=25, help="DDIM sampling steps")
    check.add_argument("--guidance", type=float, default=4.0)
    check.add_argument("--inversion-steps", type=int, default=50)
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--grid", default=None,
                       help="PNG to save: each generated image next to its nearest training image")
    check.add_argument("--threads", type=int, default=None)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "build-data":
        data = build_emoji_dataset(args.font)
        folder = data.save(args.out)
        print(f"{len(data)} images, {len(caption_words(data.captions))} caption words -> {folder}")
    elif args.command == "train":
        config = TrainConfig(
            data_dir=args.data, checkpoint_dir=args.checkpoints, arch=args.arch, seed=args.seed,
            vae_steps=args.vae_steps, unet_steps=args.unet_steps,
            vae_batch_size=args.vae_batch_size, unet_batch_size=args.unet_batch_size,
            checkpoint_every=args.checkpoint_every, log_every=args.log_every,
            threads=args.threads, progress=not args.no_progress)
        train(config)
        if args.export:
            print(f"exported to {export(args.checkpoints)}")
    elif args.command == "export":
        folder = export(args.checkpoints, args.out, use_ema=not args.no_ema)
        print(f"exported to {folder} ({weights_megabytes(folder):.1f} MB of weights)")
    elif args.command == "evaluate":
        set_threads(args.threads)
        report = evaluate(args.model, args.data, args.prompts, args.steps, args.guidance,
                          args.inversion_steps, seed=args.seed, grid_path=args.grid)
        print("\n".join(report.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
