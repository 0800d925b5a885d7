"""The published metric conventions on sequences whose values are known by hand.

Distances are the mean absolute difference of constant images, so a frame is its grey level
and a gap is the difference of two levels; FID and KID run torchmetrics on the Inception-v3
network with random weights (no download).
"""

import math
from urllib.error import URLError

import numpy as np
import pytest
import torch

from impus_lite.config import MorphConfig
from impus_lite.errors import InputError, ModelLoadError
from impus_lite.metrics import METRICS, compute, compute_many, fid, inception, kid
from impus_lite.metrics import aid, diffmorpher, freemorph
from impus_lite.result import MorphResult


def mean_abs(a, b):
    return (a - b).abs().flatten(1).mean(1)


def frames_of(levels):
    """Constant images (K, 3, 4, 4) at the given grey levels (float64, exact differences)."""
    levels = torch.tensor(levels, dtype=torch.float64)
    return levels[:, None, None, None].expand(-1, 3, 4, 4).clone()


class LinearPath:
    """``render(alphas)`` -> frames at level ``slope * alpha``; remembers every call."""

    def __init__(self, slope=1.0):
        self.slope = slope
        self.calls = []

    def __call__(self, alphas):
        self.calls.append([float(a) for a in alphas])
        return frames_of([self.slope * float(a) for a in alphas])


@pytest.fixture(scope="module")
def random_inception():
    return inception("random")


def random_images(seed, count, low=-1.0, high=1.0, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, size, size, generator=g) * (high - low) + low


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

def test_registry_lists_every_convention_with_its_frames_and_source():
    assert set(METRICS) == {"diffmorpher", "freemorph", "impus", "aid", "fid", "kid"}
    assert METRICS["diffmorpher"].frames == 17
    assert METRICS["freemorph"].frames == 7
    for convention in METRICS.values():
        assert convention.source
        assert set(convention.better) == set(convention.keys)
        assert set(convention.better.values()) <= {"lower", "higher"}


def test_unknown_metric_and_option_say_what_exists():
    with pytest.raises(InputError, match="diffmorpher"):
        compute("ppl", frames_of([0, 1]))
    with pytest.raises(InputError, match="samples"):
        compute("impus", render=LinearPath(), distance=mean_abs, sample=3)


def test_a_morph_result_is_measured_through_its_images():
    images = frames_of([0, 0.25, 0.5, 0.75, 1.0])
    result = MorphResult(frames=[], images=images, alphas=[0, .25, .5, .75, 1], distances=[.25] * 4,
                         config=MorphConfig.preset("fast"), prompt="p", model_name="m",
                         lpips_trunk="random", lora_rank=0, rppd=None, outlier=False, step=None)
    assert compute("aid", result, distance=mean_abs) == compute("aid", images, distance=mean_abs)


