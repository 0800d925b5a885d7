"""DiffMorpher on the tiny model: frame counts, the code's defaults (PNDM, LoRA factors, attention on
interpolated inputs, per-image prompts, the kept reschedule pass) and the paper's forms as options,
its closed forms (AdaIN, LoRA interpolation, attention interpolation), the attention processors'
installation, its options, and where the public ``morph()`` lives."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_CONFIG
from impus_lite import MorphConfig, morph
from impus_lite.attention import (AttentionBank, InterpolatingProcessor, TimestepClock, attention,
                                  interpolating, recording, self_attention_layers)
from impus_lite.errors import InputError
from impus_lite.interp import slerp
from impus_lite.inversion import ddim_sample
from impus_lite.lora import add_lora, max_adapter_rank
from impus_lite.methods import diffmorpher
from impus_lite.methods.diffmorpher import (ADAPTERS, FactorMixture, InputInterpolator, InputRecorder,
                                            attention_calls, attention_timesteps, denoise, installed_by_call,
                                            interpolate_codes, lora_mixture)
from impus_lite.schedules import reschedule_alphas, uniform_alphas
from impus_lite.text import encode_prompt, unconditional_embedding

#: A few steps of everything: each morph takes about a second on the tiny model.
FEW = dict(rank=4, lora_steps=2, steps=4)
#: The config's uniform alphas instead of the code's two passes (frames at fixed alphas).
FIXED = dict(alphas="schedule")
#: UNet calls per frame at FEW's 4 steps: PNDM (PLMS) evaluates its second timestep twice.
CALLS = FEW["steps"] + 1


def run(model, pair, lpips, cache_dir=None, results_dir=True, **changes):
    options = {**FEW, **changes.pop("options", {})}
    config = TINY_CONFIG.replace(method="diffmorpher", method_options=options, **changes)
    return morph(model, pair[0], pair[1], "a photo", config, cache_dir=cache_dir, lpips=lpips, progress=False,
                 results_dir=results_dir)


# --------------------------------------------------------------------------------------------
# The method end to end
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("frames", [2, 5])
def test_uniform_schedule_gives_the_frames_asked_for(frames, tiny_model, image_pair, lpips_random):
    result = run(tiny_model, image_pair, lpips_random, schedule="uniform", frames=frames, options=FIXED)
    assert len(result.frames) == frames == len(result.alphas) == len(result.distances) + 1
    assert result.alphas == uniform_alphas(frames)
    assert result.images.shape == (frames, 3, 32, 32) and result.lora_rank == 4
    assert set(result.stats) == {"encode", "lora", "inversion", "frames"}
    # One forward (and backward) per LoRA step and image; one UNet call per DDIM inversion step;
    # per frame one call per PNDM timestep, steps + 1 (no guidance, one frame per call: the
    # endpoints' recording passes are frames 0 and 1).
    assert result.stats["lora"].unet_evals == 2 * FEW["lora_steps"]
    assert result.stats["inversion"].unet_evals == 2 * FEW["steps"]
    assert result.stats["frames"].unet_evals == result.stats["frames"].unet_calls == frames * CALLS
    assert tiny_model.adapter_names() == []  # the per-image adapters are gone afterwards


def test_the_rescheduled_pass_is_always_kept(tiny_model, image_pair, lpips_random):
    for preset in ("fast", "paper"):  # paper's schedule is "perceptual": the reschedule still runs
        base = MorphConfig.preset(preset, method="diffmorpher", frames=5, size=32, text_steps=1)
        uniform = morph(tiny_model, *image_pair, "a photo", base.replace(schedule="uniform", method_options={
            **FEW, **FIXED}), lpips=lpips_random, progress=False)
        result = morph(tiny_model, *image_pair, "a photo", base.replace(method_options=FEW),
                       lpips=lpips_random, progress=False)
        # DiffMorpher's AlphaScheduler: invert the cumulative consecutive distances of the uniform
        # pass; its second pass is the result, even or not.
        rescheduled = reschedule_alphas(uniform.alphas, uniform.distances, 5)
        assert rescheduled != uniform.alphas and result.alphas == pytest.approx(rescheduled, abs=1e-12)
        new = len(set(rescheduled) - set(uniform.alphas))
        assert new == 3 and result.stats["frames"].unet_evals == (5 + new) * CALLS
        assert any("second pass kept" in n for n in result.notes)
        unused = " ".join(n for n in result.notes if "does not use" in n)
        assert ("schedule" in unused) == (preset == "paper")  # paper's perceptual search is not run
    # With alphas="schedule" the config's reschedule runs, DiffMorpher's passes whatever the
    # preset's count (fast's is 3); another count by option.
    uniform = run(tiny_model, image_pair, lpips_random, schedule="uniform", frames=5, options=FIXED)
    two = run(tiny_model, image_pair, lpips_random, schedule="reschedule", reschedule_passes=6, frames=5,
              lpips_tol=0.0, options=FIXED)
    assert two.config.reschedule_passes == 2
    assert two.alphas in (reschedule_alphas(uniform.alphas, uniform.distances, 5), uniform.alphas)


def test_same_inputs_same_frames_and_the_cache_is_used(tiny_model, image_pair, lpips_random, tmp_path):
    first = run(tiny_model, image_pair, lpips_random, tmp_path, None, schedule="uniform", frames=3)
    again = run(tiny_model, image_pair, lpips_random, tmp_path, None, schedule="uniform", frames=3)
    assert again.stats["lora"].cached and again.stats["inversion"].cached
    assert again.stats["lora"].unet_evals == again.stats["inversion"].unet_evals == 0
    assert torch.allclose(first.images, again.images, atol=1e-5)
    # Another LoRA learning rate: adapters and codes are made again.
    other = run(tiny_model, image_pair, lpips_random, tmp_path, None, schedule="uniform", frames=3,
                options=dict(lora_lr=1e-2))
    assert not other.stats["lora"].cached and not other.stats["inversion"].cached


def test_each_frame_uses_its_alpha_for_lora_code_and_attention(tiny_model, image_pair, lpips_random, monkeypatch):
    calls = []
    real = {"at": FactorMixture.at, **{name: getattr(diffmorpher, name) for name in (
        "interpolate_codes", "recording_calls", "interpolating_calls")}}

    def at(self, alpha):
        calls.append(("lora", round(alpha, 6)))
        return real["at"](self, alpha)
    monkeypatch.setattr(FactorMixture, "at", at)

    def spy(name, log):
        def wrapped(*args, **kwargs):
            calls.append(log(*args, **kwargs))
            return real[name](*args, **kwargs)
        monkeypatch.setattr(diffmorpher, name, wrapped)

    spy("interpolate_codes", lambda z0, z1, alphas, adain=True: ("code", [round(a, 6) for a in alphas], adain))
    spy("recording_calls", lambda unet, bank, e, n, layers, form: ("record", e, n, layers, form))
    spy("interpolating_calls", lambda unet, bank, alphas, layers, form: (
        "attention", [round(a, 6) for a in alphas], sorted({k[2] for k in bank}), layers, form))
    run(tiny_model, image_pair, lpips_random, schedule="uniform", frames=4, options=FIXED)
    n = attention_calls(0.6, FEW["steps"])
    up = self_attention_layers(tiny_model.unet, ("up",))
    expected = []
    for e in (0, 1):  # the endpoints, generated while their attention inputs are recorded
        expected += [("record", e, n, up, "inputs"), ("code", [float(e)], True), ("lora", e)]
    for a in (round(1 / 3, 6), round(2 / 3, 6)):
        expected += [("attention", [a], list(range(n)), up, "inputs"), ("code", [a], True), ("lora", a)]
    assert n == 3 and calls == expected


@pytest.mark.parametrize("change", [dict(attention_fraction=0.0), dict(adain=False), dict(rank=0),
                                    dict(attention_layers="all"), dict(guidance=2.0), dict(scheduler="ddim"),
                                    dict(lora_interpolation="deltas"), dict(attention_form="keys-values"),
                                    dict(prompts=["a cat", "a dog"])])
def test_each_option_changes_the_frames(change, tiny_model, image_pair, lpips_random):
    # A LoRA rate that moves A away from its shared start: the code's and the paper's LoRA and
    # attention forms differ by terms in A_0 - A_1 (see the module docstring).
    trained = {**FIXED, "lora_lr": 0.05, "lora_steps": 4}
    base = run(tiny_model, image_pair, lpips_random, schedule="uniform", frames=3, options=trained)
    changed = run(tiny_model, image_pair, lpips_random, schedule="uniform", frames=3, options={**trained, **change})
    assert not torch.allclose(base.images[1], changed.images[1], atol=1e-4)


def test_rank_is_bounded_by_the_narrowest_layer(tiny_model, image_pair, lpips_random):
    assert max_adapter_rank(tiny_model) == 16
    result = run(tiny_model, image_pair, lpips_random, schedule="uniform", frames=2,
                 options=dict(rank=32, lora_steps=1, steps=2))
    assert result.lora_rank == 16
    assert any("LoRA rank 32 bounded to 16" in note for note in result.notes)


def test_published_defaults_and_option_checks(tiny_model, image_pair, lpips_random):
    o = diffmorpher.Options()
    assert (o.rank, o.lora_steps, o.lora_lr, o.steps, o.attention_fraction, o.attention_layers, o.adain,
            o.guidance) == (16, 200, 2e-4, 50, 0.6, "up", True, 1.0)
    # The code's forms by default, the paper's by option.
    assert (o.scheduler, o.lora_interpolation, o.attention_form, o.alphas, o.prompts) == (
        "pndm", "factors", "inputs", "reschedule", None)
    with pytest.raises(InputError, match="has no option strength: its options are adain, alphas, attention_form"):
        run(tiny_model, image_pair, lpips_random, options=dict(strength=1))
    for bad, message in [(dict(attention_fraction=1.5), "attention_fraction must be in"),
                         (dict(rank=-1), "rank must be an integer"), (dict(steps=0), "steps must be"),
                         (dict(lora_steps=2.5), "lora_steps must be"), (dict(lora_lr=0), "lora_lr must"),
                         (dict(attention_layers="mid"), "attention_layers must be one of up, all"),
                         (dict(adain="yes"), "adain must be"), (dict(guidance=0.5), "guidance must be"),
                         (dict(guidance="2"), "guidance must be a number"),
                         (dict(scheduler="euler"), "scheduler must be one of pndm, ddim"),
                         (dict(lora_interpolation="mean"), "lora_interpolation must be one of factors, deltas"),
                         (dict(attention_form="outputs"), "attention_form must be one of inputs, keys-values"),
                         (dict(alphas="beta"), "alphas must be one of reschedule, schedule"),
                         (dict(prompts=["only one"]), "two non-empty prompts")]:
        with pytest.raises(InputError, match=message):
            diffmorpher.Options(**bad)


def test_attention_steps_are_the_first_fraction(tiny_model):
    assert attention_calls(0.6, 50) == 30 and attention_calls(0.6, 4) == 3  # the code: id < 50 * 0.6
    assert len(attention_timesteps(tiny_model, 0.6, 50)) == 30
    assert attention_timesteps(tiny_model, 0.6, 4, "trailing") == [999, 749, 499]
    assert attention_timesteps(tiny_model, 0.0, 50) == []


# --------------------------------------------------------------------------------------------
# AdaIN
# --------------------------------------------------------------------------------------------

def test_adain_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(1, 4, 8, 8, generator=g) * 1.3 + 0.2
    z1 = torch.randn(1, 4, 8, 8, generator=g) * 0.7 - 0.4
    alphas = [0.0, 0.3, 0.5, 1.0]
    out = interpolate_codes(z0, z1, alphas)
    assert out.shape == (4, 4, 8, 8) and out.dtype == torch.float32

    def stats(z):  # per channel over positions, biased variance + 1e-5
        return z.mean((2, 3), keepdim=True), (z.var((2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()

    (m0, s0), (m1, s1) = stats(z0.double()), stats(z1.double())
    for k, a in enumerate(alphas):
        mixed = slerp(z0, z1, a).double()
        expected = F.instance_norm(mixed, eps=1e-5) * ((1 - a) * s0 + a * s1) + ((1 - a) * m0 + a * m1)
        assert torch.allclose(out[k:k + 1].double(), expected, atol=1e-5), a
    assert torch.allclose(out[0], z0[0], atol=1e-5) and torch.allclose(out[-1], z1[0], atol=1e-5)
    # The standard deviations are interpolated, not the variances: at 0.5 the channel std is
    # the mean of the two stds.
    mean, std = stats(out[2:3].double())
    assert torch.allclose(std, (s0 + s1) / 2, atol=1e-4) and torch.allclose(mean, (m0 + m1) / 2, atol=1e-5)
    assert not torch.allclose(std ** 2, (s0 ** 2 + s1 ** 2) / 2, atol=1e-3)
    # Without AdaIN: the plain slerp.
    assert torch.allclose(interpolate_codes(z0, z1, [0.3], adain=False), slerp(z0, z1, [0.3])[:, 0])


# --------------------------------------------------------------------------------------------
# LoRA interpolation
# --------------------------------------------------------------------------------------------

@pytest.fixture
def two_adapters(tiny_model):
    """The tiny UNet with the two per-image adapters, A from different seeds, B random (not zero)."""
    tiny_model.remove_adapters()
    g = torch.Generator().manual_seed(3)
    for seed, name in enumerate(ADAPTERS):
        add_lora(tiny_model, name, 4, seed=seed)
        for n, p in tiny_model.unet.named_parameters():
            if f".lora_B.{name}." in n:
                p.data = torch.randn(p.shape, generator=g) * 0.3
    yield tiny_model
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was active which is now deleted")
        tiny_model.remove_adapters()


def _unet_output(model, z, t, cond):
    return model.unet(z, t, encoder_hidden_states=cond).sample


def test_lora_interpolation_ends_are_each_images_adapter(two_adapters):
    model = two_adapters
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, cond = torch.tensor(500), encode_prompt(model, "a photo")
    with torch.no_grad():
        own = []
        for name in ADAPTERS:
            with model.using_adapter(name):
                own.append(_unet_output(model, z, t, cond))
        with model.using_adapter(None):
            base = _unet_output(model, z, t, cond)
        mixed = {}
        for a in (0.0, 1.0, 0.5):
            with lora_mixture(model, ADAPTERS, [1 - a, a]):
                mixed[a] = _unet_output(model, z, t, cond)
        with model.using_adapter(ADAPTERS[0]):  # weights are back to 1 after the mixture
            after = _unet_output(model, z, t, cond)
    assert not torch.allclose(own[0], own[1], atol=1e-4) and not torch.allclose(own[0], base, atol=1e-4)
    assert torch.allclose(mixed[0.0], own[0], atol=1e-6) and torch.allclose(mixed[1.0], own[1], atol=1e-6)
    assert not torch.allclose(mixed[0.5], own[0], atol=1e-4)
    assert torch.allclose(after, own[0], atol=1e-6)


def test_lora_interpolation_mid_way_is_the_mean_of_the_deltas(two_adapters):
    model = two_adapters
    layer = model.unet.up_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(2))
    base_weight = layer.base_layer.weight
    deltas = [layer.lora_B[n].weight @ layer.lora_A[n].weight * layer.scaling[n] for n in ADAPTERS]
    assert not torch.allclose(deltas[0], deltas[1])
    with torch.no_grad(), lora_mixture(model, ADAPTERS, [0.5, 0.5]):
        mixed = layer(x)
    expected = x @ (base_weight + (deltas[0] + deltas[1]) / 2).T
    assert torch.allclose(mixed, expected, atol=1e-5)
    # The code's form, A and B interpolated separately, is another matrix (unless A_0 = A_1).
    factors = ((layer.lora_B[ADAPTERS[0]].weight + layer.lora_B[ADAPTERS[1]].weight) / 2
               @ (layer.lora_A[ADAPTERS[0]].weight + layer.lora_A[ADAPTERS[1]].weight) / 2)
    assert not torch.allclose(mixed, x @ (base_weight + factors).T, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Attention interpolation
# --------------------------------------------------------------------------------------------

def _codes_and_text(model):
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return z, encode_prompt(model, "a photo"), unconditional_embedding(model)


def test_attention_at_alpha_0_reproduces_endpoint_0_with_lora_active(two_adapters):
    model = two_adapters
    z, cond, uncond = _codes_and_text(model)
    steps, timesteps = 4, attention_timesteps(model, 0.6, 4)
    layers = self_attention_layers(model.unet, ("up",))
    before = dict(model.unet.attn_processors)
    with lora_mixture(model, ADAPTERS, [1.0, 0.0]):
        plain = denoise(model, z[0:1], cond, uncond, 1.0, steps)
    bank = AttentionBank()
    for e in (0, 1):
        with lora_mixture(model, ADAPTERS, [1 - e, e]), recording(model.unet, bank, e, timesteps, layers):
            recorded = denoise(model, z[e:e + 1], cond, uncond, 1.0, steps)
        if e == 0:
            assert torch.allclose(recorded, plain, atol=1e-5)  # recording leaves the output alone
    assert len(bank) == 2 * len(layers) * len(timesteps) == 12 and bank.timesteps() == timesteps
    with lora_mixture(model, ADAPTERS, [1.0, 0.0]), interpolating(model.unet, bank, [0.0], layers=layers):
        again = denoise(model, z[0:1], cond, uncond, 1.0, steps)
    assert torch.allclose(again, plain, atol=1e-5)
    with lora_mixture(model, ADAPTERS, [1.0, 0.0]), interpolating(model.unet, bank, [1.0], layers=layers):
        other = denoise(model, z[0:1], cond, uncond, 1.0, steps)
    assert not torch.allclose(other, plain, atol=1e-3)  # endpoint 1's K, V do change the frame
    after = dict(model.unet.attn_processors)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_attention_rows_follow_batched_guidance(tiny_model):
    """A batch of 2B rows (conditional, then unconditional) at alphas (0, 1) is the two endpoints."""
    tiny_model.remove_adapters()
    z, cond, uncond = _codes_and_text(tiny_model)
    timesteps = attention_timesteps(tiny_model, 0.6, 4, "trailing")
    plain = ddim_sample(tiny_model, z, cond, uncond, 2.0, 4, progress=False, timestep_spacing="trailing")
    bank = AttentionBank()
    for e in (0, 1):
        with recording(tiny_model.unet, bank, e, timesteps):
            ddim_sample(tiny_model, z[e:e + 1], cond, uncond, 2.0, 4, progress=False, timestep_spacing="trailing")
    key, _ = bank.entries[(0, self_attention_layers(tiny_model.unet)[0], timesteps[0])]
    assert key.shape[0] == 2  # the conditional and the unconditional row
    with interpolating(tiny_model.unet, bank, [0.0, 1.0]):
        ends = ddim_sample(tiny_model, z, cond, uncond, 2.0, 4, progress=False, timestep_spacing="trailing")
    assert torch.allclose(ends, plain, atol=1e-5)
    with interpolating(tiny_model.unet, bank, [1.0, 0.0]):
        swapped = ddim_sample(tiny_model, z, cond, uncond, 2.0, 4, progress=False, timestep_spacing="trailing")
    assert not torch.allclose(swapped, plain, atol=1e-3)
    with pytest.raises(ValueError, match="not 2 recorded row"), interpolating(tiny_model.unet, bank, [0.0]):
        ddim_sample(tiny_model, z, cond, uncond, 2.0, 4, progress=False, timestep_spacing="trailing")


def test_interpolated_keys_and_values_follow_the_equation(tiny_model):
    attn = tiny_model.unet.up_blocks[1].attentions[0].transformer_blocks[0].attn1
    layer = self_attention_layers(tiny_model.unet, ("up",))[0]
    g = torch.Generator().manual_seed(4)
    h = torch.randn(3, 16, attn.to_q.in_features, generator=g)
    k0, v0, k1, v1 = (torch.randn(1, 16, attn.to_k.out_features, generator=g) for _ in range(4))
    bank = AttentionBank()
    bank.store(0, layer, 500, k0, v0)
    bank.store(1, layer, 500, k1, v1)
    alphas = torch.tensor([0.0, 0.25, 1.0])
    clock = TimestepClock()
    clock.timestep = 500
    processor = InterpolatingProcessor(layer, attn.processor, clock, bank, alphas)
    with torch.no_grad():
        out = processor(attn, h)
        a = alphas.view(-1, 1, 1)
        expected = attention(attn, attn.to_q(h), (1 - a) * k0 + a * k1, (1 - a) * v0 + a * v1)
        expected = attn.to_out[0](expected)
        # by hand for the frame at 0.25: softmax(Q K^T / sqrt(d)) V per head
        q = attn.to_q(h[1:2]).view(1, 16, attn.heads, -1).transpose(1, 2)
        k = (0.75 * k0 + 0.25 * k1).view(1, 16, attn.heads, -1).transpose(1, 2)
        v = (0.75 * v0 + 0.25 * v1).view(1, 16, attn.heads, -1).transpose(1, 2)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        by_hand = attn.to_out[0]((weights @ v).transpose(1, 2).reshape(1, 16, -1))
        clock.timestep = 250  # not recorded: the previous processor, plain self-attention
        plain = processor(attn, h)
    assert torch.allclose(out, expected, atol=1e-6) and torch.allclose(out[1:2], by_hand, atol=1e-5)
    assert torch.allclose(plain, attn.processor(attn, h), atol=1e-6)
    assert not torch.allclose(plain, out, atol=1e-3)


def test_processors_are_restored_after_an_error(tiny_model):
    before, hooks = dict(tiny_model.unet.attn_processors), len(tiny_model.unet._forward_pre_hooks)
    with pytest.raises(RuntimeError, match="inside"):
        with recording(tiny_model.unet, AttentionBank(), 0):
            assert type(tiny_model.unet.attn_processors[self_attention_layers(tiny_model.unet)[0]]).__name__ \
                == "RecordingProcessor"
            raise RuntimeError("inside")
    after = dict(tiny_model.unet.attn_processors)
    assert all(after[k] is before[k] for k in before)
    assert len(tiny_model.unet._forward_pre_hooks) == hooks  # the timestep clock is gone
    with pytest.raises(ValueError, match="Unknown attention interpolation form"):
        interpolating(tiny_model.unet, AttentionBank(), [0.5], form="sideways")
    with pytest.raises(ValueError, match="Unknown UNet parts"):
        self_attention_layers(tiny_model.unet, ("middle",))


# --------------------------------------------------------------------------------------------
# The code's forms: LoRA factors, attention on inputs, PNDM, per-image prompts
# --------------------------------------------------------------------------------------------

def test_lora_factors_are_lerped_separately_by_default_and_differ_from_the_deltas(two_adapters):
    model = two_adapters
    layer = model.unet.up_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(2))
    W = layer.base_layer.weight
    A = [layer.lora_A[n].weight for n in ADAPTERS]
    B = [layer.lora_B[n].weight for n in ADAPTERS]
    mixer = FactorMixture(model, ADAPTERS, 4)
    with torch.no_grad():
        for a in (0.0, 0.3, 1.0):
            with mixer.at(a):
                mixed = layer(x)
            factors = ((1 - a) * B[0] + a * B[1]) @ ((1 - a) * A[0] + a * A[1])  # lora_utils.py: load_lora
            assert torch.allclose(mixed, x @ (W + factors).T, atol=1e-5), a
        with mixer.at(0.0):
            at_zero = layer(x)
        with model.using_adapter(ADAPTERS[0]):
            own = layer(x)
        with lora_mixture(model, ADAPTERS, [0.7, 0.3]):
            deltas = layer(x)
        with mixer.at(0.3):
            code = layer(x)
    assert torch.allclose(at_zero, own, atol=1e-6)  # the ends are each image's own adapter
    expected = x @ (W + 0.7 * B[0] @ A[0] + 0.3 * B[1] @ A[1]).T
    assert torch.allclose(deltas, expected, atol=1e-5)  # the paper's form, lora_interpolation="deltas"
    gap = code - deltas  # = a (1 - a) (B_0 - B_1)(A_0 - A_1) x: not zero when A_0 != A_1
    by_hand = -0.3 * 0.7 * (x @ ((B[0] - B[1]) @ (A[0] - A[1])).T)
    assert torch.allclose(gap, by_hand, atol=1e-5) and gap.abs().max() > 1e-3


def test_attention_on_interpolated_inputs_is_the_codes_load_processor(two_adapters):
    model = two_adapters
    attn = model.unet.up_blocks[1].attentions[0].transformer_blocks[0].attn1
    name = self_attention_layers(model.unet, ("up",))[0]
    g = torch.Generator().manual_seed(5)
    h0, h1, h = (torch.randn(1, 16, attn.to_q.in_features, generator=g) for _ in range(3))
    bank = {(0, name, 0): h0, (1, name, 0): h1}

    class Clock:
        timestep = 0
    processor = InputInterpolator(name, attn.processor, Clock, bank, torch.tensor([0.25]))
    with torch.no_grad(), lora_mixture(model, ADAPTERS, [0.75, 0.25]):
        out = processor(attn, h)
        # The frame's own processor attends from h to 0.75 h_0 + 0.25 h_1 (model.py: LoadProcessor)
        expected = attn.processor(attn, h, encoder_hidden_states=0.75 * h0 + 0.25 * h1)
        # The paper's form: the endpoints' keys and values, each through its own LoRA
        q = attn.to_q(h)
        with lora_mixture(model, ADAPTERS, [1.0, 0.0]):
            k0, v0 = attn.to_k(h0), attn.to_v(h0)
        with lora_mixture(model, ADAPTERS, [0.0, 1.0]):
            k1, v1 = attn.to_k(h1), attn.to_v(h1)
        paper = attn.to_out[0](attention(attn, q, 0.75 * k0 + 0.25 * k1, 0.75 * v0 + 0.25 * v1))
        Clock.timestep = 1  # not recorded: plain self-attention
        plain = processor(attn, h)
        unchanged = attn.processor(attn, h)
    assert torch.allclose(out, expected, atol=1e-6) and torch.allclose(plain, unchanged, atol=1e-6)
    assert not torch.allclose(out, paper, atol=1e-4)


def test_calls_not_timesteps_key_the_recorded_inputs(tiny_model):
    """PNDM calls the UNet twice at its second timestep: two recorded entries, as the code's ids."""
    tiny_model.remove_adapters()
    z, cond, uncond = _codes_and_text(tiny_model)
    layers = self_attention_layers(tiny_model.unet, ("up",))
    bank = {}
    before = tiny_model.unet_calls
    with installed_by_call(tiny_model.unet, lambda n, prev, clock: InputRecorder(n, prev, clock, bank, 0, 3), layers):
        plain_steps = denoise(tiny_model, z[0:1], cond, uncond, 1.0, 4, "leading", "pndm")
    assert tiny_model.unet_calls - before == 5  # 4 PNDM steps: 5 UNet calls
    assert sorted({k[2] for k in bank}) == [0, 1, 2] and len(bank) == 3 * len(layers)
    timesteps = diffmorpher.sampling_scheduler(tiny_model, "pndm", "leading")
    timesteps.set_timesteps(4)
    assert timesteps.timesteps.tolist() == [751, 501, 501, 251, 1]
    assert not torch.equal(bank[(0, layers[0], 1)], bank[(0, layers[0], 2)])  # both calls at t = 501
    ddim = denoise(tiny_model, z[0:1], cond, uncond, 1.0, 4, "leading", "ddim")
    assert not torch.allclose(plain_steps, ddim, atol=1e-4)
    scheduler = diffmorpher.sampling_scheduler(tiny_model, "pndm")
    scheduler.set_timesteps(50)
    assert type(scheduler).__name__ == "PNDMScheduler" and len(scheduler.timesteps) == 51


