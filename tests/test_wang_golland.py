"""Diff.Interp (wang-golland) on the tiny model: the tree's frame count and alphas, the noise
schedule of its tree, its guided text optimisation, the candidate rankings (offline LPIPS, CLIP
from a folder) and its options."""

import pytest
import torch

from conftest import TINY_CONFIG
from impus_lite.errors import InputError
from impus_lite.methods import run_method
from impus_lite.methods import wang_golland as wg

#: Few steps and candidates: each morph runs in about a second on the tiny model (the defaults,
#: 200 DDIM steps and 200 text iterations, are the code's).
SMALL = {"candidates": 2, "min_candidates": 1, "steps": 10, "text_steps": 3}


def morph(model, pair, lpips, **changes):
    options = {**SMALL, **changes.pop("method_options", {})}
    config = TINY_CONFIG.replace(method="wang-golland", method_options=options, **changes)
    return run_method(model, pair[0], pair[1], "a photo", config, lpips=lpips, progress=False)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A random CLIP model (transformers' CLIPModel) and a character tokenizer, saved to a folder."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from impus_lite.models import write_clip_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    write_clip_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77, **ids),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=8)
    CLIPModel(config).save_pretrained(folder)
    return str(folder)


def test_it_gives_the_frames_asked_for_and_names_the_offline_ranking(tiny_model, image_pair, lpips_random):
    result = morph(tiny_model, image_pair, lpips_random, frames=5)
    assert len(result.frames) == 5 and result.alphas == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert result.images.shape == (5, 3, 32, 32) and len(result.distances) == 4
    assert {"encode", "text", "ranking", "frames"} == set(result.stats)
    # The guided text loss: per iteration, one step per image on a two-row (guided) UNet call.
    assert result.stats["text"].unet_evals == 4 * SMALL["text_steps"]
    ranking = [n for n in result.notes if "ranked" in n]
    # The default CLIP id cannot load offline: the LPIPS ranking runs and says why.
    assert len(ranking) == 1 and "lpips-inputs" in ranking[0] and "trunk random" in ranking[0]
    assert "instead of clip-prompts" in ranking[0] and "could not be loaded" in ranking[0]
    no_clip = morph(tiny_model, image_pair, lpips_random, frames=3, method_options={"clip_model": None})
    assert any("lpips-inputs" in n and "no clip_model was given" in n for n in no_clip.notes)


def test_nine_frames_are_the_tree_at_k_over_8_whatever_the_preset_schedule(tiny_model, image_pair,
                                                                           lpips_random):
    # The fast preset's reschedule would move the frames off the tree; the tree's alphas stay.
    assert TINY_CONFIG.schedule == "reschedule"
    result = morph(tiny_model, image_pair, lpips_random, frames=9)
    assert result.alphas == [k / 8 for k in range(9)]
    assert not any("rounded up" in n for n in result.notes)
    assert any("tree of depth 3: 5 (middle frame) to 3 (finest) denoising steps of 10" in n for n in result.notes)


def test_a_count_off_the_tree_is_rounded_up_with_a_note(tiny_model, image_pair, lpips_random):
    assert [wg.tree_frames(n) for n in (2, 3, 4, 5, 6, 9, 10, 16, 17, 18)] == [2, 3, 5, 5, 9, 9, 17, 17, 17, 33]
    assert wg.tree_frames(None) == 17 and wg.tree_alphas(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="2\\^m \\+ 1 frames, not 6"):
        wg.tree_alphas(6)
    result = morph(tiny_model, image_pair, lpips_random, frames=6)
    assert result.alphas == [k / 8 for k in range(9)] and len(result.frames) == 9
    note = next(n for n in result.notes if "rounded up" in n)
    assert note.startswith("frames=6 rounded up to 9 = 2^3 + 1") and "alphas='schedule'" in note
    # Any count, off the tree, when the config's schedule picks the alphas.
    free = morph(tiny_model, image_pair, lpips_random, frames=6, schedule="uniform",
                 method_options={"alphas": "schedule"})
    assert free.alphas == pytest.approx([k / 5 for k in range(6)]) and not any("rounded up" in n for n in free.notes)


def test_the_defaults_are_the_codes():
    o = wg.Options()
    assert (o.steps, o.min_noise, o.max_noise, o.candidates, o.min_candidates, o.guidance) == (200, 0.3, 0.55, 8, 3, 7.5)
    assert (o.alphas, o.text_loss, o.text_steps, o.text_lr) == ("tree", "guided", 200, 1e-4)
    # Cost on their 200-step grid: 9 frames (L = 3) and 17 frames (L = 4), guidance doubling.
    for frames, evals in ((9, 7020), (17, 12812)):
        levels = wg.tree_levels(o, frames)
        alphas = wg.tree_alphas(frames)[1:-1]
        assert 2 * sum(wg.candidates_at(wg.tree_depth(a, levels), o) * wg.noise_steps(a, levels, o.steps)
                       for a in alphas) == evals


def test_the_guided_text_loss_moves_all_three_embeddings(tiny_model, image_pair, lpips_random):
    from impus_lite.text import encode_prompt

    scheduler = tiny_model.ddim_scheduler("leading")
    grid = wg.middle_third(scheduler, 200)  # their u in [T//3, 2T//3) on the ascending grid
    assert (len(grid), grid[0], grid[-1]) == (67, 331, 661)  # u = 66..132, t = 1 + 5u
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    cond, uncond = encode_prompt(tiny_model, "a photo"), encode_prompt(tiny_model, "", allow_empty=True)
    before = tiny_model.unet_evals
    out = wg.learn_conditioning(tiny_model, latents, cond, uncond, 2, 1e-2, 7.5, 12, "leading", progress=False)
    assert tiny_model.unet_evals - before == 2 * 2 * 2
    assert out.embeddings.shape == (2, *cond.shape[1:]) and out.uncond.shape == uncond.shape
    for moved, start in ((out.embeddings[0:1], cond), (out.embeddings[1:2], cond), (out.uncond, uncond)):
        assert not torch.allclose(moved, start.float())
    assert not torch.allclose(out.embeddings[0], out.embeddings[1])
    still = wg.learn_conditioning(tiny_model, latents, cond, uncond, 0, 1e-2, 7.5, 12, "leading")
    assert torch.equal(still.embeddings[0], cond[0].float()) and torch.equal(still.uncond, uncond.float())


def test_the_end_frames_are_the_inputs_vae_round_trips(tiny_model, image_pair, lpips_random):
    result = morph(tiny_model, image_pair, lpips_random, frames=3)
    assert result.end_errors["psnr_a"] == pytest.approx(result.end_errors["vae_psnr_a"], abs=1e-3)
    assert result.end_errors["psnr_b"] == pytest.approx(result.end_errors["vae_psnr_b"], abs=1e-3)


def test_the_noise_level_falls_towards_the_ends_as_the_equation_says():
    # Their numbers: a 200-step grid, fractions 0.3 and 0.55, a tree of depth 4 (17 frames).
    s_min, s_max, levels = 60, 110, 4

    def equation(depth):
        return int(s_min + (s_max - s_min) * (levels - min(depth, levels)) / (levels - 1))

    n = {a: wg.noise_steps(a, levels, 200, 0.3, 0.55)
         for a in (0.0, 1 / 16, 0.1, 1 / 8, 0.25, 0.5, 0.75, 1.0)}
    assert n[0.0] == n[1.0] == 0
    assert n[0.5] == equation(1) == 110 and n[0.25] == n[0.75] == equation(2) == 93
    assert n[1 / 8] == equation(3) == 76 and n[1 / 16] == equation(4) == 60
    assert n[0.1] == equation(5) == 60  # off the depth-4 grid: the finest level
    alphas = [k / 64 for k in range(65)]
    steps = [wg.noise_steps(a, levels, 200, 0.3, 0.55) for a in alphas]
    assert max(steps) == steps[32] and steps.count(max(steps)) == 1 and min(steps) == steps[0] == steps[-1]
    assert wg.noise_steps(0.5, 1, 200, 0.3, 0.55) == 60  # one level: their linspace(min, max, 1)
    assert wg.noise_steps(0.5, 3, 3, 0.3, 0.55) == 1   # never a plain blend of latents


def test_the_noise_timestep_is_on_the_sampling_grid(tiny_model):
    scheduler = tiny_model.ddim_scheduler("trailing")
    t = {a: wg.noise_timestep(scheduler, a, 4, 12) for a in (0.0, 1 / 16, 1 / 8, 0.25, 0.5, 1.0)}
    assert t[0.0] == t[1.0] == 0 and t[1 / 16] < t[1 / 8] < t[0.25] < t[0.5] < 1000
    scheduler.set_timesteps(12)
    assert t[0.5] == int(scheduler.timesteps[12 - wg.noise_steps(0.5, 4, 12)])


def test_the_tree_and_its_candidates():
    assert wg.tree_depth(0.5, 4) == 1 and wg.tree_depth(0.375, 4) == 3 and wg.tree_depth(0.1, 4) == 5
    assert wg.tree_parents(0.5, 4) == (0.0, 1.0, 0.5) and wg.tree_parents(0.375, 4) == (0.25, 0.5, 0.5)
    left, right, fraction = wg.tree_parents(0.1, 2)
    assert (left, right) == (0.0, 0.25) and fraction == pytest.approx(0.4)
    assert [wg.tree_levels(wg.Options(), f) for f in (3, 5, 9, 17, 6)] == [1, 2, 3, 4, 3]
    assert wg.tree_levels(wg.Options(), None) == 4 and wg.tree_levels(wg.Options(levels=2), 17) == 2
    eight = wg.Options()
    assert [wg.candidates_at(d, eight) for d in range(1, 8)] == [8, 7, 6, 5, 4, 3, 3]
    assert [wg.candidates_at(d, wg.Options(candidates=2)) for d in (1, 3)] == [2, 2]


def test_frames_cost_what_the_schedule_says(tiny_model, image_pair, lpips_random):
    # frames=5: a tree of depth 2 on a 10-step grid: n = 5 (middle), 3 (quarters);
    # candidates 4 at depth 1 and max(4 - 1, 3) = 3 at depth 2; guidance doubles every step.
    result = morph(tiny_model, image_pair, lpips_random, frames=5,
                   method_options={"candidates": 4, "min_candidates": 3, "steps": 10})
    assert result.stats["frames"].unet_evals == 4 * 5 * 2 + 2 * (3 * 3 * 2)
    plain = morph(tiny_model, image_pair, lpips_random, frames=5,
                  method_options={"candidates": 4, "min_candidates": 3, "steps": 10, "guidance": 1.0})
    assert plain.stats["frames"].unet_evals == result.stats["frames"].unet_evals // 2


def test_the_middle_frame_is_made_at_its_noise_level(tiny_model, image_pair, lpips_random):
    # One candidate: frame(1/2) = D(DDIM_n(slerp(q_t(z_0), q_t(z_1), 1/2))) with t = t(1/2).
    from impus_lite.interp import slerp
    from impus_lite.text import encode_prompt

    result = morph(tiny_model, image_pair, lpips_random, frames=3,
                   method_options={"candidates": 1, "levels": 2, "steps": 8, "text_steps": 0})
    latents = tiny_model.encode(result_inputs(tiny_model, image_pair))
    scheduler = tiny_model.ddim_scheduler(TINY_CONFIG.timestep_spacing)
    n = wg.noise_steps(0.5, 2, 8)
    t = wg.noise_timestep(scheduler, 0.5, 2, 8)
    eps = torch.randn((1, 4, 8, 8), generator=wg._frame_generator(TINY_CONFIG.seed, 0.5))
    noisy = slerp(scheduler.add_noise(latents[0:1].cpu(), eps, torch.tensor(t)),
                  scheduler.add_noise(latents[1:2].cpu(), eps, torch.tensor(t)), 0.5)
    cond = encode_prompt(tiny_model, "a photo")
    uncond = encode_prompt(tiny_model, wg.Options().negative_prompt, allow_empty=True)
    expected = tiny_model.decode(wg.denoise_tail(tiny_model, noisy, cond, uncond, 7.5, 8, n,
                                                 TINY_CONFIG.timestep_spacing)).cpu()
    assert torch.allclose(result.images[1], expected[0], atol=1e-4)


def result_inputs(model, pair):
    from impus_lite.images import load_image
    return torch.cat([load_image(p, 32, TINY_CONFIG.resize_mode, TINY_CONFIG.resample) for p in pair])


def test_frames_do_not_depend_on_the_batches_they_are_rendered_in(tiny_model, image_pair, lpips_random):
    a = morph(tiny_model, image_pair, lpips_random, frames=5, batch_size=1)
    b = morph(tiny_model, image_pair, lpips_random, frames=5, batch_size=4)
    assert torch.allclose(a.images, b.images, atol=1e-4)
    other_seed = morph(tiny_model, image_pair, lpips_random, frames=5, seed=3)
    assert not torch.allclose(a.images[1:-1], other_seed.images[1:-1], atol=1e-4)


def test_the_offline_ranking_prefers_the_frame_nearest_the_weighted_inputs(tiny_model, image_pair,
                                                                          lpips_random):
    from impus_lite.methods.base import start_run
    config = TINY_CONFIG.replace(method="wang-golland")
    run = start_run("wang-golland", wg.USES, tiny_model, *image_pair, "a photo", config, lpips=lpips_random)
    score, description = wg.make_scorer(run, wg.Options(ranking="lpips-inputs"))
    candidates = torch.cat([run.images, run.images.mean(0, keepdim=True), torch.zeros(1, 3, 32, 32)])
    assert int(torch.argmax(score(candidates, 0.0))) == 0 and int(torch.argmax(score(candidates, 1.0))) == 1
    assert float(score(candidates, 0.0)[0]) == pytest.approx(0.0, abs=1e-6)
    assert description.startswith("candidates ranked offline") and "instead of" not in description


@pytest.mark.parametrize("ranking", ["clip-prompts", "clip-inputs"])
def test_clip_ranks_when_a_clip_model_loads(tiny_model, image_pair, lpips_random, clip_folder, ranking):
    result = morph(tiny_model, image_pair, lpips_random, frames=3,
                   method_options={"clip_model": clip_folder, "ranking": ranking})
    notes = [n for n in result.notes if "ranked" in n]
    assert len(notes) == 1 and f"CLIP '{clip_folder}'" in notes[0] and f"({ranking})" in notes[0]
    assert "lpips" not in notes[0]
    if ranking == "clip-inputs":  # an input is its own nearest image: score 1 at its end
        from impus_lite.methods.base import start_run
        run = start_run("wang-golland", wg.USES, tiny_model, *image_pair, "a photo",
                        TINY_CONFIG.replace(method="wang-golland"), lpips=lpips_random)
        score, _ = wg.make_scorer(run, wg.Options(clip_model=clip_folder, ranking=ranking))
        values = score(torch.cat([run.images, -run.images]), 0.0)
        assert float(values[0]) == pytest.approx(1.0, abs=1e-5) and int(torch.argmax(values)) == 0


@pytest.mark.parametrize("options, message", [
    ({"strength": 1}, "has no option strength"),
    ({"min_noise": 0.6, "max_noise": 0.5}, "min_noise <= max_noise"),
    ({"max_noise": 1.5}, "min_noise <= max_noise"),
    ({"candidates": 0}, "at least one candidate"),
    ({"levels": 0}, "levels must be"),
    ({"ranking": "aesthetic"}, "Unknown ranking"),
    ({"alphas": "beta"}, "Unknown alphas 'beta': use one of tree, schedule"),
    ({"text_loss": "clip"}, "Unknown text_loss"),
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"text_lr": 0}, "text_lr must be positive"),
])
def test_bad_options_are_refused(tiny_model, image_pair, lpips_random, options, message):
    config = TINY_CONFIG.replace(method="wang-golland", method_options=options)
    with pytest.raises(InputError, match=message):
        run_method(tiny_model, *image_pair, "a photo", config, lpips=lpips_random, progress=False)


