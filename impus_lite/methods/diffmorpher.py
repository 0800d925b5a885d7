"""DiffMorpher (Zhang et al., CVPR 2024, https://arxiv.org/abs/2312.07409) on this package's
stages, peft adapters and diffusers attention processors. For one shared prompt c:

    LoRA_k:  W + B_k A_k fitted to image k alone (k = 0, 1): rank 16, 200 AdamW steps at 2e-4,
             ``|| eps - eps_{W + B_k A_k}(z_k,t, t, c) ||^2``, no text optimisation
    z_k    = DDIM-inversion(E(x_k), c) with W + B_k A_k               guidance 1, 50 steps
    frame at alpha:
      weights    W + (1 - a) B_0 A_0 + a B_1 A_1       both adapters, peft weights 1 - a and a
      start code AdaIN(slerp(z_0, z_1, a); (1 - a) mu_0 + a mu_1, (1 - a) s_0 + a s_1)
      attention  decoder self-attention keys and values (1 - a) K_0 + a K_1, (1 - a) V_0 + a V_1
                 for the first 60% of the 50 DDIM steps (:mod:`impus_lite.attention`); K_e, V_e
                 recorded while generating the endpoints, which are frames 0 and 1
      guidance   none (w = 1)
    alphas: DiffMorpher's "reschedule": N uniform frames, then the cumulative consecutive-LPIPS
            curve inverted piecewise-linearly for N new alphas (``schedule="reschedule"``,
            ``reschedule_passes=2``: with that, :func:`impus_lite.schedules.rescheduled_search`'s
            one reschedule is DiffMorpher's ``AlphaScheduler`` exactly).

mu_k and s_k are the per-channel mean and standard deviation of code z_k over its spatial
positions (see :func:`interpolate_codes`). Every setting is in :class:`Options`
(``MorphConfig.method_options``); the config's schedule fields choose the alphas.

Where this follows the paper rather than the public code (Kevin-thu/DiffMorpher):

* LoRA interpolation. The code interpolates each LoRA tensor, A and B separately
  (``utils/lora_utils.py: load_lora``), so its delta is ``B(a) A(a) = (1-a)^2 B_0 A_0 + a^2 B_1 A_1
  + a (1-a) (B_0 A_1 + B_1 A_0)``; here the deltas interpolate, ``(1-a) B_0 A_0 + a B_1 A_1``
  exactly, as diffusers' ``set_adapters`` combines LoRAs. Both adapters start from the same A
  (same seed, as the code's ``set_seed(0)``), so the two agree while A moves little.
* Attention. The code records the *inputs* h_e of the decoder's self-attention and lets the
  frame's own projections, with the interpolated LoRA, map ``(1-a) h_0 + a h_1`` to keys and
  values; here the endpoints' own keys and values are interpolated (the paper's equation). Without
  LoRA the two are equal (the projections are linear); with it they differ by
  ``a (1-a) (dW_1 - dW_0)(h_1 - h_0)``. The code cuts after ``50 * 0.6`` steps whatever the step
  count; here after ``ceil(fraction * steps)``. Layers: the decoder ("up") as the code does.
* AdaIN. See :func:`interpolate_codes` (one variance for both statistics, so the ends are the
  inverted codes).
* The reschedule measures LPIPS on images in [-1, 1] (the code feeds [0, 1]); the package's
  reschedule returns the more even of its passes and skips the second pass when the first is
  already even within ``lpips_tol / lpips_step`` (with ``lpips_tol=0`` it always runs).
* Inputs: each LoRA trains on the posterior mean of the image as the package reads it (the code
  samples the posterior each step, of an image resized on its short side); one prompt for both
  images (the code takes one per image); any SD 1.x/2.x model (the code uses SD 2.1-base).

With the LoRA on (rank > 0) every frame is one UNet call of its own: peft's adapter weights
hold for a whole batch, so ``config.batch_size`` does not batch frames of different alphas
(the code renders one frame at a time too). The UNet evaluations are the same either way.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..attention import AttentionBank, interpolating, recording, self_attention_layers
from ..cache import stage_key
from ..errors import InputError
from ..interp import Alphas, slerp
from ..lora import adapter_state, add_lora, load_adapter_state, max_adapter_rank, train_lora
from ..text import encode_prompt, unconditional_embedding
from .base import frame_schedule, parse_options, start_run

NAME = "diffmorpher"
#: MorphConfig fields DiffMorpher reads besides the common ones (its steps, rank and guidance
#: are in :class:`Options`).
USES = ("timestep_spacing", "schedule", "frames", "lpips_step", "lpips_tol", "search_candidates",
        "reschedule_damping", "beta_a", "beta_b", "max_frames")
#: The two per-image adapters.
ADAPTERS = ("diffmorpher0", "diffmorpher1")
#: ``Options.attention_layers`` -> UNet parts whose self-attention is interpolated.
ATTENTION_LAYERS = {"up": ("up",), "all": ("down", "mid", "up")}
#: Added to the variance in the AdaIN statistics (``torch.nn.functional.instance_norm``'s eps).
ADAIN_EPS = 1e-5


@dataclass(frozen=True)
class Options:
    """DiffMorpher's settings; the defaults are the published ones.

    Attributes:
        rank: rank of each image's LoRA (16); 0 = no LoRA (an ablation). Bounded by the
            narrowest adapted layer (:func:`impus_lite.lora.max_adapter_rank`: 320 on SD 1.x,
            16 on the tiny model), with a note.
        lora_steps, lora_lr: AdamW steps and learning rate of each LoRA (200, 2e-4; weight
            decay 0.01, as the code's).
        steps: DDIM steps of the inversion and of every frame (50), on the same grid.
        attention_fraction: fraction of the first DDIM steps whose self-attention keys and
            values are interpolated (0.6); 0 = no attention interpolation.
        attention_layers: "up" (the decoder's self-attention layers, as the code) or "all".
        adain: AdaIN of the slerped code to the interpolated channel statistics (True).
        guidance: classifier-free guidance scale of every frame (1 = none, the published).
        reschedule_passes: render passes when ``config.schedule`` is "reschedule" (2 =
            DiffMorpher's: uniform, then one reschedule); it replaces the config's own.
    """

    rank: int = 16
    lora_steps: int = 200
    lora_lr: float = 2e-4
    steps: int = 50
    attention_fraction: float = 0.6
    attention_layers: str = "up"
    adain: bool = True
    guidance: float = 1.0
    reschedule_passes: int = 2

    def __post_init__(self):
        if not isinstance(self.reschedule_passes, int) or self.reschedule_passes < 1:
            raise InputError(f"DiffMorpher's reschedule_passes must be an integer >= 1, got {self.reschedule_passes!r}.")
        for name in ("rank", "lora_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InputError(f"DiffMorpher's {name} must be an integer >= 0, got {value!r}.")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise InputError(f"DiffMorpher's steps must be an integer >= 1, got {self.steps!r}.")
        for name in ("lora_lr", "attention_fraction", "guidance"):
            if not isinstance(getattr(self, name), (int, float)) or isinstance(getattr(self, name), bool):
                raise InputError(f"DiffMorpher's {name} must be a number, got {getattr(self, name)!r}.")
        if not self.lora_lr > 0:
            raise InputError(f"DiffMorpher's lora_lr must be positive, got {self.lora_lr!r}.")
        if not 0.0 <= self.attention_fraction <= 1.0:
            raise InputError(f"DiffMorpher's attention_fraction must be in [0, 1], got {self.attention_fraction!r}.")
        if self.attention_layers not in ATTENTION_LAYERS:
            raise InputError(f"DiffMorpher's attention_layers must be one of {', '.join(ATTENTION_LAYERS)}, "
                             f"got {self.attention_layers!r}.")
        if not isinstance(self.adain, bool):
            raise InputError(f"DiffMorpher's adain must be True or False, got {self.adain!r}.")
        if not self.guidance >= 1.0:
            raise InputError(f"DiffMorpher's guidance must be >= 1, got {self.guidance!r}.")


# --------------------------------------------------------------------------------------------
# The closed forms
# --------------------------------------------------------------------------------------------

def channel_statistics(code: torch.Tensor, eps: float = ADAIN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and channel, the mean and ``sqrt(var + eps)`` over the spatial positions, var
    the population (biased) variance, as ``torch.nn.functional.instance_norm`` uses.

    Args:
        code: (B, C, h, w). Returns: mean, std, each (B, C, 1, 1) float64.
    """
    x = code.double().flatten(2)
    mean = x.mean(-1)[..., None, None]
    std = (x.var(-1, unbiased=False) + eps).sqrt()[..., None, None]
    return mean, std


def interpolate_codes(z0: torch.Tensor, z1: torch.Tensor, alphas: Alphas, adain: bool = True,
                      eps: float = ADAIN_EPS) -> torch.Tensor:
    """DiffMorpher's start codes: slerp, then AdaIN to the interpolated channel statistics.

        s(a)  = slerp(z_0, z_1, a)                                  (:func:`impus_lite.interp.slerp`)
        mu(a) = (1 - a) mu_0 + a mu_1,   sd(a) = (1 - a) sd_0 + a sd_1
        z(a)  = (s(a) - mean(s(a))) / std(s(a)) * sd(a) + mu(a)

    mean, std and mu_k, sd_k are per channel over the spatial positions
    (:func:`channel_statistics`): the means and the *standard deviations* (not the variances)
    are interpolated linearly, as in the code (``utils/model_utils.py: slerp`` with
    ``adain=True``). The code takes sd_k from the unbiased variance but normalises s(a) with
    ``instance_norm``'s biased one, so its code at alpha 0 is z_0 stretched about its channel
    means by ``sqrt(n / (n - 1))`` (1.0001 at 64x64); here both are the biased variance plus
    ``eps``, so alpha 0 and 1 give back z_0 and z_1. The package's slerp falls back to lerp for
    nearly parallel codes where the code's clamps the angle; for inverted codes they agree.

    Args:
        z0, z1: (1, C, h, w) codes; alphas: a float or K floats in [0, 1].
    Returns:
        (K, C, h, w) float32.
    """
    alpha = torch.as_tensor(alphas, dtype=torch.float64, device=z0.device).reshape(-1, 1, 1, 1)
    mixed = slerp(z0, z1, alpha.reshape(-1)).reshape(alpha.shape[0], *z0.shape[1:]).double()
    if not adain:
        return mixed.float()
    (mean0, std0), (mean1, std1) = channel_statistics(z0, eps), channel_statistics(z1, eps)
    mean, std = channel_statistics(mixed, eps)
    target_mean = (1 - alpha) * mean0 + alpha * mean1
    target_std = (1 - alpha) * std0 + alpha * std1
    return ((mixed - mean) / std * target_std + target_mean).float()


@contextlib.contextmanager
def lora_mixture(model, names: Sequence[str], weights: Sequence[float]):
    """Inside the block every adapter in ``names`` is active with its weight: each adapted layer
    computes ``W x + sum_k w_k B_k A_k x`` (diffusers' ``set_adapters``, peft's per-adapter
    scale), also after ``model.using_adapter(None)`` disabled the adapters. On exit the weights
    are 1 again (peft's ``set_adapter`` switches adapters but keeps their weights). No adapters:
    nothing happens."""
    names = list(names)
    if not names:
        yield
        return
    model.unet.enable_adapters()
    model.unet.set_adapters(names, weights=[float(w) for w in weights])
    model.adapters_changed()
    try:
        yield
    finally:
        model.unet.set_adapters(names, weights=[1.0] * len(names))
        model.adapters_changed()


@torch.no_grad()
def denoise(model, codes: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, guidance: float,
            steps: int, timestep_spacing: Optional[str] = None) -> torch.Tensor:
    """DDIM (eta = 0) from codes (B, C, h, w) to latents with the adapters and attention
    processors as they are set on the UNet (:func:`impus_lite.inversion.ddim_sample` switches
    adapters per branch, which would undo :func:`lora_mixture`). With ``guidance != 1`` the two
    branches run as one batch of 2B rows, conditional first: ``eps_u + w (eps_c - eps_u)``.

    Args:
        cond, uncond: (1, L, D) embeddings. Returns: float32 latents (B, C, h, w).
    """
    scheduler = model.ddim_scheduler(timestep_spacing)
    scheduler.set_timesteps(steps, device=model.device)
    z = codes.detach().float().to(model.device)
    batch = z.shape[0]
    context = cond.expand(batch, -1, -1)
    if guidance != 1:
        context = torch.cat([context, uncond.expand(batch, -1, -1)])
    context = context.to(model.device, model.dtype)
    for t in scheduler.timesteps:
        rows = z if guidance == 1 else torch.cat([z, z])
        eps = model.unet(rows.to(model.dtype), t, encoder_hidden_states=context).sample.float()
        if guidance != 1:
            eps_c, eps_u = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        z = scheduler.step(eps, t, z).prev_sample.float()
    return z


def attention_timesteps(model, fraction: float, steps: int, timestep_spacing: Optional[str] = None) -> list[int]:
    """The first ``ceil(fraction * steps)`` timesteps of the sampling grid (0.6 of 50: 30)."""
    scheduler = model.ddim_scheduler(timestep_spacing)
    scheduler.set_timesteps(steps)
    count = math.ceil(round(fraction * steps, 9))
    return [int(t) for t in scheduler.timesteps[:count]]


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------

def run(model, image0, image1, prompt, config, cache_dir=None, lpips=None, progress=True):
    """Morph by DiffMorpher; returns a MorphResult (stages encode, lora, inversion, frames)."""
    options = parse_options(Options, NAME, config.method_options)
    run = start_run(NAME, USES, model, image0, image1, prompt, config, cache_dir, lpips, progress)
    if config.schedule == "reschedule":  # DiffMorpher's passes, not the preset's
        run.config = config.replace(reschedule_passes=options.reschedule_passes)
    c, o = run.config, options
    rank = o.rank
    if rank > max_adapter_rank(model):
        rank = max_adapter_rank(model)
        run.notes.append(f"LoRA rank {o.rank} bounded to {rank} (the narrowest adapted layer)")
    names = ADAPTERS if rank > 0 else ()
    if names and c.batch_size > 1:
        run.notes.append("diffmorpher renders one frame per UNet call: the LoRA weights 1 - a, a hold "
                         "for a whole batch")
    latents = run.latents()
    cond = encode_prompt(model, prompt)
    uncond = unconditional_embedding(model)
    try:
        lora_keys = _train_adapters(run, names, rank, latents, cond, o) if names else [None, None]
        codes = _invert(run, names, lora_keys, latents, cond, o)
        render = _renderer(run, names, codes, cond, uncond, o)
        schedule = frame_schedule(run, render)
    finally:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was active which is now deleted")
            model.remove_adapters()
    return run.finish(schedule, lora_rank=rank)


def _train_adapters(run, names, rank, latents, cond, o) -> list[str]:
    """Stage "lora": one adapter per image, trained or loaded from the cache; their keys."""
    model, c = run.model, run.config
    keys = []
    with run.stage("lora") as stats:
        hits = 0
        for i, name in enumerate(names):
            key = stage_key("lora", method=NAME, image=run.digests[i], prompt=run.prompt, rank=rank,
                            steps=o.lora_steps, lr=o.lora_lr, seed=c.seed, init="gaussian",
                            model=model.fingerprint, dtype=str(model.dtype))
            cached = run.cache.load("diffmorpher_lora", key)
            if cached is None:
                add_lora(model, name, rank, seed=c.seed, init="gaussian")
                train_lora(model, name, [latents[i:i + 1]], [cond], o.lora_steps, o.lora_lr, seed=c.seed,
                           progress=run.progress, desc=f"LoRA {i} r={rank}")
                run.cache.save("diffmorpher_lora", key, adapter_state(model, name))
            else:
                load_adapter_state(model, name, rank, cached)
                hits += 1
            keys.append(key)
        stats.cached = hits == len(names)
    return keys


def _invert(run, names, lora_keys, latents, cond, o) -> torch.Tensor:
    """Stage "inversion": each image's code (2, C, h, w) with its own adapter, guidance 1.
    Without LoRA the key is the slerp method's, so the two share cached codes."""
    adapters = list(names) if names else [None, None]
    extra = [{"lora": key} for key in lora_keys] if names else [None, None]
    return run.inverted_codes(latents, cond.expand(2, -1, -1), o.steps, (run.prompt, run.prompt),
                              adapters, extra)


def _renderer(run, names, codes, cond, uncond, o):
    """``render(alphas) -> frames (K, 3, S, S)``: the endpoints first, generated once while
    their attention is recorded; then each frame with mixed LoRA, AdaIN code and interpolated
    attention."""
    model, spacing = run.model, run.config.timestep_spacing
    timesteps = attention_timesteps(model, o.attention_fraction, o.steps, spacing)
    layers = self_attention_layers(model.unet, ATTENTION_LAYERS[o.attention_layers])
    bank = AttentionBank() if timesteps and layers else None
    ends: dict[float, torch.Tensor] = {}

    def sample(alphas: list[float], attention) -> torch.Tensor:
        start = interpolate_codes(codes[0:1], codes[1:2], alphas, o.adain)
        weights = [1 - alphas[0], alphas[0]] if names else []
        with lora_mixture(model, names, weights), attention:
            return denoise(model, start, cond, uncond, o.guidance, o.steps, spacing)

    def render(alphas: Sequence[float]) -> torch.Tensor:
        alphas = [float(a) for a in alphas]
        if not ends:
            for e in (0, 1):
                attention = (recording(model.unet, bank, e, timesteps, layers) if bank is not None
                             else contextlib.nullcontext())
                ends[float(e)] = sample([float(e)], attention)[0]
        out = {a: ends[a] for a in alphas if a in ends}
        inner = [a for a in alphas if a not in ends]
        groups = [[a] for a in inner] if names else ([inner] if inner else [])
        for group in tqdm(groups, desc="frames", disable=not run.progress, leave=False):
            attention = (interpolating(model.unet, bank, group, "inner", layers) if bank is not None
                         else contextlib.nullcontext())
            out.update(zip(group, sample(group, attention)))
        return model.decode(torch.stack([out[a] for a in alphas])).cpu()

    return render
