"""FreeMorph on the tiny model: the frames and alphas it gives, its ends, what each of its parts
changes (guided inversion, variation trend, noise injection), the batch processors it adds to
impus_lite.attention, the fixed-point inversion, and its options."""

import contextlib

import pytest
import torch

from conftest import TINY_CONFIG
from impus_lite.attention import averaging_frames, interpolating_batch_ends
from impus_lite.errors import InputError
from impus_lite.images import load_image
from impus_lite.methods import freemorph, run_method
from impus_lite.text import encode_prompt

#: Beta(20, 20) quantiles at j/6 (scipy.stats.beta.ppf), ends 0 and 1: the default 7 alphas.
BETA_20_20_SEVEN = [0.0, 0.4234937, 0.4657748, 0.5, 0.5342252, 0.5765063, 1.0]
#: Ten steps: n = 8 inverted, "prior" attention at steps 4-5, "inputs" at step 7, "outer" at
#: denoising step 0, "fused" at 1-3 (TINY_CONFIG's 3 steps would leave the inversion plain).
STEPS = 10


def morph(model, pair, lpips, frames=None, **options):
    config = TINY_CONFIG.replace(method="freemorph", frames=frames,
                                 method_options={"steps": STEPS, **options})
    return run_method(model, pair[0], pair[1], "a photo", config, lpips=lpips, progress=False)


def largest_change(a, b):
    """Per frame, the largest absolute pixel difference of two (K, 3, S, S) stacks."""
    return (a - b).abs().amax(dim=(1, 2, 3))


def test_it_gives_seven_frames_at_the_beta_20_20_alphas_by_default(tiny_model, image_pair, lpips_random):
    result = morph(tiny_model, image_pair, lpips_random)
    assert len(result.frames) == 7 and result.images.shape == (7, 3, 32, 32)
    assert result.alphas == pytest.approx(BETA_20_20_SEVEN, abs=1e-6)
    assert len(result.distances) == 6 and all(d > 0 for d in result.distances)
    assert set(result.stats) == {"encode", "inversion", "frames"}
    n = int(STEPS * 0.8)
    assert result.stats["inversion"].unet_evals == n * 5 * 7          # 5 fixed-point iterations
    assert result.stats["frames"].unet_evals == n * 2 * 7             # guidance 7.5: two branches
    assert any("FreeMorph: 7 frames in one batch, inversion over 8 of 10 steps" in note for note in result.notes)


@pytest.mark.parametrize("frames", [2, 5, 9])
def test_it_honours_the_frame_count(tiny_model, image_pair, lpips_random, frames):
    result = morph(tiny_model, image_pair, lpips_random, frames=frames)
    assert len(result.frames) == frames and result.images.shape[0] == frames
    assert result.alphas[0] == 0.0 and result.alphas[-1] == 1.0
    assert all(x < y for x, y in zip(result.alphas, result.alphas[1:]))
    assert result.stats["inversion"].unet_evals == 8 * 5 * frames
    if frames == 9:
        assert result.alphas[1] == pytest.approx(0.4092494, abs=1e-6)


def test_the_coefficients_and_the_schedule_of_the_steps():
    assert freemorph.coefficients(7) == pytest.approx(BETA_20_20_SEVEN, abs=1e-6)
    assert freemorph.coefficients(5, 1.0, 1.0) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    # Their 50-step grid at strength 0.8: 40 inversion steps, phases counted against 50.
    phases = [freemorph.inversion_phase(i, 50) for i in range(40)]
    assert phases[:16] == ["plain"] * 16 and phases[16:30] == ["prior"] * 14
    assert phases[30] == "plain" and phases[31:] == ["inputs"] * 9
    trend = [freemorph.trend_phase(i, 40) for i in range(40)]
    assert trend[:8] == ["outer"] * 8 and trend[8:24] == ["fused"] * 16 and trend[24:] == ["plain"] * 16
    assert freemorph.band_fractions(7) == [None, 44 / 48, 42 / 48, 42 / 48, 42 / 48, 44 / 48, None]


