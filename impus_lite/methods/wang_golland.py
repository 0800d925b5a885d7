"""Diff.Interp: Wang & Golland, "Interpolating between images with diffusion models" (2023,
https://arxiv.org/abs/2307.12560), reimplemented on diffusers after the authors' public code
(github.com/clintonjwang/ControlNet, ``cm.py``, ``ContextManager.interpolate_qc``, the function
their sample scripts call; line numbers below are of that file). No inversion and no training of
the UNet:

    z_0, z_1 = E(x_0), E(x_1)                      VAE latents of the inputs (the tree's ends)
    frame(a) = D(z(a)),   z(0) = z_0,  z(1) = z_1
    z(a) = best of c(a) candidates  DDIM_{n(a) steps}( slerp(q_t(z(l)), q_t(z(r)), f), e(a), w )

with ``q_t(z) = sqrt(abar_t) z + sqrt(1 - abar_t) eps`` the forward noising to the level ``t(a)``
(one ``eps`` per candidate, shared by both parents), ``e(a) = slerp(e_0, e_1, a)`` the
interpolated optimised text embeddings, guidance ``w`` against the (optimised) negative
embedding, and the candidates ranked by CLIP (or, offline, by LPIPS).

**Defaults are the code's.** 200 DDIM steps (``Options.steps``: every sample script that calls
``interpolate_qc`` passes ``ddim_steps=200`` but one, which passes the function's default 250,
cm.py:456), the tree's ``2^L + 1`` uniform frames (``Options.alphas="tree"``), their text
optimisation (below). ``config.sample_steps``, ``config.schedule`` and the text fields of the
config are not read (the notes name them when set), except under the options that ask for them.

**The tree.** Frames are made coarse to fine (cm.py:525-596). The middle frame (a = 1/2) is
interpolated from the two inputs at the highest noise level; a = 1/4 and 3/4 from an input and
the middle frame at a lower one; and so on down to depth L, where every frame lies next to
frames already made. A dyadic alpha ``a = k / 2^d`` (k odd) of depth ``d(a) <= L`` has parents
``l, r = a -+ 2^-d`` and ``f = 1/2`` (their ``bias = 0``).

**Frame count.** The code renders ``2^L + 1`` uniform frames and asserts the count
(cm.py:507-508): here ``config.frames`` = N gives the alphas ``k / 2^m``, k = 0..2^m, with
``m = ceil(log2(N - 1))``; a count that is not ``2^m + 1`` is **rounded up** to the next one
(6 -> 9, 16 -> 17, 2 stays 2) and the result's notes say so. ``config.frames=None`` gives 17
(``num_frames=17``, cm.py:456). ``L = max(1, m)``, or ``Options.levels``.
``Options.alphas="schedule"`` lets ``config.schedule`` choose any alphas instead; an alpha off
the depth-L grid (depth L + 1) is then interpolated between its two depth-L neighbours at
``f = (a - l) 2^L``, at the finest level.

**The noise level t(a)** (``get_step_schedule(..., "linear")``, cm.py:22-29, 510). On a DDIM
grid of S sampling steps ``tau_0 > tau_1 > ... > tau_{S-1}``, a frame is noised to
``t(a) = tau_{S - n(a)}`` and denoised by the last ``n(a)`` steps of the grid, where

    n(a) = 0                                                          a in {0, 1}
    n(a) = max(1, floor(s_min + (s_max - s_min) (L - min(d(a), L)) / (L - 1)))   otherwise
    s_min = floor(S * min_noise),  s_max = floor(S * max_noise)       (L = 1: n = s_min)

so the middle frame (d = 1) gets ``s_max`` steps, the frames of the finest level (d = L) and all
off-grid frames ``s_min``, and the inputs none: the level falls with the depth, linearly, so
a frame next to the middle (7/16 at L = 4) gets as few steps as one next to an end (1/16).
Their defaults: ``min_noise = 0.3``, ``max_noise = 0.55`` (cm.py:456; the sample scripts use
per-pair fractions between 0.25 and 0.8).

**Candidates.** ``candidates`` per frame at depth 1, one fewer per level below, never fewer than
``min_candidates`` (theirs: 8, then ``max(n - 1, 3)``, cm.py:596, which raises a count below 3
to 3; here a count never rises). The code ranks them with OpenAI CLIP ViT-L/14 by
``cos(f(x), g(positive)) - cos(f(x), g(negative))`` for two quality prompts ("clip-prompts",
cm.py:497-503, 571-577, 588); "clip-inputs" ranks by the alpha-weighted image similarity to the
two inputs, ``(1 - a) cos(f(x), f(x_0)) + a cos(f(x), f(x_1))``. Without CLIP weights (they
cannot be downloaded offline) the ranking is "lpips-inputs":
``-[(1 - a) LPIPS(x, x_0) + a LPIPS(x, x_1)]``, the frame nearest the alpha-weighted pair (LPIPS
as everywhere in impus_lite: AlexNet, [-1, 1]; its trunk is named). The result's notes say which
ranking ran and why.

**Text** (``learn_conditioning``, cm.py:190-242; ``text_loss="guided"``, the default). Both
embeddings start from the prompt's, the negative embedding from the negative prompt's; one Adam
(``text_lr`` 1e-4, cm.py:205) holds all three. Each of ``text_steps`` iterations (200,
``num_iters``' default, cm.py:190; the sample scripts pass 100-500) draws one grid index
``u ~ U{floor(S/3), ..., floor(2S/3) - 1}`` (t = the u-th timestep of the ascending S-step
grid: the middle third, cm.py:212-213), then for image 0 and then image 1 one Adam step on
``|| eps - [eps_u + w (eps_c - eps_u)] ||^2`` with ``w = guidance`` (7.5), eps_c from the
image's embedding and eps_u from the negative one (cm.py:216-235): the negative embedding moves
at both steps. Cached per pair (both images), prompts, steps, rate, guidance and grid.
``text_loss="plain"`` runs IMPUS's text stage instead (each embedding alone, the plain
conditional loss, t uniform in [0, 1000), ``config.text_steps`` at ``config.text_lr``, the
negative embedding fixed), sharing IMPUS's cached embeddings.

**Cost** (UNet evaluations: one per latent row; guidance doubles the rows). Frames:
``2 sum_{d=1..L} 2^(d-1) c(d) n(d)``; for 9 frames on the 200-step grid
``2 (1*8*110 + 2*7*85 + 4*6*60) = 7,020``, for 17 frames ``2 (880 + 1302 + 1824 + 2400) =
12,812``, plus one VAE decode per candidate (46 and 86). Text: ``4 * text_steps``
evaluations with their backward passes (800). On Stable Diffusion that is minutes on a large
GPU; ``Options.steps`` (e.g. 20) and ``text_steps`` make a cheap run for tests and lessons.

Departures from the code (``interpolate_qc`` as the sample scripts call it):

* Model: any SD 1.x/2.x diffusers model at its own resolution. The paper and code use SD 2.1
  (``cldm_v21.yaml``, v-prediction, 768 px; cm.py:112-113) inside ControlNet with a pose
  model loaded (cm.py:118-120, 134-136), which without a control image is plain SD
  (cldm/cldm.py:363); the sample scripts resize the inputs to 768 px sides (e.g. 768x640).
* Sampler: DDIM with eta = 0 (most sample scripts pass ``ddim_eta=0.1``, random frames). Their
  sampler noises to ascending grid index ``s`` (cm.py:527, 555-556) and starts denoising two
  grid steps lower (ldm's sampler with ``timesteps=s`` runs ``s - 1`` steps,
  cldm/ddim_hacked.py:143-144); here the first denoising step reads the level the frame was
  noised to. ``n >= 1`` keeps a frame from being a plain latent blend on very short grids.
* Text: no augmentation (colour jitter and a random resized crop 0.7-1, cm.py:192-195), the
  posterior mean instead of a posterior sample per step (cm.py:209-210), float32 or the
  model's precision instead of CUDA autocast (cm.py:211).
* Ranking: transformers' ``CLIPModel`` with CLIP's own preprocessing (the image in [0, 1],
  resized, centre-cropped, mean/std normalised); the code feeds the decoded image in [-1, 1]
  through ``preprocess.transforms[0]`` only (resize, cm.py:572), without CLIP's normalisation.
* Frames: the end frames are the inputs' VAE round trips (the code saves the input files
  themselves, cm.py:465-466), like every method here; the candidates' noise is seeded per frame
  from ``config.seed`` and the alpha, so a frame does not depend on the order frames are
  rendered in; frame counts not ``2^L + 1`` are rounded up (the code asserts).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..cache import stage_key
from ..errors import InputError
from ..interp import slerp
from ..inversion import guidance_noise, in_worker_chunks
from ..precision import loss_scaler
from ..schedules import FrameCache, fixed_schedule
from ..text import encode_prompt, optimize_embedding
from .base import MethodRun, frame_schedule, parse_options, start_run

NAME = "wang-golland"
#: MorphConfig fields Diff.Interp always reads besides the common ones.
USES = ("timestep_spacing", "frames")
#: ... with ``text_loss="plain"`` (IMPUS's text stage).
USES_PLAIN_TEXT = ("text_steps", "text_lr")
#: ... with ``alphas="schedule"`` (the config's schedule).
USES_SCHEDULE = ("schedule", "lpips_step", "lpips_tol", "search_candidates", "reschedule_passes",
                 "reschedule_damping", "beta_a", "beta_b", "max_frames")
#: Candidate rankings: CLIP against quality prompts (the code's), CLIP against the inputs, and
#: the offline LPIPS ranking.
RANKINGS = ("clip-prompts", "clip-inputs", "lpips-inputs")
#: Where the alphas come from: the dyadic tree (the code's) or ``config.schedule``.
ALPHA_CHOICES = ("tree", "schedule")
#: The text objective: the code's guided joint optimisation, or IMPUS's plain one.
TEXT_LOSSES = ("guided", "plain")
#: Frames when ``config.frames`` is None: their ``num_frames=17`` (a tree of depth 4).
DEFAULT_FRAMES = 17


@dataclass(frozen=True)
class Options:
    """Diff.Interp's settings; defaults are ``interpolate_qc``'s and its sample scripts'.

    Attributes:
        steps: DDIM steps S of the grid the frames are noised on and denoised along (200).
        min_noise, max_noise: fractions of the DDIM grid that denoise the finest and the middle
            frames (``min_steps``, ``max_steps``: 0.3 and 0.55).
        levels: depth L of the noise schedule; None = the tree's depth from the frame count.
        alphas: "tree" (``2^m + 1`` uniform frames ``k / 2^m``, a count in between rounded up)
            or "schedule" (``config.schedule`` picks any alphas).
        candidates, min_candidates: candidates at depth 1, and the fewest at any depth (8, 3).
        guidance: classifier-free guidance against ``negative_prompt`` (7.5), in the text
            loss and in every frame.
        negative_prompt: the unconditional branch's prompt (their alien pair's ``n_prompt``).
        text_loss: "guided" (the code's joint optimisation, see the module docstring) or
            "plain" (IMPUS's text stage, ``config.text_steps`` at ``config.text_lr``).
        text_steps, text_lr: iterations and Adam rate of the guided text loss (200, 1e-4).
        ranking: one of :data:`RANKINGS`; the CLIP ones fall back to "lpips-inputs" when
            ``clip_model`` does not load.
        clip_model: hub id or folder of a transformers CLIP model (their ViT-L/14); None = no
            CLIP, rank with LPIPS.
        rank_prompt: the positive quality prompt of "clip-prompts"; None = the morph's prompt.
        rank_negative_prompt: its negative quality prompt (their scripts' most common one).
    """

    steps: int = 200
    min_noise: float = 0.3
    max_noise: float = 0.55
    levels: Optional[int] = None
    alphas: str = "tree"
    candidates: int = 8
    min_candidates: int = 3
    guidance: float = 7.5
    negative_prompt: str = "text, signature, logo, watermark, lowres, complicated, low quality"
    text_loss: str = "guided"
    text_steps: int = 200
    text_lr: float = 1e-4
    ranking: str = "clip-prompts"
    clip_model: Optional[str] = "openai/clip-vit-large-patch14"
    rank_prompt: Optional[str] = None
    rank_negative_prompt: str = "lowres, distorted, ugly, blurry, low quality"

    def __post_init__(self):
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise InputError(f"wang-golland's steps must be an integer >= 1, got {self.steps!r}.")
        if not isinstance(self.text_steps, int) or isinstance(self.text_steps, bool) or self.text_steps < 0:
            raise InputError(f"wang-golland's text_steps must be an integer >= 0, got {self.text_steps!r}.")
        if not self.text_lr > 0:
            raise InputError(f"wang-golland's text_lr must be positive, got {self.text_lr!r}.")
        if not 0.0 < self.min_noise <= self.max_noise <= 1.0:
            raise InputError(f"wang-golland needs 0 < min_noise <= max_noise <= 1, got "
                             f"{self.min_noise} and {self.max_noise}.")
        if self.levels is not None and self.levels < 1:
            raise InputError(f"wang-golland's levels must be >= 1 or None, got {self.levels}.")
        if self.candidates < 1 or self.min_candidates < 1:
            raise InputError(f"wang-golland needs at least one candidate per frame, got "
                             f"candidates={self.candidates}, min_candidates={self.min_candidates}.")
        for name, allowed in (("ranking", RANKINGS), ("alphas", ALPHA_CHOICES), ("text_loss", TEXT_LOSSES)):
            if getattr(self, name) not in allowed:
                raise InputError(f"Unknown {name} '{getattr(self, name)}': use one of {', '.join(allowed)}.")


def uses(options: Options) -> tuple[str, ...]:
    """The MorphConfig fields a run with ``options`` reads besides the common ones."""
    return (USES + (USES_PLAIN_TEXT if options.text_loss == "plain" else ())
            + (USES_SCHEDULE if options.alphas == "schedule" else ()))


# ---- the tree and its noise schedule ----------------------------------------------------------

def tree_frames(frames: Optional[int]) -> int:
    """The tree's frame count for ``frames`` asked for: the smallest ``2^m + 1 >= frames``
    (2, 3, 5, 9, 17, 33, ...); :data:`DEFAULT_FRAMES` for None."""
    if frames is None:
        return DEFAULT_FRAMES
    return 2 ** max(0, math.ceil(math.log2(frames - 1))) + 1


def tree_alphas(frames: int) -> list[float]:
    """``k / 2^m`` for k = 0..2^m, ``frames = 2^m + 1`` (exact binary fractions)."""
    intervals = frames - 1
    if intervals < 1 or intervals & (intervals - 1):
        raise ValueError(f"The tree has 2^m + 1 frames, not {frames}.")
    return [k / intervals for k in range(frames)]


def tree_levels(options: Options, frames: Optional[int]) -> int:
    """The depth L of the noise schedule: ``options.levels``, else ``ceil(log2(frames - 1))``
    (at least 1) for the tree's count of ``frames`` (:func:`tree_frames`)."""
    if options.levels is not None:
        return options.levels
    return max(1, math.ceil(math.log2(tree_frames(frames) - 1)))


def tree_depth(alpha: float, levels: int) -> int:
    """``d(a)``: 0 for the ends, the smallest d <= L with ``a 2^d`` an integer, else L + 1."""
    if alpha <= 0.0 or alpha >= 1.0:
        return 0
    for depth in range(1, levels + 1):
        scaled = alpha * 2 ** depth
        if abs(scaled - round(scaled)) < 1e-9:
            return depth
    return levels + 1


def tree_parents(alpha: float, levels: int) -> tuple[float, float, float]:
    """``(l, r, f)``: the two frames ``z(a)`` is interpolated from and the slerp fraction
    between them (see the module docstring). Only for 0 < a < 1."""
    depth = tree_depth(alpha, levels)
    if depth == 0:
        raise ValueError("The end frames have no parents.")
    if depth <= levels:
        k = round(alpha * 2 ** depth)
        return (k - 1) / 2 ** depth, (k + 1) / 2 ** depth, 0.5
    k = math.floor(alpha * 2 ** levels)
    return k / 2 ** levels, (k + 1) / 2 ** levels, alpha * 2 ** levels - k


def tree_alpha(alpha: float, levels: int) -> float:
    """``alpha`` snapped to its dyadic value ``k / 2^d`` when it is one (within 1e-9)."""
    depth = tree_depth(alpha, levels)
    if depth == 0:
        return 0.0 if alpha <= 0 else 1.0
    if depth <= levels:
        return round(alpha * 2 ** depth) / 2 ** depth
    return float(alpha)


def noise_steps(alpha: float, levels: int, steps: int, min_noise: float = 0.3,
                max_noise: float = 0.55) -> int:
    """``n(a)``, the DDIM steps that denoise the frame at ``alpha`` (the module docstring's
    equation); the frame is noised to the level of the first of them."""
    depth = tree_depth(alpha, levels)
    if depth == 0:
        return 0
    low, high = int(steps * min_noise), int(steps * max_noise)
    if levels == 1:
        n = low
    else:
        n = int(low + (high - low) * (levels - min(depth, levels)) / (levels - 1))
    return max(1, min(steps, n))


def noise_timestep(scheduler, alpha: float, levels: int, steps: int, min_noise: float = 0.3,
                   max_noise: float = 0.55) -> int:
    """``t(a) = tau_{S - n(a)}`` on the grid of ``scheduler`` (a diffusers ``DDIMScheduler``)
    set to ``steps`` steps; 0 for the ends, which are not noised."""
    n = noise_steps(alpha, levels, steps, min_noise, max_noise)
    if n == 0:
        return 0
    scheduler.set_timesteps(steps)
    return int(scheduler.timesteps[steps - n])


def candidates_at(depth: int, options: Options) -> int:
    """Candidates per frame at tree depth ``depth`` >= 1: ``candidates - (depth - 1)``, at least
    ``min_candidates`` and at most ``candidates``."""
    return min(options.candidates, max(options.candidates - (depth - 1), options.min_candidates))


# ---- ranking ------------------------------------------------------------------------------------

_CLIP_CACHE: dict = {}


class ClipScorer:
    """CLIP image and text features from transformers' ``CLIPModel`` (unit vectors).

    Images are (B, 3, H, W) in [-1, 1]; they are mapped to [0, 1], resized (bicubic) so the
    shorter side is the model's image size, centre-cropped and normalised with CLIP's mean and
    standard deviation."""

    def __init__(self, source: str, device: torch.device):
        from transformers import AutoTokenizer, CLIPModel

        from ..perceptual import _hub_reachable, _offline

        # A folder loads as it is; a hub id from the local cache when the hub cannot be reached.
        local = Path(source).is_dir() or _offline() or not _hub_reachable()
        self.model = CLIPModel.from_pretrained(source, local_files_only=local).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        self.device = device
        self.size = int(self.model.config.vision_config.image_size)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        x = (images.float().to(self.device) + 1) / 2
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        x = torch.nn.functional.interpolate(x, size=(max(self.size, round(h * scale)),
                                                     max(self.size, round(w * scale))),
                                            mode="bicubic", align_corners=False).clamp(0, 1)
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size]
        mean = torch.tensor(OPENAI_CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_CLIP_STD, device=self.device).view(1, 3, 1, 1)
        features = self.model.get_image_features(pixel_values=(x - mean) / std)
        return torch.nn.functional.normalize(_tensor(features).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        features = self.model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()})
        return torch.nn.functional.normalize(_tensor(features).float(), dim=-1)


def _tensor(output) -> torch.Tensor:
    """The features of ``get_*_features`` (a tensor, or an output object in newer transformers)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_clip(source: str, device: torch.device) -> ClipScorer:
    """A shared :class:`ClipScorer` per (source, device); raises when the weights do not load."""
    key = (source, str(device))
    if key not in _CLIP_CACHE:
        _CLIP_CACHE[key] = ClipScorer(source, device)
    return _CLIP_CACHE[key]


Scorer = Callable[[torch.Tensor, float], torch.Tensor]


def make_scorer(run: MethodRun, options: Options) -> tuple[Scorer, str]:
    """``(score, description)``: ``score(images (C, 3, S, S) in [-1, 1], alpha) -> (C,)``,
    higher is better, and one sentence naming the ranking that runs (and why, on a fallback)."""
    inputs = run.images
    fallback = ""
    if options.ranking != "lpips-inputs":
        if options.clip_model is None:
            fallback = "no clip_model was given"
        else:
            try:
                clip = load_clip(options.clip_model, run.model.device)
            except Exception as error:  # offline, missing folder, not a CLIP model
                fallback = f"CLIP '{options.clip_model}' could not be loaded ({type(error).__name__})"
        if not fallback and options.ranking == "clip-prompts":
            positive = options.rank_prompt or run.prompt
            text = clip.text_features([positive, options.rank_negative_prompt])

            def score(images, alpha):
                f = clip.image_features(images)
                return (f @ text[0] - f @ text[1]).cpu()
            return score, (f"candidates ranked by CLIP '{options.clip_model}': cos(image, "
                           f"'{positive}') - cos(image, '{options.rank_negative_prompt}') (clip-prompts)")
        if not fallback:
            ends = clip.image_features(inputs)

            def score(images, alpha):
                f = clip.image_features(images)
                return ((1 - alpha) * (f @ ends[0]) + alpha * (f @ ends[1])).cpu()
            return score, (f"candidates ranked by CLIP '{options.clip_model}': alpha-weighted "
                           "cosine similarity to the two inputs (clip-inputs)")

    def score(images, alpha):
        d0 = run.lpips(images, inputs[0:1])
        d1 = run.lpips(images, inputs[1:2])
        return -((1 - alpha) * d0 + alpha * d1)
    reason = f" instead of {options.ranking}: {fallback}" if fallback else ""
    return score, (f"candidates ranked offline by alpha-weighted LPIPS to the two inputs "
                   f"(lpips-inputs, trunk {run.lpips.trunk}){reason}")


# ---- rendering --------------------------------------------------------------------------------

def _frame_generator(seed: int, alpha: float) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{alpha!r}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def denoise_tail(model, noisy: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                 guidance: float, steps: int, n: int, spacing: Optional[str],
                 workers: Optional[int] = None) -> torch.Tensor:
    """The last ``n`` steps of a ``steps``-step DDIM grid (eta = 0) with guidance, from latents
    (B, 4, h, w) noised to the first of them; cond (B, L, D), uncond (1, L, D).

    Each row is its own trajectory, so on a CPU the rows run in batch workers
    (:func:`impus_lite.inversion.in_worker_chunks`; ``workers`` None: the model's, as far as
    CPUs are idle); the result agrees with one batch's to float rounding."""
    split = in_worker_chunks(model, noisy.shape[0], 1 if guidance == 1 else 2, workers,
                             lambda start, stop: denoise_tail(model, noisy[start:stop], cond[start:stop], uncond,
                                                              guidance, steps, n, spacing, workers=1))
    if split is not None:
        return split
    scheduler = model.ddim_scheduler(spacing)
    scheduler.set_timesteps(steps, device=model.device)
    z = noisy.float().to(model.device)
    w = torch.full((z.shape[0],), float(guidance))
    for t in scheduler.timesteps[steps - n:]:
        eps = guidance_noise(model, z, t, cond, uncond, w, None, None)
        z = scheduler.step(eps, t, z).prev_sample.float()
    return z


class FrameTree:
    """The frames made so far, by alpha: latents (1, 4, h, w) and images (3, S, S) in [-1, 1].

    :meth:`render` makes any alphas, first making the parents they need, depth by depth, in
    batches of ``batch_size`` frames (times their candidates) through the UNet."""

    def __init__(self, model, latents, embeddings, uncond, options: Options, levels: int,
                 steps: int, spacing: Optional[str], seed: int, batch_size: int, score: Scorer):
        self.model, self.embeddings, self.uncond = model, embeddings, uncond
        self.options, self.levels, self.steps, self.spacing = options, levels, steps, spacing
        self.seed, self.batch_size, self.score = seed, batch_size, score
        ends = model.decode(latents).cpu()
        self.latents = {0.0: latents[0:1], 1.0: latents[1:2]}
        self.images = {0.0: ends[0], 1.0: ends[1]}

    def _needed(self, alphas: Sequence[float]) -> dict[int, list[float]]:
        todo: dict[int, list[float]] = {}
        stack = [tree_alpha(a, self.levels) for a in alphas]
        seen = set()
        while stack:
            a = stack.pop()
            if a in self.latents or a in seen:
                continue
            seen.add(a)
            todo.setdefault(tree_depth(a, self.levels), []).append(a)
            left, right, _ = tree_parents(a, self.levels)
            stack += [left, right]
        return {d: sorted(todo[d]) for d in sorted(todo)}

    def _make(self, alphas: list[float], depth: int) -> None:
        o, model = self.options, self.model
        count = candidates_at(depth, o)
        n = noise_steps(alphas[0], self.levels, self.steps, o.min_noise, o.max_noise)
        scheduler = model.ddim_scheduler(self.spacing)
        t = torch.tensor(noise_timestep(scheduler, alphas[0], self.levels, self.steps, o.min_noise,
                                        o.max_noise))
        noisy, cond = [], []
        for a in alphas:
            left, right, fraction = tree_parents(a, self.levels)
            eps = torch.randn((count, *self.latents[left].shape[1:]),
                              generator=_frame_generator(self.seed, a))
            pair = [scheduler.add_noise(self.latents[side].float().cpu().expand_as(eps), eps, t)
                    for side in (left, right)]
            noisy.append(torch.stack([slerp(pair[0][i], pair[1][i], fraction) for i in range(count)]))
            cond.append(slerp(self.embeddings[0:1], self.embeddings[1:2], a).expand(count, -1, -1))
        out = denoise_tail(model, torch.cat(noisy), torch.cat(cond), self.uncond, o.guidance,
                           self.steps, n, self.spacing)
        images = model.decode(out).cpu()
        for i, a in enumerate(alphas):
            rows = slice(i * count, (i + 1) * count)
            best = 0 if count == 1 else int(torch.argmax(self.score(images[rows], a)))
            self.latents[a] = out[rows][best:best + 1]
            self.images[a] = images[rows][best]

    def render(self, alphas: Sequence[float]) -> torch.Tensor:
        """Frames (K, 3, S, S) in [-1, 1] at ``alphas``."""
        for depth, todo in self._needed(alphas).items():
            for start in range(0, len(todo), self.batch_size):
                self._make(todo[start:start + self.batch_size], depth)
        return torch.stack([self.images[tree_alpha(a, self.levels)] for a in alphas])


# ---- text ---------------------------------------------------------------------------------------

@dataclass
class Conditioning:
    """The embeddings the frames are rendered with: ``embeddings`` (2, L, D), one per image,
    and the negative ``uncond`` (1, L, D)."""

    embeddings: torch.Tensor
    uncond: torch.Tensor


def middle_third(scheduler, steps: int) -> list[int]:
    """The timesteps ``tau_u`` of the ascending ``steps``-step grid of ``scheduler`` for
    ``u = floor(S/3), ..., floor(2S/3) - 1`` (their ``np.random.randint(T//3, 2*T//3)``)."""
    scheduler.set_timesteps(steps)
    ascending = sorted(int(t) for t in scheduler.timesteps)
    chosen = ascending[steps // 3:2 * steps // 3]
    return chosen or [ascending[len(ascending) // 2]]


def guided_eps(model, noisy: torch.Tensor, t: int, cond: torch.Tensor, uncond: torch.Tensor,
               guidance: float) -> torch.Tensor:
    """``eps_u + w (eps_c - eps_u)`` of latents (1, C, h, w) at ``t`` in one UNet call of two
    rows, differentiable in ``cond`` and ``uncond`` (1, L, D); v-prediction outputs are turned
    into eps (``sqrt(abar) v + sqrt(1 - abar) z_t``)."""
    rows = torch.cat([noisy, noisy]).to(model.device, model.dtype)
    context = torch.cat([cond, uncond]).to(model.device, model.dtype)
    out = model.unet(rows, torch.tensor(t, device=model.device), encoder_hidden_states=context).sample.float()
    if model.prediction_type == "v_prediction":
        abar = model.ddim_scheduler().alphas_cumprod[t].to(out.device)
        out = abar.sqrt() * out + (1 - abar).sqrt() * rows.float()
    eps_c, eps_u = out.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


def learn_conditioning(model, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                       steps: int, lr: float, guidance: float, grid_steps: int,
                       spacing: Optional[str], seed: int = 0, progress: bool = True) -> Conditioning:
    """Their ``learn_conditioning`` (cm.py:190-242): the two images' embeddings and the
    negative one optimised together by one Adam (see the module docstring, "Text").

    Args:
        latents: (2, C, h, w) the two images' latents; cond, uncond: (1, L, D) starting points.
        steps: iterations (two Adam steps each, one per image); grid_steps: S of the DDIM grid
            whose middle third t is drawn from.
    Returns:
        The optimised :class:`Conditioning` (float32, detached).
    """
    params = [torch.nn.Parameter(x.detach().float().clone()) for x in (cond, cond, uncond)]
    if steps == 0:
        return Conditioning(torch.cat([p.detach() for p in params[:2]]), params[2].detach())
    scheduler = model.ddim_scheduler(spacing)
    grid = middle_third(scheduler, grid_steps)
    optimizer = torch.optim.Adam(params, lr=lr)
    scaler = loss_scaler(model)
    generator = torch.Generator().manual_seed(seed)
    clean = latents.detach().float().cpu()
    with model.using_adapter(None):
        for _ in tqdm(range(steps), desc="text embeddings (guided)", disable=not progress, leave=False):
            t = grid[int(torch.randint(len(grid), (1,), generator=generator))]
            for i in range(2):
                noise = torch.randn(clean[i:i + 1].shape, generator=generator)
                noisy = scheduler.add_noise(clean[i:i + 1], noise, torch.tensor(t))
                eps = guided_eps(model, noisy, t, params[i], params[2], guidance)
                loss = torch.nn.functional.mse_loss(eps, noise.to(eps.device))
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
    return Conditioning(torch.cat([p.detach() for p in params[:2]]), params[2].detach())


def guided_text(run: MethodRun, latents: torch.Tensor, options: Options) -> Conditioning:
    """Stage "text", ``text_loss="guided"``: :func:`learn_conditioning`, cached per pair."""
    model, c = run.model, run.config
    key = stage_key("wang_golland_text", images=run.digests, prompt=run.prompt,
                    negative=options.negative_prompt, steps=options.text_steps, lr=options.text_lr,
                    guidance=options.guidance, grid=options.steps, spacing=c.timestep_spacing,
                    seed=c.seed, model=model.fingerprint, dtype=str(model.dtype))
    with run.stage("text") as stats:
        cached = run.cache.load("wang_golland_text", key)
        if cached is None:
            result = learn_conditioning(
                model, latents, encode_prompt(model, run.prompt),
                encode_prompt(model, options.negative_prompt, allow_empty=True), options.text_steps,
                options.text_lr, options.guidance, options.steps, c.timestep_spacing, c.seed, run.progress)
            cached = {"embeddings": result.embeddings.cpu(), "uncond": result.uncond.cpu()}
            run.cache.save("wang_golland_text", key, cached)
        else:
            stats.cached = True
    return Conditioning(cached["embeddings"].to(model.device), cached["uncond"].to(model.device))


def plain_text(run: MethodRun, latents: torch.Tensor, options: Options) -> Conditioning:
    """Stage "text", ``text_loss="plain"``: IMPUS's per-image embeddings (the same cache
    entries), the negative prompt's embedding fixed."""
    model, c = run.model, run.config
    base = encode_prompt(model, run.prompt)
    embeddings = []
    with run.stage("text") as stats:
        hits = 0
        for i in range(2):
            key = stage_key("text", image=run.digests[i], steps=c.text_steps, lr=c.text_lr,
                            seed=c.seed + i, model=model.fingerprint, dtype=str(model.dtype), prompt=run.prompt)
            cached = run.cache.load("text", key)
            if cached is None:
                result = optimize_embedding(model, latents[i:i + 1], base, c.text_steps, c.text_lr,
                                            seed=c.seed + i, progress=run.progress, desc=f"text embedding {i}")
                cached = {"embedding": result.embedding.cpu(), "losses": torch.tensor(result.losses)}
                run.cache.save("text", key, cached)
            else:
                hits += 1
            embeddings.append(cached["embedding"].to(model.device))
        stats.cached = hits == 2
    return Conditioning(torch.cat(embeddings), encode_prompt(model, options.negative_prompt, allow_empty=True))


# ---- the method ---------------------------------------------------------------------------------

def frame_alphas(run: MethodRun, options: Options) -> Optional[list[float]]:
    """The tree's alphas (``alphas="tree"``), noting a frame count rounded up; None when
    ``config.schedule`` chooses them."""
    if options.alphas == "schedule":
        return None
    asked = run.config.frames
    count = tree_frames(asked)
    if asked is not None and count != asked:
        run.notes.append(f"frames={asked} rounded up to {count} = 2^{int(math.log2(count - 1))} + 1: "
                         "Diff.Interp renders the uniform frames of its dyadic tree (its code asserts "
                         "2^L + 1); method_options alphas='schedule' renders any count")
    return tree_alphas(count)


def run(model, image0, image1, prompt, config, cache_dir=None, lpips=None, progress=True):
    """Morph by Diff.Interp; returns a MorphResult (stages encode, text, ranking, frames)."""
    options = parse_options(Options, NAME, config.method_options)
    run = start_run(NAME, uses(options), model, image0, image1, prompt, config, cache_dir, lpips, progress)
    c = config
    latents = run.latents()
    text = (guided_text if options.text_loss == "guided" else plain_text)(run, latents, options)
    with run.stage("ranking"):
        score, ranking = make_scorer(run, options)
    run.notes.append(ranking)
    alphas = frame_alphas(run, options)
    levels = tree_levels(options, c.frames if alphas is None else len(alphas))
    n_middle, n_finest = (noise_steps(a, levels, options.steps, options.min_noise, options.max_noise)
                          for a in (0.5, 2.0 ** -levels))
    run.notes.append(f"tree of depth {levels}: {n_middle} (middle frame) to {n_finest} (finest) "
                     f"denoising steps of {options.steps}; text: {options.text_loss} loss")
    tree = FrameTree(model, latents, text.embeddings, text.uncond, options, levels, options.steps,
                     c.timestep_spacing, c.seed, run.frames_per_call, score)
    if alphas is None:
        return run.finish(frame_schedule(run, tree.render))
    with run.stage("frames"):
        schedule = fixed_schedule(alphas, FrameCache(tree.render, run.frames_per_call), run.lpips)
    return run.finish(schedule)
