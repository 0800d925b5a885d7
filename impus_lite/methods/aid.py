"""AID: attention interpolation between the endpoints' generations (He et al., "AID: Attention
Interpolation of Text-to-Image Diffusion", NeurIPS 2024, https://arxiv.org/abs/2403.17924),
reimplemented on diffusers attention processors (:mod:`impus_lite.attention`) after the
authors' code (github.com/QY-H00/attention-interpolation-diffusion: ``interpolation.py``,
``pipeline_interpolated_sd.py``, ``prior.py``, ``utils.py``). Training-free:

    z_k = DDIM-inversion(E(x_k), c_k)           k = 0, 1 (guidance 1, config.inversion_steps)
    endpoint k = D(DDIM(z_k, c_k, w))           plain generation; its self-attention K, V stored
    frame(a)   = D(DDIM(slerp(z_0, z_1, a), lerp(c_0, c_1, a), w))  with interpolated attention

**Real images.** AID interpolates between two *prompts* from random noise; its code reaches
photos only through an IP-Adapter image prompt (``load_aid_ip_adapter``), which also needs
the adapter's weights. Here the endpoints are the DDIM inversions of the two photos, so at
guidance 1 the end frames are the inversions' round trips; AID's guidance 7.5 (the default,
as published) sharpens every frame but moves the ends away from the inputs.

**Attention.** During the first ``attention_fraction`` of the DDIM steps (their
``warmup_ratio``, 0.5), in the conditional branch only (their code deactivates the processors
for the unconditional pass), every chosen attention layer of a frame at ``a`` computes its own
queries Q (and its own K, V) and attends with one of the forms (``Attn(Q, K, V) = softmax(Q K^T
/ sqrt(d)) V``; K_e, V_e are endpoint e's at the same layer and step):

    inner        Attn(Q, (1-a) K_0 + a K_1, (1-a) V_0 + a V_1)             keys, values mixed
    outer        (1-a) Attn(Q, K_0, V_0) + a Attn(Q, K_1, V_1)             outputs mixed
    fused        (1-a) Attn(Q, [K, K_0], [V, V_0]) + a Attn(Q, [K, K_1], [V, V_1])
    fused-inner  Attn(Q, [K, (1-a) K_0 + a K_1], [V, (1-a) V_0 + a V_1])

``[K, K_e]`` concatenates the frame's own keys and endpoint e's along the token axis, so the
frame attends to itself and to the endpoint ("fused with self-attention"). "fused" is the
public code's default (``load_aid(atype="fused_outer", is_fused=True)``, the paper's AID-O);
"fused-inner" is its ``fused_inner`` (AID-I). Self-attention endpoints come from the recorded
generations; cross-attention endpoints are ``W_k c_e``, ``W_v c_e`` of the endpoints' text
embeddings. With one shared prompt (``c_0 = c_1``, the default) cross-attention interpolation
changes nothing; with ``prompts`` (one per image) it does, except "inner", which equals plain
cross-attention on ``lerp(c_0, c_1, a)`` (``W_k`` is linear). The code interpolates every
attention layer (``attention="both"``). Their batch runs [endpoint 0, frame, endpoint 1]
together and reads the endpoints' K, V from that batch; here the endpoints run first and
their K, V are read from an :class:`~impus_lite.attention.AttentionBank` (the same numbers).

**Alphas: the Beta prior** (``alphas="beta-search"``). The frames sit at the quantiles of a
Beta(a, b) prior (:func:`impus_lite.schedules.beta_alphas`), (a, b) chosen to maximise AID's
smoothness ``1 - Gini`` of the consecutive LPIPS distances (their ``bayesian_prior_selection``):
render a = 1/2 first; if it is nearer endpoint 0 than endpoint 1 the change happens late and
only ``a >= b`` is allowed (else ``a <= b``); bounds [1, attention_fraction * steps]; probe the
3 x 3 grid {low, mid, high}^2; stop as soon as smoothness reaches ``target_smoothness`` (0.9);
else up to ``search_evaluations`` (15) more. Their later evaluations come from Bayesian
optimisation (the ``bayes_opt`` package, with sequential domain reduction); this is a faithful
simplification: a compass search (the four neighbours of the best point, step halved when
none improves; a deterministic search on the same objective, bounds, prior, grid, target and
budget). Points on the wrong side of the prior are skipped, not scored 0 and counted; and
``a == b`` is rendered rather than replaced by the three-frame smoothness their code reuses.
Frames rendered during the search are memoised by alpha and reused. Their LPIPS gets
ImageNet-normalised images; here it gets [-1, 1] (see :mod:`impus_lite.perceptual`).
``alphas="schedule"`` uses ``config.schedule`` instead.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..attention import (AttentionBank, cross_attention_layers, interpolating, interpolating_cross,
                         recording, self_attention_layers)
from ..errors import InputError
from ..interp import lerp, slerp
from ..perceptual import smoothness
from ..schedules import Distance, FrameCache, beta_alphas, fixed_schedule
from ..text import encode_prompt
from .base import frame_schedule, parse_options, start_run

NAME = "aid"
#: MorphConfig fields AID reads besides the common ones (the schedule's under alphas="schedule").
USES = ("timestep_spacing", "inversion_steps", "sample_steps", "frames", "schedule", "lpips_step",
        "lpips_tol", "search_candidates", "reschedule_passes", "reschedule_damping", "beta_a",
        "beta_b", "max_frames")
FORMS = ("inner", "outer", "fused", "fused-inner")
#: Options.attention -> (self-attention interpolated, cross-attention interpolated).
ATTENTION = {"self": (True, False), "cross": (False, True), "both": (True, True)}
ALPHA_CHOICES = ("beta-search", "schedule")


@dataclass(frozen=True)
class Options:
    """AID's settings; defaults are its public code's.

    Attributes:
        form: one of :data:`FORMS` (the module docstring); "fused" is the code's default.
        attention: "self", "cross" or "both" (the code: every attention layer).
        attention_fraction: fraction of the first DDIM steps with interpolated attention (0.5).
        guidance: classifier-free guidance scale (7.5); 1 keeps the ends at the round trips.
        steps: DDIM steps of every generation; None = ``config.sample_steps`` (their pipeline: 50).
        negative_prompt: the unconditional branch's prompt (their pipeline's default: none, "").
        prompts: two prompts, one per image (AID's endpoints); None = the morph's prompt twice.
        alphas: "beta-search" (AID's Beta prior) or "schedule" (``config.schedule``).
        frames: frame count of the Beta search when ``config.frames`` is None (their notebook's 5).
        beta_low, beta_high: bounds of a and b; None high = ``attention_fraction * steps`` (theirs).
        target_smoothness: the search stops once a probe reaches it (0.9).
        search_evaluations: probes after the 3 x 3 grid (their 15 Bayesian-optimisation steps).
    """

    form: str = "fused"
    attention: str = "both"
    attention_fraction: float = 0.5
    guidance: float = 7.5
    steps: Optional[int] = None
    negative_prompt: str = ""
    prompts: Optional[Sequence[str]] = None
    alphas: str = "beta-search"
    frames: int = 5
    beta_low: float = 1.0
    beta_high: Optional[float] = None
    target_smoothness: float = 0.9
    search_evaluations: int = 15

    def __post_init__(self):
        for name, allowed in (("form", FORMS), ("attention", tuple(ATTENTION)), ("alphas", ALPHA_CHOICES)):
            if getattr(self, name) not in allowed:
                raise InputError(f"Unknown AID {name} '{getattr(self, name)}': use one of "
                                 f"{', '.join(allowed)}.")
        if not 0.0 <= self.attention_fraction <= 1.0:
            raise InputError(f"AID's attention_fraction must be in [0, 1], got {self.attention_fraction}.")
        if self.steps is not None and self.steps < 1:
            raise InputError(f"AID's steps must be >= 1 or None, got {self.steps}.")
        if self.frames < 2:
            raise InputError(f"AID needs at least 2 frames, got frames={self.frames}.")
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


# ---- the Beta prior ----------------------------------------------------------------------------

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


# ---- generations with interpolated attention -------------------------------------------------

class AttentionMorph:
    """The two endpoints' generations and frames between them with interpolated attention.

    Args:
        codes: (2, 4, h, w) the endpoints' start codes; embeddings: (2, L, D) their prompts';
        uncond: (1, L, D) the negative prompt's.
    Attributes:
        timesteps: the DDIM grid; interpolated: its first ``int(steps * attention_fraction)``
            timesteps, where attention is interpolated (their ``warmup_steps``).
        bank: the endpoints' self-attention keys and values at those timesteps.
    """

    def __init__(self, model, codes: torch.Tensor, embeddings: torch.Tensor, uncond: torch.Tensor,
                 options: Options, steps: int, spacing: Optional[str]):
        self.model, self.codes, self.embeddings, self.uncond = model, codes, embeddings, uncond
        self.options, self.steps, self.spacing = options, steps, spacing
        scheduler = model.ddim_scheduler(spacing)
        scheduler.set_timesteps(steps)
        self.timesteps = [int(t) for t in scheduler.timesteps]
        self.interpolated = self.timesteps[:int(steps * options.attention_fraction)]
        use_self, use_cross = ATTENTION[options.attention]
        self.self_layers = self_attention_layers(model.unet) if use_self else []
        self.cross_layers = cross_attention_layers(model.unet) if use_cross else []
        self.bank = AttentionBank()
        self._ends: Optional[torch.Tensor] = None

    def _unet(self, z: torch.Tensor, t, cond: torch.Tensor) -> torch.Tensor:
        m = self.model
        out = m.unet(z.to(m.device, m.dtype), t, encoder_hidden_states=cond.to(m.device, m.dtype))
        return out.sample.float()

    def _sample(self, codes: torch.Tensor, cond: torch.Tensor, attention) -> torch.Tensor:
        """DDIM (eta = 0) from codes (B, 4, h, w) with guidance; the conditional branch runs
        inside ``attention(timestep)`` (a context manager), the unconditional one plainly."""
        scheduler = self.model.ddim_scheduler(self.spacing)
        scheduler.set_timesteps(self.steps, device=self.model.device)
        z = codes.float().to(self.model.device)
        w = float(self.options.guidance)
        for t in scheduler.timesteps:
            with attention(int(t)):
                eps = self._unet(z, t, cond)
            if w != 1.0:
                eps_u = self._unet(z, t, self.uncond.expand(z.shape[0], -1, -1))
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
                latents = self._sample(self.codes[e:e + 1], self.embeddings[e:e + 1], attention)
                images.append(self.model.decode(latents).cpu())
            self._ends = torch.cat(images)
        return self._ends

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
                    stack.enter_context(interpolating_cross(self.model.unet, self.embeddings, alphas,
                                                            self.options.form, self.cross_layers))
            return stack
        return self.model.decode(self._sample(start, cond, attention)).cpu()

    def render(self, alphas: Sequence[float]) -> torch.Tensor:
        """Frames at ``alphas``: the endpoints' generations at 0 and 1, :meth:`interpolate`
        elsewhere."""
        ends = self.endpoints()
        inner = [a for a in alphas if 0.0 < a < 1.0]
        frames = dict(zip(inner, self.interpolate(inner))) if inner else {}
        return torch.stack([ends[0] if a <= 0 else ends[1] if a >= 1 else frames[a] for a in alphas])


def run(model, image0, image1, prompt, config, cache_dir=None, lpips=None, progress=True):
    """Morph by AID on inverted endpoints; returns a MorphResult (stages encode, inversion,
    endpoints, frames)."""
    options = parse_options(Options, NAME, config.method_options)
    run = start_run(NAME, USES, model, image0, image1, prompt, config, cache_dir, lpips, progress)
    c = config
    steps = options.steps or c.sample_steps
    prompts = options.prompts or (prompt, prompt)
    embeddings = torch.cat([encode_prompt(model, p) for p in prompts])
    uncond = encode_prompt(model, options.negative_prompt, allow_empty=True)
    latents = run.latents()
    codes = run.inverted_codes(latents, embeddings, c.inversion_steps, prompts)
    morph = AttentionMorph(model, codes, embeddings, uncond, options, steps, c.timestep_spacing)
    with run.stage("endpoints"):
        morph.endpoints()
    run.notes.append(f"AID {options.form} attention interpolation ({options.attention}) for "
                     f"{len(morph.interpolated)} of {steps} steps, guidance {options.guidance}; "
                     "endpoints from DDIM inversion")
    if options.alphas == "schedule":
        return run.finish(frame_schedule(run, morph.render))
    frames = c.frames or options.frames
    high = options.beta_high if options.beta_high is not None else max(
        options.beta_low, options.attention_fraction * steps)
    with run.stage("frames"):
        cache = FrameCache(morph.render, c.batch_size)
        chosen = choose_beta(cache, run.lpips, frames, options.beta_low, high,
                             options.target_smoothness, options.search_evaluations)
        schedule = fixed_schedule(chosen.alphas, cache, run.lpips)
        schedule.renders = cache.renders
    side = "a >= b" if chosen.a_at_least_b else "a <= b"
    run.notes.append(f"alphas from AID's Beta prior: a = {chosen.a:.3g}, b = {chosen.b:.3g} ({side}), "
                     f"smoothness {chosen.smoothness:.3f} after {len(chosen.probes)} probes "
                     f"(grid and compass search), {cache.renders} frames rendered; config.schedule "
                     "applies with method_options alphas='schedule'")
    return run.finish(schedule)
