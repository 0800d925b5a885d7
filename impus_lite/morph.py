"""The full IMPUS pipeline: stages in order, a cache of their outputs, the result (notebook 07).

    from impus_lite import load_model, morph, MorphConfig
    model = load_model("stable-diffusion-v1-5/stable-diffusion-v1-5")
    result = morph(model, "cat.png", "dog.png", prompt="a photo of an animal",
                   config=MorphConfig.preset("fast"), cache_dir="out/cache")
    result.save("morph.gif")

Stages (SPEC.md numbering): 1 encode, 2 text embeddings, 3 DDIM inversion, 4 rPPD and rank,
5-6 conditional and unconditional LoRA, 7 re-inversion, 8-9 choose alphas and render.
:class:`Morpher` runs them one at a time (the notebooks call each stage on its own);
:meth:`Morpher.run` runs them all. The public :func:`impus_lite.morph` (in
:mod:`impus_lite.dispatch`, above the methods family) runs this pipeline for ``method="impus"``
and the neighbours' modules for the others; this module imports no method. Each stage records
its seconds and UNet evaluations.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from .cache import StageCache, stage_key
from .config import MorphConfig
from .images import ImageLike, load_image, tensor_digest, tensor_to_pil
from .interp import lerp, slerp
from .inversion import ddim_invert, ddim_sample
from .lora import (COND_ADAPTER, UNCOND_ADAPTER, adapter_state, add_lora, is_outlier_pair,
                   load_adapter_state, max_adapter_rank, rank_from_rppd, train_lora)
from .models import DiffusionModel, autocast_dtype, dtype_name, run_dtype
from .perceptual import Lpips, end_errors, load_lpips, rppd_probe
from .result import MorphResult, StageStats, ran_with, stage_clock
from .runtime import frames_per_call
from .schedules import FrameCache, Schedule, choose_schedule
from .text import check_prompt, encode_prompt, optimize_embeddings, unconditional_embedding

STAGES = ("encode", "text", "inversion", "rppd", "lora", "reinversion", "frames")
#: How a result names IMPUS by the schedule that placed its frames: IMPUS's own binary search
#: ("perceptual", the ``paper`` preset) or this package's reschedule (the ``fast`` preset).
SCHEDULE_LABELS = {"perceptual": "impus (search)", "reschedule": "impus (reschedule)",
                   "uniform": "impus (uniform alphas)", "beta": "impus (Beta prior)"}


def schedule_label(schedule: str) -> str:
    """IMPUS's label for a result whose alphas came from ``schedule`` (:data:`SCHEDULE_LABELS`)."""
    return SCHEDULE_LABELS.get(schedule, "impus")


