"""Reading images from disk into model-ready tensors, and back.

Convention: a model-ready image is a float32 tensor of shape (1, 3, S, S) with values in [-1, 1]
(pixel / 127.5 - 1). Frames handed back to users are ``PIL.Image.Image`` in RGB.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

ImageLike = Union[str, Path, Image.Image]
RESIZE_MODES = ("crop", "resize")
RESAMPLERS = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR}


def open_rgb(source: ImageLike) -> Image.Image:
    """Open any image Pillow reads as an upright RGB image.

    EXIF orientation is applied; transparency (RGBA, LA, palette with transparency) is composited
    on white; greyscale, CMYK and palette images are converted to RGB.

    Raises:
        InputError: the file is missing, is not an image, or is truncated.
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"Image not found: '{path}'.")
        try:
            image = Image.open(path)
            image.load()
        except UnidentifiedImageError:
            raise InputError(f"'{path}' is not an image file Pillow can read.") from None
        except Image.DecompressionBombError as error:
            raise InputError(f"'{path}' is too large to open safely ({error}).") from None
        except (OSError, SyntaxError) as error:
            raise InputError(f"'{path}' is truncated or damaged and cannot be read ({error}).") from None
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):   # 16-bit greyscale: 65535 is white
        image = image.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def fit_square(image: Image.Image, size: int, mode: str = "crop", resample: str = "lanczos") -> Image.Image:
    """Bring an RGB image to ``size`` x ``size``.

    ``mode="crop"`` keeps the aspect ratio and cuts the centre square; ``mode="resize"`` stretches
    the whole image (the IMPUS reference code: torchvision ``Resize((512, 512))``, which on a PIL
    image is Pillow's antialiased bilinear resize, i.e. ``resample="bilinear"``). ``resample`` is
    "lanczos" or "bilinear".
    """
    if mode not in RESIZE_MODES:
        raise InputError(f"Unknown resize mode '{mode}': use one of {', '.join(RESIZE_MODES)}.")
    if resample not in RESAMPLERS:
        raise InputError(f"Unknown resampling '{resample}': use one of {', '.join(RESAMPLERS)}.")
    if size < 8:
        raise InputError(f"Image size must be at least 8 pixels, got {size}.")
    if mode == "crop":
        return ImageOps.fit(image, (size, size), method=RESAMPLERS[resample])
    return image.resize((size, size), RESAMPLERS[resample])


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB ``PIL.Image`` of size (W, H) -> float32 tensor (1, 3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Tensor (B, 3, H, W) in [-1, 1] -> list of B RGB images (values clipped to the range)."""
    array = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in array]


def load_image(source: ImageLike, size: int, mode: str = "crop", resample: str = "lanczos") -> torch.Tensor:
    """Read ``source`` and return a (1, 3, size, size) tensor in [-1, 1] (see :func:`open_rgb`
    and :func:`fit_square`)."""
    return pil_to_tensor(fit_square(open_rgb(source), size, mode, resample))


def tensor_digest(tensor: torch.Tensor) -> str:
    """Hex SHA-256 of a tensor's shape and values: a content key for caches."""
    data = tensor.detach().float().cpu().contiguous().numpy()
    digest = hashlib.sha256(str(tuple(data.shape)).encode())
    digest.update(data.tobytes())
    return digest.hexdigest()
