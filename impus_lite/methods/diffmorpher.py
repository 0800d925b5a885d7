"""DiffMorpher (Zhang et al., CVPR 2024, https://arxiv.org/abs/2312.07409) as its public code
runs (github.com/Kevin-thu/DiffMorpher: ``model.py``, ``utils/lora_utils.py``,
``utils/model_utils.py``, ``utils/alpha_scheduler.py``, ``main.py``; line numbers below are of
those files), on this package's stages, peft adapters and diffusers attention processors. With
p_k the prompt of image k:

    LoRA_k:  W + B_k A_k fitted to image k alone with p_k: rank 16, 200 AdamW steps at 2e-4,
             ``|| eps - eps_{W + B_k A_k}(z_k,t, t, p_k) ||^2``, no text optimisation
    z_k    = DDIM-inversion(E(x_k), p_k) with W + B_k A_k            guidance 1, 50 steps
    frame at alpha:
      weights    W + B(a) A(a),  A(a) = (1 - a) A_0 + a A_1,  B(a) = (1 - a) B_0 + a B_1
      text       e(a) = (1 - a) e(p_0) + a e(p_1)
      start code AdaIN(slerp(z_0, z_1, a); (1 - a) mu_0 + a mu_1, (1 - a) s_0 + a s_1)
      attention  decoder self-attention with keys and values ``(W_k + dW_k(a)) h(a)``,
                 ``(W_v + dW_v(a)) h(a)`` of the interpolated inputs h(a) = (1 - a) h_0 + a h_1,
                 h_e the layer's inputs recorded while generating endpoint e, for the first
                 ceil(0.6 * 50) = 30 UNet calls of a frame
      sampler    SD 2.1-base's scheduler, PNDM (PLMS), 50 steps = 51 UNet calls; no guidance
    alphas: the code's reschedule: N uniform frames, then N new alphas where the cumulative
            consecutive-LPIPS curve is evenly divided (piecewise-linear inverse); the second
            pass is the result.

mu_k and s_k are the per-channel mean and standard deviation of code z_k over its spatial
positions (see :func:`interpolate_codes`). Every setting is in :class:`Options`
(``MorphConfig.method_options``); each line above that the code and the paper state
differently has the paper's form as an option:

* **LoRA interpolation** (``lora_interpolation``). "factors" (default): every LoRA tensor is
  interpolated, A and B separately (utils/lora_utils.py:278-283, ``load_lora``, called with
  alpha at model.py:558-559), so the delta is ``B(a) A(a) = (1-a)^2 B_0 A_0 + a^2 B_1 A_1 +
  a (1-a) (B_0 A_1 + B_1 A_0)``; a third adapter holds the interpolated factors. "deltas" (the
  paper's "LoRA interpolation"): ``(1-a) B_0 A_0 + a B_1 A_1``, diffusers' ``set_adapters``
  with weights 1 - a and a. Both adapters start from the same A (same seed, as the code's
  ``set_seed(0)``, utils/lora_utils.py:113).
* **Attention** (``attention_form``). "inputs" (default): the code records the *inputs* h_e
  of the decoder's self-attention (``StoreProcessor``, model.py:23-41) and lets the frame's own
  processor, with the interpolated LoRA, map ``(1-a) h_0 + a h_1`` to keys and values
  (``LoadProcessor``, model.py:44-92, ``attn_beta=0``), for calls with ``id < 50 * lamd``
  (model.py:59): the first 30 self-attention calls of a frame, whatever the step count; here
  the first ``ceil(attention_fraction * steps)`` UNet calls (30 at 50 steps). "keys-values"
  (the paper's equation): the endpoints' own keys and values are interpolated,
  ``(1-a) K_0 + a K_1`` (:mod:`impus_lite.attention`). Without LoRA the two are equal (the
  projections are linear); with it they differ by ``a (1-a) (dW_1 - dW_0)(h_1 - h_0)``. Both
  count UNet calls, not timesteps: PNDM calls the UNet twice at its second timestep. Layers:
  the decoder ("up", ``do_replace_attn``, utils/model_utils.py), or "all".
* **Prompts** (``prompts``). The code lerps two prompts' embeddings (model.py:310-311) and
  trains and inverts each image with its own (model.py:436-473). Here image k's prompt is
  ``prompts[k]`` when given, else its caption (:mod:`impus_lite.methods.captions`: its
  ``<stem>.txt``, else its file name when that reads as a caption, else the morph's shared
  prompt); the notes say which.
* **Scheduler** (``scheduler``). ``DiffMorpherPipeline.from_pretrained`` (main.py:77-78) keeps
  the checkpoint's scheduler: for stabilityai/stable-diffusion-2-1-base that is
  ``PNDMScheduler`` (``skip_prk_steps=True``, ``steps_offset=1``, leading grid), and the
  sampler steps with it (``self.scheduler.step``, model.py:339-340): PLMS, whose first step
  evaluates the UNet twice (50 steps: 51 calls). "pndm" (default) follows it; "ddim" is the
  paper's DDIM (eta = 0). The inversion is the code's own DDIM-form loop over the same grid
  (model.py:223-249) either way, here :func:`impus_lite.inversion.ddim_invert` (the code's
  extra call at the repeated timestep is a zero-length step: same codes, one evaluation less).
* **Alphas** (``alphas``). "reschedule" (default): ``use_reschedule`` (model.py:622-633,
  utils/alpha_scheduler.py): N = ``config.frames`` uniform frames (None: 16, main.py:63), then
  :func:`impus_lite.schedules.reschedule_alphas` (``AlphaScheduler`` exactly); the rescheduled
  pass is always the result, under every preset. "schedule": ``config.schedule`` (e.g. the
  package's iterated reschedule, which returns the more even of its passes, with
  ``reschedule_passes`` of its own).

Other departures from the code:

* AdaIN: see :func:`interpolate_codes` (one variance for both statistics, so the ends are the
  inverted codes).
* The reschedule measures LPIPS on images in [-1, 1] (the code feeds ``ToTensor`` output in
  [0, 1], model.py:627, utils/alpha_scheduler.py:9-10); the endpoints are rendered once (the
  code renders and records them again in each pass, model.py:481-553).
* Inputs: each LoRA trains on the posterior mean of the image as the package reads it (the code
  samples the posterior each step of an image resized on its short side,
  utils/lora_utils.py:216-231); any SD 1.x/2.x model (the code's default is SD 2.1-base,
  main.py:11); ``config.timestep_spacing`` places both grids (the code's is "leading", the
  ``paper`` preset's).

Cost at the defaults (UNet evaluations, one per latent row): LoRA 2 x 200 forward and backward
passes, inversion 2 x 50, every frame 51 (PNDM) with one frame per UNet call; N frames cost
51 (2N - 2) with the reschedule (the second pass reuses the endpoints): 1,530 for 16 frames.
With the LoRA on (rank > 0) every frame is one UNet call of its own: peft's adapter weights hold
for a whole batch, so ``config.batch_size`` does not batch frames of different alphas (the code
renders one frame at a time too).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..attention import AttentionBank, InterpolatingProcessor, RecordingProcessor, installed, self_attention_layers
from ..cache import stage_key
from ..errors import InputError
from ..interp import Alphas, lerp, slerp
from ..lora import adapter_state, add_lora, load_adapter_state, max_adapter_rank, train_lora
from ..schedules import FrameCache, Schedule, fixed_schedule, reschedule_alphas, uniform_alphas
from ..text import check_prompt, encode_prompt, unconditional_embedding
from .base import frame_schedule, parse_options, start_run
from .captions import image_captions

NAME = "diffmorpher"
#: MorphConfig fields DiffMorpher always reads besides the common ones (its steps, rank and
#: guidance are in :class:`Options`).
USES = ("timestep_spacing", "frames")
#: ... and with ``alphas="schedule"``.
USES_SCHEDULE = ("schedule", "lpips_step", "lpips_tol", "search_candidates", "reschedule_damping",
                 "beta_a", "beta_b", "max_frames")
#: The two per-image adapters, and the one that holds their interpolated factors.
ADAPTERS = ("diffmorpher0", "diffmorpher1")
MIX_ADAPTER = "diffmorpher-mix"
#: ``Options.attention_layers`` -> UNet parts whose self-attention is interpolated.
ATTENTION_LAYERS = {"up": ("up",), "all": ("down", "mid", "up")}
#: ``Options.lora_interpolation``: the code's (A and B each lerped) and the paper's (deltas).
LORA_INTERPOLATIONS = ("factors", "deltas")
#: ``Options.attention_form``: the code's (interpolated inputs) and the paper's (keys, values).
ATTENTION_FORMS = ("inputs", "keys-values")
#: ``Options.scheduler``: SD 2.1-base's PNDM (the code's) or DDIM (the paper's).
SCHEDULERS = ("pndm", "ddim")
#: ``Options.alphas``: the code's two-pass reschedule, or ``config.schedule``.
ALPHA_CHOICES = ("reschedule", "schedule")
#: Frames when ``config.frames`` is None (main.py's ``--num_frames`` default).
DEFAULT_FRAMES = 16
#: Added to the variance in the AdaIN statistics (``torch.nn.functional.instance_norm``'s eps).
ADAIN_EPS = 1e-5


@dataclass(frozen=True)
class Options:
    """DiffMorpher's settings; the defaults are its public code's (see the module docstring
    for each choice and the paper's alternative).

    Attributes:
        rank: rank of each image's LoRA (16); 0 = no LoRA (an ablation). Bounded by the
            narrowest adapted layer (:func:`impus_lite.lora.max_adapter_rank`: 320 on SD 1.x,
            16 on the tiny model), with a note.
        lora_steps, lora_lr: AdamW steps and learning rate of each LoRA (200, 2e-4; weight
            decay 0.01, as the code's).
        steps: sampling steps of the inversion and of every frame (50), on the same grid.
        scheduler: "pndm" (SD 2.1-base's PLMS, the code's: 51 UNet calls at 50 steps) or "ddim".
        lora_interpolation: "factors" (A and B each interpolated, the code's) or "deltas"
            (``(1-a) B_0 A_0 + a B_1 A_1``, the paper's).
        attention_form: "inputs" (the recorded inputs interpolated, then the frame's own
            projections, the code's) or "keys-values" (the recorded keys and values
            interpolated, the paper's).
        attention_fraction: fraction of the sampling steps whose first UNet calls interpolate
            attention (0.6: ``ceil(0.6 * steps)`` calls); 0 = no attention interpolation.
        attention_layers: "up" (the decoder's self-attention layers, as the code) or "all".
        adain: AdaIN of the slerped code to the interpolated channel statistics (True).
        guidance: classifier-free guidance scale of every frame (1 = none, the published).
        prompts: two prompts, one per image; None = each image's caption (caption file, file name), else the
            morph's prompt (see the module docstring).
        alphas: "reschedule" (the code's two passes, the second kept) or "schedule"
            (``config.schedule``).
        reschedule_passes: render passes when ``alphas="schedule"`` and ``config.schedule`` is
            "reschedule" (2 = uniform, then one reschedule); it replaces the config's own.
    """

    rank: int = 16
    lora_steps: int = 200
    lora_lr: float = 2e-4
    steps: int = 50
    scheduler: str = "pndm"
    lora_interpolation: str = "factors"
    attention_form: str = "inputs"
    attention_fraction: float = 0.6
    attention_layers: str = "up"
    adain: bool = True
    guidance: float = 1.0
    prompts: Optional[Sequence[str]] = None
    alphas: str = "reschedule"
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
        for name, allowed in (("attention_layers", tuple(ATTENTION_LAYERS)), ("scheduler", SCHEDULERS),
                              ("lora_interpolation", LORA_INTERPOLATIONS), ("attention_form", ATTENTION_FORMS),
                              ("alphas", ALPHA_CHOICES)):
            if getattr(self, name) not in allowed:
                raise InputError(f"DiffMorpher's {name} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}.")
        if not isinstance(self.adain, bool):
            raise InputError(f"DiffMorpher's adain must be True or False, got {self.adain!r}.")
        if not self.guidance >= 1.0:
            raise InputError(f"DiffMorpher's guidance must be >= 1, got {self.guidance!r}.")
        if self.prompts is not None and (isinstance(self.prompts, str) or len(self.prompts) != 2 or not all(
                isinstance(p, str) and p.strip() for p in self.prompts)):
            raise InputError("DiffMorpher's prompts must be two non-empty prompts, one per image.")


def uses(options: Options) -> tuple[str, ...]:
    """The MorphConfig fields a run with ``options`` reads besides the common ones."""
    return USES + (USES_SCHEDULE if options.alphas == "schedule" else ())


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


class FactorMixture:
    """The code's LoRA interpolation: adapter :data:`MIX_ADAPTER` holds
    ``A(a) = (1 - a) A_0 + a A_1`` and ``B(a) = (1 - a) B_0 + a B_1`` of every adapted layer, so
    the layer computes ``W x + s B(a) A(a) x`` (s = lora_alpha / r = 1, as the code's LoRA
    layers). Created once from the two trained adapters (same rank)."""

    def __init__(self, model, names: Sequence[str], rank: int):
        self.model = model
        add_lora(model, MIX_ADAPTER, rank)
        params = dict(model.unet.named_parameters())
        self.triples = []
        for name, mix in params.items():
            if f".{MIX_ADAPTER}." in name:
                ends = [params[name.replace(f".{MIX_ADAPTER}.", f".{n}.")] for n in names]
                self.triples.append((mix, *ends))

    @contextlib.contextmanager
    def at(self, alpha: float):
        """Inside the block only the mixture is active, its factors at ``alpha``."""
        with torch.no_grad():
            for mix, first, second in self.triples:
                mix.copy_((1 - alpha) * first.float() + alpha * second.float())
        with self.model.using_adapter(MIX_ADAPTER):
            yield


def sampling_scheduler(model, kind: str = "pndm", timestep_spacing: Optional[str] = None):
    """A fresh diffusers scheduler on the model's noise schedule: ``PNDMScheduler`` with
    ``skip_prk_steps=True`` (PLMS; SD 2.1-base's, which DiffMorpher's code steps with) for
    "pndm", ``DDIMScheduler`` (eta = 0) for "ddim"."""
    if kind == "ddim":
        return model.ddim_scheduler(timestep_spacing)
    from diffusers import PNDMScheduler
    return PNDMScheduler.from_config({**model.ddim_scheduler(timestep_spacing).config, "skip_prk_steps": True})


@torch.no_grad()
def denoise(model, codes: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, guidance: float,
            steps: int, timestep_spacing: Optional[str] = None, scheduler: str = "ddim") -> torch.Tensor:
    """Sample from codes (B, C, h, w) to latents with the adapters and attention processors as
    they are set on the UNet (:func:`impus_lite.inversion.ddim_sample` switches adapters per
    branch, which would undo :func:`lora_mixture`), one UNet call per entry of the scheduler's
    timesteps (``steps`` for DDIM, ``steps + 1`` for PNDM). With ``guidance != 1`` the two
    branches run as one batch of 2B rows, conditional first: ``eps_u + w (eps_c - eps_u)``.

    Args:
        cond: (1 or B, L, D) embeddings, one per frame; uncond: (1, L, D).
        scheduler: "pndm" or "ddim" (:func:`sampling_scheduler`).
    Returns:
        float32 latents (B, C, h, w).
    """
    sampler = sampling_scheduler(model, scheduler, timestep_spacing)
    sampler.set_timesteps(steps, device=model.device)
    z = codes.detach().float().to(model.device)
    batch = z.shape[0]
    context = cond.expand(batch, -1, -1) if cond.shape[0] == 1 else cond
    if guidance != 1:
        context = torch.cat([context, uncond.expand(batch, -1, -1)])
    context = context.to(model.device, model.dtype)
    for t in sampler.timesteps:
        rows = z if guidance == 1 else torch.cat([z, z])
        eps = model.unet(rows.to(model.dtype), t, encoder_hidden_states=context).sample.float()
        if guidance != 1:
            eps_c, eps_u = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        z = sampler.step(eps, t, z).prev_sample.float()
    return z


def attention_timesteps(model, fraction: float, steps: int, timestep_spacing: Optional[str] = None) -> list[int]:
    """The first ``ceil(fraction * steps)`` timesteps of the DDIM grid (0.6 of 50: 30)."""
    scheduler = model.ddim_scheduler(timestep_spacing)
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps[:attention_calls(fraction, steps)]]


def attention_calls(fraction: float, steps: int) -> int:
    """UNet calls of a frame, from its first, whose self-attention is interpolated:
    ``ceil(fraction * steps)`` (30 of 50; the code's ``id < 50 * lamd``, model.py:59)."""
    return math.ceil(round(fraction * steps, 9))


# --------------------------------------------------------------------------------------------
# Attention by UNet call
# --------------------------------------------------------------------------------------------

class CallClock:
    """The index (from 0) of the UNet call in progress inside one :func:`installed_by_call`
    block, as ``timestep``: the processors of :mod:`impus_lite.attention` key their bank by it,
    so PNDM's two calls at one timestep are two entries, as in the code's per-call ``id``."""

    def __init__(self):
        self.timestep: Optional[int] = None

    def read(self, module, args, kwargs) -> None:
        self.timestep = 0 if self.timestep is None else self.timestep + 1


def installed_by_call(unet, make, layers: Sequence[str]):
    """Inside the block ``make(name, previous, clock)`` is the processor of each of ``layers``,
    reading a :class:`CallClock`; the previous processors are restored on exit."""
    return installed(unet, make, layers, clock=CallClock())


class InputRecorder:
    """The code's ``StoreProcessor`` (model.py:23-41): stores the self-attention input
    ``hidden_states`` (R, N, C) of ``layer`` at the first ``calls`` UNet calls as
    ``bank[(endpoint, layer, call)]`` and runs ``previous`` unchanged."""

    def __init__(self, layer, previous, clock, bank: dict, endpoint: int, calls: int):
        self.layer, self.previous, self.clock = layer, previous, clock
        self.bank, self.endpoint, self.calls = bank, endpoint, calls

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is None and self.clock.timestep < self.calls:
            self.bank[(self.endpoint, self.layer, self.clock.timestep)] = hidden_states.detach()
        return self.previous(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


class InputInterpolator:
    """The code's ``LoadProcessor`` (model.py:44-92, ``beta = 0``): at a recorded call, the
    layer's previous processor attends from its own ``hidden_states`` (queries) to
    ``h(a) = (1 - a) h_0 + a h_1`` passed as ``encoder_hidden_states`` (keys and values through
    the layer's projections, LoRA included). A call of R * B rows renders B frames at
    ``alphas`` in R blocks (the recorded rows); row ``r * B + i`` uses recorded row r at
    ``alphas[i]``."""

    def __init__(self, layer, previous, clock, bank: dict, alphas: torch.Tensor):
        self.layer, self.previous, self.clock = layer, previous, clock
        self.bank, self.alphas = bank, alphas

    def mixed_inputs(self, rows: int) -> Optional[torch.Tensor]:
        h0 = self.bank.get((0, self.layer, self.clock.timestep))
        h1 = self.bank.get((1, self.layer, self.clock.timestep))
        if h0 is None or h1 is None:
            return None
        recorded, frames = h0.shape[0], self.alphas.numel()
        if rows != recorded * frames:
            raise ValueError(f"Attention interpolation at layer {self.layer}: a batch of {rows} rows is "
                             f"not {recorded} recorded row(s) x {frames} alpha(s).")
        alpha = self.alphas.to(h0.device, torch.float32).repeat(recorded).view(-1, 1, 1)
        h0, h1 = (h.float().repeat_interleave(frames, dim=0) for h in (h0, h1))
        return (1 - alpha) * h0 + alpha * h1

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is None:
            mixed = self.mixed_inputs(hidden_states.shape[0])
            if mixed is not None:
                encoder_hidden_states = mixed.to(hidden_states.dtype)
        return self.previous(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def recording_calls(unet, bank, endpoint: int, calls: int, layers: Sequence[str], form: str):
    """Context manager: the UNet calls inside it record endpoint ``endpoint``'s self-attention
    inputs ("inputs") or keys and values ("keys-values") at its first ``calls`` calls."""
    if form == "inputs":
        return installed_by_call(unet, lambda name, prev, clock: InputRecorder(
            name, prev, clock, bank, endpoint, calls), layers)
    return installed_by_call(unet, lambda name, prev, clock: RecordingProcessor(
        name, prev, clock, bank, endpoint, range(calls)), layers)


def interpolating_calls(unet, bank, alphas: Sequence[float], layers: Sequence[str], form: str):
    """Context manager: the UNet calls inside it render frames at ``alphas`` with the
    self-attention of ``layers`` interpolated by ``form`` at the calls ``bank`` holds."""
    alphas = torch.as_tensor(alphas, dtype=torch.float32).reshape(-1)
    if form == "inputs":
        return installed_by_call(unet, lambda name, prev, clock: InputInterpolator(
            name, prev, clock, bank, alphas), layers)
    return installed_by_call(unet, lambda name, prev, clock: InterpolatingProcessor(
        name, prev, clock, bank, alphas, "inner"), layers)


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------

def image_prompts(images: Sequence, prompt: str, options: Options) -> tuple[tuple[str, str], str]:
    """Each image's prompt and one sentence on where they came from: ``options.prompts``, else
    :func:`impus_lite.methods.captions.image_captions` (caption file, file name, shared prompt)."""
    if options.prompts is not None:
        return (options.prompts[0], options.prompts[1]), "per-image prompts from method_options"
    prompts, sources = image_captions(images, prompt)
    if sources == ("shared prompt", "shared prompt"):
        return prompts, "the shared prompt for both images"
    return prompts, f"per-image prompts: image 0 from its {sources[0]}, image 1 from its {sources[1]}"


def run(model, image0, image1, prompt, config, cache_dir=None, lpips=None, progress=True):
    """Morph by DiffMorpher; returns a MorphResult (stages encode, lora, inversion, frames)."""
    options = parse_options(Options, NAME, config.method_options)
    run = start_run(NAME, uses(options), model, image0, image1, prompt, config, cache_dir, lpips, progress)
    if options.alphas == "schedule" and config.schedule == "reschedule":
        run.config = config.replace(reschedule_passes=options.reschedule_passes)
    o = options
    prompts, source = image_prompts((image0, image1), prompt, o)
    for p in prompts:
        check_prompt(model, p)
    run.notes.append(f"{source}: {prompts[0]!r}, {prompts[1]!r}, lerped per frame; scheduler {o.scheduler}, "
                     f"LoRA {o.lora_interpolation} interpolated, attention on {o.attention_form}")
    rank = o.rank
    if rank > max_adapter_rank(model):
        rank = max_adapter_rank(model)
        run.notes.append(f"LoRA rank {o.rank} bounded to {rank} (the narrowest adapted layer)")
    names = ADAPTERS if rank > 0 else ()
    if names and run.frames_per_call > 1:
        run.notes.append("diffmorpher renders one frame per UNet call: the interpolated LoRA weights hold "
                         "for a whole batch")
    latents = run.latents()
    conds = torch.cat([encode_prompt(model, p) for p in prompts])
    uncond = unconditional_embedding(model)
    try:
        lora_keys = _train_adapters(run, names, rank, latents, conds, prompts, o) if names else [None, None]
        codes = _invert(run, names, lora_keys, latents, conds, prompts, o)
        mixer = FactorMixture(model, names, rank) if names and o.lora_interpolation == "factors" else None
        render = _renderer(run, names, mixer, codes, conds, uncond, o)
        schedule = _alpha_passes(run, render, o)
    finally:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was active which is now deleted")
            model.remove_adapters()
    return run.finish(schedule, lora_rank=rank)


def _alpha_passes(run, render, o) -> Schedule:
    """Stage "frames": the code's two passes (``alphas="reschedule"``: N uniform frames, then
    N rescheduled ones, the second kept) or ``config.schedule``'s alphas."""
    if o.alphas == "schedule":
        return frame_schedule(run, render)
    frames = run.config.frames or DEFAULT_FRAMES
    with run.stage("frames"):
        cache = FrameCache(render, run.frames_per_call)
        uniform = fixed_schedule(uniform_alphas(frames), cache, run.lpips)
        schedule = fixed_schedule(reschedule_alphas(uniform.alphas, uniform.distances, frames), cache, run.lpips)
    schedule.renders = cache.renders
    schedule.notes.append(f"DiffMorpher's reschedule: {frames} uniform frames, then {frames} at the evenly "
                          f"divided cumulative LPIPS (the second pass kept); {cache.renders} frames rendered")
    return schedule


def _train_adapters(run, names, rank, latents, conds, prompts, o) -> list[str]:
    """Stage "lora": one adapter per image with its own prompt, trained or loaded from the
    cache; their keys."""
    model, c = run.model, run.config
    keys = []
    with run.stage("lora") as stats:
        hits = 0
        for i, name in enumerate(names):
            key = stage_key("lora", method=NAME, image=run.digests[i], prompt=prompts[i], rank=rank,
                            steps=o.lora_steps, lr=o.lora_lr, seed=c.seed, init="gaussian",
                            model=model.fingerprint, dtype=str(model.dtype))
            cached = run.cache.load("diffmorpher_lora", key)
            if cached is None:
                add_lora(model, name, rank, seed=c.seed, init="gaussian")
                train_lora(model, name, [latents[i:i + 1]], [conds[i:i + 1]], o.lora_steps, o.lora_lr,
                           seed=c.seed, progress=run.progress, desc=f"LoRA {i} r={rank}")
                run.cache.save("diffmorpher_lora", key, adapter_state(model, name))
            else:
                load_adapter_state(model, name, rank, cached)
                hits += 1
            keys.append(key)
        stats.cached = hits == len(names)
    return keys


def _invert(run, names, lora_keys, latents, conds, prompts, o) -> torch.Tensor:
    """Stage "inversion": each image's code (2, C, h, w) with its own adapter and prompt,
    guidance 1. Without LoRA the key is the slerp method's, so the two share cached codes."""
    adapters = list(names) if names else [None, None]
    extra = [{"lora": key} for key in lora_keys] if names else [None, None]
    return run.inverted_codes(latents, conds, o.steps, prompts, adapters, extra)


def _renderer(run, names, mixer, codes, conds, uncond, o):
    """``render(alphas) -> frames (K, 3, S, S)``: the endpoints first, generated once while
    their attention is recorded; then each frame with interpolated LoRA, prompt, AdaIN code and
    attention."""
    model, spacing = run.model, run.config.timestep_spacing
    calls = attention_calls(o.attention_fraction, o.steps)
    layers = self_attention_layers(model.unet, ATTENTION_LAYERS[o.attention_layers])
    bank = ({} if o.attention_form == "inputs" else AttentionBank()) if calls and layers else None
    ends: dict[float, torch.Tensor] = {}

    def weights(alpha: float):
        if mixer is not None:
            return mixer.at(alpha)
        return lora_mixture(model, names, [1 - alpha, alpha] if names else [])

    def sample(alphas: list[float], attention) -> torch.Tensor:
        start = interpolate_codes(codes[0:1], codes[1:2], alphas, o.adain)
        cond = lerp(conds[0:1], conds[1:2], alphas).reshape(len(alphas), *conds.shape[1:])
        with weights(alphas[0]), attention:
            return denoise(model, start, cond, uncond, o.guidance, o.steps, spacing, o.scheduler)

    def render(alphas: Sequence[float]) -> torch.Tensor:
        alphas = [float(a) for a in alphas]
        if not ends:
            for e in (0, 1):
                attention = (recording_calls(model.unet, bank, e, calls, layers, o.attention_form)
                             if bank is not None else contextlib.nullcontext())
                ends[float(e)] = sample([float(e)], attention)[0]
        out = {a: ends[a] for a in alphas if a in ends}
        inner = [a for a in alphas if a not in ends]
        groups = [[a] for a in inner] if names else ([inner] if inner else [])
        for group in tqdm(groups, desc="frames", disable=not run.progress, leave=False):
            attention = (interpolating_calls(model.unet, bank, group, layers, o.attention_form)
                         if bank is not None else contextlib.nullcontext())
            out.update(zip(group, sample(group, attention)))
        return model.decode(torch.stack([out[a] for a in alphas])).cpu()

    return render
