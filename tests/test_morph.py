from pathlib import Path

import pytest
import torch

from conftest import TINY_CONFIG, smooth_image
from impus_lite import MorphConfig, Morpher, morph
from impus_lite.config import PRESETS
from impus_lite.errors import InputError


def run(model, pair, config, lpips, cache_dir=None, results_dir=True):
    return morph(model, pair[0], pair[1], "a photo", config, cache_dir=cache_dir, lpips=lpips, progress=False,
                 results_dir=results_dir)


def test_morph_gives_the_frames_asked_for(tiny_model, image_pair, lpips_random):
    result = run(tiny_model, image_pair, TINY_CONFIG.replace(frames=4), lpips_random)
    assert len(result.frames) == 4 == len(result.alphas) == len(result.distances) + 1
    assert result.alphas[0] == 0.0 and result.alphas[-1] == 1.0
    assert result.images.shape == (4, 3, 32, 32) and result.frames[0].size == (32, 32)
    assert result.lpips_trunk == "random" and result.lora_rank >= 1 and result.rppd is not None
    stages = set(result.stats)
    assert {"encode", "text", "inversion", "rppd", "lora", "reinversion", "frames"} <= stages
    assert result.unet_evals == sum(s.unet_evals for s in result.stats.values()) > 0
    # Text optimisation: 3 steps x 2 images, one UNet evaluation each.
    assert result.stats["text"].unet_evals == 6


def test_same_seed_same_frames(tiny_model, image_pair, lpips_random):
    a = run(tiny_model, image_pair, TINY_CONFIG, lpips_random)
    b = run(tiny_model, image_pair, TINY_CONFIG, lpips_random)
    assert torch.equal(a.images, b.images) and a.alphas == b.alphas


def test_cache_is_hit_on_rerun_and_missed_when_an_image_changes(tiny_model, image_pair, lpips_random, tmp_path):
    cache = tmp_path / "cache"
    first = run(tiny_model, image_pair, TINY_CONFIG, lpips_random, cache, results_dir=None)
    assert not any(s.cached for s in first.stats.values())
    again = run(tiny_model, image_pair, TINY_CONFIG, lpips_random, cache, results_dir=None)
    for stage in ("text", "rppd", "lora", "reinversion"):
        assert again.stats[stage].cached and again.stats[stage].unet_evals == 0, stage
    assert "inversion" not in again.stats  # only the rPPD probe needs the base codes, and it is cached
    assert again.unet_evals == again.stats["frames"].unet_evals
    assert torch.allclose(again.images, first.images, atol=1e-5)

    # Other sampling settings: training stages still come from the cache.
    resampled = run(tiny_model, image_pair, TINY_CONFIG.replace(max_guidance=5.0), lpips_random, cache, results_dir=None)
    assert resampled.stats["text"].cached and resampled.stats["lora"].cached
    assert not torch.allclose(resampled.images, first.images, atol=1e-4)

    # Another DDIM grid: the codes are inverted again, the embeddings are reused.
    regridded = run(tiny_model, image_pair, TINY_CONFIG.replace(timestep_spacing="leading"), lpips_random, cache,
                    results_dir=None)
    assert regridded.stats["text"].cached
    assert not regridded.stats["inversion"].cached and not regridded.stats["reinversion"].cached
    # Another LoRA start: both adapters are trained again.
    restarted = run(tiny_model, image_pair, TINY_CONFIG.replace(lora_init="kaiming"), lpips_random, cache,
                    results_dir=None)
    assert restarted.stats["rppd"].cached and not restarted.stats["lora"].cached
    assert restarted.stats["lora"].unet_evals == first.stats["lora"].unet_evals

    # Same file name, new content: nothing stale is reused.
    smooth_image(9, (40, 48)).save(image_pair[0])
    changed = run(tiny_model, image_pair, TINY_CONFIG, lpips_random, cache, results_dir=None)
    assert not changed.stats["lora"].cached and not changed.stats["reinversion"].cached
    assert changed.stats["text"].unet_evals == 3  # image 1's embedding is reused, image 0's is not
    assert not any(p.suffix == ".tmp" for p in cache.iterdir())


