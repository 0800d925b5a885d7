"""FID and KID of a morph's frames against its inputs, computed by torchmetrics.

Why torchmetrics: it is already a dependency (notebook 09), its Inception-v3 is
torch-fidelity's port of the TensorFlow FID network (the same 2015-12-05 graph that
pytorch-fid, used by DiffMorpher, also ports), it works on tensors already in memory (no
folders of PNGs) and on the GPU, and it gives FID and KID with one feature extractor. The two
ports differ in how they resize to 299x299 (torchmetrics: antialiased bilinear by default), so
numbers agree with pytorch-fid's only approximately.

Conventions:

* Images (B, 3, H, W) in [-1, 1] are mapped to uint8 ``round((x + 1) * 127.5)``, what the
  Inception metrics read; the network resizes to 299x299 itself.
* FID (Heusel et al., arXiv 1706.08500): ``|mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))``
  of the 2048-d pool features, covariances with ``n - 1``; each set needs at least 2 images.
* KID (Binkowski et al., arXiv 1801.01401): the unbiased MMD^2 with the cubic polynomial kernel
  ``(x.y / d + 1)^3``, averaged over ``subsets`` random subsets of ``subset_size`` images
  (default: the size of the smaller set); returns the mean and the standard deviation.
* Morphing papers compare the frames (the "fake" set) with the input images (the "real"
  set). With a handful of frames and two inputs both numbers are dominated by sampling noise:
  compare methods only on the same pair, frame count and reference set.

The Inception weights (``weights-inception-2015-12-05-6726825d.pth``) download
once into ``torch.hub.get_dir()/checkpoints``. Offline (``IMPUS_LITE_OFFLINE=1`` or
``HF_HUB_OFFLINE=1``, or a failed download) :func:`inception` raises one sentence saying so.
``inception(weights="random")`` builds the same network with random weights (He-normal
convolutions, fixed seed): a feature map for tests and offline teaching, not the FID of the
literature.
"""

from __future__ import annotations

import contextlib
import socket
import warnings
from pathlib import Path
from typing import Optional

import torch

from ..errors import InputError, ModelLoadError
from ..perceptual import _offline
from .base import Convention, as_images

WEIGHTS = ("auto", "inception", "random")
WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
FEATURES = 2048
SOURCE = ("torchmetrics FrechetInceptionDistance / KernelInceptionDistance on torch-fidelity's "
          "Inception-v3")


def weights_path() -> Path:
    """Where torch.hub keeps the Inception weights once downloaded."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def _network_class():
    from torchmetrics.image.fid import NoTrainInceptionV3
    return NoTrainInceptionV3


@contextlib.contextmanager
def _no_weights_download():
    """While building the network, torch-fidelity's weight loader returns nothing to load."""
    import torch_fidelity.feature_extractor_inceptionv3 as module
    original = module.load_state_dict_from_url
    module.load_state_dict_from_url = lambda *args, **kwargs: None
    try:
        yield
    finally:
        module.load_state_dict_from_url = original


def _random_network(feature: int, seed: int):
    base = _network_class()

    class RandomInceptionV3(base):
        """torchmetrics' Inception-v3 keeping the random weights it was built with."""

        def load_state_dict(self, state_dict, *args, **kwargs):
            if state_dict is None:
                return None
            return super().load_state_dict(state_dict, *args, **kwargs)

    with torch.random.fork_rng(devices=[]), _no_weights_download():
        torch.manual_seed(seed)
        network = RandomInceptionV3(name="inception-v3-compat", features_list=[str(feature)])
        for module in network.modules():  # He init keeps the signal alive through ~50 layers
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return network