class Morpher:
    """The IMPUS stages for one pair of images, each callable on its own and cached.

    Args:
        model: a loaded :class:`DiffusionModel` (its LoRA adapters are replaced).
        image0, image1: paths or PIL images, any size and mode.
        prompt: what the two images share, e.g. "a photo of an animal".
        config: a :class:`MorphConfig` (default: the "fast" preset).
        cache_dir: folder for stage outputs (None: no cache).
        lpips: the distance for rPPD and the alpha search (default: :func:`load_lpips`).

    When ``config.precision`` names a precision other than the model's, the model's weights are
    cast to it (and stay so); the result's notes say so.
    """

    def __init__(self, model: DiffusionModel, image0: ImageLike, image1: ImageLike, prompt: str,
                 config: Optional[MorphConfig] = None, cache_dir: Union[str, Path, None] = None,
                 lpips: Optional[Lpips] = None, progress: bool = True):
        self.model = model
        self.config = config or MorphConfig.preset("fast")
        check_prompt(model, prompt)
        self.prompt = prompt
        size = self.config.size or model.resolution
        factor = model.vae_scale_factor
        if size % factor:
            from .errors import InputError
            raise InputError(f"Image size {size} is not a multiple of the VAE factor {factor}.")
        c = self.config
        self.images = torch.cat([load_image(image, size, c.resize_mode, c.resample) for image in (image0, image1)])
        self.cache = StageCache(cache_dir)
        self.lpips = lpips or load_lpips(device=model.device)
        self.progress = progress
        self.stats: dict[str, StageStats] = {}
        self.notes: list[str] = []
        self._values: dict[str, object] = {}
        self._adapter_states: dict[str, tuple[int, dict]] = {}
        #: What the frames :meth:`render` returned cost to sample (seconds, UNet evaluations).
        self.render_cost = StageStats()
        model.remove_adapters()
        wanted = run_dtype(model, c.precision)
        if wanted != model.dtype:
            before = dtype_name(model.dtype)
            model.cast(wanted)
            self.notes.append(f"weights cast from {before} to {c.precision} (config.precision)")
        model.inference_autocast = autocast_dtype(model.device, c.autocast)
        if model.inference_autocast is not None:
            self.notes.append(f"inference stages under bf16 autocast (config.autocast={c.autocast!r})")
        #: The weights' dtype and inference autocast this morph runs in; re-applied at each stage,
        #: since another Morpher on the same model may have changed them (its keys name these).
        self._precision = (model.dtype, model.inference_autocast)
        digests = [tensor_digest(self.images[i]) for i in range(2)]
        self._base = dict(model=model.fingerprint, dtype=str(model.dtype), prompt=prompt)
        # The inference stages' keys name the autocast, only when there is one (keys without it
        # stay as they were); the training stages do not run under it and are shared.
        self._cast = {} if model.inference_autocast is None else {"autocast": str(model.inference_autocast)}
        self._digests = digests

    # ---- bookkeeping -----------------------------------------------------------------------
    def _stage(self, name: str):
        self._use_precision()
        return stage_clock(self.model, self.stats, name)

    def _use_precision(self) -> None:
        """Give the shared model this morph's weights dtype and autocast back, if another
        Morpher on it changed them (``config.precision``, ``config.autocast``). Casting back up
        is exact only for weights that were in the narrower dtype before (a bf16 model a
        ``paper`` morph cast to fp32); fp32 weights another morph cast to half keep the bits
        they lost, and the notes say so."""
        dtype, cast = self._precision
        if self.model.dtype != dtype:
            changed = self.model.dtype
            self.model.cast(dtype)
            lossy = torch.finfo(changed).eps > torch.finfo(dtype).eps
            self.notes.append(f"weights cast back to {dtype_name(dtype)} after another morph on "
                              f"this model cast them to {dtype_name(changed)}"
                              + ("; the bits that dropped stay lost" if lossy else ""))
        self.model.inference_autocast = cast

    def _once(self, name: str, compute):
        if name not in self._values:
            self._values[name] = compute()
        return self._values[name]

    def _keys(self) -> dict:
        c = self.config
        # image i is optimised with seed + i (embeddings()), so its key names that seed: the same
        # image at the other end of another morph is another optimisation
        text = [stage_key("text", image=d, steps=c.text_steps, lr=c.text_lr, seed=c.seed + i, **self._base)
                for i, d in enumerate(self._digests)]
        inversion = [stage_key("inversion", text=t, steps=c.inversion_steps, spacing=c.timestep_spacing,
                               **self._cast) for t in text]
        return {"text": text, "inversion": inversion}

    def _uncond_lora_key(self) -> str:
        """Key of the unconditional adapter: both images' text keys, its rank and training."""
        c = self.config
        return stage_key("uncond_lora", text=self._keys()["text"], rank=c.uncond_lora_rank,
                         steps=c.uncond_lora_steps, lr=c.uncond_lora_lr, seed=c.seed, init=c.lora_init)

    def _lora_key(self) -> str:
        """Key of the conditional adapter: both images' text keys, the rank and its training."""
        c = self.config
        return stage_key("lora", text=self._keys()["text"], rank=self.rank(), steps=c.lora_steps,
                         lr=c.lora_lr, seed=c.seed, init=c.lora_init)

    # ---- stage 1 ---------------------------------------------------------------------------
    def latents(self) -> torch.Tensor:
        """Stage 1: VAE latents (2, 4, S/f, S/f) of the two images."""
        def compute():
            with self._stage("encode"):
                return self.model.encode(self.images)
        return self._once("latents", compute)

    def reconstructions(self) -> torch.Tensor:
        """The two inputs through the VAE, (2, 3, S, S) in [-1, 1] on the CPU: what the model
        can see of them, the floor of any morph's end error."""
        def compute():
            latents = self.latents()
            with self._stage("encode"):
                return self.model.decode(latents).cpu()
        return self._once("reconstructions", compute)

    # ---- stage 2 ---------------------------------------------------------------------------
    def prompt_embedding(self) -> torch.Tensor:
        """The shared prompt's embedding (1, L, D)."""
        return self._once("prompt_embedding", lambda: encode_prompt(self.model, self.prompt))

    def uncond_embedding(self) -> torch.Tensor:
        """The empty prompt's embedding (1, L, D)."""
        return self._once("uncond_embedding", lambda: unconditional_embedding(self.model))

    def embeddings(self) -> torch.Tensor:
        """Stage 2: one optimised embedding per image, (2, L, D); the prompt's when text_steps=0."""
        def compute():
            latents, base, keys = self.latents(), self.prompt_embedding(), self._keys()["text"]
            c = self.config
            with self._stage("text") as stats:
                found = [self.cache.load("text", key) for key in keys]
                missing = [i for i in range(2) if found[i] is None]
                stats.cached = len(missing) < 2
                if missing:  # the images still to optimise, in one batched call per step
                    results = optimize_embeddings(
                        self.model, latents[missing], base, c.text_steps, c.text_lr,
                        seeds=[c.seed + i for i in missing], progress=self.progress,
                        desc=f"text embedding{'s' if len(missing) > 1 else ' ' + str(missing[0])}")
                    for i, result in zip(missing, results):
                        found[i] = {"embedding": result.embedding.cpu(),
                                    "losses": torch.tensor(result.losses)}
                        self.cache.save("text", keys[i], found[i])
                for i in range(2):
                    self._values[f"text_losses{i}"] = found[i]["losses"].tolist()
            return torch.cat([f["embedding"] for f in found]).to(self.model.device)
        return self._once("embeddings", compute)

    # ---- stages 3 and 7 -------------------------------------------------------------------
    def _invert(self, stage: str, keys: Sequence[str], adapter: Optional[str]) -> torch.Tensor:
        latents, embeddings = self.latents(), self.embeddings()
        with self._stage(stage) as stats:
            found = [self.cache.load(stage, key) for key in keys]
            missing = [i for i in range(2) if found[i] is None]
            stats.cached = len(missing) < 2
            if missing:  # both images in one batched call: the ODE acts on each independently
                codes = ddim_invert(self.model, latents[missing], embeddings[missing],
                                    self.config.inversion_steps, adapter=adapter,
                                    progress=self.progress, desc=stage,
                                    timestep_spacing=self.config.timestep_spacing)
                for i, code in zip(missing, codes):
                    found[i] = {"code": code[None].cpu().clone()}
                    self.cache.save(stage, keys[i], found[i])
        return torch.cat([f["code"] for f in found]).to(self.model.device)

    def base_codes(self) -> torch.Tensor:
        """Stage 3: DDIM codes (2, 4, h, w) of both images under the un-adapted model."""
        return self._once("base_codes", lambda: self._invert("inversion", self._keys()["inversion"], None))

    # ---- stage 4 ---------------------------------------------------------------------------
    def rank(self) -> int:
        """Stage 4: the conditional LoRA rank: ``config.lora_rank``, or IMPUS's rule from rPPD
        (:func:`perceptual.rppd_probe` of kind ``config.rppd_probe`` on the un-adapted model,
        at least 16 for an outlier pair), bounded by ``config.max_lora_rank`` and the narrowest
        adapted layer."""
        def compute():
            c = self.config
            if c.lora_rank is not None:
                return self._bounded_rank(c.lora_rank)
            key = stage_key("rppd", inversion=self._keys()["inversion"], frames=c.rppd_frames,
                            steps=c.sample_steps, w=(c.min_guidance, c.max_guidance),
                            lpips=self.lpips.trunk, probe=c.rppd_probe)
            cached = self.cache.load("rppd", key)
            codes = self.base_codes() if cached is None else None
            with self._stage("rppd") as stats:
                if cached is None:
                    probe = rppd_probe(lambda a, w: self._render(a, adapted=False, guidances=w), self.lpips,
                                       c.rppd_frames, c.rppd_probe, c.min_guidance, c.max_guidance)
                    cached = {"rppd": torch.tensor(probe.value),
                              "outlier": torch.tensor(is_outlier_pair(codes[0], codes[1]))}
                    self.cache.save("rppd", key, cached)
                else:
                    stats.cached = True
            self._values["rppd"] = float(cached["rppd"])
            self._values["outlier"] = bool(cached["outlier"])
            return self._bounded_rank(rank_from_rppd(self._values["rppd"], self._values["outlier"]))
        return self._once("rank", compute)

    def _bounded_rank(self, rank: int) -> int:
        limit = max_adapter_rank(self.model)
        reason = "the narrowest adapted layer"
        if self.config.max_lora_rank is not None and self.config.max_lora_rank < limit:
            limit, reason = self.config.max_lora_rank, "config.max_lora_rank"
        if rank <= limit:
            return rank
        asked = f"2^{rank.bit_length() - 1}" if rank > 2 ** 20 else str(rank)
        self.notes.append(f"LoRA rank {asked} bounded to {limit} ({reason})")
        return limit

    def rppd(self) -> Optional[float]:
        """The rPPD that stage 4 measured (None when ``config.lora_rank`` fixed the rank)."""
        self.rank()
        return self._values.get("rppd")

    def outlier(self) -> bool:
        """Whether stage 4 found an inverted code far from unit variance (IMPUS's outlier pair)."""
        self.rank()
        return bool(self._values.get("outlier", False))

    # ---- stages 5 and 6 -------------------------------------------------------------------
    def adapters(self) -> tuple[Optional[str], Optional[str]]:
        """Stages 5-6: train (or load) the adapters; returns (conditional, unconditional) names."""
        def compute():
            c, rank = self.config, self.rank()
            self.latents()  # earlier stages run before this stage's clock starts
            embeddings = self.embeddings()
            cond = uncond = None
            with self._stage("lora") as stats:
                if rank > 0:
                    cond = self._adapter(COND_ADAPTER, self._lora_key(), rank, c.lora_steps, c.lora_lr,
                                         [embeddings[0:1], embeddings[1:2]], stats)
                if c.uncond_lora_rank > 0:
                    empty = self.uncond_embedding()
                    uncond = self._adapter(UNCOND_ADAPTER, self._uncond_lora_key(), c.uncond_lora_rank,
                                           c.uncond_lora_steps, c.uncond_lora_lr, [empty, empty], stats)
            self.model.adapter_owner = self
            return cond, (uncond if uncond is not None else cond)
        names = self._once("adapters", compute)
        if self._adapter_states and self.model.adapter_owner is not self:
            # Another Morpher (or morph call) replaced this pair's adapters on the shared model.
            self.model.remove_adapters()
            for name, (rank, state) in self._adapter_states.items():
                load_adapter_state(self.model, name, rank, state)
            self.model.adapter_owner = self
        return names

    def _adapter(self, name, key, rank, steps, lr, embeddings, stats) -> str:
        cached = self.cache.load(name + "_lora", key)
        if cached is None:
            add_lora(self.model, name, rank, seed=self.config.seed, init=self.config.lora_init)
            latents = self.latents()
            train_lora(self.model, name, [latents[0:1], latents[1:2]], embeddings, steps, lr,
                       seed=self.config.seed, progress=self.progress, desc=f"{name} LoRA r={rank}")
            cached = adapter_state(self.model, name)
            self.cache.save(name + "_lora", key, cached)
        else:
            stats.cached = True
            load_adapter_state(self.model, name, rank, cached)
        self._adapter_states[name] = (rank, cached)
        return name

    # ---- stage 7 ---------------------------------------------------------------------------
    def _reinversion_keys(self) -> list[str]:
        return [stage_key("reinversion", lora=self._lora_key(), image=i, steps=self.config.inversion_steps,
                          spacing=self.config.timestep_spacing, **self._cast) for i in range(2)]

    def codes(self) -> torch.Tensor:
        """Stage 7: the codes (2, 4, h, w) that frames start from (re-inverted with the
        conditional adapter; the base codes when there is no adapter)."""
        def compute():
            cond, _ = self.adapters()
            if cond is None:
                return self.base_codes()
            return self._invert("reinversion", self._reinversion_keys(), cond)
        return self._once("codes", compute)

    # ---- stage 8 ---------------------------------------------------------------------------
    def render(self, alphas: Sequence[float], adapted: bool = True,
               guidances: Optional[Sequence[float]] = None) -> torch.Tensor:
        """Stage 8: frames (K, 3, S, S) in [-1, 1] at ``alphas``.

        Embedding ``lerp(e0, e1, a)``, start code ``slerp(z0, z1, a)``, guidance
        ``config.guidance(a)`` (or ``guidances``, one per alpha), ``config.sample_steps`` DDIM
        steps on ``config.timestep_spacing``'s grid, :attr:`frames_per_call` frames per UNet call.
        ``adapted=False`` uses the un-adapted model and base codes (the rPPD probe).

        With a cache folder, each frame's sampled latent is kept (stage "frame", keyed by the
        codes, adapters and embeddings it comes from, its alpha, guidance and the sampling
        settings): a frame sampled before is decoded again instead of sampled.
        :attr:`render_cost` adds up what the returned frames cost to sample, a loaded frame at
        the cost recorded when it was sampled. The stages of :meth:`run` sample every frame
        (no frame cache), so a morph's stats count all it renders.
        """
        return self._render(alphas, adapted, guidances, use_cache=True)

    @property
    def frames_per_call(self) -> int:
        """Frames per UNet call: ``config.batch_size``, or when it is None
        :func:`impus_lite.runtime.frames_per_call` for this pair's latent size (read off the
        images' size, as :attr:`impus_lite.methods.base.MethodRun.frames_per_call` does, so that
        asking does not run the encode stage)."""
        side = self.images.shape[-1] // self.model.vae_scale_factor
        return frames_per_call(self.config.batch_size, side, self.config.max_frames)

    def _frame_keys(self, alphas: Sequence[float], adapted: bool, guidances: Sequence[float]) -> list[str]:
        c = self.config
        if adapted and self.adapters()[0] is not None:
            codes = self._reinversion_keys()
        else:
            codes = self._keys()["inversion"]
        uncond = self._uncond_lora_key() if adapted and c.uncond_lora_rank > 0 else None
        return [stage_key("frame", codes=codes, uncond_lora=uncond, text=self._keys()["text"], adapted=adapted,
                          alpha=float(a), guidance=float(w), steps=c.sample_steps, spacing=c.timestep_spacing)
                for a, w in zip(alphas, guidances)]

    def _render(self, alphas: Sequence[float], adapted: bool = True,
                guidances: Optional[Sequence[float]] = None, use_cache: bool = False) -> torch.Tensor:
        embeddings = self.embeddings()
        self._use_precision()
        if adapted:
            cond_adapter, uncond_adapter = self.adapters()
            codes = self.codes()
        else:
            cond_adapter = uncond_adapter = None
            codes = self.base_codes()
        uncond = self.uncond_embedding()
        alphas = [float(a) for a in alphas]
        if guidances is None:
            guidances = [self.config.guidance(a) for a in alphas]
        guidances = [float(w) for w in guidances]
        keep = use_cache and self.cache.folder is not None
        keys = self._frame_keys(alphas, adapted, guidances) if keep else [None] * len(alphas)
        out, per_call = [], self.frames_per_call
        for start in range(0, len(alphas), per_call):
            stop = min(start + per_call, len(alphas))
            found = {i: self.cache.load("frame", keys[i]) for i in range(start, stop)} if keep else {}
            missing = [i for i in range(start, stop) if found.get(i) is None]
            if missing:
                chunk = [alphas[i] for i in missing]
                k = len(chunk)
                cond = lerp(embeddings[0:1], embeddings[1:2], chunk).reshape(k, *embeddings.shape[1:])
                start_codes = slerp(codes[0:1], codes[1:2], chunk).reshape(k, *codes.shape[1:])
                guidance = torch.tensor([guidances[i] for i in missing])
                evals, clock = self.model.unet_evals, time.perf_counter()
                latents = ddim_sample(self.model, start_codes, cond, uncond, guidance, self.config.sample_steps,
                                      cond_adapter, uncond_adapter, progress=False,
                                      timestep_spacing=self.config.timestep_spacing)
                share = torch.tensor([time.perf_counter() - clock, self.model.unet_evals - evals]) / k
                for j, i in enumerate(missing):
                    found[i] = {"latent": latents[j:j + 1], "cost": share}
                    if keep:  # a CPU copy of its own row (a slice would save the whole batch)
                        self.cache.save("frame", keys[i], {"latent": latents[j:j + 1].cpu().clone(), "cost": share})
            if use_cache:  # render(): what the returned frames cost, loaded ones as recorded
                for i in range(start, stop):
                    self.render_cost.seconds += float(found[i]["cost"][0])
                    self.render_cost.unet_evals += round(float(found[i]["cost"][1]))
            latents = torch.cat([found[i]["latent"].to(self.model.device) for i in range(start, stop)])
            out.append(self.model.decode(latents).cpu())
        return torch.cat(out)

    # ---- stage 9 ---------------------------------------------------------------------------
    def schedule(self) -> Schedule:
        """Stage 9: choose the alphas and render the frames (see :mod:`impus_lite.schedules`)."""
        def compute():
            self.codes()  # train and invert first, so their cost is not counted here
            with self._stage("frames"):
                cache = FrameCache(self._render_with_bar, self.frames_per_call)
                return choose_schedule(self.config, cache, self.lpips)
        return self._once("schedule", compute)

    def _render_with_bar(self, alphas: Sequence[float]) -> torch.Tensor:
        bar = self._values.get("frame_bar")
        if bar is None:
            bar = tqdm(desc="frames rendered", unit="frame", disable=not self.progress, leave=False)
            self._values["frame_bar"] = bar
        frames = self._render(alphas)
        bar.update(len(alphas))
        return frames

    def run(self) -> MorphResult:
        """Run every stage and return the :class:`MorphResult`."""
        steps = [("encode", self.latents), ("text", self.embeddings), ("rank", self.rank),
                 ("lora", self.adapters), ("reinversion", self.codes), ("frames", self.schedule)]
        bar = tqdm(steps, desc="morph", disable=not self.progress)
        for name, call in bar:
            bar.set_postfix_str(name)
            call()
        frame_bar = self._values.pop("frame_bar", None)
        if frame_bar is not None:
            frame_bar.close()
        schedule = self.schedule()
        self._use_precision()
        errors = end_errors(self.images, schedule.frames[[0, -1]], self.reconstructions(), self.lpips)
        return MorphResult(
            frames=tensor_to_pil(schedule.frames), images=schedule.frames, alphas=schedule.alphas,
            distances=schedule.distances, config=self.config, prompt=self.prompt,
            model_name=self.model.name, lpips_trunk=self.lpips.trunk, lora_rank=self.rank(),
            rppd=self._values.get("rppd"), outlier=bool(self._values.get("outlier", False)),
            step=schedule.step, end_errors=errors, stats=dict(self.stats),
            notes=self.notes + list(schedule.notes), label=schedule_label(self.config.schedule),
            ran_with=ran_with(self.model, self.images.shape[-1]))

