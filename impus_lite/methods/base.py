"""What the methods other than IMPUS share: reading the inputs as the model sees them, their
options, the notes on settings they ignore, the frame schedule and the result."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from ..cache import StageCache
from ..config import MorphConfig
from ..errors import InputError
from ..images import ImageLike, load_image, tensor_digest, tensor_to_pil
from ..models import DiffusionModel, dtype_name, run_dtype
from ..perceptual import Lpips, end_errors, load_lpips
from ..result import MorphResult, StageStats, ran_with, stage_clock
from ..runtime import frames_per_call
from ..schedules import Schedule
from ..text import check_prompt

#: Fields every method honours.
COMMON_FIELDS = frozenset({"method", "method_options", "size", "resize_mode", "resample",
                           "precision", "seed", "batch_size"})


def parse_options(options_class, method: str, given: Optional[dict]):
    """``options_class`` (a dataclass of a method's defaults) updated with ``given``; an
    unknown key raises one sentence naming the known ones."""
    given = dict(given or {})
    known = {f.name for f in dataclasses.fields(options_class)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise InputError(f"Method '{method}' has no option {', '.join(unknown)}: its options are "
                         f"{', '.join(sorted(known))}.")
    return options_class(**given)


def ignored_fields(config: MorphConfig, uses: Sequence[str]) -> list[str]:
    """Fields of ``config`` set away from the ``fast`` preset that a method does not read."""
    reference = MorphConfig.preset("fast")
    read = COMMON_FIELDS | set(uses)
    return [f.name for f in dataclasses.fields(config)
            if f.name not in read and getattr(config, f.name) != getattr(reference, f.name)]


@dataclass
class MethodRun:
    """One pair being morphed by a method: the inputs as the model sees them, the stage costs,
    the cache and the notes. Methods add stages with ``with run.stage("name"):``.

    Attributes:
        images: (2, 3, S, S) in [-1, 1], the two inputs cropped or resized to the model's size.
        stats: per stage, a :class:`StageStats`.
    """

    model: DiffusionModel
    images: torch.Tensor
    prompt: str
    config: MorphConfig
    cache: StageCache
    lpips: Lpips
    progress: bool
    digests: list[str]
    stats: dict[str, StageStats] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def stage(self, name: str):
        """Context manager adding the time, UNet evaluations and memory of a block to ``name``."""
        return stage_clock(self.model, self.stats, name)

    @property
    def frames_per_call(self) -> int:
        """Frames per UNet call: ``config.batch_size``, or when it is None
        :func:`impus_lite.runtime.frames_per_call` for the latents of these images."""
        side = self.images.shape[-1] // self.model.vae_scale_factor
        return frames_per_call(self.config.batch_size, side, self.config.max_frames)

    def latents(self) -> torch.Tensor:
        """VAE latents (2, C, S/f, S/f) of both images (stage "encode")."""
        with self.stage("encode"):
            return self.model.encode(self.images)

    def inverted_codes(self, latents: torch.Tensor, embeddings: torch.Tensor, steps: int,
                       prompts: Sequence[str], adapters: Sequence[Optional[str]] = (None, None),
                       extra_keys: Sequence[Optional[dict]] = (None, None)) -> torch.Tensor:
        """Stage "inversion": DDIM codes (2, C, h, w) of the two latents (2, C, h, w) with their
        embeddings (2, L, D), guidance 1, ``steps`` steps on ``config.timestep_spacing``'s grid,
        image i through LoRA adapter ``adapters[i]`` (None: the base model).

        Cached per image by its content, the model and its dtype, ``prompts[i]``, the steps and
        the grid (plus ``extra_keys[i]``, e.g. the adapter's own key), so methods that invert
        the same image with the same plain prompt share the codes. ``cached`` is set when both
        came from the cache."""
        from ..cache import stage_key
        from ..inversion import ddim_invert

        codes, hits = [], 0
        with self.stage("inversion") as stats:
            for i in range(2):
                parts = dict(image=self.digests[i], steps=steps, spacing=self.config.timestep_spacing,
                             model=self.model.fingerprint, dtype=str(self.model.dtype),
                             prompt=prompts[i], text="prompt", **(extra_keys[i] or {}))
                key = stage_key("inversion", **parts)
                cached = self.cache.load("inversion", key)
                if cached is None:
                    code = ddim_invert(self.model, latents[i:i + 1], embeddings[i:i + 1], steps,
                                       adapter=adapters[i], progress=self.progress,
                                       desc=f"inversion {i}",
                                       timestep_spacing=self.config.timestep_spacing)
                    cached = {"code": code.cpu()}
                    self.cache.save("inversion", key, cached)
                else:
                    hits += 1
                codes.append(cached["code"].to(self.model.device))
            stats.cached = hits == 2
        return torch.cat(codes)

    def finish(self, schedule: Schedule, lora_rank: int = 0, step: Optional[float] = None) -> MorphResult:
        """The :class:`MorphResult` of the chosen frames, with the end errors against the inputs
        and against the VAE's reconstruction of them."""
        with torch.no_grad():
            recon = self.model.decode(self.model.encode(self.images)).cpu()
        errors = end_errors(self.images, schedule.frames[[0, -1]], recon, self.lpips)
        return MorphResult(
            frames=tensor_to_pil(schedule.frames), images=schedule.frames, alphas=schedule.alphas,
            distances=schedule.distances, config=self.config, prompt=self.prompt,
            model_name=self.model.name, lpips_trunk=self.lpips.trunk, lora_rank=lora_rank,
            rppd=None, outlier=False, step=step if step is not None else schedule.step,
            end_errors=errors, stats=dict(self.stats), notes=self.notes + list(schedule.notes),
            ran_with=ran_with(self.model, self.images.shape[-1]))


def start_run(method: str, uses: Sequence[str], model: DiffusionModel, image0: ImageLike,
              image1: ImageLike, prompt: str, config: MorphConfig,
              cache_dir: Union[str, Path, None] = None, lpips: Optional[Lpips] = None,
              progress: bool = True) -> MethodRun:
    """Check the prompt and size, read both images as :class:`impus_lite.morph.Morpher` does,
    cast the model to ``config.precision`` and note the fields ``method`` ignores."""
    check_prompt(model, prompt)
    size = config.size or model.resolution
    if size % model.vae_scale_factor:
        raise InputError(f"Image size {size} is not a multiple of the VAE factor {model.vae_scale_factor}.")
    images = torch.cat([load_image(image, size, config.resize_mode, config.resample)
                        for image in (image0, image1)])
    model.remove_adapters()
    model.inference_autocast = None   # config.autocast is IMPUS's (the methods' notes name it if set)
    notes = []
    wanted = run_dtype(model, config.precision)
    if wanted != model.dtype:
        before = dtype_name(model.dtype)
        model.cast(wanted)
        notes.append(f"weights cast from {before} to {config.precision} (config.precision)")
    ignored = ignored_fields(config, uses)
    if ignored:
        notes.append(f"{method} does not use {', '.join(ignored)} (set in the config; its own "
                     "steps, ranks and rates are method_options, see its Options)")
    return MethodRun(model=model, images=images, prompt=prompt, config=config,
                     cache=StageCache(cache_dir), lpips=lpips or load_lpips(device=model.device),
                     progress=progress, digests=[tensor_digest(images[i]) for i in range(2)],
                     notes=notes)


def frame_schedule(run: MethodRun, render: Callable[[Sequence[float]], torch.Tensor]) -> Schedule:
    """The alphas ``run.config.schedule`` picks, rendering frames (K, 3, S, S) in [-1, 1] with
    ``render(alphas)`` in batches of :attr:`MethodRun.frames_per_call`, timed as stage "frames"."""
    from ..schedules import FrameCache, choose_schedule

    with run.stage("frames"):
        cache = FrameCache(render, run.frames_per_call)
        return choose_schedule(run.config, cache, run.lpips)