def inception(weights: str = "auto", feature: int = FEATURES, seed: int = 0) -> torch.nn.Module:
    """The Inception-v3 feature extractor of torchmetrics' FID and KID.

    Args:
        weights: "inception" (the FID weights; downloaded once), "random" (the same network
            with random weights, seed ``seed``) or "auto" ("inception", one clear error offline).
        feature: the feature layer, 64, 192, 768 or 2048 (the standard FID pool features).
    Returns:
        The network, uint8 images (B, 3, H, W) -> features (B, feature), with ``weights`` and
        ``num_features`` attributes.
    Raises:
        ModelLoadError: the weights are neither cached nor downloadable.
    """
    if weights not in WEIGHTS:
        raise InputError(f"Unknown Inception weights '{weights}': use one of {', '.join(WEIGHTS)}.")
    if weights == "random":
        network = _random_network(feature, seed)
    else:
        path = weights_path()
        if not path.is_file() and _offline():
            raise ModelLoadError(
                f"FID and KID need the Inception-v3 weights ({WEIGHTS_FILE}), which "
                f"are not in {path.parent} and cannot be downloaded offline: run once with "
                "internet access or copy the file there.")
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)
        try:
            network = _network_class()(name="inception-v3-compat", features_list=[str(feature)])
        except Exception as error:  # no internet, proxy, broken download
            text = str(error).strip()
            reason = text.splitlines()[0] if text else type(error).__name__
            raise ModelLoadError(
                f"FID and KID need the Inception-v3 weights ({WEIGHTS_FILE}), which "
                f"could not be downloaded into {path.parent} ({reason}): run once with internet "
                "access or copy the file there.") from None
        finally:
            socket.setdefaulttimeout(previous)
        weights = "inception"
    network.weights = weights
    network.num_features = feature
    return network


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> uint8 ``round((x + 1) * 127.5)``, clamped."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _filled(metric, real: torch.Tensor, fake: torch.Tensor, network: torch.nn.Module):
    device = next(network.parameters()).device
    metric.to(device)
    metric.update(to_uint8(real).to(device), real=True)
    metric.update(to_uint8(fake).to(device), real=False)
    return metric


def fid(real: torch.Tensor, fake: torch.Tensor, network: Optional[torch.nn.Module] = None) -> float:
    """FID between two sets of images (B, 3, H, W) in [-1, 1], at least 2 in each.

    ``network``: from :func:`inception`; None loads the real Inception weights.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    network = network if network is not None else inception()
    with torch.no_grad():
        metric = _filled(FrechetInceptionDistance(feature=network), real, fake, network)
        return float(metric.compute())


def kid(real: torch.Tensor, fake: torch.Tensor, network: Optional[torch.nn.Module] = None,
        subsets: int = 100, subset_size: Optional[int] = None,
        seed: int = 0) -> tuple[float, float]:
    """KID (mean, standard deviation over subsets) between two sets of images in [-1, 1].

    ``subset_size`` defaults to the size of the smaller set (torchmetrics' 1000 needs more
    images than a morph has); subsets are drawn with a fixed ``seed``.
    """
    from torchmetrics.image.kid import KernelInceptionDistance
    network = network if network is not None else inception()
    size = subset_size or min(len(real), len(fake))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*save all extracted features.*")
            metric = KernelInceptionDistance(feature=network, subsets=subsets, subset_size=size)
        mean, std = _filled(metric, real, fake, network).compute()
        return float(mean), float(std)


def _sets(frames, inputs, label: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = as_images(frames)
    if images is None or inputs is None:
        raise InputError(f"{label} needs the frames and the input images (2, 3, H, W) in [-1, 1].")
    return as_images(inputs), images


def measure_fid(frames=None, render=None, distance=None, inputs=None, network=None,
                strict: bool = True) -> dict[str, float]:
    """FID of all frames (fake) against the inputs (real), as DiffMorpher's table does."""
    real, fake = _sets(frames, inputs, "FID")
    return {"fid": fid(real, fake, network), "frames": int(fake.shape[0])}


def measure_kid(frames=None, render=None, distance=None, inputs=None, network=None,
                strict: bool = True, subsets: int = 100, subset_size: Optional[int] = None,
                seed: int = 0) -> dict[str, float]:
    """KID (mean and standard deviation over subsets) of all frames against the inputs."""
    real, fake = _sets(frames, inputs, "KID")
    mean, std = kid(real, fake, network, subsets, subset_size, seed)
    return {"kid": mean, "kid_std": std, "frames": int(fake.shape[0])}


_NEEDS = ("frames", "inputs", "network")
FID_CONVENTION = Convention(name="fid", keys=("fid",), frames=None, needs=_NEEDS,
                            better={"fid": "lower"}, source=SOURCE, measure=measure_fid)
KID_CONVENTION = Convention(name="kid", keys=("kid", "kid_std"), frames=None, needs=_NEEDS,
                            better={"kid": "lower", "kid_std": "lower"}, source=SOURCE,
                            measure=measure_kid)
