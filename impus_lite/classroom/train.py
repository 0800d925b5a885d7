"""Training the classroom model, in two resumable stages: the VAE (64x64x3 images <-> 16x16x4
latents, L1 + L2 + an edge term + a small KL, mostly on random crops), then the UNet and the
text encoder jointly on the epsilon loss, with caption dropout for classifier-free guidance
and, half of the time, a copy of the image shifted by a few pixels and zoomed by up to 10%
(so the model learns more than 1,361 fixed points, and a morph has more to pass through).
Also the architecture presets and the functions that build the networks, the losses and the
checkpoints."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..models import SD_SCHEDULER_CONFIG, impus_cache_dir
from .data import IMAGE_SIZE, EmojiDataset, default_data_dir
from .tokenizer import load_tokenizer, tokenize


def default_train_dir() -> Path:
    """Where ``train`` keeps its checkpoints and log (under the impus_lite cache, not in git)."""
    return impus_cache_dir() / "classroom-train"


#: Architecture presets: "classroom" is the shipped model, "tiny" is for tests.
ARCHITECTURES = {
    "classroom": dict(
        vae=dict(block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=16),
        unet=dict(block_out_channels=(64, 128, 192), layers_per_block=1, norm_num_groups=32,
                  attention_head_dim=8,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
        text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4),
    ),
    "tiny": dict(
        vae=dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=8),
        unet=dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                  attention_head_dim=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4),
    ),
}


def build_vae(arch: str, image_size: int = IMAGE_SIZE):
    """An ``AutoencoderKL`` with scale factor 4: (B, 3, 64, 64) <-> (B, 4, 16, 16)."""
    from diffusers import AutoencoderKL

    spec = ARCHITECTURES[arch]["vae"]
    levels = len(spec["block_out_channels"])
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=image_size,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, **spec)


def build_unet(arch: str, cross_attention_dim: int, latent_size: int = IMAGE_SIZE // 4):
    """A ``UNet2DConditionModel`` on (B, 4, 16, 16) latents with cross attention to text
    embeddings of width ``cross_attention_dim``."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=latent_size, in_channels=4, out_channels=4,
                                cross_attention_dim=cross_attention_dim,
                                **ARCHITECTURES[arch]["unet"])


