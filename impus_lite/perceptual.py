"""Image distances and path metrics: LPIPS, PPL (two forms), PDV, smoothness, rPPD (notebooks 06, 08).

Conventions (the papers disagree; these are the ones used everywhere in impus_lite):

* LPIPS is ``lpips.LPIPS(net="alex")`` (version 0.1, the learned linear heads shipped in the
  lpips wheel) on images in **[-1, 1]**, the range lpips expects. DiffMorpher's reschedule
  (``utils/alpha_scheduler.py``) feeds [0, 1] and AID's code ImageNet-normalised tensors; both
  distort the distance. DiffMorpher's evaluation script (its issue 33) feeds [-1, 1], as here.
* The AlexNet trunk needs ImageNet weights from the internet (torchvision downloads them once
  into ``torch.hub.get_dir()``). Without them the same lpips code runs on a random trunk with a
  fixed seed: still a metric on images, not the perceptual one. :attr:`Lpips.trunk` says which
  ("imagenet" or "random"); every result that uses LPIPS records it.
* Path metrics take the K-1 consecutive distances ``d_k = LPIPS(x_k, x_{k+1})`` of K frames.
* PSNR is on images in [-1, 1] with peak-to-peak 2, the same number as on [0, 1] with peak 1.
"""

from __future__ import annotations

import math
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch

from .errors import InputError

TRUNKS = ("auto", "imagenet", "random")
_ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
_CACHE: dict = {}


def _alexnet_weights_cached() -> bool:
    return (Path(torch.hub.get_dir()) / "checkpoints" / _ALEXNET_FILE).is_file()