def test_an_image_at_the_other_end_of_another_morph_gets_its_own_embedding(tiny_model, image_pair, lpips_random,
                                                                          tmp_path):
    # image i is optimised with seed + i: B as image 1 of (A, B) is not B as image 0 of (B, A)
    a, b = image_pair
    Morpher(tiny_model, a, b, "a photo", TINY_CONFIG, cache_dir=tmp_path, lpips=lpips_random,
            progress=False).embeddings()
    cached = Morpher(tiny_model, b, a, "a photo", TINY_CONFIG, cache_dir=tmp_path, lpips=lpips_random,
                     progress=False)
    fresh = Morpher(tiny_model, b, a, "a photo", TINY_CONFIG, lpips=lpips_random, progress=False)
    assert torch.allclose(cached.embeddings(), fresh.embeddings(), atol=1e-6)
    assert not cached.stats["text"].cached


def test_the_result_key_of_a_captioned_method_names_the_captions(tiny_model, image_pair, tmp_path):
    from impus_lite.methods import result_key
    renamed = [tmp_path / "red_car.png", tmp_path / "blue_bus.png"]
    for source, target in zip(image_pair, renamed):
        target.write_bytes(Path(source).read_bytes())
    for method, differs in (("aid", True), ("diffmorpher", True), ("freemorph", True), ("impus", False)):
        config = TINY_CONFIG.replace(method=method)
        keys = {result_key(tiny_model, *pair, "a photo", config) for pair in (image_pair, renamed)}
        assert len(keys) == (2 if differs else 1), method


# One changed value per field; each must change the frames, the alphas or the cost.
FIELD_CHANGES = {
    "size": 16, "resize_mode": "resize", "text_steps": 5, "text_lr": 0.05, "inversion_steps": 6,
    "lora_rank": 3, "rppd_frames": 4, "lora_steps": 3, "lora_lr": 0.05, "uncond_lora_rank": 0,
    "uncond_lora_steps": 4, "uncond_lora_lr": 0.05, "sample_steps": 4, "min_guidance": 1.0,
    "max_guidance": 5.0, "schedule": "uniform", "frames": 4, "reschedule_passes": 1,
    "reschedule_damping": 0.5,
    "batch_size": 1, "seed": 1, "resample": "bilinear", "precision": "bf16", "timestep_spacing": "leading",
    "autocast": "bf16",
    "rppd_probe": "reference", "lora_init": "kaiming", "max_lora_rank": 2,
    "method": "slerp", "method_options": {"guidance": 2.0},
    # Fields read only under some schedules, checked against a base config that uses them:
    "lpips_step": 0.04, "lpips_tol": 0.02, "search_candidates": 3, "max_frames": 3,
    "beta_a": 5.0, "beta_b": 0.5,
}
BASES = {
    # The tiny model's path is about 0.2 long in random-trunk LPIPS: steps of 0.05 make ~5 frames.
    "lpips_step": dict(schedule="perceptual", frames=None, lpips_step=0.08, lpips_tol=0.005),
    "lpips_tol": dict(schedule="perceptual", frames=None, lpips_step=0.05, lpips_tol=0.002),
    "search_candidates": dict(schedule="perceptual", frames=None, lpips_step=0.05, lpips_tol=0.005),
    "max_frames": dict(schedule="perceptual", frames=None, lpips_step=0.05, lpips_tol=0.005),
    "beta_a": dict(schedule="beta"), "beta_b": dict(schedule="beta"),
    "reschedule_passes": dict(reschedule_passes=3, frames=5, lpips_tol=0.0),
    "reschedule_damping": dict(schedule="reschedule", reschedule_passes=2, frames=5, lpips_tol=0.0),
    "schedule": dict(reschedule_passes=3, frames=5, lpips_tol=0.0),
    "max_lora_rank": dict(lora_rank=4),
    "method_options": dict(method="slerp"),
}


def _signature(result):
    return (result.images, result.alphas, result.unet_evals,
            sum(s.unet_calls for s in result.stats.values()))


