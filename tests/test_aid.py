"""AID on the tiny model: frame count, attention interpolation that reproduces the endpoints at
alpha 0 and 1 and changes the frames in between, every form, the Beta-prior search on paths
whose distances are known, and the options."""

import pytest
import torch

from conftest import TINY_CONFIG
from impus_lite.errors import InputError
from impus_lite.methods import aid, run_method
from impus_lite.schedules import FrameCache
from impus_lite.text import encode_prompt


def morph(model, pair, lpips, options=None, **changes):
    config = TINY_CONFIG.replace(method="aid", method_options={"search_evaluations": 2, **(options or {})},
                                 **changes)
    return run_method(model, pair[0], pair[1], "a photo", config, lpips=lpips, progress=False)


def attention_morph(model, prompts=("a cat", "a dog"), steps=4, **options):
    """An :class:`aid.AttentionMorph` from two fixed random codes and two prompts."""
    codes = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    embeddings = torch.cat([encode_prompt(model, p) for p in prompts])
    uncond = encode_prompt(model, "", allow_empty=True)
    return aid.AttentionMorph(model, codes, embeddings, uncond, aid.Options(**options), steps, "trailing")


def test_it_gives_the_frames_asked_for(tiny_model, image_pair, lpips_random):
    result = morph(tiny_model, image_pair, lpips_random, frames=4)
    assert len(result.frames) == 4 and result.images.shape == (4, 3, 32, 32)
    assert result.alphas[0] == 0.0 and result.alphas[-1] == 1.0
    assert all(x < y for x, y in zip(result.alphas, result.alphas[1:]))
    assert set(result.stats) == {"encode", "inversion", "endpoints", "frames"}
    steps = TINY_CONFIG.sample_steps
    assert result.stats["inversion"].unet_evals == 2 * TINY_CONFIG.inversion_steps
    assert result.stats["endpoints"].unet_evals == 2 * steps * 2          # guidance 7.5: two branches
    assert result.stats["frames"].unet_evals % (steps * 2) == 0
    assert any("AID fused attention interpolation (both)" in n for n in result.notes)
    assert any("Beta prior" in n for n in result.notes)
    uniform = morph(tiny_model, image_pair, lpips_random, {"alphas": "schedule"}, schedule="uniform",
                    frames=3)
    assert uniform.alphas == [0.0, 0.5, 1.0] and not any("Beta prior" in n for n in uniform.notes)


@pytest.mark.parametrize("form", aid.FORMS)
def test_interpolation_at_alpha_0_and_1_is_the_plain_generation_of_each_endpoint(tiny_model, form):
    m = attention_morph(tiny_model, form=form, attention="both", attention_fraction=1.0)
    ends = m.endpoints()
    frames = m.interpolate([0.0, 1.0])
    assert torch.allclose(frames, ends, atol=1e-4)
    # ... while the middle frame differs from a generation without attention interpolation.
    plain = attention_morph(tiny_model, form=form, attention="both", attention_fraction=0.0)
    assert not torch.allclose(m.interpolate([0.5]), plain.interpolate([0.5]), atol=1e-3)


def test_the_forms_differ_and_cross_attention_inner_is_plain_cross_attention(tiny_model):
    middle = {form: attention_morph(tiny_model, form=form, attention_fraction=1.0).interpolate([0.5])
              for form in aid.FORMS}
    for i, a in enumerate(aid.FORMS):
        for b in aid.FORMS[i + 1:]:
            assert not torch.allclose(middle[a], middle[b], atol=1e-4), (a, b)
    plain = attention_morph(tiny_model, attention_fraction=0.0).interpolate([0.3])
    inner = attention_morph(tiny_model, form="inner", attention="cross", attention_fraction=1.0)
    # W_k lerp(c0, c1) = lerp(W_k c0, W_k c1): plain cross-attention on the interpolated prompt.
    assert torch.allclose(inner.interpolate([0.3]), plain, atol=1e-4)
    outer = attention_morph(tiny_model, form="outer", attention="cross", attention_fraction=1.0)
    assert not torch.allclose(outer.interpolate([0.3]), plain, atol=1e-3)
    # One shared prompt: cross-attention interpolation changes nothing.
    shared = attention_morph(tiny_model, prompts=("a photo", "a photo"), attention="cross",
                             attention_fraction=1.0)
    shared_plain = attention_morph(tiny_model, prompts=("a photo", "a photo"), attention_fraction=0.0)
    assert torch.allclose(shared.interpolate([0.3]), shared_plain.interpolate([0.3]), atol=1e-4)


