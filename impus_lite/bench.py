"""Cost of a morph per stage: UNet evaluations, seconds and peak memory, preset against preset.

UNet evaluations (latents through the UNet, each guidance branch counted) are the
machine-independent currency; seconds and memory depend on the machine, which the report names.
Peak memory is the CUDA allocator's peak on a GPU, and the process's peak resident set size on
a CPU (which includes the Python process and the model, and never goes down between runs).

:func:`training_memory` measures, on any device, what dominates a GPU's peak during the
training stages: the weights, and the tensors autograd saves for backward in one training step
(:class:`SavedActivations`). It runs one step, so it works for the full Stable Diffusion 1.5
architecture on a CPU.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .config import MorphConfig

STAGE_ORDER = ("encode", "text", "inversion", "rppd", "lora", "reinversion", "frames")


def machine_description(device: torch.device) -> str:
    """One line naming the machine: GPU name and memory, or CPU model and core count."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}"
    import os
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


class SavedActivations:
    """Bytes of the tensors autograd saves for backward: ``live`` now and ``peak`` at most.

    A context manager over ``torch.autograd.graph.saved_tensors_hooks``: every saved tensor is
    counted when autograd saves it and uncounted when its graph is freed (after backward).
    Tensors saved twice are counted twice, so the figure is an upper bound of what they occupy.
    """

    def __init__(self):
        self.live = self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _SavedTensor.unpack)

    def _pack(self, tensor: torch.Tensor) -> "_SavedTensor":
        return _SavedTensor(self, tensor)

    def __enter__(self) -> "SavedActivations":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


class _SavedTensor:
    def __init__(self, meter: SavedActivations, tensor: torch.Tensor):
        self.meter, self.tensor = meter, tensor
        self.nbytes = tensor.numel() * tensor.element_size()
        meter.live += self.nbytes
        meter.peak = max(meter.peak, meter.live)

    @staticmethod
    def unpack(saved: "_SavedTensor") -> torch.Tensor:
        return saved.tensor

    def __del__(self):
        self.meter.live -= self.nbytes


def training_memory(model, size: Optional[int] = None, lora_rank: int = 16) -> dict:
    """Weights and saved activations of one training step on one image of side ``size``, in MB.

    Returns ``weights_mb`` per component (unet, vae, text_encoder), and the peak bytes autograd
    saves for backward in one text-optimisation step (``text_step_saved_mb``) and one LoRA step
    of rank ``lora_rank`` (``lora_step_saved_mb``). Both stages back-propagate one image at a
    time, so their peak is about weights + saved activations + the gradients flowing back.
    """
    from .lora import add_lora, train_lora
    from .text import encode_prompt, optimize_embedding

    size = size or model.resolution
    f = model.vae_scale_factor
    latents = torch.randn(1, model.unet.config.in_channels, size // f, size // f,
                          generator=torch.Generator().manual_seed(0)).to(model.device, model.dtype)
    embedding = encode_prompt(model, "a photo")
    report = {"machine": machine_description(model.device), "model": model.name,
              "dtype": str(model.dtype).replace("torch.", ""), "size": size,
              "weights_mb": {name: round(sum(p.numel() * p.element_size()
                                             for p in getattr(model, name).parameters()) / 2**20, 3)
                             for name in ("unet", "vae", "text_encoder")}}
    with SavedActivations() as meter:
        optimize_embedding(model, latents, embedding, steps=1, progress=False)
    report["text_step_saved_mb"] = round(meter.peak / 2**20, 3)
    add_lora(model, "memory-probe", lora_rank)
    try:
        with SavedActivations() as meter:
            train_lora(model, "memory-probe", [latents], [embedding], steps=1, progress=False)
    finally:
        model.remove_adapter("memory-probe")
    report["lora_rank"] = lora_rank
    report["lora_step_saved_mb"] = round(meter.peak / 2**20, 3)
    return report


