"""AID on the tiny model: frame count, ends that come back to the VAE round trip on inverted
codes, per-image captions, attention interpolation that reproduces the endpoints at alpha 0 and
1 and changes the frames in between for the first 25 of 50 steps, every form, the pipeline's
Beta-prior exploration and the Bayesian Beta search on paths whose distances are known, the
IP-Adapter endpoints through diffusers' loader (offline, a tiny adapter built here), and the
options."""

import numpy as np
import pytest
import torch

from conftest import TINY_CONFIG, smooth_image
from impus_lite.errors import InputError
from impus_lite.images import load_image
from impus_lite.methods import aid, run_method
from impus_lite.schedules import FrameCache
from impus_lite.text import encode_prompt


def morph(model, pair, lpips, options=None, prompt="a photo", **changes):
    """AID on ``pair`` with 4 DDIM steps unless ``options`` says otherwise."""
    config = TINY_CONFIG.replace(method="aid", method_options={"steps": 4, "search_evaluations": 2,
                                                               **(options or {})}, **changes)
    return run_method(model, pair[0], pair[1], prompt, config, lpips=lpips, progress=False)


def psnr(x, y):
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    return float(10 * torch.log10(4.0 / ((x - y) ** 2).mean()))


@pytest.fixture
def named_pair(tmp_path):
    a, b = tmp_path / "cat_face.png", tmp_path / "dog_face.png"
    smooth_image(1, (40, 48)).save(a)
    smooth_image(2, (64, 50)).save(b)
    return a, b


def attention_morph(model, prompts=("a cat", "a dog"), steps=4, **options):
    """An :class:`aid.AttentionMorph` from two fixed random codes and two prompts, at AID's
    published guidance 7.5 unless ``options`` say otherwise."""
    options.setdefault("guidance", 7.5)
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
    assert result.label == "aid (inverted codes)" and result.notes[0] == "aid (inverted codes)"
    steps = 4                                                     # inversion and sampling: one grid
    assert result.stats["inversion"].unet_evals == 2 * steps
    assert result.stats["endpoints"].unet_evals == 2 * steps      # guidance 1: one branch
    explored = int(1.5 * 4)                                       # the pipeline's exploration size
    assert result.stats["frames"].unet_evals == (explored - 2) * steps
    assert any("AID fused attention interpolation (both) for 2 of 4 steps, guidance 1" in n for n in result.notes)
    assert any(f"Beta-prior exploration (generate_interpolation): {explored} frames explored" in n
               for n in result.notes)
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
    ({"endpoints": "noise"}, "Unknown AID endpoints"), ({"alphas": "bayes"}, "Unknown AID alphas"),
    ({"exploration": 2}, "exploration"), ({"guidance": 0.5}, "guidance"),
])
def test_bad_options_are_refused(tiny_model, image_pair, lpips_random, options, message):
    with pytest.raises(InputError, match=message):
        morph(tiny_model, image_pair, lpips_random, options, frames=3)


def test_the_inversions_are_cached_and_shared_with_slerp(tiny_model, image_pair, lpips_random, tmp_path):
    config = TINY_CONFIG.replace(method="slerp", schedule="uniform", frames=3)
    run_method(tiny_model, *image_pair, "a photo", config, cache_dir=tmp_path, lpips=lpips_random,
               progress=False)
    # AID inverts on its own sampling grid (steps); with slerp's step count the codes are shared.
    config = TINY_CONFIG.replace(method="aid", frames=3,
                                 method_options={"steps": TINY_CONFIG.inversion_steps})
    result = run_method(tiny_model, *image_pair, "a photo", config, cache_dir=tmp_path, lpips=lpips_random,
                        progress=False)
    assert result.stats["inversion"].cached and result.stats["inversion"].unet_evals == 0


# ---- real images: inverted codes, captions, 25 of 50 steps ----------------------------------

