import json

import numpy as np
import pytest
import torch

from impus_lite.errors import ModelLoadError
from impus_lite.models import load_model, tiny_model_dir


def test_tiny_model_loads_through_the_diffusers_loader(tiny_model):
    assert (tiny_model_dir() / "model_index.json").is_file()
    index = json.loads((tiny_model_dir() / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert tiny_model.resolution == 32 and tiny_model.vae_scale_factor == 4
    assert tiny_model.dtype == torch.float32 and tiny_model.device.type == "cpu"


def test_latents_are_scaled_to_unit_std_and_decode_to_the_image_range(tiny_model):
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = tiny_model.encode(x)
    assert z.shape == (4, 4, 8, 8)
    assert 0.5 < z.std().item() < 2.0
    y = tiny_model.decode(z)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1


def test_unet_evaluations_are_counted_per_latent(tiny_model):
    before = tiny_model.unet_evals
    emb = torch.zeros(3, 77, 32)
    with torch.no_grad():
        tiny_model.unet(torch.zeros(3, 4, 8, 8), 10, encoder_hidden_states=emb)
    assert tiny_model.unet_evals - before == 3


def test_uncached_hub_model_offline_names_the_cache_and_the_options(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        load_model("nobody-here/not-a-cached-model", device="cpu")
    message = str(info.value)
    assert "Hugging Face cache" in message and "--model classroom" in message
    assert "\n" not in message


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_model(str(tmp_path), device="cpu")


def test_name_that_is_neither_folder_nor_hub_id():
    with pytest.raises(ModelLoadError, match="neither a folder nor a hub id"):
        load_model("./missing/folder/x", device="cpu")


def test_the_shipped_classroom_model_loads_and_round_trips_an_emoji():
    from impus_lite.images import load_image
    from impus_lite.runtime import data_path

    model = load_model("classroom", device="cpu")
    assert model.resolution == 64 and model.vae_scale_factor == 4 and model.dtype == torch.float32
    x = load_image(data_path("pairs", "emoji_cat_dog", "cat_face.png"), 64)
    z = model.encode(x)
    assert z.shape == (1, 4, 16, 16) and 0.3 < z.std().item() < 3.0  # latents scaled to about unit std
    error = (model.decode(z) - x).abs().mean().item()
    assert error < 0.1, error  # a trained VAE (the random tiny one is off by ~0.9)


def test_the_shipped_classroom_model_generates_in_plain_diffusers():
    # Exactly as a diffusers user writes it: no torch_dtype, no impus_lite.
    from diffusers import StableDiffusionPipeline

    from impus_lite.runtime import data_path

    pipe = StableDiffusionPipeline.from_pretrained(str(data_path("classroom")))
    assert {next(getattr(pipe, name).parameters()).dtype for name in ("unet", "vae", "text_encoder")} == \
        {torch.float32}
    image = pipe("cat face", num_inference_steps=3, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all() and image.std() > 0.05


def test_the_loss_schedule_is_built_once_and_follows_the_scheduler_config():
    from impus_lite.models import load_model

    model = load_model("tiny", device="cpu")  # its own copy: the config is changed below
    first = model.noise_schedule()
    assert model.noise_schedule() is first
    z = torch.randn(1, 4, 8, 8)
    eps_loss = model.diffusion_loss(z, torch.zeros(1, 77, 32), torch.Generator().manual_seed(3))
    model.scheduler_config = {**model.scheduler_config, "prediction_type": "v_prediction"}
    second = model.noise_schedule()
    assert second is not first and second.config.prediction_type == "v_prediction"
    v_loss = model.diffusion_loss(z, torch.zeros(1, 77, 32), torch.Generator().manual_seed(3))
    # the same draws against another target: the velocity, not eps
    assert abs(float(v_loss) - float(eps_loss)) > 1e-4


def test_adam_optimizer_is_fused_on_the_cpu_and_updates_as_the_looped_one():
    from impus_lite.precision import adam_optimizer

    start = [torch.randn(16, 4, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    finals = {}
    for fused in (True, False):
        params = [torch.nn.Parameter(s.clone()) for s in start]
        optimizer = (adam_optimizer(params, lr=1e-2, decoupled_weight_decay=True) if fused
                     else torch.optim.AdamW(params, lr=1e-2))
        assert optimizer.defaults.get("fused") is (True if fused else None)
        generator = torch.Generator().manual_seed(0)
        for _ in range(30):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
        finals[fused] = torch.cat([p.detach().flatten() for p in params])
    moved = (finals[True] - torch.cat([s.flatten() for s in start])).abs().max()
    assert moved > 0.1                                     # 30 steps of 1e-2 moved them
    assert torch.allclose(finals[True], finals[False], atol=1e-5)