def test_a_whole_result_is_stored_and_loaded_with_the_costs_of_the_run_that_made_it(
        tiny_model, image_pair, lpips_random, tmp_path):
    from impus_lite.cache import cache_report
    first = run(tiny_model, image_pair, TINY_CONFIG, lpips_random, tmp_path)
    assert not first.loaded and len(list(tmp_path.glob("result-*.pt"))) == 1
    evals = tiny_model.unet_evals
    again = run(tiny_model, image_pair, TINY_CONFIG, lpips_random, tmp_path)
    assert again.loaded and tiny_model.unet_evals == evals          # nothing ran
    assert (again.images - first.images).abs().max() <= 1 / 127.5   # frames kept at 8 bits
    assert [f.tobytes() for f in again.frames] == [f.tobytes() for f in first.frames]
    assert again.alphas == first.alphas and again.distances == first.distances
    assert again.unet_evals == first.unet_evals > 0 and again.seconds == pytest.approx(first.seconds)
    assert {k: vars(v) for k, v in again.stats.items()} == {k: vars(v) for k, v in first.stats.items()}
    assert (again.config, again.lora_rank, again.rppd, again.end_errors, again.label) == \
        (first.config, first.lora_rank, first.rppd, first.end_errors, first.label)
    assert "loaded whole from the result cache" in again.notes[-1] and "CPU" in again.notes[-1]
    assert again.summary()["loaded_from_result_cache"] is True
    assert cache_report([again]) == "Loaded from the stage cache: result x1. Computed: nothing."
    # Any field of the config, or another method, is another result; no results_dir: none kept.
    other = run(tiny_model, image_pair, TINY_CONFIG.replace(max_guidance=5.0), lpips_random, tmp_path)
    assert not other.loaded and len(list(tmp_path.glob("result-*.pt"))) == 2
    slerp = run(tiny_model, image_pair, TINY_CONFIG.replace(method="slerp"), lpips_random, tmp_path)
    assert not slerp.loaded
    fresh = run(tiny_model, image_pair, TINY_CONFIG, lpips_random, tmp_path / "stages", results_dir=None)
    assert not fresh.loaded and not list((tmp_path / "stages").glob("result-*.pt"))


def test_rendered_frames_are_kept_and_count_at_the_cost_they_were_sampled(tiny_model, image_pair, lpips_random,
                                                                          tmp_path):
    make = lambda: Morpher(tiny_model, *image_pair, "a photo", TINY_CONFIG, cache_dir=tmp_path,  # noqa: E731
                           lpips=lpips_random, progress=False)
    first = make()
    first.codes()
    frames = first.render([0.0, 0.3, 0.6, 1.0])
    per_frame = 2 * TINY_CONFIG.sample_steps            # two guidance branches per step
    assert first.render_cost.unet_evals == 4 * per_frame and first.render_cost.seconds > 0
    assert len(list(tmp_path.glob("frame-*.pt"))) == 4
    second = make()
    second.codes()
    evals = tiny_model.unet_evals
    again = second.render([0.3, 0.45, 1.0])            # two kept, one new
    assert tiny_model.unet_evals - evals == per_frame
    assert second.render_cost.unet_evals == 3 * per_frame   # loaded frames at their recorded cost
    assert torch.allclose(again[[0, 2]], frames[[1, 3]], atol=1e-5)
    # Other guidance: other frames; the morph's own frames stage never reads the frame cache.
    other = second.render([0.3], guidances=[7.0])
    assert not torch.allclose(other, frames[1:2], atol=1e-3)
    evals = tiny_model.unet_evals
    result = second.run()
    assert result.stats["frames"].unet_evals == tiny_model.unet_evals - evals > 0


def test_autocast_runs_the_inference_stages_in_bf16_only_when_asked(tiny_model, image_pair, lpips_random,
                                                                    tmp_path, monkeypatch):
    from impus_lite import models
    from impus_lite.methods import result_key
    cpu = torch.device("cpu")
    assert models.autocast_dtype(cpu, None) is None and models.autocast_dtype(cpu, "bf16") == torch.bfloat16
    assert models.autocast_dtype(torch.device("cuda"), "bf16") is None   # a GPU's weights are half already
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    assert models.autocast_dtype(cpu, "auto") is None
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert models.autocast_dtype(cpu, "auto") == torch.bfloat16

    seen = []
    tiny_model.unet.register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cpu")))
    plain = run(tiny_model, image_pair, TINY_CONFIG, lpips_random, tmp_path)
    assert not any(seen) and not any("autocast" in n for n in plain.notes)
    seen.clear()
    alone = run(tiny_model, image_pair, TINY_CONFIG.replace(autocast="bf16"), lpips_random, tmp_path / "new")
    assert any(seen) and not all(seen)          # sampling and inversion yes, training no
    cast = run(tiny_model, image_pair, TINY_CONFIG.replace(autocast="bf16"), lpips_random, tmp_path)
    assert torch.allclose(cast.images, alone.images, atol=1e-5)
    assert cast.stats["text"].cached and cast.stats["lora"].cached          # training is shared
    assert not cast.stats["reinversion"].cached                             # inference is not
    assert any("bf16 autocast" in n for n in cast.notes)
    assert not torch.allclose(cast.images, plain.images, atol=1e-4)
    assert (cast.images - plain.images).abs().mean() < 0.05                 # the same morph, rounded
    # A neighbour method ignores it (and says so); an unset field keeps the keys results had.
    seen.clear()
    slerp = run(tiny_model, image_pair, TINY_CONFIG.replace(method="slerp", autocast="bf16"), lpips_random)
    assert not any(seen) and any("autocast" in n for n in slerp.notes)
    assert result_key(tiny_model, *image_pair, "a photo", TINY_CONFIG) != \
        result_key(tiny_model, *image_pair, "a photo", TINY_CONFIG.replace(autocast="bf16"))
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    assert result_key(tiny_model, *image_pair, "a photo", TINY_CONFIG) == \
        result_key(tiny_model, *image_pair, "a photo", TINY_CONFIG.replace(autocast="auto"))


