"""AID: attention interpolation between the endpoints' generations (He et al., "AID: Attention
Interpolation of Text-to-Image Diffusion", NeurIPS 2024, https://arxiv.org/abs/2403.17924),
reimplemented on diffusers attention processors (:mod:`impus_lite.attention`) after the
authors' code (github.com/QY-H00/attention-interpolation-diffusion at dfa4e13:
``pipeline_interpolated_sd.py``, ``interpolation.py``, ``prior.py``, ``utils.py``; "pipeline"
and "prior" below name the first and third). Training-free. Latents are (B, 4, h, w), images
(B, 3, S, S) in [-1, 1], text embeddings (B, L, D); ``a`` in [0, 1] is the frame's alpha.

**Endpoints.** AID interpolates between two *generations*; ``Options.endpoints`` says where
they come from, and :data:`LABELS` names the result accordingly (``result.label``, first note):

* ``"inverted"`` (default), labelled "aid (inverted codes)": the real images' DDIM codes.
  Each image k has its own caption c_k (:func:`image_captions`) and is inverted and sampled on
  the same DDIM grid (``Options.steps``, 50, whatever the preset) at guidance 1, where DDIM
  inversion is the inverse of sampling up to its discretisation, so each end is the image's
  round trip and comes back within a few dB of the VAE floor::

      z_k     = DDIM-inversion(E(x_k), c_k; steps, guidance 1)          k = 0, 1
      end k   = D(DDIM(z_k, c_k; steps, w = 1))                         plain generation
      frame a = D(DDIM(slerp(z_0, z_1, a), lerp(c_0, c_1, a); w = 1))   interpolated attention

* ``"ip-adapter"``, labelled "aid (ip-adapter)": AID as published for real images (pipeline
  L973-1010 ``load_aid_ip_adapter``; play_sd.ipynb, cell 9): one start noise z for both ends
  (drawn from ``config.seed``), per-image captions, the images as IP-Adapter prompts
  (diffusers' ``pipe.load_ip_adapter``, the UNet's image projection ``encoder_hid_proj``),
  guidance 7.5 (pipeline L1426)::

      end k   = D(DDIM(z, c_k, ip_k; w))          ip_k = image encoder(x_k), uncond ip: 0
      frame a = D(DDIM(z, lerp(c_0, c_1, a), lerp(ip_0, ip_1, a); w))   (pipeline L1744, L1763-1797)

  The ends are generations that follow the images, not the images: their end errors are far
  from the VAE floor. It needs an IP-Adapter made for the model (default ``h94/IP-Adapter``,
  ``models/ip-adapter_sd15.bin``, SD 1.x) and raises :class:`InputError` on a model that cannot
  take one: the classroom model (cross-attention width 128, its own emoji text encoder; every
  published adapter is for SD's 768 or 1024), or an adapter that does not load onto the UNet.

**Attention.** During the first ``int(steps * attention_fraction)`` DDIM steps (their
``warmup_ratio`` 0.5 of 50 steps: 25; pipeline L1831), in the conditional branch only (pipeline
L1845-1870: active for the conditional call, deactivated before the unconditional one), every
chosen attention layer of a frame at ``a`` computes its own queries Q (and its own K, V) and attends
with one of the forms (``Attn(Q, K, V) = softmax(Q K^T / sqrt(d)) V``, Q (B, N, H*d), K and V
(B, M, H*d); K_e, V_e are endpoint e's at the same layer and step):

    inner        Attn(Q, (1-a) K_0 + a K_1, (1-a) V_0 + a V_1)             keys, values mixed
    outer        (1-a) Attn(Q, K_0, V_0) + a Attn(Q, K_1, V_1)             outputs mixed
    fused        (1-a) Attn(Q, [K, K_0], [V, V_0]) + a Attn(Q, [K, K_1], [V, V_1])
    fused-inner  Attn(Q, [K, (1-a) K_0 + a K_1], [V, (1-a) V_0 + a V_1])

``[K, K_e]`` concatenates the frame's own keys and endpoint e's along the token axis. "fused"
is the code's default (``load_aid(atype="fused_outer", is_fused=True)``, pipeline L950-970;
the paper's AID-O); "fused-inner" is its ``fused_inner`` (AID-I). Self-attention endpoints come
from the recorded generations; cross-attention endpoints are ``W_k c_e``, ``W_v c_e`` of the
endpoints' text embeddings (with one caption for both, cross-attention interpolation changes
nothing; "inner" on lerped embeddings equals plain cross-attention, ``W_k`` being linear). With
IP-Adapter image prompts the image tokens are interpolated the same way and added with the
adapter's scale s (interpolation.py L240-387, ``OuterInterpolatedIPAttnProcessor``):
``form(Q, text K/V) + s * form(Q, image-token K/V)``.

**Alphas** (``Options.alphas``).

* ``"explore"`` (default): the path the public pipeline runs, ``BetaPriorPipeline.
  generate_interpolation`` (prior L299-340, called by every example in play_sd.ipynb), in
  :func:`explore_and_select`: start from alphas {0, 1/2, 1} with a Beta(3, 3) prior; add a
  frame inside the widest gap (largest distance d_i between neighbours x_i < x_{i+1}) at the
  prior's median of that gap, ``t = F^{-1}((F(x_i) + F(x_{i+1})) / 2)``; refit (a, b) by least
  squares of ``F(x_j; a, b)`` to the cumulative share of the distances (``curve_fit``, start
  (1, 1), bounds [1e-6, inf), prior L35-56); until ``exploration`` frames exist (their notebook:
  1.5 x the frames, 13 for 9); then keep ``frames`` of them, from alpha 0 to alpha 1, whose
  consecutive distances spread least (max - min; prior L212-297).
* ``"beta-search"``: the Bayesian selection of the paper (``bayesian_prior_selection``, prior
  L343-478), kept as an alternative: it calls ``interpolate_save_gpu``, which only the Gradio
  demo's pipeline defines, so the public SD pipeline never runs it. Frames at the quantiles of
  Beta(a, b) (:func:`impus_lite.schedules.beta_alphas`), (a, b) maximising smoothness
  ``1 - Gini`` of consecutive LPIPS; the middle frame's side fixes ``a >= b`` or ``a <= b``;
  bounds [1, attention_fraction * steps] = [1, 25]; the 3 x 3 grid, then up to 15 more probes;
  stop at smoothness 0.9 (:func:`choose_beta`).
* ``"schedule"``: ``config.schedule``.

Distances: LPIPS-Alex v0.1 on images in [-1, 1] (:mod:`impus_lite.perceptual`); AID's
``compute_lpips`` (utils.py L108-136) feeds ImageNet-normalised [0, 1] images, which distorts
the distance, and the public exploration uses CLIP ViT-B/32 (prior L18-33).

**Departures from the public code** (file and line at dfa4e13):

1. Real images through inverted codes (the default): pipeline L1722-1744 starts both ends
   from noise (``prepare_latents``); here from the images' DDIM codes, at guidance 1 (their
   7.5, pipeline L1426, would move the ends off the inputs), with the ends rendered on their
   own rather than as rows 0 and 2 of each frame's batch of 3 (pipeline L1745): the same
   numbers, the endpoints' K, V read from an :class:`~impus_lite.attention.AttentionBank`.
2. Captions: the pipeline takes ``prompt_start``/``prompt_end`` from the user (pipeline
   L1409-1410); here from :func:`image_captions` unless ``Options.prompts`` gives them.
3. Exploration distance: LPIPS on [-1, 1] for CLIP ViT-B/32 cosine (prior L13-33; the CLIP
   weights are not shipped); a failed Beta fit keeps the previous (a, b) (prior L51 raises).
4. Selection: the exact least-spread path (every minimum edge, a dynamic programme on the
   maximum) for the binary search on the spread with a greedy programme (prior L223-297); the
   two agree except where the greedy one misses a path.
5. ``beta-search``: a compass search for ``bayes_opt`` (prior L447-473; deterministic, same
   objective, bounds, prior, grid, target and budget); points on the wrong side of the prior
   are skipped, not scored 0 and counted (prior L392-395); ``a == b`` is rendered rather than
   given the three-frame smoothness (prior L396-397).
6. IP-Adapter: only the first loaded adapter is interpolated (interpolation.py L330 reads
   ``to_k_ip[0]`` too); the unconditional image embedding is the encoder's own (zeros for
   plain IP-Adapter, pipeline L689), interpolated like the conditional one (pipeline
   L1791).
7. Smoothness and selection distances get [-1, 1] images (utils.py L126-127 normalises).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..attention import (FORMS as ATTENTION_FORMS, AttentionBank, KeyValueProcessor, _attention_inputs,
                         _attention_output, cross_attention_layers, installed, interpolating,
                         interpolating_cross, recording, self_attention_layers)
from ..errors import InputError
from ..images import tensor_to_pil
from ..interp import lerp, slerp
from ..perceptual import smoothness
from ..schedules import Distance, FrameCache, beta_alphas, fixed_schedule
from ..text import encode_prompt
from .base import frame_schedule, parse_options, start_run
from .captions import image_captions

NAME = "aid"
#: MorphConfig fields AID reads besides the common ones (the schedule's under alphas="schedule").
USES = ("timestep_spacing", "frames", "schedule", "lpips_step", "lpips_tol", "search_candidates",
        "reschedule_passes", "reschedule_damping", "beta_a", "beta_b", "max_frames")
FORMS = ("inner", "outer", "fused", "fused-inner")
#: Options.attention -> (self-attention interpolated, cross-attention interpolated).
ATTENTION = {"self": (True, False), "cross": (False, True), "both": (True, True)}
ALPHA_CHOICES = ("explore", "beta-search", "schedule")
ENDPOINTS = ("inverted", "ip-adapter")
#: How results name the method, by ``Options.endpoints``.
LABELS = {"inverted": "aid (inverted codes)", "ip-adapter": "aid (ip-adapter)"}
#: Guidance by ``Options.endpoints`` when ``Options.guidance`` is None.
DEFAULT_GUIDANCE = {"inverted": 1.0, "ip-adapter": 7.5}
@dataclass(frozen=True)
class Options:
    """AID's settings; defaults are its public code's, except where real images need otherwise.

    Attributes:
        endpoints: "inverted" (the real images' DDIM codes, default) or "ip-adapter" (AID as
            published: one start noise, the images as IP-Adapter prompts); see the module docstring.
        form: one of :data:`FORMS` (the module docstring); "fused" is the code's default.
        attention: "self", "cross" or "both" (the code: every attention layer).
        attention_fraction: fraction of the first DDIM steps with interpolated attention (0.5).
        guidance: classifier-free guidance scale; None = 1 for "inverted" (the inversion's, so the
            ends are round trips), 7.5 for "ip-adapter" (the code's).
        steps: DDIM steps of every generation, and of the inversion (one grid): 50, the code's.
        negative_prompt: the unconditional branch's prompt (their pipeline's default: none, "").
        prompts: two captions, one per image; None = :func:`image_captions`.
        alphas: "explore" (the pipeline's ``generate_interpolation``), "beta-search" (the paper's
            Bayesian choice) or "schedule" (``config.schedule``).
        frames: frame count when ``config.frames`` is None (their notebook's 5).
        exploration: frames the exploration renders before selecting; None = 1.5 x frames.
        init_a, init_b: the exploration's starting Beta prior (3, 3).
        beta_low, beta_high: bounds of a and b in "beta-search"; None high =
            ``attention_fraction * steps`` (theirs: [1, 25]).
        target_smoothness: "beta-search" stops once a probe reaches it (0.9).
        search_evaluations: "beta-search" probes after the 3 x 3 grid (their 15).
        ip_adapter: hub id or folder of the IP-Adapter ("ip-adapter" endpoints).
        ip_adapter_subfolder, ip_adapter_weight: where its weights are in it.
        image_encoder_folder: its image encoder's folder (under the subfolder unless it has a "/").
        ip_adapter_scale: the image prompt's weight s.
    """

    endpoints: str = "inverted"
    form: str = "fused"
    attention: str = "both"
    attention_fraction: float = 0.5
    guidance: Optional[float] = None
    steps: int = 50
    negative_prompt: str = ""
    prompts: Optional[Sequence[str]] = None
    alphas: str = "explore"
    frames: int = 5
    exploration: Optional[int] = None
    init_a: float = 3.0
    init_b: float = 3.0
    beta_low: float = 1.0
    beta_high: Optional[float] = None
    target_smoothness: float = 0.9
    search_evaluations: int = 15
    ip_adapter: str = "h94/IP-Adapter"
    ip_adapter_subfolder: str = "models"
    ip_adapter_weight: str = "ip-adapter_sd15.bin"
    image_encoder_folder: str = "image_encoder"
    ip_adapter_scale: float = 1.0

    def __post_init__(self):
        for name, allowed in (("endpoints", ENDPOINTS), ("form", FORMS), ("attention", tuple(ATTENTION)),
                              ("alphas", ALPHA_CHOICES)):
            if getattr(self, name) not in allowed:
                raise InputError(f"Unknown AID {name} '{getattr(self, name)}': use one of "
                                 f"{', '.join(allowed)}.")
        if not 0.0 <= self.attention_fraction <= 1.0:
            raise InputError(f"AID's attention_fraction must be in [0, 1], got {self.attention_fraction}.")
        if self.steps is None or self.steps < 1:
            raise InputError(f"AID's steps must be >= 1, got {self.steps}.")
        if self.guidance is not None and self.guidance < 1:
            raise InputError(f"AID's guidance must be >= 1 or None, got {self.guidance}.")
        if self.frames < 2:
            raise InputError(f"AID needs at least 2 frames, got frames={self.frames}.")
        if self.exploration is not None and self.exploration < 3:
            raise InputError(f"AID's exploration must be >= 3 frames or None, got {self.exploration}.")
        if self.init_a <= 0 or self.init_b <= 0:
            raise InputError(f"AID's init_a and init_b must be > 0, got {self.init_a} and {self.init_b}.")
        if self.beta_low <= 0 or (self.beta_high is not None and self.beta_high < self.beta_low):
            raise InputError(f"AID's Beta bounds must satisfy 0 < beta_low <= beta_high, got "
                             f"{self.beta_low} and {self.beta_high}.")
        if self.search_evaluations < 0:
            raise InputError(f"AID's search_evaluations must be >= 0, got {self.search_evaluations}.")
        if self.prompts is not None:
            prompts = tuple(self.prompts)
            if len(prompts) != 2 or not all(isinstance(p, str) and p.strip() for p in prompts):
                raise InputError("AID's prompts must be two non-empty prompts, one per image.")
            object.__setattr__(self, "prompts", prompts)

    @property
    def label(self) -> str:
        """How results name the method: "aid (inverted codes)" or "aid (ip-adapter)"."""
        return LABELS[self.endpoints]

    @property
    def guidance_scale(self) -> float:
        """The guidance used: ``guidance``, else the endpoints' default."""
        return float(self.guidance) if self.guidance is not None else DEFAULT_GUIDANCE[self.endpoints]


# ---- per-image captions --------------------------------------------------------------------

# ---- alphas: the pipeline's Beta-prior exploration -------------------------------------------

@dataclass
class Exploration:
    """What :func:`explore_and_select` rendered and kept.

    Attributes:
        explored: every alpha rendered, increasing, 0 and 1 included.
        distances: consecutive distances of the explored frames (len(explored) - 1).
        a, b: the Beta prior fitted last.
        kept: indices into ``explored`` of the frames kept (0 and the last included).
        alphas: the kept alphas; spread: max - min of their consecutive distances.
    """

    explored: list[float]
    distances: list[float]
    a: float
    b: float
    kept: list[int]
    alphas: list[float]
    spread: float


def fit_beta(alphas: Sequence[float], distances: Sequence[float], a: float, b: float) -> tuple[float, float]:
    """(a, b) of the Beta CDF nearest, in least squares, to the path's cumulative distance share
    ``u_j = sum_{i<j} d_i / sum_i d_i`` at ``alphas`` (prior L35-56: ``curve_fit`` from (1, 1),
    bounds [1e-6, inf)). Returns the given (a, b) when the fit fails or the path has no length."""
    from scipy.optimize import curve_fit
    from scipy.stats import beta as beta_distribution

    d = np.asarray(distances, dtype=np.float64)
    if d.sum() <= 0:
        return a, b
    share = np.concatenate([[0.0], np.cumsum(d / d.sum())])
    try:
        params, _ = curve_fit(lambda x, p, q: beta_distribution.cdf(x, p, q), np.asarray(alphas, np.float64),
                              share, p0=[1.0, 1.0], bounds=([1e-6, 1e-6], [np.inf, np.inf]))
    except (RuntimeError, ValueError):
        return a, b
    return float(params[0]), float(params[1])


def next_alpha(alphas: Sequence[float], distances: Sequence[float], a: float, b: float) -> tuple[int, float]:
    """(i, t): the widest gap ``i = argmax d_i`` and the Beta(a, b) median inside it,
    ``t = F^{-1}((F(x_i) + F(x_{i+1})) / 2)`` (prior L75-85)."""
    from scipy.stats import beta as beta_distribution

    i = int(np.argmax(distances))
    middle = (beta_distribution.cdf(alphas[i], a, b) + beta_distribution.cdf(alphas[i + 1], a, b)) / 2
    return i, float(beta_distribution.ppf(middle, a, b))


def pair_distances(frames: torch.Tensor, distance: Distance, batch: int = 16) -> np.ndarray:
    """(m, m) matrix of ``distance(frames[i], frames[j])`` for i < j, +inf elsewhere; frames
    (m, 3, S, S) in [-1, 1]."""
    m = frames.shape[0]
    pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
    weights = np.full((m, m), np.inf)
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        first = frames[[i for i, _ in chunk]]
        second = frames[[j for _, j in chunk]]
        values = torch.as_tensor(distance(first, second)).reshape(-1).detach().cpu().double().numpy()
        for (i, j), value in zip(chunk, values):
            weights[i, j] = value
    return weights


def least_spread_path(weights: np.ndarray, n: int) -> tuple[list[int], float]:
    """The path 0 = k_1 < k_2 < ... < k_n = m - 1 through an (m, m) matrix of edge weights
    (``weights[i, j]`` for i < j, +inf for no edge) whose edges spread least, ``max w - min w``
    (the goal of prior L212-297, found exactly): for every candidate minimum edge w_min, a
    dynamic programme finds the path of n nodes with the smallest maximum edge among edges
    >= w_min. Returns (the path's indices, its spread)."""
    m = weights.shape[0]
    if not 2 <= n <= m:
        raise ValueError(f"A path of {n} frames through {m} explored frames does not exist.")
    best_path, best_spread = None, np.inf
    for w_min in np.unique(weights[np.isfinite(weights)]):
        allowed = np.where(weights >= w_min, weights, np.inf)
        top = np.full(m, np.inf)
        top[0] = -np.inf
        parents = []
        for _ in range(n - 1):
            candidates = np.maximum(top[:, None], allowed)
            parents.append(candidates.argmin(axis=0))
            top = candidates.min(axis=0)
        if np.isfinite(top[m - 1]) and top[m - 1] - w_min < best_spread:
            best_spread = float(top[m - 1] - w_min)
            path = [m - 1]
            for parent in reversed(parents):
                path.append(int(parent[path[-1]]))
            best_path = path[::-1]
    return best_path, best_spread


def explore_and_select(cache: FrameCache, distance: Distance, frames: int, exploration: int,
                       a: float = 3.0, b: float = 3.0) -> Exploration:
    """AID's ``BetaPriorPipeline.generate_interpolation`` (prior L119-199, L299-340; the module
    docstring): explore ``exploration`` frames guided by a Beta prior refitted after every frame,
    then keep ``frames`` of them, from alpha 0 to 1, whose consecutive distances spread least.
    Frames come from ``cache`` (memoised by alpha)."""
    exploration = max(int(exploration), int(frames), 3)
    alphas = [0.0, 0.5, 1.0]
    three = cache.get(alphas)
    distances = [float(d) for d in torch.as_tensor(distance(three[:2], three[1:])).reshape(-1)]
    while len(alphas) < exploration:
        i, t = next_alpha(alphas, distances, a, b)
        if not 0.0 <= t <= 1.0 or not np.isfinite(t):
            break
        left, new, right = cache.get([alphas[i], t, alphas[i + 1]])
        d = torch.as_tensor(distance(torch.stack([left, new]), torch.stack([new, right]))).reshape(-1)
        alphas.insert(i + 1, t)
        distances[i:i + 1] = [float(d[0]), float(d[1])]
        a, b = fit_beta(alphas, distances, a, b)
    weights = pair_distances(cache.get(alphas), distance)
    kept, spread = least_spread_path(weights, min(frames, len(alphas)))
    return Exploration(alphas, distances, a, b, kept, [alphas[k] for k in kept], spread)


# ---- alphas: the paper's Bayesian choice of the Beta prior ("beta-search") --------------------

@dataclass
class BetaChoice:
    """The Beta prior the search chose.

    Attributes:
        a, b: its parameters; alphas: the frames' alphas, ``beta_alphas(frames, a, b)``.
        smoothness: ``1 - Gini`` of their consecutive distances.
        a_at_least_b: the prior's side (True: the middle frame is nearer endpoint 0).
        probes: every (a, b, smoothness) scored, in order.
    """

    a: float
    b: float
    alphas: list[float]
    smoothness: float
    a_at_least_b: bool
    probes: list[tuple[float, float, float]] = field(default_factory=list)


def choose_beta(cache: FrameCache, distance: Distance, frames: int, low: float, high: float,
                target: float = 0.9, evaluations: int = 15) -> BetaChoice:
    """AID's choice of the Beta prior (the module docstring): the 3 x 3 grid over [low, high]^2
    on the allowed side of ``a = b``, then a compass search of at most ``evaluations`` probes;
    stops early at smoothness ``target``. Frames come from ``cache`` (memoised by alpha)."""
    middle = cache.get([0.0, 0.5, 1.0])
    d = torch.as_tensor(distance(middle[:2], middle[1:])).reshape(-1)
    a_at_least_b = bool(d[0] < d[1])
    probes: dict[tuple[float, float], float] = {}

    def allowed(a: float, b: float) -> bool:
        return low <= a <= high and low <= b <= high and (a >= b if a_at_least_b else a <= b)

    def score(a: float, b: float) -> float:
        if (a, b) not in probes:
            schedule = fixed_schedule(beta_alphas(frames, a, b), cache, distance)
            probes[(a, b)] = smoothness(schedule.distances)
        return probes[(a, b)]

    def choice() -> BetaChoice:
        (a, b), s = max(probes.items(), key=lambda item: item[1])
        return BetaChoice(a, b, beta_alphas(frames, a, b), s, a_at_least_b,
                          [(pa, pb, ps) for (pa, pb), ps in probes.items()])

    grid = sorted({float(low), (low + high) / 2.0, float(high)})
    for a in grid:
        for b in grid:
            if allowed(a, b) and score(a, b) >= target:
                return choice()
    step, spent = (high - low) / 4.0, 0
    while spent < evaluations and step > 1e-3 * max(high - low, 1e-12):
        best = max(probes, key=probes.get)
        improved = False
        for da, db in ((step, 0.0), (-step, 0.0), (0.0, step), (0.0, -step)):
            a, b = best[0] + da, best[1] + db
            if not allowed(a, b) or (a, b) in probes or spent >= evaluations:
                continue
            spent += 1
            if score(a, b) >= target:
                return choice()
            if probes[(a, b)] > probes[best]:
                improved = True
                break
        if not improved:
            step /= 2.0
    return choice()


# ---- IP-Adapter image prompts ("ip-adapter" endpoints) ----------------------------------------

@dataclass
class ImagePrompts:
    """The two images as IP-Adapter prompts.

    Attributes:
        embeds: (2, 1, E) image embeddings (or (2, 1, T, E) hidden states for IP-Adapter Plus);
        uncond: the same shape, the unconditional ones (zeros for plain IP-Adapter).
        pipeline: the diffusers pipeline the adapter was loaded through (to unload it).
    """

    embeds: torch.Tensor
    uncond: torch.Tensor
    pipeline: object

    def rows(self, alphas: Sequence[float], conditional: bool = True) -> torch.Tensor:
        """Embeddings lerped at ``alphas``: (K, 1, ...)."""
        x = self.embeds if conditional else self.uncond
        return lerp(x[0:1], x[1:2], [float(a) for a in alphas]).reshape(len(alphas), *x.shape[1:])

    def unload(self) -> None:
        """Remove the adapter: the UNet's processors and image projection as before loading."""
        self.pipeline.unload_ip_adapter()


def _pipeline_of(model):
    """A diffusers ``StableDiffusionPipeline`` around the model's components (nothing copied)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=model.ddim_scheduler(), safety_checker=None,
                                   feature_extractor=None, image_encoder=None, requires_safety_checker=False)


def load_image_prompts(model, images: torch.Tensor, options: Options) -> ImagePrompts:
    """Load ``options.ip_adapter`` onto the model's UNet through diffusers' ``load_ip_adapter``
    and encode ``images`` (2, 3, S, S) in [-1, 1] with its image encoder.

    Raises:
        InputError: on the classroom model, or when the adapter does not load onto the UNet."""
    if model.name == "classroom":
        raise InputError("AID's ip-adapter endpoints need an IP-Adapter made for the model, and the classroom "
                         "model has none (its cross-attention is 128 wide, every published adapter's 768 or "
                         "1024): use endpoints='inverted', the default.")
    from diffusers.models import ImageProjection

    pipeline = _pipeline_of(model)
    try:
        pipeline.load_ip_adapter(options.ip_adapter, subfolder=options.ip_adapter_subfolder,
                                 weight_name=options.ip_adapter_weight,
                                 image_encoder_folder=options.image_encoder_folder)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        with contextlib.suppress(Exception):
            pipeline.unload_ip_adapter()
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"AID's ip-adapter endpoints could not load the IP-Adapter '{options.ip_adapter}' "
                         f"({options.ip_adapter_subfolder}/{options.ip_adapter_weight}) onto this model: "
                         f"{reason}") from None
    pipeline.set_ip_adapter_scale(options.ip_adapter_scale)
    projection = model.unet.encoder_hid_proj.image_projection_layers[0]
    hidden = not isinstance(projection, ImageProjection)
    embeds, uncond = [], []
    with torch.no_grad():
        for image in tensor_to_pil(images):
            e, u = pipeline.encode_image(image, model.device, 1, output_hidden_states=hidden)
            embeds.append(e.float())
            uncond.append(u.float())
    return ImagePrompts(torch.stack(embeds), torch.stack(uncond), pipeline)


class CrossIPInterpolatingProcessor(KeyValueProcessor):
    """Cross-attention of a UNet with an IP-Adapter, interpolated between the endpoints' text
    and image prompts (interpolation.py L240-387):

        out = form(Q, (K, V), (K_0, V_0), (K_1, V_1), a)
              + s * form(Q, (K', V'), (K'_0, V'_0), (K'_1, V'_1), a)

    K = W_k c(a), K_e = W_k c_e for the text; K' = W'_k p(a), K'_e = W'_k p_e for the image
    tokens p (the adapter's ``to_k_ip[0]``, ``to_v_ip[0]`` and scale s of ``previous``, diffusers'
    ``IPAdapterAttnProcessor2_0``). ``embeddings`` (2, L, D) are the endpoints' text embeddings,
    ``image_tokens`` (2, T, D) their projected image prompts; row ``r * B + i`` uses ``alphas[i]``.
    Self-attention runs ``previous`` unchanged."""

    def __init__(self, layer, previous, clock, embeddings: torch.Tensor, image_tokens: torch.Tensor,
                 alphas: torch.Tensor, form: str = "fused"):
        super().__init__(layer, previous, clock)
        self.embeddings, self.image_tokens, self.alphas = embeddings, image_tokens, alphas
        self.form = ATTENTION_FORMS[form]

    def _formed(self, attn, query, own_context, end_context, to_k, to_v, alpha, mask):
        """``form`` over keys and values ``to_k``, ``to_v`` of the frame's context (B, M, D) and
        of the endpoints' (2, M, D): (B, N, H*d)."""
        batch = own_context.shape[0]
        own = (to_k(own_context), to_v(own_context))
        ends = end_context.to(own_context.device, own_context.dtype)
        keys, values = to_k(ends), to_v(ends)
        start, end = [(keys[e:e + 1].expand(batch, -1, -1), values[e:e + 1].expand(batch, -1, -1))
                      for e in (0, 1)]
        return self.form(attn, query, own, start, end, alpha, mask)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 *args, **kwargs) -> torch.Tensor:
        if not isinstance(encoder_hidden_states, tuple):
            return self.previous(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        text, image_states = encoder_hidden_states
        residual, shape = hidden_states, hidden_states.shape
        hidden_states, attention_mask = _attention_inputs(attn, hidden_states, temb, attention_mask, text.shape[1])
        batch, frames = hidden_states.shape[0], self.alphas.numel()
        if batch % frames:
            raise ValueError(f"Cross-attention interpolation at layer {self.layer}: a batch of {batch} rows "
                             f"is not a multiple of {frames} alpha(s).")
        alpha = self.alphas.to(hidden_states.device, torch.float32).repeat(batch // frames).view(-1, 1, 1)
        query = attn.to_q(hidden_states)
        ends = self.embeddings.to(text.device, text.dtype)
        if attn.norm_cross:
            text, ends = attn.norm_encoder_hidden_states(text), attn.norm_encoder_hidden_states(ends)
        out = self._formed(attn, query, text, ends, attn.to_k, attn.to_v, alpha, attention_mask)
        own_tokens = image_states[0].reshape(batch, -1, image_states[0].shape[-1])
        adapter = self.previous
        scale = adapter.scale[0]
        if scale != 0:
            out = out + scale * self._formed(attn, query, own_tokens, self.image_tokens, adapter.to_k_ip[0],
                                             adapter.to_v_ip[0], alpha, None)
        return _attention_output(attn, out, shape, residual)


def interpolating_cross_ip(unet, embeddings: torch.Tensor, image_tokens: torch.Tensor, alphas, form: str,
                           layers: Sequence[str]):
    """Context manager: the cross-attention ``layers`` of a UNet with an IP-Adapter interpolate
    text and image prompts between the endpoints (:class:`CrossIPInterpolatingProcessor`)."""
    alphas = torch.as_tensor(alphas, dtype=torch.float32).reshape(-1)
    return installed(unet, lambda name, prev, clock: CrossIPInterpolatingProcessor(
        name, prev, clock, embeddings, image_tokens, alphas, form), layers)


# ---- generations with interpolated attention -------------------------------------------------

class AttentionMorph:
    """The two endpoints' generations and frames between them with interpolated attention.

    Args:
        codes: (2, 4, h, w) the endpoints' start codes; embeddings: (2, L, D) their prompts';
        uncond: (1, L, D) the negative prompt's; image_prompts: the endpoints' IP-Adapter
        prompts, or None.
    Attributes:
        timesteps: the DDIM grid; interpolated: its first ``int(steps * attention_fraction)``
            timesteps, where attention is interpolated (their ``warmup_steps``).
        bank: the endpoints' self-attention keys and values at those timesteps.
    """

    def __init__(self, model, codes: torch.Tensor, embeddings: torch.Tensor, uncond: torch.Tensor,
                 options: Options, steps: int, spacing: Optional[str],
                 image_prompts: Optional[ImagePrompts] = None):
        self.model, self.codes, self.embeddings, self.uncond = model, codes, embeddings, uncond
        self.options, self.steps, self.spacing = options, steps, spacing
        self.image_prompts = image_prompts
        scheduler = model.ddim_scheduler(spacing)
        scheduler.set_timesteps(steps)
        self.timesteps = [int(t) for t in scheduler.timesteps]
        self.interpolated = self.timesteps[:int(steps * options.attention_fraction)]
        use_self, use_cross = ATTENTION[options.attention]
        self.self_layers = self_attention_layers(model.unet) if use_self else []
        self.cross_layers = cross_attention_layers(model.unet) if use_cross else []
        self.bank = AttentionBank()
        self._ends: Optional[torch.Tensor] = None

    def _unet(self, z: torch.Tensor, t, cond: torch.Tensor, image: Optional[torch.Tensor]) -> torch.Tensor:
        m = self.model
        extra = {} if image is None else {"added_cond_kwargs": {"image_embeds": [image.to(m.device, m.dtype)]}}
        out = m.unet(z.to(m.device, m.dtype), t, encoder_hidden_states=cond.to(m.device, m.dtype), **extra)
        return out.sample.float()

    def _image_rows(self, alphas: Sequence[float], conditional: bool) -> Optional[torch.Tensor]:
        return None if self.image_prompts is None else self.image_prompts.rows(alphas, conditional)

    def _sample(self, codes: torch.Tensor, cond: torch.Tensor, alphas: Sequence[float], attention) -> torch.Tensor:
        """DDIM (eta = 0) from codes (B, 4, h, w) with guidance; the conditional branch runs
        inside ``attention(timestep)`` (a context manager), the unconditional one plainly; rows
        at ``alphas`` (B) for the image prompts."""
        scheduler = self.model.ddim_scheduler(self.spacing)
        scheduler.set_timesteps(self.steps, device=self.model.device)
        z = codes.float().to(self.model.device)
        w = self.options.guidance_scale
        image, image_uncond = self._image_rows(alphas, True), self._image_rows(alphas, False)
        for t in scheduler.timesteps:
            with attention(int(t)):
                eps = self._unet(z, t, cond, image)
            if w != 1.0:
                eps_u = self._unet(z, t, self.uncond.expand(z.shape[0], -1, -1), image_uncond)
                eps = eps_u + w * (eps - eps_u)
            z = scheduler.step(eps, t, z).prev_sample.float()
        return z

    @torch.no_grad()
    def endpoints(self) -> torch.Tensor:
        """The endpoints' plain generations (2, 3, S, S) in [-1, 1], recording their
        self-attention keys and values at the interpolated timesteps (once)."""
        if self._ends is None:
            images = []
            for e in (0, 1):
                def attention(t, e=e):
                    if t in self.interpolated and self.self_layers:
                        return recording(self.model.unet, self.bank, e, layers=self.self_layers)
                    return contextlib.nullcontext()
                latents = self._sample(self.codes[e:e + 1], self.embeddings[e:e + 1], [float(e)], attention)
                images.append(self.model.decode(latents).cpu())
            self._ends = torch.cat(images)
        return self._ends

    def _cross(self, alphas: Sequence[float]):
        """The context manager interpolating cross-attention at ``alphas``."""
        unet, form = self.model.unet, self.options.form
        if self.image_prompts is None:
            return interpolating_cross(unet, self.embeddings, alphas, form, self.cross_layers)
        with torch.no_grad():
            embeds = self.image_prompts.embeds.to(self.model.device, self.model.dtype)
            tokens = unet.encoder_hid_proj([embeds])[0]
        return interpolating_cross_ip(unet, self.embeddings, tokens.reshape(2, -1, tokens.shape[-1]), alphas,
                                      form, self.cross_layers)

    @torch.no_grad()
    def interpolate(self, alphas: Sequence[float]) -> torch.Tensor:
        """Frames (K, 3, S, S) in [-1, 1] at ``alphas`` with interpolated attention, alpha 0
        and 1 included (they reproduce the endpoints)."""
        self.endpoints()
        alphas = [float(a) for a in alphas]
        k = len(alphas)
        start = slerp(self.codes[0:1], self.codes[1:2], alphas).reshape(k, *self.codes.shape[1:])
        cond = lerp(self.embeddings[0:1], self.embeddings[1:2], alphas).reshape(k, *self.embeddings.shape[1:])

        def attention(t):
            stack = contextlib.ExitStack()
            if t in self.interpolated:
                if self.self_layers:
                    stack.enter_context(interpolating(self.model.unet, self.bank, alphas, self.options.form,
                                                      self.self_layers))
                if self.cross_layers:
                    stack.enter_context(self._cross(alphas))
            return stack
        return self.model.decode(self._sample(start, cond, alphas, attention)).cpu()

    def render(self, alphas: Sequence[float]) -> torch.Tensor:
        """Frames at ``alphas``: the endpoints' generations at 0 and 1, :meth:`interpolate`
        elsewhere."""
        ends = self.endpoints()
        inner = [a for a in alphas if 0.0 < a < 1.0]
        frames = dict(zip(inner, self.interpolate(inner))) if inner else {}
        return torch.stack([ends[0] if a <= 0 else ends[1] if a >= 1 else frames[a] for a in alphas])


def _start_noise(model, latents_shape, seed: int) -> torch.Tensor:
    """One start noise (2, 4, h, w) for both ends (the same draw twice), from ``seed``."""
    generator = torch.Generator().manual_seed(int(seed))
    z = torch.randn((1, *latents_shape[1:]), generator=generator)
    return z.repeat(2, 1, 1, 1).to(model.device)


def _endpoint_codes(run, model, embeddings: torch.Tensor, captions, options: Options):
    """(codes (2, 4, h, w), image prompts or None) for ``options.endpoints``."""
    latent_shape = (2, model.latent_channels, run.images.shape[-2] // model.vae_scale_factor,
                    run.images.shape[-1] // model.vae_scale_factor)
    if options.endpoints == "ip-adapter":
        with run.stage("image prompts"):
            prompts = load_image_prompts(model, run.images, options)
        return _start_noise(model, latent_shape, run.config.seed), prompts
    latents = run.latents()
    return run.inverted_codes(latents, embeddings, options.steps, captions), None


def _choose_alphas(run, morph: AttentionMorph, options: Options):
    """The frames' schedule by ``options.alphas`` (the module docstring), with a note."""
    c = run.config
    if options.alphas == "schedule":
        return frame_schedule(run, morph.render)
    frames = c.frames or options.frames
    with run.stage("frames"):
        cache = FrameCache(morph.render, run.frames_per_call)
        if options.alphas == "explore":
            exploration = options.exploration or int(1.5 * frames)
            chosen = explore_and_select(cache, run.lpips, frames, exploration, options.init_a, options.init_b)
            note = (f"alphas from AID's Beta-prior exploration (generate_interpolation): {len(chosen.explored)} "
                    f"frames explored, Beta(a = {chosen.a:.3g}, b = {chosen.b:.3g}) fitted, {len(chosen.alphas)} "
                    f"kept with LPIPS spread {chosen.spread:.3f}")
        else:
            high = options.beta_high if options.beta_high is not None else max(
                options.beta_low, options.attention_fraction * options.steps)
            chosen = choose_beta(cache, run.lpips, frames, options.beta_low, high,
                                 options.target_smoothness, options.search_evaluations)
            side = "a >= b" if chosen.a_at_least_b else "a <= b"
            note = (f"alphas from AID's Beta prior (Bayesian selection): a = {chosen.a:.3g}, b = {chosen.b:.3g} "
                    f"({side}), smoothness {chosen.smoothness:.3f} after {len(chosen.probes)} probes")
        schedule = fixed_schedule(chosen.alphas, cache, run.lpips)
        schedule.renders = cache.renders
    run.notes.append(f"{note}, {cache.renders} frames rendered; LPIPS on [-1, 1] images; config.schedule "
                     "applies with method_options alphas='schedule'")
    return schedule


def run(model, image0, image1, prompt, config, cache_dir=None, lpips=None, progress=True):
    """Morph by AID (the module docstring); returns a MorphResult labelled ``result.label``
    ("aid (inverted codes)" or "aid (ip-adapter)", also its first note), with stages encode,
    inversion, endpoints, frames ("image prompts" instead of encode and inversion for
    ip-adapter endpoints)."""
    options = parse_options(Options, NAME, config.method_options)
    run = start_run(NAME, USES, model, image0, image1, prompt, config, cache_dir, lpips, progress)
    captions, sources = (options.prompts, ("given", "given")) if options.prompts else \
        image_captions((image0, image1), prompt)
    embeddings = torch.cat([encode_prompt(model, p) for p in captions])
    uncond = encode_prompt(model, options.negative_prompt, allow_empty=True)
    codes, image_prompts = _endpoint_codes(run, model, embeddings, captions, options)
    try:
        morph = AttentionMorph(model, codes, embeddings, uncond, options, options.steps,
                               config.timestep_spacing, image_prompts)
        with run.stage("endpoints"):
            morph.endpoints()
        ends = ("DDIM inversion at guidance 1 on the sampling grid" if image_prompts is None
                else "one start noise and IP-Adapter image prompts")
        run.notes[:0] = [options.label,
                         f"captions: '{captions[0]}' ({sources[0]}), '{captions[1]}' ({sources[1]})"]
        run.notes.append(f"AID {options.form} attention interpolation ({options.attention}) for "
                         f"{len(morph.interpolated)} of {options.steps} steps, guidance "
                         f"{options.guidance_scale:g}; endpoints from {ends}")
        schedule = _choose_alphas(run, morph, options)
    finally:
        if image_prompts is not None:
            image_prompts.unload()
    result = run.finish(schedule)
    result.label = options.label
    return result
