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