def test_the_ends_come_back_to_the_vae_round_trip_at_the_inversions_guidance(tiny_model, named_pair,
                                                                             lpips_random):
    config = TINY_CONFIG.replace(method="aid", frames=3)           # AID's defaults: 50 steps, guidance 1
    result = run_method(tiny_model, *named_pair, "a photo", config, lpips=lpips_random, progress=False)
    images = torch.cat([load_image(p, 32, config.resize_mode, config.resample) for p in named_pair])
    vae = tiny_model.decode(tiny_model.encode(images)).cpu()
    ends = result.images[[0, -1]]
    assert [round(psnr(ends[i], vae[i]), 1) for i in (0, 1)] >= [20.0, 20.0]      # measured 23.7, 24.2
    for key in ("psnr_a", "psnr_b"):                                # within a few dB of the VAE floor
        assert result.end_errors[key] >= result.end_errors["vae_" + key] - 1.0
    assert result.stats["inversion"].unet_evals == 100 and result.stats["endpoints"].unet_evals == 100
    # AID's published guidance 7.5 on the same codes moves the ends away (measured 14.8, 14.5 dB).
    guided = run_method(tiny_model, *named_pair, "a photo", config.replace(method_options={"guidance": 7.5}),
                        lpips=lpips_random, progress=False)
    assert all(psnr(guided.images[[0, -1]][i], vae[i]) < psnr(ends[i], vae[i]) - 5.0 for i in (0, 1))


def test_captions_come_from_caption_files_then_file_names_then_the_shared_prompt(tmp_path):
    names = ["cat_face.png", "dog-face-02.jpg", "a.png", "IMG_0001.jpg", "image_left.png", "fox.png"]
    for name in names:
        smooth_image(1).save(tmp_path / name)
    (tmp_path / "fox.txt").write_text("  a red fox in the snow\n")
    captions = [aid.image_captions([tmp_path / n], "shared")[0][0] for n in names]
    assert captions == ["cat face", "dog face", "shared", "shared", "shared", "a red fox in the snow"]
    assert aid.image_captions([tmp_path / "a.png", tmp_path / "fox.png"], "shared") == (
        ("shared", "a red fox in the snow"), ("shared prompt", "caption file"))
    assert aid.image_captions([smooth_image(1), smooth_image(2)], "shared")[0] == ("shared", "shared")


def test_each_image_is_inverted_and_sampled_with_its_own_caption(tiny_model, named_pair, lpips_random):
    result = morph(tiny_model, named_pair, lpips_random, frames=3)
    assert result.notes[1] == "captions: 'cat face' (file name), 'dog face' (file name)"
    given = morph(tiny_model, named_pair, lpips_random, {"prompts": ("cat face", "dog face")}, frames=3)
    shared = morph(tiny_model, named_pair, lpips_random, {"prompts": ("a photo", "a photo")}, frames=3)
    assert torch.equal(result.images[[0, -1]], given.images[[0, -1]])
    assert (result.images[[0, -1]] - shared.images[[0, -1]]).abs().max() > 1e-3
    # A caption file next to an image wins over its name.
    named_pair[1].with_suffix(".txt").write_text("a photo")
    filed = morph(tiny_model, named_pair, lpips_random, frames=3)
    assert filed.notes[1] == "captions: 'cat face' (file name), 'a photo' (caption file)"
    assert torch.equal(filed.images[-1], morph(tiny_model, named_pair, lpips_random,
                                               {"prompts": ("cat face", "a photo")}, frames=3).images[-1])


def test_attention_is_interpolated_for_the_first_25_of_50_steps_by_default(tiny_model, monkeypatch):
    options = aid.Options()
    assert (options.steps, options.attention_fraction, options.guidance_scale) == (50, 0.5, 1.0)
    m = attention_morph(tiny_model, steps=options.steps, guidance=options.guidance_scale)
    m.endpoints()
    assert len(m.timesteps) == 50 and m.interpolated == m.timesteps[:25]
    assert m.bank.timesteps() == m.timesteps[:25]
    entered = {"self": [], "cross": []}

    def counting(kind, install):
        def wrapped(unet, *args, **kwargs):
            entered[kind].append(unet)
            return install(unet, *args, **kwargs)
        return wrapped
    monkeypatch.setattr(aid, "interpolating", counting("self", aid.interpolating))
    monkeypatch.setattr(aid, "interpolating_cross", counting("cross", aid.interpolating_cross))
    calls = tiny_model.unet_calls
    m.interpolate([0.5])
    assert tiny_model.unet_calls - calls == 50                      # guidance 1: one UNet call a step
    assert len(entered["self"]) == len(entered["cross"]) == 25     # interpolated in the first 25 only


