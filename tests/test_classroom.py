"""The classroom model's code: data set, tokenizer, training, resuming, export, metrics.

Everything here runs offline on the CPU without the emoji font: the data sets are a few
synthetic images and the models use the "tiny" architecture.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from impus_lite import classroom as C

CAPTIONS = ["red square", "blue circle", "green triangle", "yellow square"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One PyTorch thread: on a busy two-core machine two threads run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_images():
    """Four 64x64 RGBA shapes on a transparent background."""
    images = []
    for caption in CAPTIONS:
        colour, shape = caption.split()
        image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
        draw = ImageDraw.Draw(image)
        if shape == "square":
            draw.rectangle((16, 16, 47, 47), fill=colour)
        elif shape == "circle":
            draw.ellipse((12, 12, 51, 51), fill=colour)
        else:
            draw.polygon([(32, 8), (56, 56), (8, 56)], fill=colour)
        images.append(image)
    return images


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classroom-data")
    C.dataset_from_images(synthetic_images(), CAPTIONS).save(folder)
    return folder


def tiny_config(data_dir, checkpoint_dir, **overrides):
    settings = dict(data_dir=str(data_dir), checkpoint_dir=str(checkpoint_dir), arch="tiny",
                    vae_steps=2, unet_steps=2, vae_batch_size=4, unet_batch_size=4,
                    checkpoint_every=1000, log_every=1, progress=False, vae_full_size_steps=0,
                    warmup_steps=1)
    return C.TrainConfig(**{**settings, **overrides})


# ---- data ------------------------------------------------------------------------------------

def test_pictographic_filter_keeps_emoji_and_drops_modifiers():
    assert C.is_pictographic(0x1F431)          # cat face
    assert C.caption_of("\U0001F431") == "cat face"
    assert not C.is_pictographic(ord("#"))     # ASCII keycap base
    assert not C.is_pictographic(0x1F3FB)      # skin-tone modifier
    assert not C.is_pictographic(0x1F1E6)      # regional indicator letter
    assert not C.is_pictographic(0x200D)       # zero-width joiner
    assert not C.is_pictographic(0xFE0F)       # variation selector


def test_fit_on_white_crops_content_and_fills_white():
    canvas = Image.new("RGBA", (200, 100), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).rectangle((150, 10, 189, 49), fill=(255, 0, 0, 255))
    image = C.fit_on_white(canvas, size=64)
    assert image.size == (64, 64) and image.mode == "RGB"
    assert image.getpixel((32, 32)) == (255, 0, 0)      # the square fills the centre
    assert image.getpixel((0, 0)) == (255, 255, 255)    # margin is white
    assert C.fit_on_white(Image.new("RGBA", (50, 50), (0, 0, 0, 0))) is None


def test_dataset_from_synthetic_images_and_round_trip(tmp_path):
    data = C.dataset_from_images(synthetic_images(), CAPTIONS)
    assert data.images.shape == (4, 64, 64, 3) and data.images.dtype == torch.uint8
    pixels = data.pixels()
    assert pixels.shape == (4, 3, 64, 64)
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert torch.equal(pixels[0, :, 0, 0], torch.ones(3))               # white corner
    assert torch.allclose(pixels[0, :, 32, 32], torch.tensor([1.0, -1.0, -1.0]))  # red centre
    assert data.index_of("blue circle") == 1

    data.save(tmp_path)
    again = C.EmojiDataset.load(tmp_path)
    assert torch.equal(again.images, data.images)
    assert again.captions == CAPTIONS
    with pytest.raises(FileNotFoundError, match="build-data"):
        C.EmojiDataset.load(tmp_path / "missing")


# ---- tokenizer -------------------------------------------------------------------------------

def test_caption_words_follow_clip_pretokenizer():
    assert C.caption_words(["T-Rex", "clock face one oclock", "keycap 10"]) == [
        "-", "0", "1", "clock", "face", "keycap", "oclock", "one", "rex", "t"]


def test_tokenizer_makes_every_caption_word_one_token(tmp_path):
    captions = ["cat face", "cat", "dog face", "t-rex", "face with tears of joy", "a", "ab", "abc"]
    tokenizer = C.load_tokenizer(C.write_caption_tokenizer(tmp_path, captions))
    ids = {}
    for word in C.caption_words(captions):
        tokens = tokenizer(word).input_ids
        assert tokens[0] == tokenizer.bos_token_id and tokens[-1] == tokenizer.eos_token_id
        assert len(tokens) == 3, (word, tokens)
        ids[word] = tokens[1]
    assert len(set(ids.values())) == len(ids)          # distinct words, distinct tokens
    for caption in captions:
        tokens = tokenizer(caption).input_ids
        assert len(tokens) == 2 + len(C.caption_words([caption]))
        # CLIP decodes each word-final token with a trailing space: "t-rex" -> "t - rex"
        words = C._CLIP_PRETOKEN.findall(caption)
        assert tokenizer.decode(tokens, skip_special_tokens=True) == " ".join(words)
    assert len(tokenizer("zebra").input_ids) > 3       # unseen words fall back to pieces
    padded = C.tokenize(tokenizer, ["cat face", ""])
    assert padded.shape == (2, 77)
    assert padded[0, :4].tolist() == [tokenizer.bos_token_id, ids["cat"], ids["face"],
                                      tokenizer.eos_token_id]


def test_word_merges_never_split_a_finished_word():
    words = ["a", "ab", "abc", "b", "bc", "bca", "cab", "cabbage"]
    ranks = {tuple(m.split()): i for i, m in enumerate(C.word_merges(words))}
    for word in words:
        assert C._bpe_pieces(word, ranks) == [word + "</w>"]
    assert C._bpe_pieces("ba", ranks) != ["ba</w>"]


# ---- training --------------------------------------------------------------------------------

def test_vae_training_lowers_reconstruction_error(data_dir, tmp_path):
    # Whole images at the full rate (the crop phase's windows: test_random_crops_...).
    config = tiny_config(data_dir, tmp_path, vae_steps=40, unet_steps=0, vae_crop=64)
    data = C.EmojiDataset.load(data_dir)
    images = data.pixels()
    torch.manual_seed(0)

    def l1_of(state):
        vae = C.build_vae("tiny")
        if state is not None:
            vae.load_state_dict(state["model"])
        with torch.no_grad():
            return (vae(images).sample - images).abs().mean().item()

    before = l1_of(None)
    state = C.train(config)["vae"]
    after = l1_of(state)
    assert state["step"] == 40 and len(state["history"]) == 40
    assert after < 0.5 * before, (before, after)
    first, last = state["history"][0][1], state["history"][-1][1]
    assert last < first


def _tiny_denoiser(data_dir):
    """Seeded tiny tokenizer, text encoder and UNet, and the training noise schedule."""
    torch.manual_seed(0)
    tokenizer = C.load_tokenizer(data_dir / "tokenizer")
    text_encoder = C.build_text_encoder("tiny", tokenizer)
    unet = C.build_unet("tiny", text_encoder.config.hidden_size)
    return tokenizer, text_encoder, unet, C.training_noise_scheduler()


def test_diffusion_loss_drops_when_fitting_one_batch(data_dir):
    tokenizer, text_encoder, unet, scheduler = _tiny_denoiser(data_dir)
    latents = torch.randn(4, 4, 16, 16)
    ids = C.tokenize(tokenizer, CAPTIONS)
    noise = torch.randn_like(latents)
    timesteps = torch.tensor([10, 300, 600, 900])
    model = torch.nn.ModuleList([unet, text_encoder])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        loss = C.diffusion_loss(unet, text_encoder, latents, ids, noise, timesteps, scheduler)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_min_snr_weighting_only_down_weights_clean_steps(data_dir):
    tokenizer, text_encoder, unet, scheduler = _tiny_denoiser(data_dir)
    latents, noise = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    ids = C.tokenize(tokenizer, CAPTIONS[:1])
    with torch.no_grad():
        for t, expect_equal in ((999, True), (5, False)):
            timestep = torch.tensor([t])
            plain = C.diffusion_loss(unet, text_encoder, latents, ids, noise, timestep, scheduler)
            weighted = C.diffusion_loss(unet, text_encoder, latents, ids, noise, timestep,
                                        scheduler, min_snr_gamma=5.0)
            alpha = scheduler.alphas_cumprod[t]
            snr = (alpha / (1 - alpha)).item()
            assert weighted.item() == pytest.approx(plain.item() * min(snr, 5.0) / snr, rel=1e-5)
            assert (weighted.item() == pytest.approx(plain.item())) == expect_equal


def _load_checkpoints(folder):
    return (torch.load(folder / "vae.pt", weights_only=False),
            torch.load(folder / "unet.pt", weights_only=False))


def _assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def test_interrupted_training_resumes_to_the_identical_state(data_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    C.train(tiny_config(data_dir, straight, vae_steps=2, unet_steps=2))
    C.train(tiny_config(data_dir, resumed, vae_steps=1, unet_steps=0))
    C.train(tiny_config(data_dir, resumed, vae_steps=2, unet_steps=1))
    C.train(tiny_config(data_dir, resumed, vae_steps=2, unet_steps=2))

    (vae_a, unet_a), (vae_b, unet_b) = _load_checkpoints(straight), _load_checkpoints(resumed)
    assert vae_a["step"] == vae_b["step"] == 2 and unet_a["step"] == unet_b["step"] == 2
    for key in ("model", "optimizer", "generator", "history"):
        _assert_same_tensors(vae_a[key], vae_b[key], f"vae/{key}")
    for key in ("model", "optimizer", "ema", "generator", "lr_schedule", "history",
                "scaling_factor"):
        _assert_same_tensors(unet_a[key], unet_b[key], f"unet/{key}")
    # and training did change the weights
    fresh = C.build_vae("tiny").state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in vae_a["model"].items())


def test_resumed_run_keeps_the_stored_architecture(data_dir, tmp_path):
    C.train(tiny_config(data_dir, tmp_path, vae_steps=1, unet_steps=0))
    config = C._stored_config(tmp_path, C.TrainConfig(checkpoint_dir=str(tmp_path), vae_steps=5))
    assert config.arch == "tiny" and config.vae_batch_size == 4 and config.vae_steps == 5


def test_edge_loss_ignores_a_constant_offset_and_sees_a_moved_edge():
    image = -torch.ones(1, 3, 8, 8)
    image[..., :, 4:] = 1.0  # a vertical edge between columns 3 and 4
    assert C.edge_loss(image + 0.3, image).item() == 0.0
    moved = torch.roll(image, 1, dims=-1)  # the edge one column right; column 7 wraps to 0
    # horizontal differences per row: the image's +2 at 3; the moved one's -2 at 0 and +2 at 4:
    # |error| sums to 6 over 7 cells per row; vertical differences are 0 in both
    assert C.edge_loss(moved, image).item() == pytest.approx(6 / 7)


def test_random_crops_cut_windows_of_the_images():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    crops = C.random_crops(images, 4, torch.Generator().manual_seed(0))
    assert crops.shape == (2, 3, 4, 4)
    for image, crop in zip(images, crops):
        row, col = divmod(int(crop[0, 0, 0] - image[0, 0, 0]), 8)
        assert torch.equal(crop, image[:, row:row + 4, col:col + 4])
    assert C.random_crops(images, 8, torch.Generator()) is images


def test_shifted_and_scaled_copies_move_the_content_and_fill_white():
    images = torch.ones(1, 3, 16, 16)
    images[..., 6:10, 6:10] = -1.0  # a black square on white
    generator = torch.Generator().manual_seed(0)
    assert torch.allclose(C.shifted_and_scaled(images, 0.0, 0.0, generator), images, atol=1e-5)
    copies = C.shifted_and_scaled(images.expand(64, -1, -1, -1), 3.0, 0.1, generator)
    assert copies.shape == (64, 3, 16, 16)
    assert copies.min() >= -1 - 1e-5 and copies.max() <= 1 + 1e-5
    assert torch.allclose(copies[..., 0, :], torch.ones(1), atol=1e-5)  # white comes in
    dark = (copies < 0).float().mean(dim=(1, 2, 3))
    centre = (copies * (copies < 0)).sum(dim=(1, 2, 3))
    assert dark.std() > 0 and (copies - images).abs().amax(dim=(1, 2, 3)).min() > 0.1
    assert torch.isfinite(centre).all()


def test_augmented_versions_keep_the_original_share():
    version = C.augmented_version(4000, 4, 0.5, torch.Generator().manual_seed(0))
    assert abs((version == 0).float().mean().item() - 0.5) < 0.03
    assert set(version.tolist()) == {0, 1, 2, 3, 4}
    assert torch.equal(C.augmented_version(5, 0, 0.5, torch.Generator()), torch.zeros(5, dtype=torch.long))


def test_reconstruction_psnr_per_image_and_its_worst_decile():
    class Doubler(torch.nn.Module):  # decode(encode(x)) = 2x: image k is off by x_k = k / 100
        def encode(self, x):
            return type("E", (), {"latent_dist": type("D", (), {"mean": x})()})()

        def decode(self, z):
            return type("S", (), {"sample": 2 * z})()

    images = (torch.arange(1, 11) / 100).view(-1, 1, 1, 1).expand(10, 3, 4, 4)
    per_image = C.reconstruction_psnr(Doubler(), images, batch_size=3)
    expected = [10 * math.log10(4 / (k / 100) ** 2) for k in range(1, 11)]
    assert per_image.tolist() == pytest.approx(expected, rel=1e-4)
    summary = C.psnr_summary(per_image)
    assert summary["worst_decile"] == pytest.approx(expected[9], rel=1e-4)
    assert summary["mean"] == pytest.approx(sum(expected) / 10, rel=1e-4)


def test_latent_scaling_factor_gives_unit_std():
    latents = 3.0 * torch.randn(64, 4, 16, 16) + 0.5
    factor = C.latent_scaling_factor(latents)
    assert factor == pytest.approx(1 / 3.0, rel=0.02)
    assert (latents * factor).std().item() == pytest.approx(1.0, abs=1e-5)


# ---- export ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_tiny(data_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("classroom-train")
    C.train(tiny_config(data_dir, folder, vae_steps=3, unet_steps=3))
    return folder


def test_exported_model_loads_with_from_pretrained(trained_tiny, data_dir, tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextModel, CLIPTokenizer

    out = C.export(trained_tiny, tmp_path / "classroom")
    assert (out / "LICENSE").read_text().count("SIL Open Font License") == 1
    assert json.loads((out / "training.json").read_text())["unet_steps"] == 3
    assert 0 < C.weights_megabytes(out) < C.MAX_WEIGHTS_MB

    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None,
                                                   requires_safety_checker=False)
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.unet.dtype == torch.float32                          # small enough for fp32
    assert len(pipe.tokenizer("red square").input_ids) == 4

    unet_state = torch.load(trained_tiny / "unet.pt", weights_only=False)
    assert pipe.vae.config.scaling_factor == pytest.approx(unet_state["scaling_factor"])
    assert pipe.vae.config.scaling_factor != pytest.approx(0.18215)
    # the exported weights are the EMA weights, not the raw ones
    model = C._Diffuser(C.build_unet("tiny", 32), C.build_text_encoder("tiny", pipe.tokenizer))
    model.load_state_dict(unet_state["model"])
    raw = {k: v.clone() for k, v in model.unet.state_dict().items()}
    ema = EMAModel(model.parameters(), decay=0.999)
    ema.load_state_dict(unet_state["ema"])
    ema.copy_to(model.parameters())
    exported = pipe.unet.state_dict()
    assert all(torch.equal(exported[k], v) for k, v in model.unet.state_dict().items())
    assert any(not torch.equal(exported[k], v) for k, v in raw.items())

    image = pipe("red square", num_inference_steps=2, height=64, width=64,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)


def test_exported_latents_have_unit_std_through_the_loader(trained_tiny, data_dir, tmp_path):
    from impus_lite.models import load_model

    out = C.export(trained_tiny, tmp_path / "classroom")
    model = load_model(str(out), device="cpu")
    latents = model.encode(C.EmojiDataset.load(data_dir).pixels())
    assert latents.shape == (4, 4, 16, 16)
    assert latents.std().item() == pytest.approx(1.0, abs=1e-3)
    assert model.resolution == 64 and model.vae_scale_factor == 4


def test_fp16_export_is_upcast_by_the_loader(trained_tiny, tmp_path):
    from impus_lite.models import load_model

    out = C.export(trained_tiny, tmp_path / "half", dtype=torch.float16)
    full = C.export(trained_tiny, tmp_path / "full", dtype=torch.float32)
    from safetensors.torch import load_file
    stored = {part: {t.dtype for f in (out / part).glob("*.safetensors") for t in load_file(f).values()}
              for part in ("unet", "vae", "text_encoder")}
    # The text encoder stays fp32: transformers loads it in its stored dtype.
    assert stored == {"unet": {torch.float16}, "vae": {torch.float16}, "text_encoder": {torch.float32}}
    assert C.weights_megabytes(out / "unet") == pytest.approx(C.weights_megabytes(full / "unet") / 2, rel=0.05)
    from transformers import CLIPTextModel
    assert CLIPTextModel.from_pretrained(out / "text_encoder").dtype == torch.float32  # as transformers loads it
    half_model, full_model = load_model(str(out), device="cpu"), load_model(str(full), device="cpu")
    half_weights = dict(half_model.unet.named_parameters())
    for name, weight in full_model.unet.named_parameters():
        assert half_weights[name].dtype == torch.float32
        assert torch.equal(half_weights[name], weight.half().float()), name


def test_export_refuses_weights_above_the_limit(trained_tiny, tmp_path):
    with pytest.raises(ValueError, match="MB limit"):
        C.export(trained_tiny, tmp_path / "too-big", max_mb=0.01)
    assert not (tmp_path / "too-big").exists()


# ---- evaluation helpers and command line -------------------------------------------------------

def test_nearest_indices_and_psnr():
    references = torch.stack([torch.full((3, 8, 8), v) for v in (-1.0, 0.0, 1.0)])
    assert C.nearest_indices(references, references).tolist() == [[0], [1], [2]]
    assert C.nearest_indices(references[[2, 0]] * 0.9, references).tolist() == [[2], [0]]
    assert C.nearest_indices(references[[2]] * 0.9, references, k=5).tolist() == [[2, 1, 0]]
    a = torch.zeros(1, 3, 8, 8)
    assert C.psnr(a, a + 0.2) == pytest.approx(20.0, abs=1e-4)   # mse 0.04, peak-to-peak 2


def test_evaluate_on_the_training_images_of_a_tiny_model(trained_tiny, data_dir, tmp_path):
    out = C.export(trained_tiny, tmp_path / "classroom")
    grid = tmp_path / "grid.png"
    report = C.evaluate(str(out), data_dir, prompts=4, steps=2, inversion_steps=3,
                        roundtrip_images=2, grid_path=grid)
    assert report.prompts == 4
    assert report.nearest_accuracy * 4 == pytest.approx(round(report.nearest_accuracy * 4))
    assert report.top5_accuracy == 1.0                  # only 4 references: all in the top 5
    assert 5.0 < report.vae_psnr < 60.0 and 0.0 < report.roundtrip_psnr < 60.0
    assert report.roundtrip_latent_rmse >= 0 and report.inverted_std > 0
    assert Image.open(grid).size == (20 * 64, 64)       # 4 generated + 4 nearest, 20 a row
    assert len(report.lines()) == 4
    assert report.vae_psnr_worst_decile <= report.vae_psnr_mean < 60.0


def test_pairs_report_how_switch_like_a_morph_is_and_draw_its_end_frames(trained_tiny, data_dir, tmp_path):
    from impus_lite.classroom.pairs import end_frames_figure, morph_pairs, report_lines
    out = C.export(trained_tiny, tmp_path / "classroom")
    morphs = morph_pairs(str(out), pairs=[("red square", "blue circle")], frames=3,
                         data_dir=data_dir, progress=False)
    (m,) = morphs
    assert m.prompt == "red square blue circle" and len(m.distances) == 2
    assert m.largest_share == pytest.approx(max(m.distances) / sum(m.distances))
    assert m.inputs.shape == m.reconstructions.shape == m.ends.shape == (2, 3, 64, 64)
    expected = C.EmojiDataset.load(data_dir).pixels()[[0, 1]]
    assert torch.allclose(m.inputs, expected, atol=2 / 255)  # the emoji as the model sees them
    lines = report_lines(morphs)
    assert "| red square -> blue circle |" in lines[3] and "even steps: 0.500" in lines[-1]
    figure = end_frames_figure(morphs, tmp_path / "ends.png")
    assert Image.open(figure).size == (2 * 130, 430)  # 1.3 x 4.3 inches per column at 100 dpi


def test_pair_folders_are_read_by_evaluate_with_their_pixels_and_prompt(data_dir, tmp_path):
    from impus_lite.classroom.pairs import write_pair_folders
    from impus_lite.evaluation import find_pairs

    folders = write_pair_folders(tmp_path / "pairs", [("blue circle", "red square")], data_dir)
    (pair,) = find_pairs(tmp_path / "pairs")
    assert pair.prompt == "blue circle red square" and Path(pair.image0).parent == folders[0]
    data = C.EmojiDataset.load(data_dir)
    for path, caption in ((pair.image0, "blue circle"), (pair.image1, "red square")):
        pixels = torch.from_numpy(np.asarray(Image.open(path)))
        assert torch.equal(pixels, data.images[data.index_of(caption)])  # lossless, in order


def test_command_line_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        C.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("build-data", "train", "export", "evaluate", "pairs"))
    with pytest.raises(SystemExit):
        C.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--threads" in out and "--checkpoints" in out