def _offline() -> bool:
    return any(os.environ.get(k, "").strip() in ("1", "true", "True", "yes")
               for k in ("IMPUS_LITE_OFFLINE", "HF_HUB_OFFLINE"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub (``HF_ENDPOINT``, default
    huggingface.co, port 443) opens within ``timeout`` seconds. Offline, the hub client retries
    for most of a minute before giving up; this answers in at most ``timeout``."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host or "huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _build_lpips(pretrained_trunk: bool):
    import lpips
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*")
        torch.manual_seed(0)
        return lpips.LPIPS(net="alex", pretrained=True, pnet_rand=not pretrained_trunk, verbose=False)


class Lpips:
    """LPIPS distance between images in [-1, 1].

    Call with two tensors (B, 3, H, W) (or (1, ...) against (B, ...), broadcast) and get a
    float32 tensor (B,) of distances. Images smaller than 32 pixels a side are upsampled
    (bilinear) to 32, the smallest size AlexNet's five layers accept.

    Attributes:
        trunk: "imagenet" (the real LPIPS) or "random" (random AlexNet trunk, fixed seed).
    """

    def __init__(self, trunk: str = "auto", device: Union[str, torch.device] = "cpu"):
        if trunk not in TRUNKS:
            raise InputError(f"Unknown LPIPS trunk '{trunk}': use one of {', '.join(TRUNKS)}.")
        self.device = torch.device(device)
        if trunk == "auto":
            trunk = "imagenet" if _alexnet_weights_cached() else ("random" if _offline() else "download")
        if trunk == "download":
            previous = socket.getdefaulttimeout()
            socket.setdefaulttimeout(15)
            try:
                self.net, trunk = _build_lpips(True), "imagenet"
            except Exception as error:  # no internet, proxy, broken download
                warnings.warn(f"LPIPS: AlexNet ImageNet weights could not be downloaded ({error}); "
                              "using a random trunk, which is not the perceptual metric.")
                self.net, trunk = _build_lpips(False), "random"
            finally:
                socket.setdefaulttimeout(previous)
        else:
            self.net = _build_lpips(trunk == "imagenet")
        self.trunk = trunk
        self.net.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = a.to(self.device, torch.float32)
        b = b.to(self.device, torch.float32)
        if a.shape[0] != b.shape[0]:
            a, b = torch.broadcast_tensors(a, b)
        if a.shape[-1] < 32 or a.shape[-2] < 32:
            size = (max(32, a.shape[-2]), max(32, a.shape[-1]))
            a = torch.nn.functional.interpolate(a, size=size, mode="bilinear", align_corners=False)
            b = torch.nn.functional.interpolate(b, size=size, mode="bilinear", align_corners=False)
        return self.net(a, b, normalize=False).reshape(-1).float().cpu()

    def __repr__(self) -> str:
        return f"Lpips(net='alex', trunk='{self.trunk}', device='{self.device}')"


def load_lpips(trunk: str = "auto", device: Union[str, torch.device] = "cpu") -> Lpips:
    """A shared :class:`Lpips` per (trunk, device): building it once saves a second per call.

    ``trunk="auto"`` uses the ImageNet trunk when its weights are cached or downloadable, and a
    random trunk when offline (``IMPUS_LITE_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` skips the try).
    """
    key = (trunk, str(torch.device(device)))
    if key not in _CACHE:
        _CACHE[key] = Lpips(trunk, device)
    return _CACHE[key]


# --------------------------------------------------------------------------------------------
# Path metrics on consecutive distances
# --------------------------------------------------------------------------------------------

def consecutive_distances(frames: torch.Tensor, distance: Callable) -> np.ndarray:
    """``d_k = distance(x_k, x_{k+1})`` for frames (K, 3, H, W) in [-1, 1] -> array (K-1,)."""
    if frames.shape[0] < 2:
        raise InputError("A path needs at least 2 frames.")
    return np.asarray(distance(frames[:-1], frames[1:]), dtype=np.float64).reshape(-1)


def _as_array(distances: Sequence[float]) -> np.ndarray:
    d = np.asarray(distances, dtype=np.float64).reshape(-1)
    if d.size == 0:
        raise InputError("Path metrics need at least one consecutive distance (two frames).")
    return d


def ppl_path_sum(distances: Sequence[float]) -> float:
    """Perceptual path length, path-sum form (DiffMorpher): ``sum_k d_k``."""
    return float(_as_array(distances).sum())


def pdv(distances: Sequence[float], use_std: bool = False) -> float:
    """Perceptual distance variance (DiffMorpher): ``Var_k d_k`` (population variance).

    ``use_std=True`` gives the standard deviation instead, as some scripts report.
    """
    d = _as_array(distances)
    return float(d.std() if use_std else d.var())


def gini(values: Sequence[float]) -> float:
    """Gini coefficient ``sum_ij |v_i - v_j| / (2 n^2 mean(v))`` of non-negative values; 0 when
    all are equal, (n-1)/n when one holds everything."""
    v = _as_array(values)
    if np.any(v < 0):
        raise InputError("The Gini coefficient needs non-negative values.")
    mean = v.mean()
    if mean == 0:
        return 0.0
    return float(np.abs(v[:, None] - v[None, :]).sum() / (2 * v.size ** 2 * mean))


def smoothness(distances: Sequence[float]) -> float:
    """AID's smoothness: ``1 - Gini(d)``; 1 for perfectly even steps."""
    return 1.0 - gini(distances)


def largest_step_share(distances: Sequence[float]) -> float:
    """How switch-like a path is: the largest share of the total path length taken by one step,
    ``max_k d_k / sum_k d_k``; 1/(K-1) for perfectly even steps, 1 when one step does it all."""
    d = _as_array(distances)
    total = d.sum()
    return float(d.max() / total) if total > 0 else 0.0


def rppd(distances: Sequence[float], end_distance: float) -> float:
    """Relative perceptual path diversity (IMPUS): ``sum_k d_k / ((K-1) LPIPS(x_0, x_{K-1}))``.

    The mean consecutive distance relative to the distance of the end frames. A path that
    wanders (many changes between the ends) has a large rPPD and gets a higher LoRA rank;
    IMPUS measures it on 10 uniform frames of the un-adapted model.
    """
    d = _as_array(distances)
    if end_distance <= 0:
        raise InputError("rPPD needs end frames at a positive distance from each other.")
    return float(d.sum() / (d.size * end_distance))


@dataclass
class RppdProbe:
    """What an rPPD probe rendered and measured.

    Attributes:
        value: the rPPD.
        alphas, guidances: the frames rendered, in the order the gaps are taken.
        distances: the gaps summed in the numerator.
        end_distance: the end distance in the denominator.
        kind: "equation" or "reference" (see :func:`rppd_probe`).
    """

    value: float
    alphas: list[float]
    guidances: list[float]
    distances: list[float]
    end_distance: float
    kind: str


def rppd_probe(render: Callable[[Sequence[float], Sequence[float]], torch.Tensor], distance: Callable,
               frames: int = 10, kind: str = "equation", min_guidance: float = 1.5,
               max_guidance: float = 3.0) -> RppdProbe:
    """Measure rPPD on the path ``render(alphas, guidances) -> frames (K, 3, H, W)`` in [-1, 1].

    ``kind="equation"`` is the IMPUS paper's: K = ``frames`` uniform alphas a_k = k/(K-1) from 0
    to 1, each at the morph's guidance ``w(a) = max - |a - 0.5| 2 (max - min)``, and

        rPPD = sum_{k<K-1} d(x_k, x_{k+1}) / ((K-1) d(x_0, x_{K-1})).

    ``kind="reference"`` is what the reference code (GoL2022/IMPUS run_morph.py) computes, in
    this package's convention (alpha 0 = image 0): a start frame s = x(0) at the minimum
    guidance; K frames y_k = x(1 - k/K), k = 1..K, all at the maximum guidance (y_1 is near
    image 1, y_K is image 0 again); an end frame e = x(1) at the maximum guidance, and

        rPPD = (d(s, y_1) + sum_{k<K} d(y_k, y_{k+1})) / ((K-1) d(s, e)):

    K gaps over K-1, and a first gap that crosses the whole path. On an evenly spaced path of
    length L it gives (1.8 L) / (9 L) = 0.2 where the equation gives 1/9, about 0.1 more, which
    the rank rule turns into about four times the rank.
    """
    if frames < 2:
        raise InputError(f"rPPD needs at least 2 frames, got {frames}.")
    if kind == "equation":
        alphas = [k / (frames - 1) for k in range(frames)]
        guidances = [max_guidance - abs(a - 0.5) * 2 * (max_guidance - min_guidance) for a in alphas]
    elif kind == "reference":
        alphas = [0.0] + [1 - k / frames for k in range(1, frames + 1)] + [1.0]
        guidances = [min_guidance] + [max_guidance] * (frames + 1)
    else:
        raise InputError(f"Unknown rPPD probe '{kind}': use equation or reference.")
    images = render(alphas, guidances)
    if kind == "equation":
        path, start, end = images, images[:1], images[-1:]
    else:
        path, start, end = images[:-1], images[:1], images[-1:]
    gaps = [float(g) for g in distance(path[:-1], path[1:])]
    end_distance = float(distance(start, end)[0])
    value = float(sum(gaps) / ((frames - 1) * end_distance)) if end_distance > 0 else 0.0
    return RppdProbe(value, alphas, guidances, gaps, end_distance, kind)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2):
    ``10 log10(4 / mean((a - b)^2))``; infinite for identical images."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


def per_image_psnr(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """PSNR (N,) in dB of each image (N, 3, H, W) in [-1, 1] against its reference:
    ``10 log10(4 / mean((a - b)^2))`` per image (capped at 120 dB for identical images)."""
    mse = (images.float() - references.float()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(4.0 / mse.clamp_min(4e-12))


def nearest_indices(images: torch.Tensor, references: torch.Tensor, k: int = 1) -> torch.Tensor:
    """For each image (B, 3, H, W), the indices (B, k) of its ``k`` nearest references
    (N, 3, H, W) in pixel space (Euclidean distance), nearest first; k is capped at N."""
    distances = torch.cdist(images.flatten(1).float(), references.flatten(1).float())
    return distances.topk(min(k, len(references)), largest=False).indices


def distance_to_data(images: torch.Tensor, references: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A realism measure that needs no Inception weights: how far each image is from the data.

    Args:
        images: (K, 3, H, W) in [-1, 1]; area-resized to the references' size first.
        references: (N, 3, h, w) in [-1, 1], e.g. a model's training images.
    Returns:
        (K,) RMS pixel distance ``sqrt(mean((x - r*)^2))`` to the nearest reference r* (same
        units as the images: 0 is a training image itself, 2 is the largest possible), and
        (K,) the index of r*.
    """
    images = images.float().cpu()
    if images.shape[-2:] != references.shape[-2:]:
        images = torch.nn.functional.interpolate(images, size=references.shape[-2:], mode="area")
    nearest = nearest_indices(images, references)[:, 0]
    return (images - references[nearest].float()).flatten(1).pow(2).mean(1).sqrt(), nearest


def end_errors(inputs: torch.Tensor, ends: torch.Tensor, reconstructions: torch.Tensor,
               distance: Callable) -> dict[str, float]:
    """How far a morph's end frames are from its inputs, next to the floor no morph can beat.

    Args:
        inputs: (2, 3, H, W) in [-1, 1], the two images exactly as the model sees them.
        ends: (2, 3, H, W), the first and last frames (alpha 0 and 1).
        reconstructions: (2, 3, H, W), the inputs through the VAE (encode, decode).
        distance: LPIPS-like callable on batches.
    Returns:
        ``lpips_a``, ``lpips_b``, ``psnr_a``, ``psnr_b`` (frame 0 to input A, last frame to input
        B; PSNR in dB) and ``vae_lpips_a`` ... ``vae_psnr_b`` (reconstruction to input).
    """
    out = {}
    for prefix, images in (("", ends), ("vae_", reconstructions)):
        d = distance(images, inputs)
        for i, side in enumerate("ab"):
            out[f"{prefix}lpips_{side}"] = float(d[i])
            out[f"{prefix}psnr_{side}"] = psnr(images[i], inputs[i])
    return out


def ppl_stylegan(render: Callable[[Sequence[float]], torch.Tensor], distance: Callable,
                 samples: int = 64, eps: float = 1e-4, seed: int = 0,
                 batch_size: int = 8) -> float:
    """Perceptual path length, StyleGAN form (IMPUS code): ``E_a[d(x(a), x(a + eps))] / eps^2``.

    ``a ~ U[0, 1 - eps]``; the mean is taken over the samples between the 1st and 99th
    percentiles (trimmed mean), as StyleGAN does.

    Args:
        render: alphas (a list of K floats) -> frames (K, 3, H, W) in [-1, 1].
        distance: frames, frames -> (K,) distances (e.g. an :class:`Lpips`).
    """
    rng = np.random.default_rng(seed)
    alphas = rng.uniform(0.0, 1.0 - eps, size=samples)
    values = []
    for start in range(0, samples, batch_size):
        a = alphas[start:start + batch_size]
        x = render(list(a))
        y = render(list(a + eps))
        values.extend(np.asarray(distance(x, y), dtype=np.float64).reshape(-1) / eps ** 2)
    values = np.asarray(values)
    lo, hi = np.percentile(values, [1, 99])
    kept = values[(values >= lo) & (values <= hi)]
    return float(kept.mean())