def test_settings_it_cannot_honour_are_named(tiny_model, image_pair, lpips_random):
    result = morph(tiny_model, image_pair, lpips_random, frames=3, lora_rank=4, inversion_steps=7, sample_steps=7)
    note = next(n for n in result.notes if "does not use" in n)
    assert "lora_rank" in note and "inversion_steps" in note and "method_options" in note
    # Its own steps and text settings are method options: the config's are named as unused.
    assert "sample_steps" in note and "text_steps" in note and "schedule" not in note
    plain = morph(tiny_model, image_pair, lpips_random, frames=3, method_options={"text_loss": "plain"})
    assert "text_steps" not in next(n for n in plain.notes if "does not use" in n)


def test_the_text_stage_is_cached_and_shared_with_impus(tiny_model, image_pair, lpips_random, tmp_path):
    from impus_lite import morph as impus_morph
    impus_morph(tiny_model, *image_pair, "a photo", TINY_CONFIG.replace(lora_rank=0), cache_dir=tmp_path,
                lpips=lpips_random, progress=False)
    config = TINY_CONFIG.replace(method="wang-golland", frames=3,
                                 method_options={**SMALL, "text_loss": "plain"})
    result = run_method(tiny_model, *image_pair, "a photo", config, cache_dir=tmp_path, lpips=lpips_random,
                        progress=False)
    assert result.stats["text"].cached and result.stats["text"].unet_evals == 0


def test_clip_loads_from_the_local_cache_only_when_the_hub_cannot_be_reached(monkeypatch):
    import socket

    import transformers
    from impus_lite import perceptual

    def unreachable(address, timeout=None):
        assert address == ("huggingface.co", 443) and timeout == 3.0
        raise OSError("no route to host")

    monkeypatch.delenv("IMPUS_LITE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    assert not perceptual._hub_reachable()
    calls = []

    def from_pretrained(source, **kwargs):
        calls.append(kwargs)
        raise OSError("not in the local cache")

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", from_pretrained)
    with pytest.raises(OSError):
        wg.ClipScorer("openai/clip-vit-large-patch14", torch.device("cpu"))
    assert calls == [{"local_files_only": True}]  # no minute of retries against the hub
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: socket.socket())
    assert perceptual._hub_reachable()
    with pytest.raises(OSError):
        wg.ClipScorer("openai/clip-vit-large-patch14", torch.device("cpu"))
    assert calls[-1] == {"local_files_only": False}
