import math

import numpy as np

import pytest
import torch

from impus_lite.bench import SavedActivations
from impus_lite.errors import InputError
from impus_lite.lora import adapter_parameters, adapter_state, add_lora, load_adapter_state, rank_from_rppd, train_lora
from impus_lite.text import encode_prompt, unconditional_embedding


@pytest.mark.parametrize("rppd, outlier, rank", [
    (0.0, False, 1), (0.35, False, 1), (7 / 18 - 1e-9, False, 1), (0.40, False, 2), (0.45, False, 4),
    (0.50, False, 8), (0.55, False, 8), (0.56, False, 16), (0.60, False, 16), (0.62, False, 32),
    (0.70, False, 64), (0.35, True, 16), (0.62, True, 32),
])
def test_rank_rule_matches_the_reference_table(rppd, outlier, rank):
    assert rank_from_rppd(rppd, outlier) == rank
    assert rank == max(16 if outlier else 1, 2 ** max(0, math.floor(18 * rppd - 6)))


def test_rank_rule_rejects_nonsense():
    with pytest.raises(InputError):
        rank_from_rppd(float("nan"))


def _prediction(model, adapter, z, e):
    with torch.no_grad(), model.using_adapter(adapter):
        return model.unet(z, torch.tensor(400), encoder_hidden_states=e).sample


def test_adapters_start_as_identity_and_train_apart(tiny_model):
    model = tiny_model
    model.remove_adapters()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    e = encode_prompt(model, "a photo").expand(2, -1, -1)
    base = _prediction(model, None, z, e)
    add_lora(model, "cond", 4)
    add_lora(model, "uncond", 2)
    base_weights = {n: p.clone() for n, p in model.unet.named_parameters() if "lora" not in n}
    assert torch.equal(_prediction(model, "cond", z, e), base)
    assert torch.equal(_prediction(model, "uncond", z, e), base)
    assert sum(p.numel() for p in adapter_parameters(model, "cond")) == 2 * sum(
        p.numel() for p in adapter_parameters(model, "uncond"))

    latents = [z[:1], z[1:]]
    losses = train_lora(model, "cond", latents, [e[:1], e[1:]], steps=6, lr=1e-2, progress=False)
    empty = unconditional_embedding(model)
    train_lora(model, "uncond", latents, [empty, empty], steps=3, lr=1e-2, progress=False)
    assert len(losses) == 6
    cond, uncond = _prediction(model, "cond", z, e), _prediction(model, "uncond", z, e)
    assert (cond - base).abs().max() > 1e-3
    assert (uncond - base).abs().max() > 1e-4
    assert (cond - uncond).abs().max() > 1e-3
    assert torch.equal(_prediction(model, None, z, e), base)  # adapters switch off cleanly
    for n, p in model.unet.named_parameters():  # only LoRA matrices trained
        if "lora" not in n:
            assert torch.equal(p, base_weights[n]), n

    state = adapter_state(model, "cond")
    model.remove_adapters()
    assert model.adapter_names() == []
    load_adapter_state(model, "cond", 4, state)
    assert torch.allclose(_prediction(model, "cond", z, e), cond, atol=1e-6)
    model.remove_adapters()


def test_unknown_adapter(tiny_model):
    with pytest.raises(KeyError):
        train_lora(tiny_model, "missing", [torch.zeros(1, 4, 8, 8)], [torch.zeros(1, 77, 32)], 1)


