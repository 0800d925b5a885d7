import torch

from impus_lite.inversion import ddim_invert, ddim_sample
from impus_lite.text import encode_prompt, unconditional_embedding


def _latents(model, seed=0, batch=2):
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return model.encode(x)


def _relative_error(a, b):
    return ((a - b).pow(2).mean() / b.pow(2).mean()).item()


def test_inversion_then_sampling_reconstructs_the_latent(tiny_model):
    z = _latents(tiny_model)
    e = encode_prompt(tiny_model, "a photo")
    errors = {}
    for steps in (25, 250):
        codes = ddim_invert(tiny_model, z, e, steps, progress=False)
        back = ddim_sample(tiny_model, codes, e, unconditional_embedding(tiny_model), 1.0, steps, progress=False)
        errors[steps] = _relative_error(back, z)
    # The ODE is inverted up to discretisation error, which shrinks with more steps.
    assert errors[250] < 0.1
    assert errors[250] < errors[25]


def test_codes_differ_from_latents_and_have_the_same_shape(tiny_model):
    z = _latents(tiny_model, 1)
    codes = ddim_invert(tiny_model, z, encode_prompt(tiny_model, "a photo"), 10, progress=False)
    assert codes.shape == z.shape and _relative_error(codes, z) > 0.1


def test_guidance_changes_the_sample_and_batches_match_single_runs(tiny_model):
    codes = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    cond = torch.cat([encode_prompt(tiny_model, "a cat"), encode_prompt(tiny_model, "a dog")])
    uncond = unconditional_embedding(tiny_model)
    w1 = ddim_sample(tiny_model, codes, cond, uncond, 1.0, 5, progress=False)
    w3 = ddim_sample(tiny_model, codes, cond, uncond, 3.0, 5, progress=False)
    assert (w1 - w3).abs().max() > 1e-3
    mixed = ddim_sample(tiny_model, codes, cond, uncond, torch.tensor([1.0, 3.0]), 5, progress=False)
    single = ddim_sample(tiny_model, codes[1:], cond[1:], uncond, 3.0, 5, progress=False)
    assert torch.allclose(mixed[1:], single, atol=1e-4)
    assert torch.allclose(mixed[:1], w1[:1], atol=1e-4)


def test_guidance_one_skips_the_unconditional_branch(tiny_model):
    codes = torch.randn(2, 4, 8, 8)
    e = encode_prompt(tiny_model, "a photo")
    before = tiny_model.unet_evals
    ddim_sample(tiny_model, codes, e, unconditional_embedding(tiny_model), 1.0, 4, progress=False)
    assert tiny_model.unet_evals - before == 2 * 4
    before = tiny_model.unet_evals
    ddim_sample(tiny_model, codes, e, unconditional_embedding(tiny_model), 2.0, 4, progress=False)
    assert tiny_model.unet_evals - before == 2 * 2 * 4


def test_leading_grids_do_not_meet_and_trailing_grids_do(tiny_model):
    from impus_lite.inversion import grid_ends
    assert grid_ends(tiny_model, 250, 16, "leading") == (997, 931)   # the reference code's grids
    assert grid_ends(tiny_model, 50, 12, "leading") == (981, 914)
    assert grid_ends(tiny_model, 50, 12, "trailing") == (999, 999)
    assert grid_ends(tiny_model, 250, 16, "trailing") == (999, 999)


def test_round_trip_on_meeting_grids_is_closer(tiny_model):
    from impus_lite.inversion import round_trip
    z = _latents(tiny_model, 3, batch=4)
    e = encode_prompt(tiny_model, "a photo")
    errors = {s: _relative_error(round_trip(tiny_model, z, e, 50, 12, s), z) for s in ("leading", "trailing")}
    assert errors["trailing"] < errors["leading"]