def test_every_config_field_is_covered():
    assert set(FIELD_CHANGES) == set(MorphConfig.__dataclass_fields__)


@pytest.mark.parametrize("field", sorted(FIELD_CHANGES))
def test_each_config_field_changes_the_output_or_the_cost(field, tiny_model, image_pair, lpips_random):
    from impus_lite.models import load_model
    base = TINY_CONFIG.replace(**BASES.get(field, {}))
    changed = base.replace(**{field: FIELD_CHANGES[field]})
    assert getattr(changed, field) != getattr(base, field)
    model = load_model("tiny", device="cpu") if field == "precision" else tiny_model  # it casts the model
    images0, alphas0, evals0, calls0 = _signature(run(model, image_pair, base, lpips_random))
    images1, alphas1, evals1, calls1 = _signature(run(model, image_pair, changed, lpips_random))
    same_frames = images0.shape == images1.shape and torch.allclose(images0, images1, atol=1e-5)
    assert not (same_frames and alphas0 == alphas1 and evals0 == evals1 and calls0 == calls1)


def test_presets_hold_the_reference_numbers():
    paper = MorphConfig.preset("paper")
    assert (paper.text_steps, paper.text_lr, paper.inversion_steps, paper.lora_steps, paper.lora_lr) == \
        (2500, 2e-3, 250, 150, 1e-3)
    assert (paper.uncond_lora_rank, paper.uncond_lora_steps, paper.sample_steps) == (2, 15, 16)
    assert (paper.min_guidance, paper.max_guidance, paper.lpips_step, paper.lpips_tol) == (1.5, 3.0, 0.2, 0.01)
    assert paper.rppd_frames == 10 and paper.lora_rank is None and paper.schedule == "perceptual"
    # Where the reference code's choices change the result:
    assert (paper.resize_mode, paper.resample, paper.precision) == ("resize", "bilinear", "fp32")
    assert (paper.timestep_spacing, paper.rppd_probe, paper.lora_init) == ("leading", "reference", "gaussian")
    fast = MorphConfig.preset("fast")
    assert (fast.timestep_spacing, fast.rppd_probe, fast.precision) == ("trailing", "equation", None)
    assert paper.guidance(0.0) == 1.5 and paper.guidance(0.5) == 3.0 and paper.guidance(0.75) == 2.25
    assert set(PRESETS) == {"paper", "fast"}
    with pytest.raises(Exception):
        paper.text_steps = 1  # frozen


@pytest.mark.parametrize("changes, message", [
    (dict(frames=1), "at least 2 frames"), (dict(schedule="zigzag"), "Unknown schedule"),
    (dict(lpips_step=0), "must be positive"), (dict(reschedule_damping=1.0), "in \\[0, 1\\)"),
    (dict(schedule="uniform", frames=None), "needs a frame count"),
    (dict(timestep_spacing="linspace"), "Unknown timestep_spacing"), (dict(precision="fp8"), "Unknown precision"),
    (dict(rppd_probe="code"), "Unknown rppd_probe"), (dict(max_lora_rank=0), "max_lora_rank"),
    (dict(method="morphing"), "Unknown method"),
])
def test_bad_config_values(changes, message):
    with pytest.raises(InputError, match=message):
        MorphConfig.preset("fast", **changes)


def test_unknown_preset():
    with pytest.raises(InputError, match="Unknown preset"):
        MorphConfig.preset("slow")


