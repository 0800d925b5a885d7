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
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .config import MorphConfig
from .models import dtype_name
from .runtime import machine_description, peak_memory_mb, reset_peak_memory

STAGE_ORDER = ("encode", "text", "inversion", "rppd", "lora", "reinversion", "endpoints", "ranking",
               "frames")


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
              "dtype": dtype_name(model.dtype), "size": size,
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


def _stage_rank(stage: str) -> int:
    return STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)


def bench_presets(model, image0, image1, prompt: str, presets: Sequence[str], frames: int,
                  overrides: Optional[dict] = None, progress: bool = True,
                  methods: Sequence[str] = ("impus",), results_dir=None) -> dict:
    """Run ``morph`` once per preset (no stage cache) with ``frames`` frames; return per-stage costs.

    ``results_dir``: a folder of whole results (:func:`impus_lite.cache.cached_result`): a run
    stored there loads with the costs it recorded, ``machine`` names where they were measured
    and ``recorded_in`` the folder; a run not stored is measured here and stored. None
    (default): measure every run.

    ``methods``: IMPUS runs once per preset (columns named by the preset); every other method
    of :mod:`impus_lite.methods` runs once on the first preset with its own settings (columns
    named by the method). Each run starts from the weights' dtype the model came with (a preset
    whose ``precision`` casts the shared model, as ``paper`` does, would otherwise hand the next
    preset its dtype), and the model ends in it.

    Returns a dict with ``machine``, ``model``, and per preset: ``stages`` (stage -> seconds,
    unet_evals), ``total_unet_evals``, ``total_seconds``, ``peak_memory_mb``, ``frames``, the
    path metrics (PDV, PPL, smoothness) of the frames it made, and their end errors against the
    VAE's floor (``end_errors`` and the means ``end_lpips``, ``vae_lpips``, ``end_psnr``, ``vae_psnr``).
    """
    from .evaluation import end_metrics
    from .dispatch import morph
    from .perceptual import load_lpips, pdv, ppl_path_sum, smoothness

    lpips = load_lpips(device=model.device)
    report = {"machine": machine_description(model.device), "model": model.name,
              "dtype": dtype_name(model.dtype), "frames": frames, "presets": {}}
    runs = [(name, name, "impus") for name in presets] if "impus" in methods else []
    runs += [(method, presets[0], method) for method in methods if method != "impus"]
    loaded = model.dtype
    for name, preset, method in runs:
        config = MorphConfig.preset(preset, frames=frames, method=method, **(overrides or {}))
        if model.dtype != loaded:
            model.cast(loaded)
        reset_peak_memory(model.device)
        result = morph(model, image0, image1, prompt, config, lpips=lpips, progress=progress,
                       results_dir=results_dir)
        if result.loaded:
            report["machine"], report["recorded_in"] = result.computed_on, str(results_dir)
        d = result.distances
        report["presets"][name] = {
            "stages": {k: {"seconds": round(v.seconds, 3), "unet_evals": v.unet_evals}
                       for k, v in sorted(result.stats.items(), key=lambda kv: _stage_rank(kv[0]))},
            "total_unet_evals": result.unet_evals, "total_seconds": round(result.seconds, 3),
            "peak_memory_mb": round(max(s.peak_memory_mb for s in result.stats.values()) if result.loaded
                                    else peak_memory_mb(model.device), 1), "frames": len(result.frames),
            "pdv": pdv(d), "ppl_path_sum": ppl_path_sum(d), "smoothness": smoothness(d),
            "lora_rank": result.lora_rank, "lpips_trunk": result.lpips_trunk,
            "end_errors": result.end_errors, **end_metrics(result.end_errors),
        }
    if model.dtype != loaded:
        model.cast(loaded)
    names = list(report["presets"])
    if {"paper", "fast"} <= set(names):
        p, f = report["presets"]["paper"], report["presets"]["fast"]
        report["fast_over_paper_unet_evals"] = f["total_unet_evals"] / p["total_unet_evals"]
    return report