def test_compute_many_gives_one_flat_row():
    row = compute_many(["diffmorpher", "aid"], frames_of(np.linspace(0, 1, 17)), distance=mean_abs)
    assert set(row) == {"diffmorpher_ppl", "diffmorpher_pdv", "aid_smoothness", "aid_consistency",
                        "aid_max_distance"}
    assert row["diffmorpher_ppl"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# AID: 1 - Gini, mean, max
# ---------------------------------------------------------------------------------------------

def test_aid_even_steps_are_perfectly_smooth():
    out = compute("aid", frames_of([0, 1, 2, 3, 4]), distance=mean_abs)
    assert out["smoothness"] == pytest.approx(1.0)
    assert out["consistency"] == pytest.approx(1.0)
    assert out["max_distance"] == pytest.approx(1.0)
    assert out["frames"] == 5


def test_aid_one_jump_has_gini_three_quarters():
    out = compute("aid", frames_of([0, 0, 0, 0, 4]), distance=mean_abs)  # gaps 0, 0, 0, 4
    assert out["smoothness"] == pytest.approx(1 - 3 / 4)
    assert out["consistency"] == pytest.approx(1.0)
    assert out["max_distance"] == pytest.approx(4.0)


def test_aid_from_distances_two_speeds():
    # gaps 1, 1, 3, 3: sum |d_i - d_j| = 8 pairs x 2 = 16; Gini = 16 / (2 * 16 * 2) = 1/4
    out = aid.from_distances([1, 1, 3, 3])
    assert out["smoothness"] == pytest.approx(0.75)
    assert out["consistency"] == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------------
# DiffMorpher: sum and population variance on 17 frames
# ---------------------------------------------------------------------------------------------

def test_diffmorpher_even_path_has_ppl_one_and_pdv_zero():
    out = compute("diffmorpher", frames_of(np.linspace(0, 1, 17)), distance=mean_abs)
    assert out["ppl"] == pytest.approx(1.0)
    assert out["pdv"] == pytest.approx(0.0, abs=1e-15)
    assert out["frames"] == 17


def test_diffmorpher_pdv_is_the_population_variance_not_the_std():
    levels = np.cumsum([0.0] + [0.0, 0.1] * 8)  # 16 gaps alternating 0 and 0.1
    out = compute("diffmorpher", frames_of(levels), distance=mean_abs)
    assert out["ppl"] == pytest.approx(0.8)
    assert out["pdv"] == pytest.approx(0.0025)  # sample variance 0.00267, std 0.05


def test_diffmorpher_renders_17_uniform_frames_when_the_morph_has_another_count():
    path = LinearPath(slope=2.0)
    out = compute("diffmorpher", frames_of(np.linspace(0, 2, 9)), render=path, distance=mean_abs)
    assert path.calls == [[k / 16 for k in range(17)]]
    assert out["frames"] == 17
    assert out["ppl"] == pytest.approx(2.0)


def test_diffmorpher_uses_17_given_frames_without_rendering():
    path = LinearPath()
    compute("diffmorpher", frames_of(np.linspace(0, 1, 17)), render=path, distance=mean_abs)
    assert path.calls == []


def test_diffmorpher_refuses_another_frame_count_unless_told():
    nine = frames_of(np.linspace(0, 1, 9))
    with pytest.raises(InputError, match="17 frames and this morph has 9"):
        compute("diffmorpher", nine, distance=mean_abs)
    out = compute("diffmorpher", nine, distance=mean_abs, strict=False)
    assert out["frames"] == 9
    assert out["ppl"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# FreeMorph: 5 in-between frames, sums, PPL = LPIPS / (1/5)^2
# ---------------------------------------------------------------------------------------------

def test_freemorph_renders_five_in_between_frames_and_sums():
    path = LinearPath()
    out = compute("freemorph", render=path, distance=mean_abs)
    assert path.calls == [[k / 6 for k in range(7)]]
    assert len(path.calls[0][1:-1]) == freemorph.IN_BETWEEN == 5
    assert out["lpips_sum"] == pytest.approx(1.0)
    assert out["ppl_sum"] == pytest.approx(25.0)
    assert "fid" not in out


def test_freemorph_ppl_over_lpips_is_table_ones_ratio():
    for lpips_sum, ppl_sum in ((130.52, 3263.03), (90.57, 2264.20), (84.91, 2122.80)):
        assert freemorph.from_distances([lpips_sum])["ppl_sum"] == pytest.approx(ppl_sum, abs=0.1)


def test_freemorph_puts_the_inputs_at_the_ends_and_measures_fid(random_inception):
    inputs = frames_of([-1.0, 2.0])
    out = compute("freemorph", render=LinearPath(), distance=mean_abs, inputs=inputs,
                  network=random_inception)
    # levels -1, 1/6, ..., 5/6, 2: gaps 7/6, 1/6 x 4, 7/6 -> 3
    assert out["lpips_sum"] == pytest.approx(3.0)
    assert out["ppl_sum"] == pytest.approx(75.0)
    assert math.isfinite(out["fid"]) and out["fid"] > 0


# ---------------------------------------------------------------------------------------------
# IMPUS: StyleGAN PPL, eps 1e-4, trimmed mean
# ---------------------------------------------------------------------------------------------

def test_impus_ppl_of_a_linear_path_is_slope_over_eps():
    path = LinearPath(slope=2.0)
    out = compute("impus", render=path, distance=mean_abs)
    assert out["ppl"] == pytest.approx(2.0 / 1e-4, rel=1e-6)
    rendered = [a for call in path.calls for a in call]
    assert len(rendered) == 2 * 50 == 2 * out["samples"]
    assert min(rendered) >= 0 and max(rendered) <= 1


def test_impus_ppl_honours_eps_and_samples():
    path = LinearPath(slope=3.0)
    out = compute("impus", render=path, distance=mean_abs, eps=1e-2, samples=10)
    assert out["ppl"] == pytest.approx(3.0 / 1e-2, rel=1e-9)
    assert sum(len(call) for call in path.calls) == 20


def test_impus_ppl_needs_a_path():
    with pytest.raises(InputError, match="render"):
        compute("impus", frames_of([0, 1]), distance=mean_abs)


# ---------------------------------------------------------------------------------------------
# FID and KID (torchmetrics on a random-weight Inception-v3)
# ---------------------------------------------------------------------------------------------

def test_random_inception_is_the_fid_network_with_live_features(random_inception):
    from torchmetrics.image.fid import NoTrainInceptionV3
    assert isinstance(random_inception, NoTrainInceptionV3)
    assert random_inception.weights == "random" and random_inception.num_features == 2048
    features = random_inception(torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8))
    assert features.shape == (2, 2048)
    assert features.abs().mean() > 1e-3


def test_fid_of_identical_sets_is_zero_and_of_different_sets_positive(random_inception):
    a = random_images(0, 6)
    b = random_images(1, 6, low=0.0, high=1.0)
    assert fid(a, a, random_inception) == pytest.approx(0.0, abs=1e-3)
    assert fid(a, b, random_inception) > 1.0


def test_kid_of_identical_sets_is_near_zero_and_of_different_sets_positive(random_inception):
    a = random_images(0, 6)
    b = random_images(1, 6, low=0.0, high=1.0)
    same, _ = kid(a, a, random_inception)
    different, _ = kid(a, b, random_inception)
    assert different > 0.1
    assert abs(same) < 0.01 * different


def test_fid_and_kid_through_the_registry(random_inception):
    frames, inputs = random_images(2, 5), random_images(3, 2)
    out = compute("fid", frames, inputs=inputs, network=random_inception)
    assert out["fid"] == pytest.approx(fid(inputs, frames, random_inception))
    assert out["frames"] == 5
    out = compute("kid", frames, inputs=inputs, network=random_inception)
    assert set(out) == {"kid", "kid_std", "frames"}
    with pytest.raises(InputError, match="input images"):
        compute("fid", frames, network=random_inception)


def test_offline_fid_says_in_one_sentence_that_it_needs_the_weights(tmp_path, monkeypatch):
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        monkeypatch.setenv("IMPUS_LITE_OFFLINE", "1")
        with pytest.raises(ModelLoadError) as error:
            compute("fid", random_images(0, 3), inputs=random_images(1, 2))
    finally:
        torch.hub.set_dir(previous)
    message = str(error.value)
    assert message.startswith("FID and KID need the Inception-v3 weights")
    assert str(tmp_path / "checkpoints") in message
    assert "\n" not in message and message.count(". ") == 0 and message.endswith(".")


def test_failed_download_is_one_sentence_without_a_chained_traceback(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as module

    def no_network(*args, **kwargs):
        raise URLError("no route to host")

    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    monkeypatch.delenv("IMPUS_LITE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(module, "load_state_dict_from_url", no_network)
    try:
        with pytest.raises(ModelLoadError) as error:
            inception()
    finally:
        torch.hub.set_dir(previous)
    assert "could not be downloaded" in str(error.value)
    assert "no route to host" in str(error.value)
    assert error.value.__suppress_context__
    assert "\n" not in str(error.value)