def test_each_image_uses_its_caption_file_else_the_shared_prompt(tiny_model, image_pair, lpips_random):
    o = diffmorpher.Options()
    prompts, source = diffmorpher.image_prompts(image_pair, "a photo", o)
    assert prompts == ("a photo", "a photo") and "shared prompt" in source
    image_pair[0].with_suffix(".txt").write_text("a cat\n")
    prompts, source = diffmorpher.image_prompts(image_pair, "a photo", o)
    assert prompts == ("a cat", "a photo")
    assert source == "per-image prompts: image 0 from its caption file, image 1 from its shared prompt"
    given = diffmorpher.image_prompts(image_pair, "a photo", diffmorpher.Options(prompts=["x y", "z"]))
    assert given[0] == ("x y", "z")
    result = run(tiny_model, image_pair, lpips_random, schedule="uniform", frames=3, options=FIXED)
    assert any(n.startswith("per-image prompts: image 0 from its caption file") and "'a cat', 'a photo'" in n
               for n in result.notes)


def test_the_public_morph_lives_above_the_methods():
    import importlib
    import inspect
    import sys

    import impus_lite
    from impus_lite import dispatch

    pipeline = sys.modules["impus_lite.morph"]
    assert impus_lite.morph is dispatch.morph is morph and morph.__module__ == "impus_lite.dispatch"
    assert pipeline.Morpher is impus_lite.Morpher and pipeline.MorphResult is impus_lite.MorphResult
    assert not hasattr(pipeline, "morph") and "methods" not in inspect.getsource(pipeline).split('"""')[-1]
    assert importlib.import_module("impus_lite.methods.impus").Morpher is pipeline.Morpher