def format_report(report: dict) -> str:
    """The report as a plain-text table: one column per preset, one row per stage."""
    names = list(report["presets"])
    recorded = f" (recorded in {report['recorded_in']})" if report.get("recorded_in") else ""
    lines = [f"machine: {report['machine']}{recorded}", f"model: {report['model']} ({report['dtype']}), "
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
                       ("smoothness", "smoothness"), ("end_lpips", "end LPIPS"), ("vae_lpips", "VAE LPIPS"),
                       ("end_psnr", "end PSNR dB"), ("vae_psnr", "VAE PSNR dB")):
        lines.append(f"{label:<12}" + "".join(f"{report['presets'][n][key]:26.4g}" for n in names))
    if "fast_over_paper_unet_evals" in report:
        lines.append(f"\nfast / paper UNet evaluations: {report['fast_over_paper_unet_evals']:.3f}")
    return "\n".join(lines)


#: The fewest steps that still run every stage once (one text, LoRA and unconditional-LoRA step
#: per image, one-step inversion and sampling, a two-frame rPPD probe, two frames from one pass
#: of the reschedule): the cost and memory of the whole pipeline on a real architecture, in
#: minutes on a CPU. Multiply a stage's cost by its steps in a preset to estimate a full run.
SMOKE_CHANGES = dict(text_steps=1, inversion_steps=1, rppd_frames=2, lora_steps=1, uncond_lora_steps=1,
                     sample_steps=1, frames=2, schedule="reschedule", reschedule_passes=1)


def steps_smoke(model_name: str, image0, image1, prompt: str, dtypes: Sequence[str] = ("fp32", "fp16", "bf16"),
                device: Optional[str] = None, size: Optional[int] = None, preset: str = "fast",
                progress: bool = True) -> dict:
    """Every stage of a morph, with :data:`SMOKE_CHANGES`' handful of steps, once per precision.

    For each dtype the model is loaded in it, the ``preset`` morphs the pair at ``size`` (default:
    the model's resolution) and the frames are exported (GIF, MP4, strip, PNGs, JSON). Returns,
    per dtype, per stage: seconds, UNet evaluations and peak memory in MB (see
    :class:`impus_lite.morph.StageStats`), plus whether the frames are finite, the rank and rPPD.
    """
    import gc

    from .models import load_model
    from .dispatch import morph
    from .perceptual import load_lpips

    report = {"model": model_name, "preset": preset, "runs": {}}
    for dtype in dtypes:
        model = load_model(model_name, device=device, dtype=dtype)
        report["machine"] = machine_description(model.device)
        config = MorphConfig.preset(preset, precision=dtype, **SMOKE_CHANGES, **({"size": size} if size else {}))
        result = morph(model, image0, image1, prompt, config, lpips=load_lpips(device=model.device),
                       progress=progress)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            result.save_all(tmp)
        stages = {k: {"seconds": round(v.seconds, 3), "unet_evals": v.unet_evals,
                      "peak_memory_mb": v.peak_memory_mb} for k, v in result.stats.items()}
        stages["export"] = {"seconds": round(time.perf_counter() - start, 3), "unet_evals": 0,
                            "peak_memory_mb": round(peak_memory_mb(model.device), 1)}
        report["size"] = int(result.images.shape[-1])
        report["runs"][dtype] = {
            "stages": stages, "total_seconds": round(sum(v["seconds"] for v in stages.values()), 3),
            "total_unet_evals": result.unet_evals, "finite": bool(torch.isfinite(result.images).all()),
            "lora_rank": result.lora_rank, "rppd": result.rppd, "notes": result.notes}
        del model, result
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return report


