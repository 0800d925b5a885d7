"""Export of a training run: the ``StableDiffusionPipeline`` built from its checkpoints, saved
with ``save_pretrained`` (safetensors) into ``data/classroom`` with its LICENSE."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import torch

from ..models import CLASSROOM_DIR, SD_SCHEDULER_CONFIG
from .tokenizer import load_tokenizer
from .train import (TrainConfig, _Diffuser, build_text_encoder, build_unet, build_vae,
                    count_parameters, default_train_dir)

MAX_WEIGHTS_MB = 40.0
LICENSE_TEXT = """The classroom model (weights in this folder) is trained only on images of the emoji of
Noto Color Emoji (https://github.com/googlefonts/noto-emoji), rendered from the Debian package
fonts-noto-color-emoji. The font is licensed under the SIL Open Font License, Version 1.1
(https://openfontlicense.org). The images were rendered, composited on white and resized to
64x64 by `python -m impus_lite.classroom build-data`; the captions are the Unicode names of
the emoji. The code that builds and trains the model is part of impus_lite (MIT licence).
"""


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


def export(checkpoint_dir: Union[str, Path] = None, out_dir: Union[str, Path] = CLASSROOM_DIR,
           use_ema: bool = True, dtype: Optional[torch.dtype] = None,
           max_mb: float = MAX_WEIGHTS_MB) -> Path:
    """Save the trained model with ``StableDiffusionPipeline.save_pretrained`` (safetensors)
    into ``out_dir`` (default ``data/classroom``) with a LICENSE file; the folder is replaced
    only once the new copy is complete.

    ``dtype`` None stores fp32 when the weights fit in ``max_mb`` and fp16 otherwise
    (``from_pretrained(torch_dtype=torch.float32)`` upcasts them on load). Raises ValueError
    when even that is above ``max_mb``.

    The text encoder is always stored in fp32: diffusers loads half UNet and VAE weights as fp32
    when no ``torch_dtype`` is given, but transformers 5 loads a model in its stored dtype, so a
    half text encoder would hand half embeddings to an fp32 UNet in a plain
    ``StableDiffusionPipeline.from_pretrained(folder)``."""
    checkpoint_dir = Path(checkpoint_dir or default_train_dir())
    out_dir = Path(out_dir)
    pipe = pipeline_from_checkpoints(checkpoint_dir, use_ema=use_ema)
    if dtype is None:
        params = sum(count_parameters(m) for m in (pipe.vae, pipe.unet, pipe.text_encoder))
        dtype = torch.float32 if params * 4 / 1e6 <= max_mb else torch.float16
    pipe.to(dtype=dtype)
    pipe.text_encoder.to(torch.float32)
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
        "text_encoder_dtype": str(torch.float32),
        "train_config": json.loads((checkpoint_dir / "config.json").read_text()),
        "unet_loss_history": unet_state["history"][-20:]}, indent=1))
    old = out_dir.with_name(out_dir.name + f".old{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir
