"""DDIM inversion and DDIM sampling with classifier-free guidance (IMPUS stages 3, 7, 8; notebook 04).

Both run the deterministic DDIM update (eta = 0), a discretisation of the probability-flow ODE,
with the diffusers schedulers ``DDIMInverseScheduler`` (data -> noise) and ``DDIMScheduler``
(noise -> data). Inversion uses guidance 1 (the conditional branch alone). Sampling uses

    eps = eps_u + w (eps_c - eps_u),

where ``eps_c`` is the noise prediction with the image's text embedding (and the conditional
LoRA adapter) and ``eps_u`` with the empty prompt (and the unconditional adapter). Latents are
(B, 4, h, w) in the VAE's scaled units; codes from inversion have variance close to 1.

Both grids follow ``timestep_spacing``. With diffusers' "leading" spacing (the reference code's)
the grids do not meet: 250-step inversion ends at t = 997 and 16-step sampling starts at
t = 931 (50 and 12 steps: 981 and 914), so sampling reads the code as less noisy than it is.
With "trailing" spacing the last inversion step and the first sampling step are both t = 999
for any step counts (:func:`grid_ends` says where each grid ends).
"""

from __future__ import annotations

import contextlib

from typing import Callable, Optional, Union

import torch
from tqdm.auto import tqdm

from .models import DiffusionModel
from .workers import map_chunks


def _unet(model: DiffusionModel, latents: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor,
          adapter: Optional[str], switch: bool = True) -> torch.Tensor:
    """The UNet's noise prediction (float32) with adapter ``adapter`` active (``switch=False``:
    the adapters as they are, e.g. inside ``using_adapters_per_row``), under autocast to
    ``model.inference_autocast`` when set and the weights are fp32."""
    cast = model.inference_autocast if model.dtype == torch.float32 else None
    with model.using_adapter(adapter) if switch else contextlib.nullcontext(), \
            torch.autocast(model.device.type, dtype=cast) if cast is not None else contextlib.nullcontext():
        out = model.unet(latents.to(model.device, model.dtype), t,
                         encoder_hidden_states=embeddings.to(model.device, model.dtype)).sample
    return out.float()


def _expand(embeddings: torch.Tensor, batch: int) -> torch.Tensor:
    return embeddings.expand(batch, -1, -1) if embeddings.shape[0] == 1 else embeddings


def grid_ends(model: DiffusionModel, inversion_steps: int, sample_steps: int,
              timestep_spacing: Optional[str] = None) -> tuple[int, int]:
    """(last timestep of inversion, first timestep of sampling) on the given grids; equal when
    the grids meet."""
    inverse = model.ddim_inverse_scheduler(timestep_spacing)
    inverse.set_timesteps(inversion_steps)
    forward = model.ddim_scheduler(timestep_spacing)
    forward.set_timesteps(sample_steps)
    return int(inverse.timesteps[-1]), int(forward.timesteps[0])


@torch.no_grad()
def ddim_invert(model: DiffusionModel, latents: torch.Tensor, embeddings: torch.Tensor, steps: int,
                adapter: Optional[str] = None, progress: bool = True,
                desc: str = "DDIM inversion", timestep_spacing: Optional[str] = None) -> torch.Tensor:
    """Run the DDIM ODE from data to noise: latents (B, 4, h, w) -> codes (B, 4, h, w).

    Args:
        embeddings: (B or 1, L, D) text embeddings, one per latent (guidance 1).
        steps: number of inversion steps (IMPUS: 250; its run_morph.py comments that 250 are not
            clearly better than 50, the ``fast`` preset's choice).
        adapter: LoRA adapter to run the UNet with (None: the base model).
        timestep_spacing: "leading" or "trailing" (None: the model's scheduler config).
    Returns:
        float32 codes on the model's device.
    """
    scheduler = model.ddim_inverse_scheduler(timestep_spacing)
    scheduler.set_timesteps(steps, device=model.device)
    z = latents.detach().float().to(model.device)
    embeddings = _expand(embeddings, z.shape[0])
    for t in tqdm(scheduler.timesteps, desc=desc, disable=not progress, leave=False):
        eps = _unet(model, z, t, embeddings, adapter)
        z = scheduler.step(eps, t, z).prev_sample.float()
    return z


def guidance_noise(model: DiffusionModel, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                   uncond: torch.Tensor, guidance: torch.Tensor, cond_adapter: Optional[str],
                   uncond_adapter: Optional[str]) -> torch.Tensor:
    """Guided noise prediction ``eps_u + w (eps_c - eps_u)`` for a batch.

    Both branches run as one batched UNet call of 2B latents, each row through its branch's
    adapter (:meth:`DiffusionModel.using_adapters_per_row` when the adapters differ); when every
    ``w`` is 1 the unconditional branch is skipped. Where the two adapters differ, the rows name
    their adapter (per thread) in that case too, never switching the model's adapter: batch
    workers may run this at once on chunks of one batch, some with every ``w`` 1 and some not.

    Args:
        z: (B, 4, h, w); cond: (B, L, D); uncond: (1 or B, L, D); guidance: (B,) float32.
    """
    batch = z.shape[0]
    uncond = _expand(uncond, batch)
    if torch.all(guidance == 1):
        if cond_adapter == uncond_adapter:
            return _unet(model, z, t, cond, cond_adapter)
        with model.using_adapters_per_row([cond_adapter] * batch):
            return _unet(model, z, t, cond, None, switch=False)
    if cond_adapter == uncond_adapter:
        both = _unet(model, torch.cat([z, z]), t, torch.cat([cond, uncond]), cond_adapter)
    else:
        with model.using_adapters_per_row([cond_adapter] * batch + [uncond_adapter] * batch):
            both = _unet(model, torch.cat([z, z]), t, torch.cat([cond, uncond]), None, switch=False)
    eps_c, eps_u = both[:batch], both[batch:]
    w = guidance.to(eps_c.device).view(-1, 1, 1, 1)
    return eps_u + w * (eps_c - eps_u)


@torch.no_grad()
def ddim_sample(model: DiffusionModel, codes: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                guidance: Union[float, torch.Tensor], steps: int, cond_adapter: Optional[str] = None,
                uncond_adapter: Optional[str] = None, progress: bool = True,
                desc: str = "DDIM sampling", timestep_spacing: Optional[str] = None,
                workers: Optional[int] = None) -> torch.Tensor:
    """Run the DDIM ODE from noise to data with guidance: codes (B, 4, h, w) -> latents.

    Each row is its own trajectory, so on a CPU the rows are split into contiguous chunks that
    ``workers`` threads sample at once (:func:`impus_lite.workers.map_chunks`; None:
    ``model.batch_workers`` as far as CPUs are idle, :func:`impus_lite.workers.free_workers`),
    as many as keep two UNet rows per chunk, and only while the UNet
    runs diffusers' own attention processors (a method's processors may hold state across
    rows). The result agrees with one batch's to float rounding; the UNet evaluations are the same.

    Args:
        cond: (B or 1, L, D) conditional embeddings; uncond: (1 or B, L, D).
        guidance: a float or (B,) guidance scales w.
        steps: number of DDIM steps (IMPUS renders frames with 16).
        timestep_spacing: "leading" or "trailing" (None: the model's scheduler config).
    Returns:
        float32 latents on the model's device (decode with ``model.decode``).
    """
    batch = codes.shape[0]
    cond = _expand(cond, batch)
    w = torch.as_tensor(guidance, dtype=torch.float32).reshape(-1).expand(batch).clone()
    uncond_rows = _expand(uncond, batch) if uncond.shape[0] == batch else None

    def sample_rows(start: int, stop: int) -> torch.Tensor:
        return ddim_sample(model, codes[start:stop], cond[start:stop],
                           uncond if uncond_rows is None else uncond_rows[start:stop], w[start:stop],
                           steps, cond_adapter, uncond_adapter, progress and start == 0, desc,
                           timestep_spacing, workers=1)

    split = in_worker_chunks(model, batch, 1 if torch.all(w == 1) else 2, workers, sample_rows)
    if split is not None:
        return split
    scheduler = model.ddim_scheduler(timestep_spacing)
    scheduler.set_timesteps(steps, device=model.device)
    z = codes.detach().float().to(model.device)
    for t in tqdm(scheduler.timesteps, desc=desc, disable=not progress, leave=False):
        eps = guidance_noise(model, z, t, cond, uncond, w, cond_adapter, uncond_adapter)
        z = scheduler.step(eps, t, z).prev_sample.float()
    return z


def in_worker_chunks(model: DiffusionModel, batch: int, rows_per_item: int, workers: Optional[int],
                     run_rows: Callable[[int, int], torch.Tensor]) -> Optional[torch.Tensor]:
    """A batch of ``batch`` independent trajectories run as contiguous chunks in batch workers.

    ``run_rows(start, stop)`` computes items ``start:stop`` alone (on one worker); their outputs
    are concatenated along dim 0. ``rows_per_item`` is how many UNet rows an item takes (2 with
    both guidance branches); a chunk keeps at least ``workers.MIN_ROWS_PER_WORKER`` rows.
    ``workers`` None: ``model.batch_workers`` as far as CPUs are idle
    (:meth:`DiffusionModel.worker_chunks`). Returns None, for the caller to run the batch
    whole, when one chunk is all it gets, off the CPU, or when the UNet runs attention processors
    other than diffusers' own (a method's processors may hold state across rows).
    """
    chunks = model.worker_chunks(batch, rows_per_item, workers)
    if chunks > 1 and _plain_attention(model):
        return torch.cat(map_chunks(run_rows, batch, chunks))
    return None


def _plain_attention(model: DiffusionModel) -> bool:
    """Whether every attention processor of the UNet is one of diffusers' own (stateless)."""
    processors = getattr(model.unet, "attn_processors", {})
    return all(type(p).__module__.startswith("diffusers.") for p in processors.values())


def round_trip(model: DiffusionModel, latents: torch.Tensor, embeddings: torch.Tensor,
               inversion_steps: int, sample_steps: int,
               timestep_spacing: Optional[str] = None) -> torch.Tensor:
    """Invert ``latents`` (B, 4, h, w) and sample them back at guidance 1 with the same
    embeddings (B or 1, L, D): float32 latents (B, 4, h, w).

    ``mean((round_trip(z) - z)^2)`` is the latent round-trip error: how far inversion and
    sampling on the given grids are from being inverse maps of each other.
    """
    codes = ddim_invert(model, latents, embeddings, inversion_steps, progress=False,
                        timestep_spacing=timestep_spacing)
    return ddim_sample(model, codes, embeddings, embeddings[:1], 1.0, sample_steps, progress=False,
                       timestep_spacing=timestep_spacing)