def test_attention_is_recorded_and_interpolated_for_the_first_fraction_of_steps(tiny_model):
    m = attention_morph(tiny_model, steps=8, attention="self", attention_fraction=0.5)
    m.endpoints()
    assert m.interpolated == m.timesteps[:4]
    assert m.bank.timesteps() == m.interpolated
    assert len(m.bank) == 2 * 4 * len(m.self_layers) and not m.cross_layers
    later = attention_morph(tiny_model, steps=8, attention="self", attention_fraction=0.25)
    assert later.interpolated == m.timesteps[:2]
    assert not torch.allclose(m.interpolate([0.5]), later.interpolate([0.5]), atol=1e-4)


def path(f):
    """A render whose 'frames' are f(alpha) and a distance |f(a) - f(b)|: LPIPS known in closed form."""
    def render(alphas):
        return torch.tensor([[f(a)] for a in alphas], dtype=torch.float64)

    def distance(x, y):
        return (x - y).abs().reshape(-1)
    return FrameCache(render, 8), distance


@pytest.mark.parametrize("f, expected, side", [(lambda a: a ** 3, (3.0, 1.0), True),
                                               (lambda a: 1 - (1 - a) ** 3, (1.0, 3.0), False)])
def test_the_beta_search_finds_the_prior_that_evens_the_steps(f, expected, side):
    # Beta(3, 1) has quantiles u^(1/3), exactly the alphas where a^3 moves in equal steps.
    cache, distance = path(f)
    choice = aid.choose_beta(cache, distance, 5, 1.0, 5.0)
    assert (choice.a, choice.b) == expected and choice.a_at_least_b is side
    assert choice.smoothness == pytest.approx(1.0, abs=1e-9)
    assert choice.alphas[0] == 0.0 and choice.alphas[-1] == 1.0
    assert all(0 <= a <= 1 for a in choice.alphas)
    assert all(x < y for x, y in zip(choice.alphas, choice.alphas[1:]))


def test_the_beta_search_keeps_to_its_prior_bounds_and_budget():
    cache, distance = path(lambda a: a ** 2.2)  # optimum (2.2, 1) is off the grid
    choice = aid.choose_beta(cache, distance, 6, 1.0, 4.0, target=1.01, evaluations=7)
    assert choice.a_at_least_b and len(choice.probes) <= 6 + 7  # 6 grid points on the a >= b side
    assert all(1.0 <= a <= 4.0 and 1.0 <= b <= 4.0 and a >= b for a, b, _ in choice.probes)
    assert choice.smoothness == max(s for _, _, s in choice.probes)
    grid_best = max(s for a, b, s in choice.probes[:6])
    assert choice.smoothness > grid_best  # the compass search improved on the grid
    assert len(choice.alphas) == 6 and choice.alphas[0] == 0.0 and choice.alphas[-1] == 1.0
    assert all(x < y for x, y in zip(choice.alphas, choice.alphas[1:]))


@pytest.mark.parametrize("options, message", [
    ({"strength": 1}, "has no option strength"), ({"form": "sideways"}, "Unknown AID form"),
    ({"attention": "all"}, "Unknown AID attention"), ({"alphas": "uniform"}, "Unknown AID alphas"),
    ({"attention_fraction": 1.5}, "attention_fraction"), ({"prompts": ["a cat"]}, "two non-empty prompts"),
    ({"beta_low": 3.0, "beta_high": 2.0}, "Beta bounds"), ({"steps": 0}, "steps"),
])
def test_bad_options_are_refused(tiny_model, image_pair, lpips_random, options, message):
    with pytest.raises(InputError, match=message):
        morph(tiny_model, image_pair, lpips_random, options, frames=3)


def test_the_inversions_are_cached_and_shared_with_slerp(tiny_model, image_pair, lpips_random, tmp_path):
    config = TINY_CONFIG.replace(method="slerp", schedule="uniform", frames=3)
    run_method(tiny_model, *image_pair, "a photo", config, cache_dir=tmp_path, lpips=lpips_random,
               progress=False)
    config = TINY_CONFIG.replace(method="aid", frames=3, method_options={"search_evaluations": 0})
    result = run_method(tiny_model, *image_pair, "a photo", config, cache_dir=tmp_path, lpips=lpips_random,
                        progress=False)
    assert result.stats["inversion"].cached and result.stats["inversion"].unet_evals == 0