def test_stages_run_one_at_a_time(tiny_model, image_pair, lpips_random):
    m = Morpher(tiny_model, *image_pair, "a photo", TINY_CONFIG.replace(lora_rank=2), lpips=lpips_random,
                progress=False)
    assert m.latents().shape == (2, 4, 8, 8)
    assert m.embeddings().shape == (2, 77, 32)
    assert m.base_codes().shape == (2, 4, 8, 8)
    assert m.rank() == 2 and "rppd" not in m.stats and m.rppd() is None  # a given rank skips the probe
    assert m.adapters() == ("cond", "uncond")
    frames = m.render([0.0, 0.5, 1.0])
    assert frames.shape == (3, 3, 32, 32) and frames.min() >= -1 and frames.max() <= 1


def test_size_must_fit_the_vae(tiny_model, image_pair, lpips_random):
    with pytest.raises(InputError, match="multiple of the VAE factor"):
        Morpher(tiny_model, *image_pair, "a photo", TINY_CONFIG.replace(size=30), lpips=lpips_random)


def test_a_morpher_gets_its_adapters_back_after_another_replaced_them(tiny_model, image_pair, lpips_random):
    first = Morpher(tiny_model, *image_pair, "a photo", TINY_CONFIG.replace(lora_rank=2), lpips=lpips_random,
                    progress=False)
    before = first.render([0.5])
    other = Morpher(tiny_model, image_pair[1], image_pair[0], "a photo", TINY_CONFIG.replace(lora_rank=3, seed=5),
                    lpips=lpips_random, progress=False)
    other.adapters()
    assert tiny_model.adapter_owner is other
    assert torch.allclose(first.render([0.5]), before, atol=1e-5)
    assert tiny_model.adapter_owner is first