def test_the_inversion_and_denoising_grids_meet(tiny_model):
    for spacing, expected in (("trailing", [99, 199, 299, 399, 499, 599, 699, 799]),
                              ("leading", [1, 101, 201, 301, 401, 501, 601, 701])):
        inverse, forward = freemorph.partial_grid(tiny_model, 10, 0.8, spacing)
        assert inverse == expected and forward == expected[::-1]


def test_the_ends_are_the_inputs_as_the_model_sees_them(tiny_model, image_pair, lpips_random):
    result = morph(tiny_model, image_pair, lpips_random)
    c = TINY_CONFIG
    inputs = torch.cat([load_image(p, 32, c.resize_mode, c.resample) for p in image_pair])
    assert torch.equal(result.images[[0, -1]], inputs)
    assert result.end_errors["lpips_a"] == 0.0 and result.end_errors["psnr_b"] == float("inf")
    rendered = morph(tiny_model, image_pair, lpips_random, ends="rendered")
    assert torch.equal(rendered.images[1:-1], result.images[1:-1])
    assert largest_change(rendered.images[[0, -1]], inputs).min() > 0.05
    assert any("end frames are the inputs" in note for note in result.notes)


def test_the_variation_trend_changes_the_middle_frames_but_not_the_ends(tiny_model, image_pair, lpips_random):
    trend = morph(tiny_model, image_pair, lpips_random, ends="rendered")
    plain = morph(tiny_model, image_pair, lpips_random, ends="rendered", variation_trend=False)
    # At c = 0 and c = 1 the end rows attend as plain attention does.
    assert largest_change(trend.images[[0, -1]], plain.images[[0, -1]]).max() < 1e-4
    assert largest_change(trend.images[1:-1], plain.images[1:-1]).min() > 0.05
    assert any("no variation trend" in note for note in plain.notes)


def test_the_guided_inversion_couples_every_frame_to_the_batch(tiny_model, image_pair, lpips_random):
    off = dict(ends="rendered", variation_trend=False, noise_injection=False)
    # Without the batch's attention each frame is its own round trip: the ends of a 2-frame and
    # of a 7-frame morph agree ...
    alone = morph(tiny_model, image_pair, lpips_random, frames=2, guided_inversion=False, **off)
    seven = morph(tiny_model, image_pair, lpips_random, frames=7, guided_inversion=False, **off)
    assert largest_change(alone.images, seven.images[[0, -1]]).max() < 1e-4
    # ... with it the ends are inverted among the other frames and move, every frame does.
    guided = morph(tiny_model, image_pair, lpips_random, frames=7, **off)
    assert largest_change(guided.images, seven.images).min() > 0.01
    assert largest_change(guided.images[[0, -1]], seven.images[[0, -1]]).min() > 0.05


def test_the_noise_injection_touches_only_the_middle_frames(tiny_model, image_pair, lpips_random):
    injected = morph(tiny_model, image_pair, lpips_random, ends="rendered")
    clean = morph(tiny_model, image_pair, lpips_random, ends="rendered", noise_injection=False)
    assert torch.equal(injected.images[[0, -1]], clean.images[[0, -1]])
    assert largest_change(injected.images[1:-1], clean.images[1:-1]).min() > 0.1
    reseeded = run_method(tiny_model, *image_pair, "a photo",
                          TINY_CONFIG.replace(method="freemorph", frames=None, seed=1,
                                              method_options={"steps": STEPS, "ends": "rendered"}),
                          lpips=lpips_random, progress=False)
    assert largest_change(reseeded.images[1:-1], injected.images[1:-1]).min() > 0.05


def test_high_frequency_injection_keeps_the_low_band():
    code = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(1))
    out = freemorph.inject_high_frequencies(code, noise, 42 / 48)   # box [8 - 7, 8 + 7) centred

    def centred(x):
        return torch.fft.fftshift(torch.fft.fftn(x, dim=(-2, -1)), dim=(-2, -1))
    # Frequencies -6..6 (whose mirror images are in the box too) are the code's; the Nyquist row
    # and column (-8, their own mirror) the noise's; +-7 straddle the box edge and mix.
    assert torch.allclose(centred(out)[..., 2:15, 2:15], centred(code)[..., 2:15, 2:15], atol=1e-4)
    assert torch.allclose(centred(out)[..., 0, :], centred(noise)[..., 0, :], atol=1e-4)
    assert torch.allclose(centred(out)[..., :, 0], centred(noise)[..., :, 0], atol=1e-4)
    assert not torch.allclose(out, code, atol=0.1)
    assert torch.allclose(freemorph.inject_high_frequencies(code, noise, 1.0), code, atol=1e-5)