def _peak_saved_bytes(model, images):
    z = torch.randn(images, 1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    e = encode_prompt(model, "a photo")
    add_lora(model, "meter", 4)
    with SavedActivations() as meter:
        train_lora(model, "meter", list(z), [e] * images, steps=2, progress=False)
    model.remove_adapters()
    return meter.peak


def test_lora_training_holds_one_image_of_activations_at_a_time_on_large_latents(tiny_model, monkeypatch):
    import impus_lite.runtime as runtime
    tiny_model.remove_adapters()
    monkeypatch.setattr(runtime, "BATCHED_TRAINING_CELLS", 7 * 7)  # the tiny 8x8 latents count as large
    one, two = _peak_saved_bytes(tiny_model, 1), _peak_saved_bytes(tiny_model, 2)
    assert one > 0
    assert two < 1.1 * one  # a summed loss over both images would hold twice as much
    # Small latents trade memory for speed: both images in one batched pass.
    monkeypatch.setattr(runtime, "BATCHED_TRAINING_CELLS", 8 * 8)
    assert _peak_saved_bytes(tiny_model, 2) > 1.3 * one


@pytest.mark.parametrize("rank", [2, 8])
def test_gaussian_initialisation_draws_a_with_std_one_over_rank(tiny_model, rank):
    stds = {}
    for init in ("gaussian", "kaiming"):
        add_lora(tiny_model, "init-probe", rank, seed=0, init=init)
        a = torch.cat([p.detach().flatten() for n, p in tiny_model.unet.named_parameters()
                       if ".lora_A.init-probe." in n])
        b = torch.cat([p.detach().flatten() for n, p in tiny_model.unet.named_parameters()
                       if ".lora_B.init-probe." in n])
        assert torch.count_nonzero(b) == 0  # the adapter starts as the identity either way
        stds[init] = float(a.std())
        tiny_model.remove_adapter("init-probe")
    assert stds["gaussian"] == pytest.approx(1 / rank, rel=0.1)
    # peft's Kaiming-uniform: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in 16 or 32 on the tiny model.
    assert 1 / math.sqrt(3 * 32) * 0.9 < stds["kaiming"] < 1 / math.sqrt(3 * 16) * 1.1


def test_outlier_rule_reads_both_codes():
    from impus_lite.lora import is_outlier_pair
    g = torch.Generator().manual_seed(0)
    unit, low, lower = (s * torch.randn(4, 64, 64, generator=g) for s in (1.0, 0.8 ** 0.5, 0.5))
    assert not is_outlier_pair(unit, unit.flip(0))   # both near variance 1
    assert is_outlier_pair(unit, lower)              # |1 - 0.25| > 0.1 and 0.25 < 0.9
    assert is_outlier_pair(low, unit)                # |0.8 - 1| > 0.1 and 0.8 < 0.9
    assert not is_outlier_pair(lower, lower.flip(0))  # both low, but alike: no outlier
    assert not is_outlier_pair(unit, 1.2 * unit)     # far apart, but neither below 0.9


def test_lora_training_is_the_same_batched_or_one_image_at_a_time(tiny_model, monkeypatch):
    import impus_lite.runtime as runtime
    from impus_lite.lora import adapter_parameters, add_lora, train_lora
    from impus_lite.text import encode_prompt
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    e = encode_prompt(tiny_model, "a photo")

    def trained():
        add_lora(tiny_model, "probe", 2, seed=0)
        losses = train_lora(tiny_model, "probe", [latents[0:1], latents[1:2]], [e, e], 3, 1e-2, progress=False)
        return losses, [p.detach().clone() for p in adapter_parameters(tiny_model, "probe")]

    reference_losses, reference = trained()  # the default: 8x8 latents train together
    assert runtime.trains_images_together(latents)
    monkeypatch.setattr(runtime, "BATCHED_TRAINING_CELLS", 0)  # one image per backward pass
    assert not runtime.trains_images_together(latents)
    losses, params = trained()
    tiny_model.remove_adapter("probe")
    assert np.allclose(losses, reference_losses, rtol=1e-5)
    assert all(torch.allclose(p, q, atol=1e-5) for p, q in zip(params, reference))
    assert any(p.abs().max() > 0 for p in params)


def test_one_call_with_an_adapter_per_row_equals_one_call_per_adapter(tiny_model):
    from impus_lite.inversion import _unet, guidance_noise
    add_lora(tiny_model, "a", 4, seed=1)
    add_lora(tiny_model, "b", 2, seed=2)
    for name in ("a", "b"):     # B starts at zero: give both adapters an effect
        for param in adapter_parameters(tiny_model, name):
            param.data.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    side = tiny_model.resolution // tiny_model.vae_scale_factor
    z = torch.randn(3, tiny_model.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    cond = encode_prompt(tiny_model, "a photo").expand(3, -1, -1)
    t = torch.tensor(500)
    rows = ["a", None, "b"]
    with torch.no_grad():
        alone = torch.cat([_unet(tiny_model, z[i:i + 1], t, cond[i:i + 1], name) for i, name in enumerate(rows)])
        calls = tiny_model.unet_calls
        with tiny_model.using_adapters_per_row(rows):
            mixed = _unet(tiny_model, z, t, cond, None, switch=False)
        assert tiny_model.unet_calls == calls + 1
        assert torch.allclose(mixed, alone, atol=1e-5)
        assert not torch.allclose(alone[0], alone[2], atol=1e-3)       # the adapters differ
        # Guidance with a conditional and an unconditional adapter: one call, the same noise.
        uncond = unconditional_embedding(tiny_model)
        w = torch.tensor([1.5, 3.0, 7.5])
        calls = tiny_model.unet_calls
        guided = guidance_noise(tiny_model, z, t, cond, uncond, w, "a", "b")
        assert tiny_model.unet_calls == calls + 1
        eps_c = _unet(tiny_model, z, t, cond, "a")
        eps_u = _unet(tiny_model, z, t, uncond.expand(3, -1, -1), "b")
        assert torch.allclose(guided, eps_u + w.view(-1, 1, 1, 1) * (eps_c - eps_u), atol=1e-4)
    with pytest.raises(KeyError, match="nope"):
        with tiny_model.using_adapters_per_row(["nope"]):
            pass