def test_a_morpher_gets_its_precision_back_after_another_changed_it(image_pair, lpips_random):
    from impus_lite.models import load_model
    # a bf16 model (a GPU's default) morphed with its own weights, then a `paper`-like morph on
    # it casts the shared model to fp32 and sets an autocast: the first gets bf16 back, exactly
    model = load_model("tiny", device="cpu", dtype="bf16")
    config = TINY_CONFIG.replace(lora_rank=2, precision=None)
    alone = Morpher(model, *image_pair, "a photo", config, lpips=lpips_random, progress=False).render([0.5])
    model.remove_adapters()
    first = Morpher(model, *image_pair, "a photo", config, lpips=lpips_random, progress=False)
    Morpher(model, *image_pair, "a photo", config.replace(precision="fp32", autocast="bf16"), lpips=lpips_random,
            progress=False)
    assert model.dtype == torch.float32 and model.inference_autocast == torch.bfloat16
    frame = first.render([0.5])
    assert model.dtype == torch.bfloat16 and model.inference_autocast is None
    assert {p.dtype for n, p in model.unet.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    assert torch.equal(frame, alone)
    assert any("cast back to bfloat16" in note and "lost" not in note for note in first.notes)


@pytest.mark.parametrize("dtype, torch_dtype, tolerance", [("fp16", torch.float16, 0.005),
                                                           ("bf16", torch.bfloat16, 0.05)])
def test_half_precision_weights_morph_like_full_precision(image_pair, lpips_random, dtype, torch_dtype,
                                                          tolerance):
    # The dtype plumbing of a CUDA fp16 run (fp32 LoRA and text embeddings around a half UNet,
    # fp32 frames out), exercised on the CPU. Measured mean |difference|: 0.0016 fp16, 0.015 bf16.
    from impus_lite.models import load_model
    config = TINY_CONFIG.replace(schedule="uniform", frames=3)
    full = run(load_model("tiny", device="cpu"), image_pair, config, lpips_random)
    model = load_model("tiny", device="cpu", dtype=dtype)
    assert {p.dtype for p in model.unet.parameters()} == {torch_dtype}
    half = run(model, image_pair, config, lpips_random)
    assert half.images.dtype == torch.float32 and torch.isfinite(half.images).all()
    assert half.images.abs().max() <= 1.0
    assert (half.images - full.images).abs().mean() < tolerance
    assert half.lora_rank == full.lora_rank and half.unet_evals == full.unet_evals


def test_the_paper_preset_casts_a_half_model_to_fp32_and_says_so(image_pair, lpips_random):
    from impus_lite.models import load_model
    model = load_model("tiny", device="cpu", dtype="fp16")
    result = run(model, image_pair, TINY_CONFIG.replace(precision="fp32"), lpips_random)
    assert model.dtype == torch.float32 and {p.dtype for p in model.unet.parameters()} == {torch.float32}
    assert any("cast from float16 to fp32" in note for note in result.notes)


def test_end_errors_compare_the_end_frames_with_the_inputs_and_the_vae_floor(tiny_model, image_pair,
                                                                            lpips_random):
    from impus_lite.perceptual import psnr
    m = Morpher(tiny_model, *image_pair, "a photo", TINY_CONFIG, lpips=lpips_random, progress=False)
    result = m.run()
    errors = result.end_errors
    assert set(errors) == {f"{p}{k}_{s}" for p in ("", "vae_") for k in ("lpips", "psnr") for s in "ab"}
    floor = m.reconstructions()
    assert floor.shape == m.images.shape
    assert errors["vae_psnr_a"] == pytest.approx(psnr(floor[0], m.images[0]))
    assert errors["psnr_b"] == pytest.approx(psnr(result.images[-1], m.images[1]))
    assert errors["lpips_a"] == pytest.approx(float(lpips_random(result.images[:1], m.images[:1])[0]), abs=1e-6)
    assert result.summary()["end_errors"] == errors
    assert all(s.peak_memory_mb > 0 for s in result.stats.values())


def test_a_huge_rppd_asks_for_a_bounded_rank(tiny_model, image_pair, lpips_random, monkeypatch):
    import sys

    from impus_lite.lora import max_adapter_rank
    from impus_lite.perceptual import RppdProbe

    monkeypatch.setattr(sys.modules["impus_lite.morph"], "rppd_probe", lambda *a, **k: RppdProbe(5.0, [], [], [], 1.0, "equation"))
    assert max_adapter_rank(tiny_model) == 16  # the tiny UNet's narrowest attention projection
    m = Morpher(tiny_model, *image_pair, "a photo", TINY_CONFIG, lpips=lpips_random, progress=False)
    assert m.rppd() == 5.0 and m.rank() == 16  # the rule asks for 2^84
    assert any("2^84 bounded to 16" in note for note in m.notes)
    small = Morpher(tiny_model, *image_pair, "a photo", TINY_CONFIG.replace(max_lora_rank=4), lpips=lpips_random,
                    progress=False)
    assert small.rank() == 4 and any("config.max_lora_rank" in note for note in small.notes)


def test_a_method_rejects_options_it_does_not_have(tiny_model, image_pair, lpips_random):
    from impus_lite.errors import InputError
    with pytest.raises(InputError, match="has no option strength: its options are guidance"):
        run(tiny_model, image_pair, TINY_CONFIG.replace(method="slerp", method_options={"strength": 1}),
            lpips_random)
    with pytest.raises(InputError, match="IMPUS takes no method_options"):
        run(tiny_model, image_pair, TINY_CONFIG.replace(method_options={"guidance": 2.0}), lpips_random)


def test_frames_per_call_follows_batch_size_or_the_latent_size():
    from impus_lite.runtime import LARGE_LATENT_FRAMES_PER_CALL, frames_per_call

    assert frames_per_call(3, 16) == 3 and frames_per_call(3, 64) == 3           # a set value holds
    assert frames_per_call(None, 16, max_frames=40) == 40                        # classroom: a whole pass
    assert frames_per_call(None, 64, max_frames=40) == LARGE_LATENT_FRAMES_PER_CALL == 4   # SD at 512
    assert MorphConfig.preset("fast").batch_size is None
    with pytest.raises(InputError, match="batch_size"):
        MorphConfig.preset("fast", batch_size=0)


def test_a_render_pass_of_small_latents_is_one_unet_call_per_step(tiny_model, image_pair, lpips_random, monkeypatch):
    from impus_lite import models
    monkeypatch.setattr(models, "free_workers", lambda workers: workers)   # not the machine's load
    monkeypatch.setattr(tiny_model, "batch_workers", 1)
    frames = {}
    for batch_size, workers, calls_per_step in ((None, 1, 1), (2, 1, 3), (None, 2, 2)):
        tiny_model.batch_workers = workers
        m = Morpher(tiny_model, *image_pair, "a photo", TINY_CONFIG.replace(lora_rank=2, batch_size=batch_size),
                    lpips=lpips_random, progress=False)
        m.codes()                                      # train and invert first: count the render alone
        calls = tiny_model.unet_calls
        frames[batch_size, workers] = m.render([0.0, 0.25, 0.5, 0.75, 1.0])
        # both guidance branches run in one call: one call per DDIM step, batch of frames and
        # worker (two workers: frames 0-2 and 3-4 at once)
        assert tiny_model.unet_calls - calls == calls_per_step * TINY_CONFIG.sample_steps
    assert torch.allclose(frames[None, 1], frames[2, 1], atol=1e-4)
    assert torch.allclose(frames[None, 1], frames[None, 2], atol=1e-4)