# ---- alphas: the pipeline's exploration -------------------------------------------------------

def test_the_beta_fit_recovers_the_prior_of_a_known_path():
    xs = [0.0, 0.3, 0.5, 0.7, 0.9, 1.0]
    d = np.diff(np.asarray(xs) ** 3)            # the path a^3 has cumulative share x^3 = Beta(3, 1)'s CDF
    a, b = aid.fit_beta(xs, d, 1.0, 1.0)
    assert (a, b) == pytest.approx((3.0, 1.0), rel=1e-3)
    assert aid.fit_beta(xs, np.zeros(5), 2.0, 5.0) == (2.0, 5.0)
    i, t = aid.next_alpha([0.0, 0.5, 1.0], [0.1, 0.3], 3.0, 3.0)
    from scipy.stats import beta
    assert i == 1 and beta.cdf(t, 3, 3) == pytest.approx((0.5 + 1.0) / 2)


def test_the_least_spread_path_is_found_exactly():
    w = np.full((5, 5), np.inf)
    for (i, j), v in {(0, 1): 0.1, (0, 2): 0.5, (0, 3): 0.9, (0, 4): 2.0, (1, 2): 0.4, (1, 3): 0.5,
                      (1, 4): 1.0, (2, 3): 0.45, (2, 4): 0.5, (3, 4): 0.2}.items():
        w[i, j] = v
    path, spread = aid.least_spread_path(w, 3)
    assert path == [0, 2, 4] and spread == pytest.approx(0.0)
    path, spread = aid.least_spread_path(w, 4)      # 0-2-3-4 spreads 0.3, 0-1-3-4 0.4, 0-1-2-4 0.4
    assert path == [0, 2, 3, 4] and spread == pytest.approx(0.3)
    assert aid.least_spread_path(w, 2) == ([0, 4], 0.0)
    with pytest.raises(ValueError):
        aid.least_spread_path(w, 6)


def test_the_exploration_refines_where_the_path_changes_and_keeps_even_steps():
    cache, distance = path(lambda a: a ** 3)
    chosen = aid.explore_and_select(cache, distance, 5, 9)
    assert len(chosen.explored) == 9 == cache.renders and len(chosen.alphas) == 5
    assert chosen.explored == sorted(chosen.explored) and chosen.alphas[0] == 0.0 and chosen.alphas[-1] == 1.0
    assert sum(a > 0.5 for a in chosen.explored) > sum(0 < a < 0.5 for a in chosen.explored)
    assert chosen.a > chosen.b                     # a^3 changes late: the prior leans to 1
    d = np.diff(np.asarray(chosen.alphas) ** 3)
    uniform = np.diff(np.linspace(0, 1, 5) ** 3)
    assert d.max() - d.min() == pytest.approx(chosen.spread) and chosen.spread < uniform.max() - uniform.min()


# ---- AID as published: IP-Adapter image prompts (offline) -------------------------------------