def format_training_memory(report: dict) -> str:
    """The :func:`training_memory` report as text."""
    weights = report["weights_mb"]
    return "\n".join([
        f"machine: {report['machine']}",
        f"model: {report['model']} ({report['dtype']}), {report['size']}x{report['size']} images",
        "weights MB: " + ", ".join(f"{k} {v:.0f}" for k, v in weights.items())
        + f" (total {sum(weights.values()):.0f})",
        f"saved for backward, one text-optimisation step: {report['text_step_saved_mb']:.0f} MB",
        f"saved for backward, one LoRA step (rank {report['lora_rank']}): {report['lora_step_saved_mb']:.0f} MB",
    ])


def bench_presets(model, image0, image1, prompt: str, presets: Sequence[str], frames: int,
                  overrides: Optional[dict] = None, progress: bool = True) -> dict:
    """Run ``morph`` once per preset (no cache) with ``frames`` frames; return per-stage costs.

    Returns a dict with ``machine``, ``model``, and per preset: ``stages`` (stage -> seconds,
    unet_evals), ``total_unet_evals``, ``total_seconds``, ``peak_memory_mb``, ``frames``, and the
    path metrics (PDV, PPL, smoothness) of the frames it made.
    """
    from .morph import morph
    from .perceptual import load_lpips, pdv, ppl_path_sum, smoothness

    lpips = load_lpips(device=model.device)
    report = {"machine": machine_description(model.device), "model": model.name,
              "dtype": str(model.dtype).replace("torch.", ""), "frames": frames, "presets": {}}
    for name in presets:
        config = MorphConfig.preset(name, frames=frames, **(overrides or {}))
        if model.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(model.device)
        result = morph(model, image0, image1, prompt, config, lpips=lpips, progress=progress)
        d = result.distances
        report["presets"][name] = {
            "stages": {k: {"seconds": round(v.seconds, 3), "unet_evals": v.unet_evals}
                       for k, v in sorted(result.stats.items(), key=lambda kv: STAGE_ORDER.index(kv[0]))},
            "total_unet_evals": result.unet_evals, "total_seconds": round(result.seconds, 3),
            "peak_memory_mb": round(_peak_memory_mb(model.device), 1), "frames": len(result.frames),
            "pdv": pdv(d), "ppl_path_sum": ppl_path_sum(d), "smoothness": smoothness(d),
            "lora_rank": result.lora_rank, "lpips_trunk": result.lpips_trunk,
        }
    names = list(report["presets"])
    if {"paper", "fast"} <= set(names):
        p, f = report["presets"]["paper"], report["presets"]["fast"]
        report["fast_over_paper_unet_evals"] = f["total_unet_evals"] / p["total_unet_evals"]
    return report


def format_report(report: dict) -> str:
    """The report as a plain-text table: one column per preset, one row per stage."""
    names = list(report["presets"])
    lines = [f"machine: {report['machine']}", f"model: {report['model']} ({report['dtype']}), "
             f"{report['frames']} frames", ""]
    header = f"{'stage':<12}" + "".join(f"{n + ' s':>12}{n + ' evals':>14}" for n in names)
    lines.append(header)
    for stage in STAGE_ORDER:
        if not any(stage in report["presets"][n]["stages"] for n in names):
            continue
        row = f"{stage:<12}"
        for n in names:
            s = report["presets"][n]["stages"].get(stage, {"seconds": 0.0, "unet_evals": 0})
            row += f"{s['seconds']:12.2f}{s['unet_evals']:14d}"
        lines.append(row)
    lines.append(f"{'total':<12}" + "".join(
        f"{report['presets'][n]['total_seconds']:12.2f}{report['presets'][n]['total_unet_evals']:14d}" for n in names))
    for key, label in (("peak_memory_mb", "peak MB"), ("pdv", "PDV"), ("ppl_path_sum", "PPL sum"),
                       ("smoothness", "smoothness")):
        lines.append(f"{label:<12}" + "".join(f"{report['presets'][n][key]:26.4g}" for n in names))
    if "fast_over_paper_unet_evals" in report:
        lines.append(f"\nfast / paper UNet evaluations: {report['fast_over_paper_unet_evals']:.3f}")
    return "\n".join(lines)


def write_report(report: dict, out: Union[str, Path]) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return path
