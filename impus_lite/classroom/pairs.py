"""Morphs of emoji pairs on a classroom model: how switch-like its paths are, and how much of
each input its end frames keep next to what the VAE alone keeps.

    python -m impus_lite.classroom pairs --figure docs/figures/classroom_end_frames.png

A model that memorises its training images makes most of a cat-to-dog change in one step of a
uniform morph; :func:`impus_lite.perceptual.largest_step_share` of the 9-frame uniform path
measures it (1/8 for even steps, 1 for a switch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import torch

from .data import EmojiDataset, default_data_dir

#: Related emoji (captions of the data set): the pairs whose morphs the README reports.
SWITCH_PAIRS = (("cat face", "dog face"), ("red apple", "green apple"),
                ("rabbit face", "panda face"), ("tiger face", "lion face"),
                ("grinning face", "crying face"))


@dataclass
class PairMorph:
    """One pair's uniform morph.

    Attributes:
        captions: the two emoji's captions; prompt: "caption0 caption1".
        distances: the 8 consecutive LPIPS distances of the 9 frames (trunk in ``lpips_trunk``).
        largest_share: max distance / sum of distances.
        end_errors: see :func:`impus_lite.perceptual.end_errors` (PSNR in dB).
        inputs, reconstructions, ends: (2, 3, 64, 64) in [-1, 1]: the two emoji, their VAE
            reconstructions and the morph's first and last frames.
    """

    captions: tuple[str, str]
    prompt: str
    distances: list[float]
    largest_share: float
    end_errors: dict
    lpips_trunk: str
    inputs: torch.Tensor
    reconstructions: torch.Tensor
    ends: torch.Tensor


def morph_pairs(model_name: str = "classroom", pairs: Sequence[tuple[str, str]] = SWITCH_PAIRS,
                frames: int = 9, data_dir: Union[str, Path, None] = None,
                progress: bool = True) -> list[PairMorph]:
    """Morph each pair of training emoji with the ``fast`` preset on ``frames`` uniform alphas
    (the prompt is both captions, as the README's "cat face dog face")."""
    from ..config import MorphConfig
    from ..images import tensor_to_pil
    from ..models import load_model
    from ..morph import Morpher
    from ..perceptual import largest_step_share, load_lpips

    data = EmojiDataset.load(data_dir or default_data_dir())
    model = load_model(model_name, device="cpu", dtype=torch.float32)
    lpips = load_lpips()
    config = MorphConfig.preset("fast", frames=frames, schedule="uniform")
    pixels = data.pixels()
    out = []
    for pair in pairs:
        images = pixels[[data.index_of(caption) for caption in pair]]
        prompt = " ".join(pair)
        morpher = Morpher(model, *tensor_to_pil(images), prompt, config, lpips=lpips,
                          progress=progress)
        result = morpher.run()
        out.append(PairMorph(
            captions=tuple(pair), prompt=prompt, distances=list(result.distances),
            largest_share=largest_step_share(result.distances), end_errors=result.end_errors,
            lpips_trunk=result.lpips_trunk, inputs=morpher.images.cpu(),
            reconstructions=morpher.reconstructions(), ends=result.images[[0, -1]]))
    return out


def write_pair_folders(out_dir: Union[str, Path], pairs: Sequence[tuple[str, str]] = SWITCH_PAIRS,
                       data_dir: Union[str, Path, None] = None) -> list[Path]:
    """Write each pair of training emoji as a pair folder that ``evaluate`` reads:
    ``out_dir/<caption0>_<caption1>/`` with ``0_<caption0>.png``, ``1_<caption1>.png`` (64x64
    RGB, white background) and ``prompt.txt`` ("caption0 caption1", as :func:`morph_pairs`).
    Returns the folders, in the order of ``pairs``."""
    from PIL import Image

    data = EmojiDataset.load(data_dir or default_data_dir())
    folders = []
    for pair in pairs:
        folder = Path(out_dir) / "_".join(c.replace(" ", "-") for c in pair)
        folder.mkdir(parents=True, exist_ok=True)
        for k, caption in enumerate(pair):
            pixels = data.images[data.index_of(caption)].numpy()
            Image.fromarray(pixels).save(folder / f"{k}_{caption.replace(' ', '_')}.png")
        (folder / "prompt.txt").write_text(" ".join(pair) + "\n")
        folders.append(folder)
    return folders


def end_frames_figure(morphs: Sequence[PairMorph], path: Union[str, Path],
                      scale: int = 2) -> Path:
    """A PNG with one column per emoji (both ends of each pair) and three rows: the input, the
    VAE's reconstruction, the morph's end frame; pixels enlarged ``scale`` times (nearest)."""
    from matplotlib.figure import Figure

    columns = [(m.captions[i], m.inputs[i], m.reconstructions[i], m.ends[i])
               for m in morphs for i in range(2)]
    fig = Figure(figsize=(1.3 * len(columns), 4.3))
    axes = fig.subplots(3, len(columns), squeeze=False)
    for c, (caption, *images) in enumerate(columns):
        for r, image in enumerate(images):
            ax = axes[r][c]
            pixels = ((image.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
            ax.imshow(pixels.repeat(scale, 0).repeat(scale, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(caption.replace(" face", ""), fontsize=8)
    for r, label in enumerate(("input", "VAE", "morph end")):
        axes[r][0].set_ylabel(label, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def report_lines(morphs: Sequence[PairMorph]) -> list[str]:
    """A Markdown table: pair, largest step share, end PSNR and the VAE's (mean of both ends)."""
    lines = [f"LPIPS AlexNet ({morphs[0].lpips_trunk} trunk) between the 9 uniform frames",
             "| pair | largest step share | end PSNR (dB) | VAE PSNR (dB) |",
             "| --- | --- | --- | --- |"]
    for m in morphs:
        e = m.end_errors
        lines.append(f"| {m.captions[0]} -> {m.captions[1]} | {m.largest_share:.2f} | "
                     f"{(e['psnr_a'] + e['psnr_b']) / 2:.1f} | "
                     f"{(e['vae_psnr_a'] + e['vae_psnr_b']) / 2:.1f} |")
    shares = [m.largest_share for m in morphs]
    lines.append(f"mean largest step share {sum(shares) / len(shares):.2f} "
                 f"(even steps: {1 / len(morphs[0].distances):.3f})")
    return lines
