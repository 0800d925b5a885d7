"""What every morphing method returns: the frames, their alphas and distances, and the cost of
each stage (seconds, UNet evaluations, peak memory). Also the clock that measures a stage."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from .config import MorphConfig
from .runtime import peak_memory_mb, reset_peak_memory


@dataclass
class StageStats:
    """Cost of one stage: wall-clock seconds, UNet evaluations (latents through the UNet,
    counting each branch of guidance), UNet calls (batches), peak memory in MB (the CUDA
    allocator's peak during the stage on a GPU; the process's peak so far on a CPU, see
    :func:`impus_lite.runtime.peak_memory_mb`), and whether its output came from the cache."""

    seconds: float = 0.0
    unet_evals: int = 0
    unet_calls: int = 0
    peak_memory_mb: float = 0.0
    cached: bool = False


@dataclass
class MorphResult:
    """The frames of a morph and how they were made.

    Attributes:
        frames: K RGB images; ``images`` the same as a tensor (K, 3, S, S) in [-1, 1].
        alphas: K increasing floats from 0 to 1.
        distances: K-1 consecutive LPIPS distances (trunk in ``lpips_trunk``).
        lora_rank, rppd, outlier: the bottleneck chosen (rppd None when the rank was given).
        end_errors: frame 0 against input A and the last frame against input B (LPIPS and PSNR
            in dB, inputs as the model sees them), next to the VAE's own reconstruction of the
            inputs (``vae_*``), the floor no morph can beat (see :func:`perceptual.end_errors`).
        stats: per stage, seconds and UNet evaluations.
        threads: the CPU threads and OpenMP wait policy it ran with
            (:func:`impus_lite.threads.thread_report`, taken when the result is made).
        label: how tables name the morph when the method's name alone would mislead, e.g.
            "impus (reschedule)" or "aid (inverted codes)"; empty: ``config.method``.
        loaded: True when the whole result came from a result cache
            (:func:`impus_lite.cache.cached_result`): its stats, threads and seconds are those of
            the run that computed it, its images that run's frames rounded to 8 bits.
        computed_on: for a loaded result, the machine that computed it
            (:func:`impus_lite.runtime.machine_description`); empty for one computed here.
        ran_with: what the run actually used where the config leaves the choice to the model
            or the machine (:func:`ran_with`): device, weights' dtype, inference autocast,
            image size and the machine; a loaded result keeps its computing run's (empty for
            one cached before this was recorded).
    """

    frames: list
    images: torch.Tensor
    alphas: list[float]
    distances: list[float]
    config: MorphConfig
    prompt: str
    model_name: str
    lpips_trunk: str
    lora_rank: int
    rppd: Optional[float]
    outlier: bool
    step: Optional[float]
    end_errors: dict[str, float] = field(default_factory=dict)
    stats: dict[str, StageStats] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    label: str = ""
    threads: dict = field(default_factory=dict)
    loaded: bool = False
    computed_on: str = ""
    ran_with: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.threads:
            from .threads import thread_report
            self.threads = thread_report()

    @property
    def name(self) -> str:
        """``label``, else the method's name."""
        return self.label or self.config.method

    @property
    def unet_evals(self) -> int:
        return sum(s.unet_evals for s in self.stats.values())

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stats.values())

    def summary(self) -> dict:
        """Everything but the pixels, JSON-serialisable."""
        from . import __version__
        from .perceptual import pdv, ppl_path_sum, smoothness
        return {
            "impus_lite": __version__, "method": self.name, "model": self.model_name, "prompt": self.prompt,
            "config": self.config.to_dict(), "alphas": self.alphas, "distances": self.distances,
            "lpips": f"alex, trunk={self.lpips_trunk}, inputs in [-1, 1]",
            "lpips_step": self.step, "lora_rank": self.lora_rank, "rppd": self.rppd,
            "outlier_pair": self.outlier, "end_errors": self.end_errors,
            "metrics": {"ppl_path_sum": ppl_path_sum(self.distances), "pdv": pdv(self.distances),
                        "smoothness": smoothness(self.distances)},
            "unet_evals": self.unet_evals, "seconds": round(self.seconds, 3),
            "stages": {k: vars(v) for k, v in self.stats.items()}, "notes": self.notes,
            "threads": self.threads, "ran_with": self.ran_with, "loaded_from_result_cache": self.loaded,
            "computed_on": self.computed_on,
        }

    def to_state(self) -> dict:
        """What :meth:`from_state` needs: the frames as a uint8 tensor (K, 3, S, S) in [0, 255]
        (what a saved morph holds) and every other field as one JSON string; loadable with
        ``torch.load(..., weights_only=True)``."""
        import json
        fields = {"alphas": self.alphas, "distances": self.distances, "config": self.config.to_dict(),
                  "prompt": self.prompt, "model_name": self.model_name, "lpips_trunk": self.lpips_trunk,
                  "lora_rank": self.lora_rank, "rppd": self.rppd, "outlier": self.outlier,
                  "step": self.step, "end_errors": self.end_errors, "notes": self.notes,
                  "label": self.label, "threads": self.threads, "ran_with": self.ran_with,
                  "stats": {name: vars(stats) for name, stats in self.stats.items()}}
        pixels = ((self.images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return {"pixels": pixels, "fields": json.dumps(fields)}

    @classmethod
    def from_state(cls, state: dict) -> "MorphResult":
        """The result :meth:`to_state` stored, with ``loaded`` set; images back in [-1, 1]."""
        import json
        from .images import tensor_to_pil
        fields = json.loads(state["fields"])
        images = state["pixels"].float() / 127.5 - 1
        stats = {name: StageStats(**values) for name, values in fields.pop("stats").items()}
        config = MorphConfig(**fields.pop("config"))
        return cls(frames=tensor_to_pil(images), images=images, config=config, stats=stats, loaded=True,
                   computed_on=state.get("machine", ""), **fields)

    def save(self, path: Union[str, Path], fps: float = 8.0) -> Path:
        """Save by extension: .gif / .mp4 (animation), .png (strip), .json (summary)."""
        from . import viz
        return viz.save_result(self, path, fps=fps)

    def save_all(self, out_dir: Union[str, Path], fps: float = 8.0) -> dict[str, Path]:
        """Write morph.gif, morph.mp4, strip.png, frames/frame_XXX.png and morph.json."""
        from . import viz
        return viz.save_all(self, out_dir, fps=fps)


def ran_with(model, size: int) -> dict:
    """What a morph on ``model`` at ``size`` x ``size`` pixels runs with, where its config may
    leave the choice open (``precision`` and ``size`` None: the model's own): ``device``,
    ``dtype`` (the weights'), ``inference_autocast`` (None or "bfloat16"), ``size`` and
    ``machine`` (:func:`impus_lite.runtime.machine_description`). Taken when the result is made."""
    from .models import dtype_name
    from .runtime import machine_description
    autocast = model.inference_autocast
    return {"device": str(model.device), "dtype": dtype_name(model.dtype),
            "inference_autocast": None if autocast is None else dtype_name(autocast),
            "size": int(size), "machine": machine_description(model.device)}


@contextlib.contextmanager
def stage_clock(model, stats: dict, name: str):
    """Add the seconds, UNet evaluations and calls, and peak memory spent inside the ``with``
    block to ``stats[name]`` (a :class:`StageStats`, created if missing); yields it."""
    stage = stats.setdefault(name, StageStats())
    device = model.device
    reset_peak_memory(device)
    evals, calls, start = model.unet_evals, model.unet_calls, time.perf_counter()
    try:
        yield stage
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stage.seconds += time.perf_counter() - start
        stage.peak_memory_mb = max(stage.peak_memory_mb, round(peak_memory_mb(device), 1))
        stage.unet_evals += model.unet_evals - evals
        stage.unet_calls += model.unet_calls - calls
