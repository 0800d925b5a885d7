"""The emoji data set: the single-code-point emoji of Noto Color Emoji (SIL Open Font License
1.1), rendered with Pillow, composited on white, cropped to their content and resized to 64x64;
each is captioned by its lower-case Unicode name ("cat face", "dog face").

Images are stored as uint8 (N, 64, 64, 3); :meth:`EmojiDataset.pixels` gives float tensors
(N, 3, 64, 64) in [-1, 1] (white = 1). ``python -m impus_lite.classroom build-data`` writes it."""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from ..models import impus_cache_dir
from .tokenizer import write_caption_tokenizer

IMAGE_SIZE = 64
NOTO_EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
NOTO_BITMAP_SIZE = 109  # the one size of the CBDT bitmaps in NotoColorEmoji.ttf


def default_data_dir() -> Path:
    """Where ``build-data`` writes the emoji data set (under the impus_lite cache)."""
    return impus_cache_dir() / "classroom-data"


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
