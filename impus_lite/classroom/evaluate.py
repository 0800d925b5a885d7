"""Evaluation of the classroom model: generation accuracy against the nearest training image,
VAE reconstruction and the DDIM inversion round trip; an image grid for looking at it."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from ..perceptual import nearest_indices, per_image_psnr, psnr
from .data import EmojiDataset, default_data_dir
from .tokenizer import tokenize
from .train import psnr_summary


@torch.no_grad()
def embed_prompts(model, prompts: Sequence[str]) -> torch.Tensor:
    """Text embeddings (B, 77, D) of prompts with the model's tokenizer and text encoder."""
    ids = tokenize(model.tokenizer, prompts).to(model.device)
    return model.text_encoder(ids)[0]


@dataclass
class EvaluationReport:
    """Figures of :func:`evaluate`.

    Attributes:
        nearest_accuracy: fraction of prompts whose generated image has the prompted emoji as
            nearest training image in pixel space.
        top5_accuracy: same, with the prompted emoji among the 5 nearest.
        vae_psnr: PSNR (dB) of the chosen training images through VAE encode/decode (one
            mean squared error over all of them).
        vae_psnr_mean, vae_psnr_worst_decile: per-image PSNR (dB) of every training image
            through the VAE: the mean, and the mean of the worst tenth.
        roundtrip_psnr: PSNR (dB) of training images through DDIM inversion then sampling.
        roundtrip_latent_rmse: RMS difference of the scaled latents before and after the
            inversion round trip.
        inverted_std: standard deviation of the inverted codes (about 1 when well inverted).
    """

    prompts: int
    nearest_accuracy: float
    top5_accuracy: float
    vae_psnr: float
    vae_psnr_mean: float
    vae_psnr_worst_decile: float
    roundtrip_psnr: float
    roundtrip_latent_rmse: float
    inverted_std: float
    seconds: float

    def lines(self) -> list[str]:
        return [
            f"generation: {self.nearest_accuracy:.1%} of {self.prompts} prompts give their emoji "
            f"as nearest training image (top-5: {self.top5_accuracy:.1%})",
            f"VAE reconstruction PSNR: {self.vae_psnr:.2f} dB; per image over the whole data "
            f"set: mean {self.vae_psnr_mean:.2f} dB, worst decile {self.vae_psnr_worst_decile:.2f} dB",
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
    from ..inversion import ddim_invert, ddim_sample
    from ..models import load_model

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
    per_image = torch.cat([per_image_psnr(model.decode(model.encode(batch)), batch)
                           for batch in references.split(64)])
    summary = psnr_summary(per_image)
    return EvaluationReport(
        prompts=len(chosen), nearest_accuracy=nearest_accuracy, top5_accuracy=top5_accuracy,
        vae_psnr=psnr(model.decode(latents), originals),
        vae_psnr_mean=summary["mean"], vae_psnr_worst_decile=summary["worst_decile"],
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