def build_text_encoder(arch: str, tokenizer):
    """A ``CLIPTextModel`` for ``tokenizer`` (77 positions, SD's text length)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = ARCHITECTURES[arch]["text"]
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
        projection_dim=spec["hidden_size"], bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **spec))


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())


@dataclass
class TrainConfig:
    """Settings of a training run; stored in the checkpoint folder.

    Steps are totals: running ``train`` again with larger ``unet_steps`` resumes and extends a
    finished run. The architecture, seed and batch sizes of an existing run are kept.
    """

    data_dir: str = field(default_factory=lambda: str(default_data_dir()))
    checkpoint_dir: str = field(default_factory=lambda: str(default_train_dir()))
    arch: str = "classroom"
    seed: int = 0
    vae_steps: int = 9000
    vae_batch_size: int = 16
    vae_lr: float = 2e-3
    vae_crop: int = 32
    vae_full_size_steps: int = 1000
    edge_weight: float = 1.0
    kl_weight: float = 1e-6
    unet_steps: int = 10000
    unet_batch_size: int = 32
    unet_lr: float = 5e-4
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    augment_copies: int = 4
    augment_shift: float = 3.0
    augment_scale: float = 0.1
    original_share: float = 0.5
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    checkpoint_every: int = 200
    log_every: int = 50
    threads: Optional[int] = None
    progress: bool = True


def set_threads(threads: Optional[int]) -> None:
    """Limit PyTorch to ``threads`` CPU threads (None: PyTorch's default)."""
    if threads:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:  # only settable before the first parallel work
            pass


def training_noise_scheduler():
    """The forward process the UNet is trained on: ``DDPMScheduler`` on SD's schedule
    (scaled-linear betas from 0.00085 to 0.012 over 1000 steps), the one DDIM later samples."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**{k: v for k, v in SD_SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})


def edge_loss(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the horizontal and vertical finite differences of two image
    batches (B, C, H, W): sum_d mean |D_d recon - D_d images|, D_d x = x[.., i+1] - x[.., i].

    Zero for a reconstruction that is off by a constant; large where an edge is blurred or
    moved, which L1/L2 on pixels barely penalise (a thin line is few pixels)."""
    loss = recon.new_zeros(())
    for dim in (-1, -2):
        loss = loss + (recon.diff(dim=dim) - images.diff(dim=dim)).abs().mean()
    return loss


def vae_loss(vae, images: torch.Tensor, generator: torch.Generator, kl_weight: float,
             edge_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """L1 + L2 reconstruction of images (B, 3, H, W) in [-1, 1] through a sampled latent,
    plus ``edge_weight`` times :func:`edge_loss` and ``kl_weight`` times the KL to N(0, I)
    summed over latent cells (mean over batch)."""
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample(generator=generator)).sample
    l1 = (recon - images).abs().mean()
    l2 = (recon - images).pow(2).mean()
    edges = edge_loss(recon, images)
    kl = posterior.kl().mean()
    return (l1 + l2 + edge_weight * edges + kl_weight * kl,
            {"l1": l1.item(), "l2": l2.item(), "edge": edges.item(), "kl": kl.item()})


def random_crops(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One random ``size`` x ``size`` window per image of (B, C, H, W); the whole batch when
    ``size`` is at least H and W."""
    height, width = images.shape[-2:]
    if size >= height and size >= width:
        return images
    rows = torch.randint(0, height - size + 1, (len(images),), generator=generator).tolist()
    cols = torch.randint(0, width - size + 1, (len(images),), generator=generator).tolist()
    return torch.stack([image[:, r:r + size, c:c + size] for image, r, c in zip(images, rows, cols)])


@torch.no_grad()
def reconstruction_psnr(vae, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Per-image PSNR (N,) in dB of images (N, 3, H, W) in [-1, 1] through the VAE's
    posterior mean (:func:`impus_lite.perceptual.per_image_psnr` of D(E(x)) and x)."""
    from ..perceptual import per_image_psnr

    was_training = vae.training
    vae.eval()
    values = []
    for batch in images.split(batch_size):
        recon = vae.decode(vae.encode(batch).latent_dist.mean).sample.clamp(-1, 1)
        values.append(per_image_psnr(recon, batch))
    vae.train(was_training)
    return torch.cat(values)


def psnr_summary(per_image: torch.Tensor) -> dict:
    """Mean and worst-decile mean (dB) of per-image PSNRs."""
    ordered = per_image.sort().values
    worst = ordered[:max(1, len(ordered) // 10)]
    return {"mean": float(ordered.mean()), "worst_decile": float(worst.mean())}


def diffusion_loss(unet, text_encoder, latents: torch.Tensor, token_ids: torch.Tensor,
                   noise: torch.Tensor, timesteps: torch.Tensor, scheduler,
                   min_snr_gamma: Optional[float] = None) -> torch.Tensor:
    """The epsilon loss ||eps - eps_theta(z_t, t, c)||^2 of scaled latents (B, 4, h, w).

    With ``min_snr_gamma`` each sample is weighted by min(SNR(t), gamma) / SNR(t) (Min-SNR,
    Hang et al. 2023), which speeds up training; the weight is 1 for noisy steps."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    context = text_encoder(token_ids)[0]
    prediction = unet(noisy, timesteps, context).sample
    per_sample = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
    if min_snr_gamma:
        alphas = scheduler.alphas_cumprod[timesteps]
        snr = alphas / (1 - alphas)
        per_sample = per_sample * (snr.clamp(max=min_snr_gamma) / snr)
    return per_sample.mean()


def _save_atomic(state: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _progress(total: int, start: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=desc, disable=not enabled, mininterval=5,
                dynamic_ncols=True)


def _log(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"[{time.strftime('%H:%M:%S')}] {message}")
    sys.stdout.flush()


def train_vae(config: TrainConfig, data: EmojiDataset, folder: Path) -> dict:
    """Train (or resume) the VAE stage up to ``config.vae_steps``; returns its checkpoint.

    Schedule: ``warmup_steps`` of linear warm-up, then ``config.vae_lr`` on random
    ``vae_crop`` x ``vae_crop`` crops (a quarter of the pixels of a 64x64 image: four times the
    steps for the same time, and every step sees edges), then the last ``vae_full_size_steps``
    on whole images at a tenth of the rate (the mid-block attention sees its 16x16 grid).

    Checkpoint ``vae.pt``: step, model and optimizer state, data/noise generator state,
    history (step, mean loss of the last ``log_every`` steps), and ``psnr`` (step, mean and
    worst-decile PSNR of every seventh training image at each checkpoint)."""
    path = folder / "vae.pt"
    torch.manual_seed(config.seed)  # the initial weights
    vae = build_vae(config.arch)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    full_from = config.vae_steps - config.vae_full_size_steps

    def rate(step: int) -> float:
        return min(1.0, (step + 1) / max(1, config.warmup_steps)) * (0.1 if step >= full_from else 1.0)

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    generator = torch.Generator().manual_seed(config.seed)
    state = {"step": 0, "history": [], "psnr": []}
    if path.is_file():
        state = torch.load(path, weights_only=False)
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        if "lr_schedule" in state:
            schedule.load_state_dict(state["lr_schedule"])
        # The stored rate followed the stored total of steps; an extended run follows the new one.
        for group, base in zip(optimizer.param_groups, schedule.base_lrs):
            group["lr"] = base * rate(schedule.last_epoch)
    if state["step"] >= config.vae_steps:
        return state
    images = data.pixels()
    probe = images[::7]
    vae.train()
    recent = []
    bar = _progress(config.vae_steps, state["step"], "vae", config.progress)

    def checkpoint():
        summary = psnr_summary(reconstruction_psnr(vae, probe))
        state.setdefault("psnr", []).append((state["step"], summary["mean"],
                                             summary["worst_decile"]))
        _log(f"vae step {state['step']}: PSNR {summary['mean']:.2f} dB (worst decile "
             f"{summary['worst_decile']:.2f})")
        state.update(model=vae.state_dict(), optimizer=optimizer.state_dict(),
                     lr_schedule=schedule.state_dict(), generator=generator.get_state(),
                     config=asdict(config))
        _save_atomic(state, path)

    for step in range(state["step"], config.vae_steps):
        batch = images[torch.randint(len(images), (config.vae_batch_size,), generator=generator)]
        if step < full_from:
            batch = random_crops(batch, config.vae_crop, generator)
        loss, parts = vae_loss(vae, batch, generator, config.kl_weight, config.edge_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        state["step"] = step + 1
        recent.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", l1=f"{parts['l1']:.4f}", refresh=False)
        if state["step"] % config.log_every == 0 or state["step"] == config.vae_steps:
            state["history"].append((state["step"], float(np.mean(recent))))
            _log(f"vae step {state['step']}: loss {np.mean(recent):.5f} (l1 {parts['l1']:.4f}, "
                 f"edge {parts['edge']:.4f}, kl {parts['kl']:.1f})")
            recent = []
        if state["step"] % config.checkpoint_every == 0:
            checkpoint()
    bar.close()
    if state["step"] % config.checkpoint_every:
        checkpoint()
    return state


def shifted_and_scaled(images: torch.Tensor, shift: float, scale: float,
                       generator: torch.Generator) -> torch.Tensor:
    """Each image (N, 3, H, W) in [-1, 1] on white, zoomed by a factor drawn from
    U[1 - scale, 1 + scale] about its centre and moved by up to ``shift`` pixels in x and y
    (uniform), bilinear; what comes in from outside the image is white (1). ``shift = scale = 0``
    returns the images unchanged."""
    count, _, height, width = images.shape
    zoom = 1 + scale * (2 * torch.rand(count, generator=generator) - 1)
    offset = shift * (2 * torch.rand(count, 2, generator=generator) - 1)
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / zoom  # output -> input coordinates
    theta[:, 0, 2] = -2 * offset[:, 0] / width / zoom
    theta[:, 1, 2] = -2 * offset[:, 1] / height / zoom
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    moved = torch.nn.functional.grid_sample(images - 1, grid, mode="bilinear",
                                            padding_mode="zeros", align_corners=False)
    return moved + 1


def augmented_version(count: int, copies: int, original_share: float,
                      generator: torch.Generator) -> torch.Tensor:
    """Which version of each of ``count`` training images a batch uses (``count``,): 0 (the
    image itself) with probability ``original_share``, else one of the ``copies`` shifted and
    scaled versions 1..copies, uniformly. All 0 when there are no copies."""
    if copies == 0:
        return torch.zeros(count, dtype=torch.long)
    pick = torch.randint(1, copies + 1, (count,), generator=generator)
    keep = torch.rand(count, generator=generator) < original_share
    return torch.where(keep, torch.zeros_like(pick), pick)


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Posterior means (N, 4, 16, 16) of images (N, 3, 64, 64) in [-1, 1], unscaled."""
    vae.eval()
    return torch.cat([vae.encode(images[i:i + batch_size]).latent_dist.mean
                      for i in range(0, len(images), batch_size)])


def latent_scaling_factor(latents: torch.Tensor) -> float:
    """1 / std of the latents: multiplying by it gives latents of unit standard deviation
    (the role 0.18215 plays for SD's VAE)."""
    return float(1.0 / latents.float().std())


class _Diffuser(torch.nn.Module):
    """The UNet and the text encoder trained together: one module, one optimizer."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder


def train_unet(config: TrainConfig, data: EmojiDataset, folder: Path, vae_state: dict) -> dict:
    """Train (or resume) the UNet + text encoder stage up to ``config.unet_steps``.

    Data: the posterior means of the images and of ``augment_copies`` shifted-and-scaled
    copies of each (:func:`shifted_and_scaled`, drawn once from ``seed + 2``); each batch
    element is the image itself with probability ``original_share``, else a copy
    (:func:`augmented_version`), with the image's caption either way.

    Checkpoint ``unet.pt``: step, model, EMA and optimizer state, generator state, the latent
    scaling factor, history (step, mean loss of the last ``log_every`` steps)."""
    from diffusers.training_utils import EMAModel

    path = folder / "unet.pt"
    tokenizer = load_tokenizer(Path(config.data_dir) / "tokenizer")
    torch.manual_seed(config.seed + 1)  # the initial weights
    text_encoder = build_text_encoder(config.arch, tokenizer)
    unet = build_unet(config.arch, text_encoder.config.hidden_size)
    model = _Diffuser(unet, text_encoder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.unet_lr, weight_decay=1e-2)
    warmup = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, config.warmup_steps)))
    ema = EMAModel(model.parameters(), decay=config.ema_decay)
    generator = torch.Generator().manual_seed(config.seed + 1)
    scheduler = training_noise_scheduler()

    vae = build_vae(config.arch)
    vae.load_state_dict(vae_state["model"])
    pixels = data.pixels()
    raw_latents = encode_dataset(vae, pixels)
    augment = torch.Generator().manual_seed(config.seed + 2)
    copies = [encode_dataset(vae, shifted_and_scaled(pixels, config.augment_shift,
                                                     config.augment_scale, augment))
              for _ in range(config.augment_copies)]
    state = {"step": 0, "history": [], "scaling_factor": latent_scaling_factor(raw_latents)}
    if path.is_file():
        state = torch.load(path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        warmup.load_state_dict(state["lr_schedule"])
        ema.load_state_dict(state["ema"])
        generator.set_state(state["generator"])
    if state["step"] >= config.unet_steps:
        return state
    # (copies + 1, N, 4, h, w): index 0 the images themselves, then the shifted-and-scaled copies.
    latents = torch.stack([raw_latents, *copies]) * state["scaling_factor"]
    token_ids = tokenize(tokenizer, data.captions)
    empty_ids = tokenize(tokenizer, [""])
    model.train()
    recent = []
    bar = _progress(config.unet_steps, state["step"], "unet", config.progress)

    def checkpoint():
        state.update(model=model.state_dict(), optimizer=optimizer.state_dict(),
                     lr_schedule=warmup.state_dict(), ema=ema.state_dict(),
                     generator=generator.get_state(), config=asdict(config))
        _save_atomic(state, path)

    for step in range(state["step"], config.unet_steps):
        index = torch.randint(latents.shape[1], (config.unet_batch_size,), generator=generator)
        version = augmented_version(len(index), config.augment_copies, config.original_share,
                                    generator)
        batch = latents[version, index]
        ids = token_ids[index].clone()
        drop = torch.rand(len(index), generator=generator) < config.caption_dropout
        ids[drop] = empty_ids
        noise = torch.randn(batch.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),),
                                  generator=generator)
        loss = diffusion_loss(unet, text_encoder, batch, ids, noise, timesteps,
                              scheduler, config.min_snr_gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        ema.step(model.parameters())
        state["step"] = step + 1
        recent.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if state["step"] % config.log_every == 0 or state["step"] == config.unet_steps:
            state["history"].append((state["step"], float(np.mean(recent))))
            _log(f"unet step {state['step']}: loss {np.mean(recent):.5f}")
            recent = []
        if state["step"] % config.checkpoint_every == 0:
            checkpoint()
    bar.close()
    checkpoint()
    return state


def _stored_config(folder: Path, config: TrainConfig) -> TrainConfig:
    """The run's config: architecture, seed and batch sizes come from an existing run in
    ``folder`` (so a resumed run continues the same experiment); step counts, intervals,
    threads and paths from ``config``."""
    path = folder / "config.json"
    if not path.is_file():
        return config
    stored = json.loads(path.read_text())
    kept = ("arch", "seed", "vae_batch_size", "unet_batch_size", "caption_dropout",
            "kl_weight", "min_snr_gamma", "ema_decay", "vae_lr", "unet_lr", "warmup_steps",
            "vae_crop", "vae_full_size_steps", "edge_weight", "augment_copies",
            "augment_shift", "augment_scale", "original_share")
    return TrainConfig(**{**asdict(config), **{k: stored[k] for k in kept if k in stored}})


def train(config: TrainConfig) -> dict:
    """Run (or resume) both training stages; returns {"vae": state, "unet": state}.

    Everything lives in ``config.checkpoint_dir``: ``config.json``, ``vae.pt``, ``unet.pt``.
    Interrupt at any time; the same command resumes from the last checkpoint."""
    set_threads(config.threads)
    folder = Path(config.checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    config = _stored_config(folder, config)
    (folder / "config.json").write_text(json.dumps(asdict(config), indent=2))
    data = EmojiDataset.load(config.data_dir)
    _log(f"data: {len(data)} images from {config.data_dir}; checkpoints in {folder}")
    vae_state = train_vae(config, data, folder)
    unet_state = train_unet(config, data, folder, vae_state) if config.unet_steps > 0 else None
    return {"vae": vae_state, "unet": unet_state}