def test_fixed_point_iterations_make_the_inversion_invertible(tiny_model):
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    cond = encode_prompt(tiny_model, "a photo").expand(2, -1, -1)
    inverse, forward = freemorph.partial_grid(tiny_model, 10, 0.8, "trailing")

    def plain(i):
        return contextlib.nullcontext()

    errors = []
    for iterations in (1, 5):
        codes = freemorph.fixed_point_inversion(tiny_model, latents, cond, inverse, iterations, plain,
                                                "trailing", 10)
        back = freemorph.guided_denoising(tiny_model, codes, cond, cond[:1], forward, 1.0, plain, "trailing", 10)
        errors.append(float(((back - latents) ** 2).mean()))
    assert errors[0] > 1e-3 and errors[1] < 1e-6


def test_batch_end_processors_keep_the_end_rows_plain_and_the_mean_is_over_the_frames(tiny_model):
    unet = tiny_model.unet
    z = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    cond = encode_prompt(tiny_model, "a photo").expand(3, -1, -1)
    with torch.no_grad():
        def call(x=z):
            return unet(x, 500, encoder_hidden_states=cond).sample
        plain = call()
        for form in ("outer", "fused"):
            with interpolating_batch_ends(unet, [0.0, 0.5, 1.0], form):
                mixed = call()
            assert largest_change(mixed[[0, 2]], plain[[0, 2]]).max() < 1e-5
            assert largest_change(mixed[1:2], plain[1:2]).item() > 1e-3
        same = z[:1].expand(3, -1, -1, -1)
        plain_same = call(same)
        with averaging_frames(unet, 3):
            mean_same, mean, permuted = call(same), call(), call(z[[2, 0, 1]])
    assert largest_change(mean_same, plain_same).max() < 1e-5     # the mean of equal frames
    assert largest_change(mean, plain).min() > 1e-3
    assert largest_change(permuted, mean[[2, 0, 1]]).max() < 1e-5  # one mean for any order


@pytest.mark.parametrize("options, message", [
    ({"strenght": 0.5}, "has no option strenght"), ({"ends": "both"}, "Unknown FreeMorph ends"),
    ({"strength": 0.0}, "strength"), ({"strength": 0.05}, "gives none"),
    ({"fixed_point_iterations": 0}, "fixed_point_iterations"), ({"frames": 1}, "at least 2 frames"),
    ({"trend_phases": [0.6, 0.2]}, "trend_phases"), ({"beta_a": 0}, "Beta prior"),
    ({"prompts": ["a cat"]}, "two non-empty prompts"), ({"steps": 0}, "steps"),
])
def test_bad_options_are_refused(tiny_model, image_pair, lpips_random, options, message):
    with pytest.raises(InputError, match=message):
        morph(tiny_model, image_pair, lpips_random, **options)


def test_the_inversion_is_cached_and_per_image_prompts_change_the_frames(tiny_model, image_pair, lpips_random,
                                                                         tmp_path):
    config = TINY_CONFIG.replace(method="freemorph", frames=None, method_options={"steps": STEPS})
    first = run_method(tiny_model, *image_pair, "a photo", config, cache_dir=tmp_path, lpips=lpips_random,
                       progress=False)
    again = run_method(tiny_model, *image_pair, "a photo",
                       config.replace(method_options={"steps": STEPS, "variation_trend": False}),
                       cache_dir=tmp_path, lpips=lpips_random, progress=False)
    assert not first.stats["inversion"].cached and first.stats["inversion"].unet_evals == 280
    assert again.stats["inversion"].cached and again.stats["inversion"].unet_evals == 0
    prompts = morph(tiny_model, image_pair, lpips_random, prompts=["a cat", "a dog"])
    assert largest_change(prompts.images[1:-1], first.images[1:-1]).min() > 0.01