def format_steps_smoke(report: dict) -> str:
    """The :func:`steps_smoke` report as a table: one row per stage, per dtype seconds / UNet
    evaluations / peak MB."""
    names = list(report["runs"])
    lines = [f"machine: {report['machine']}",
             f"model: {report['model']}, {report['size']}x{report['size']}, preset {report['preset']} "
             "with a handful of steps (bench.SMOKE_CHANGES)", ""]
    lines.append(f"{'stage':<12}" + "".join(f"{n + ' s':>11}{n + ' evals':>12}{n + ' MB':>11}" for n in names))
    order = [*STAGE_ORDER, "export"]
    for stage in order:
        if not any(stage in report["runs"][n]["stages"] for n in names):
            continue
        row = f"{stage:<12}"
        for n in names:
            st = report["runs"][n]["stages"].get(stage, {"seconds": 0.0, "unet_evals": 0, "peak_memory_mb": 0.0})
            row += f"{st['seconds']:11.1f}{st['unet_evals']:12d}{st['peak_memory_mb']:11.0f}"
        lines.append(row)
    lines.append(f"{'total':<12}" + "".join(
        f"{report['runs'][n]['total_seconds']:11.1f}{report['runs'][n]['total_unet_evals']:12d}{'':>11}"
        for n in names))
    for n in names:
        run = report["runs"][n]
        lines.append(f"{n}: frames finite {run['finite']}, LoRA rank {run['lora_rank']}"
                     + (f", notes: {'; '.join(run['notes'])}" if run["notes"] else ""))
    return "\n".join(lines)