def tiny_ip_adapter(folder, unet, seed=0):
    """A random IP-Adapter for ``unet`` in diffusers' layout: ``models/ip-adapter_tiny.safetensors``
    (image projection and per-cross-attention ``to_k_ip``, ``to_v_ip``, numbered 1, 3, 5, ... as
    diffusers' loader reads them) and a tiny CLIP image encoder in ``models/image_encoder``."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=16, projection_dim=8))
    encoder.save_pretrained(folder / "models" / "image_encoder")
    width = unet.config.cross_attention_dim
    state = {"image_proj.proj.weight": torch.randn(4 * width, 8), "image_proj.proj.bias": torch.zeros(4 * width),
             "image_proj.norm.weight": torch.ones(width), "image_proj.norm.bias": torch.zeros(width)}
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = unet.get_submodule(name[:-len(".processor")]).to_q.in_features
        state[f"ip_adapter.{key}.to_k_ip.weight"] = torch.randn(hidden, width) * width ** -0.5
        state[f"ip_adapter.{key}.to_v_ip.weight"] = torch.randn(hidden, width) * width ** -0.5
        key += 2
    save_file(state, str(folder / "models" / "ip-adapter_tiny.safetensors"))
    return {"endpoints": "ip-adapter", "ip_adapter": str(folder), "ip_adapter_weight": "ip-adapter_tiny.safetensors"}


def test_ip_adapter_endpoints_run_offline_through_diffusers_loader(tiny_model, named_pair, lpips_random,
                                                                   tmp_path):
    ip = tiny_ip_adapter(tmp_path / "adapter", tiny_model.unet)
    processors = {k: type(v) for k, v in tiny_model.unet.attn_processors.items()}
    result = morph(tiny_model, named_pair, lpips_random, ip, frames=3)
    assert result.label == "aid (ip-adapter)" and result.notes[0] == "aid (ip-adapter)"
    assert set(result.stats) == {"image prompts", "endpoints", "frames"}
    assert result.stats["endpoints"].unet_evals == 2 * 4 * 2       # guidance 7.5: two branches
    assert any("guidance 7.5; endpoints from one start noise and IP-Adapter image prompts" in n
               for n in result.notes)
    # The adapter is gone afterwards: the UNet is as it was.
    assert tiny_model.unet.encoder_hid_proj is None
    assert {k: type(v) for k, v in tiny_model.unet.attn_processors.items()} == processors
    # The image prompts steer the ends: scale 0 (text only) gives other ends.
    plain = morph(tiny_model, named_pair, lpips_random, {**ip, "ip_adapter_scale": 0.0}, frames=3)
    assert (result.images[[0, -1]] - plain.images[[0, -1]]).abs().max() > 1e-3


@pytest.mark.parametrize("form", aid.FORMS)
def test_ip_adapter_frames_at_0_and_1_are_the_endpoints_from_one_start_noise(tiny_model, tmp_path, form):
    ip = tiny_ip_adapter(tmp_path / "adapter", tiny_model.unet)
    options = aid.Options(**ip, form=form, attention_fraction=1.0)
    images = torch.stack([load_image(smooth_image(s), 32) for s in (1, 2)]).squeeze(1)
    prompts = aid.load_image_prompts(tiny_model, images, options)
    try:
        assert prompts.embeds.shape == (2, 1, 8) and not torch.equal(prompts.embeds[0], prompts.embeds[1])
        assert torch.equal(prompts.uncond, torch.zeros_like(prompts.uncond))
        codes = aid._start_noise(tiny_model, (2, 4, 8, 8), seed=0)
        assert torch.equal(codes[0], codes[1])
        embeddings = torch.cat([encode_prompt(tiny_model, p) for p in ("a cat", "a dog")])
        m = aid.AttentionMorph(tiny_model, codes, embeddings, encode_prompt(tiny_model, "", allow_empty=True),
                               options, 4, "trailing", prompts)
        assert torch.allclose(m.interpolate([0.0, 1.0]), m.endpoints(), atol=1e-4)
        assert (m.endpoints()[0] - m.endpoints()[1]).abs().max() > 1e-3
    finally:
        prompts.unload()


def test_ip_adapter_endpoints_refuse_the_classroom_model(image_pair, lpips_random):
    from impus_lite.models import load_model
    classroom = load_model("classroom", device="cpu")
    with pytest.raises(InputError, match="the classroom model has none"):
        morph(classroom, image_pair, lpips_random, {"endpoints": "ip-adapter"}, frames=3)
    assert classroom.unet_evals == 0