def gradient_precision(model_name: str, device: Optional[str] = None, dtypes: Sequence[str] = ("fp16", "bf16"),
                       size: Optional[int] = None, lora_rank: int = 4, seeds: Sequence[int] = (0,),
                       prompt: str = "a photo of an animal") -> dict:
    """How closely training through a half-precision UNet reproduces fp32's gradients.

    For each seed (one t and one noise draw of the diffusion loss on a unit-Gaussian latent of
    the model's shape at ``size``), one backward pass gives the gradient of the text embedding
    (IMPUS stage 2) and of the B matrices of a fresh rank-``lora_rank`` adapter (stages 5-6: B
    starts at 0, so at the first step only B has a gradient). Each half dtype is measured
    "unscaled" (the loss back-propagated as it is: this package before it used loss scaling)
    and, for fp16, "scaled" (:func:`impus_lite.precision.loss_scaler`, torch.amp's recipe;
    bf16's recipe is unscaled). Against fp32: cosine similarity, relative error
    ``||g - g32|| / ||g32||`` and the fraction of elements that are zero where fp32's are not
    (underflow), means over the seeds.
    """
    from .lora import add_lora
    from .models import load_model
    from .precision import loss_scaler
    from .text import encode_prompt

    def measure(dtype: str, scaled: bool) -> list[dict[str, torch.Tensor]]:
        model = load_model(model_name, device=device, dtype=dtype)
        side = (size or model.resolution) // model.vae_scale_factor
        latents = torch.randn(1, model.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
        embedding = torch.nn.Parameter(encode_prompt(model, prompt))
        add_lora(model, "gradient-probe", lora_rank, seed=0)
        lora_b = [p for n, p in model.unet.named_parameters() if ".lora_B.gradient-probe." in n]
        for p in lora_b:
            p.requires_grad_(True)
        out = []
        for seed in seeds:
            embedding.grad = None
            for p in lora_b:
                p.grad = None
            scaler = loss_scaler(model) if scaled else torch.amp.GradScaler(model.device.type, enabled=False)
            optimizer = torch.optim.SGD([embedding, *lora_b], lr=0.0)
            with model.using_adapter("gradient-probe"):
                loss = model.diffusion_loss(latents, embedding, torch.Generator().manual_seed(seed))
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            out.append({"embedding": embedding.grad.detach().flatten().double().cpu(),
                        "lora": torch.cat([p.grad.detach().flatten() for p in lora_b]).double().cpu(),
                        "scale": float(scaler.get_scale()) if scaled and scaler.is_enabled() else 1.0})
        report["machine"] = machine_description(model.device)
        report["size"] = side * model.vae_scale_factor
        return out

    def compare(grads, reference) -> dict:
        row = {}
        for key in ("embedding", "lora"):
            cos, rel, zeroed = [], [], []
            for g, r in zip(grads, reference):
                a, b = g[key], r[key]
                cos.append(float(torch.dot(a, b) / (a.norm() * b.norm())))
                rel.append(float((a - b).norm() / b.norm()))
                zeroed.append(float(((a == 0) & (b != 0)).double().mean()))
            row[key] = {"cosine": sum(cos) / len(cos), "relative_error": sum(rel) / len(rel),
                        "zeroed": sum(zeroed) / len(zeroed)}
        row["loss_scale"] = grads[0]["scale"]
        return row

    report = {"model": model_name, "lora_rank": lora_rank, "seeds": list(seeds), "rows": []}
    reference = measure("fp32", scaled=False)
    for dtype in dtypes:
        modes = (False, True) if dtype == "fp16" else (False,)
        for scaled in modes:
            row = compare(measure(dtype, scaled), reference)
            row.update(dtype=dtype, mode="scaled" if scaled else "unscaled")
            report["rows"].append(row)
    return report


def format_gradient_precision(report: dict) -> str:
    """The :func:`gradient_precision` report as a table."""
    lines = [f"machine: {report['machine']}",
             f"model: {report['model']}, {report['size']}x{report['size']}, LoRA rank {report['lora_rank']}, "
             f"seeds {report['seeds']}; against fp32", "",
             f"{'dtype':<6}{'loss scale':>12}{'emb cos':>10}{'emb rel.err':>13}{'emb zeroed':>12}"
             f"{'LoRA cos':>10}{'LoRA rel.err':>14}{'LoRA zeroed':>13}"]
    for row in report["rows"]:
        e, lo = row["embedding"], row["lora"]
        lines.append(f"{row['dtype']:<6}{row['loss_scale']:12.0f}{e['cosine']:10.5f}{e['relative_error']:13.2e}"
                     f"{e['zeroed']:12.2e}{lo['cosine']:10.5f}{lo['relative_error']:14.2e}{lo['zeroed']:13.2e}")
    return "\n".join(lines)


def round_trip_errors(model, images: torch.Tensor, prompts: Sequence[str], inversion_steps: int = 50,
                      sample_steps: int = 12, spacings: Sequence[str] = ("leading", "trailing"),
                      names: Optional[Sequence[str]] = None) -> dict:
    """Latent round-trip error of DDIM inversion then sampling (guidance 1), per timestep grid.

    Args:
        images: (N, 3, S, S) in [-1, 1]; prompts: one per image; names: one per image (default: the prompts).
    Returns:
        per spacing: ``grid_ends`` (last inversion t, first sampling t) and ``mse`` (one per image,
        ``mean((z' - z)^2)`` in the VAE's scaled latent units), and their mean.
    """
    from .inversion import grid_ends, round_trip
    from .text import encode_prompt

    latents = model.encode(images)
    embeddings = torch.cat([encode_prompt(model, p) for p in prompts])
    report = {"machine": machine_description(model.device), "model": model.name,
              "latent_shape": list(latents.shape[1:]), "inversion_steps": inversion_steps,
              "sample_steps": sample_steps, "names": list(names or prompts), "prompts": list(prompts),
              "spacings": {}}
    for spacing in spacings:
        back = round_trip(model, latents, embeddings, inversion_steps, sample_steps, spacing)
        mse = ((back - latents.to(back.device)) ** 2).mean(dim=(1, 2, 3)).cpu().tolist()
        report["spacings"][spacing] = {"grid_ends": list(grid_ends(model, inversion_steps, sample_steps, spacing)),
                                       "mse": mse, "mean_mse": sum(mse) / len(mse)}
    return report


def format_round_trip(report: dict) -> str:
    """The :func:`round_trip_errors` report as a table: one row per image, one column per grid."""
    names = list(report["spacings"])
    lines = [f"machine: {report['machine']}",
             f"model: {report['model']}, latents {report['latent_shape']}, "
             f"{report['inversion_steps']} inversion / {report['sample_steps']} sampling steps, guidance 1", ""]
    lines.append(f"{'image':<40}" + "".join(
        f"{n + ' ' + '/'.join(map(str, report['spacings'][n]['grid_ends'])):>24}" for n in names))
    for i, name in enumerate(report["names"]):
        lines.append(f"{name[:39]:<40}" + "".join(f"{report['spacings'][n]['mse'][i]:24.5f}" for n in names))
    lines.append(f"{'mean':<40}" + "".join(f"{report['spacings'][n]['mean_mse']:24.5f}" for n in names))
    return "\n".join(lines)


def write_report(report: dict, out: Union[str, Path]) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return path
