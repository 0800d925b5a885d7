"""Evaluating morphs: ablations of IMPUS and the neighbouring methods over a set of pairs, as
tables and plots (notebooks 09 and 10).

For every pair, each :data:`ABLATIONS` row changes one thing in the base config and reports
the path metrics of :mod:`impus_lite.perceptual` on the frames it makes (lower PPL and PDV are
better; smoothness 1 is perfectly even), the number of frames, UNet evaluations and seconds.
Rows share one cache of stage outputs per pair, so a row that only changes the alphas reuses
the trained adapters; its ``unet_evals`` and ``seconds`` then count only what it computed, and
its ``reused_stages`` names the stages it loaded. With ``methods`` each other method of :mod:`impus_lite.methods` adds a row
("full": its own published settings at the same frame count); FID and KID over all pairs come
from :mod:`impus_lite.metrics` when the Inception weights can be had.

The path metrics follow the published conventions on the frames made: ``ppl_path_sum`` and
``pdv`` are DiffMorpher's PPL and PDV (sum and population variance of consecutive LPIPS; its
paper uses 17 frames, ``--frames 17`` reproduces that), ``smoothness`` is AID's 1 - Gini.

Pairs may also come as MorphBench (https://github.com/Kevin-thu/DiffMorpher) lays them out
after download: one folder per pair holding its two images (and, here, an optional
``prompt.txt``); a folder of such folders is a benchmark.

Pairs are given as a folder holding one sub-folder per pair (two images each, and optionally a
``prompt.txt``) or a single pair folder. Under ``accelerate launch`` the pairs are split across
the processes and the main process merges the tables.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .config import MorphConfig
from .errors import InputError
from .images import load_image, open_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_PROMPT = "a photo"

#: name -> changes to the base config (a frame count is always set, so rows compare).
ABLATIONS: dict[str, dict] = {
    "full": {},
    "no_text_opt": {"text_steps": 0},
    "no_lora": {"lora_rank": 0},
    "no_uncond_lora": {"uncond_lora_rank": 0},
    "uniform": {"schedule": "uniform"},
    "searched": {"schedule": "perceptual"},
    "rescheduled": {"schedule": "reschedule"},
    "beta": {"schedule": "beta"},
}
METRICS = ("ppl_path_sum", "pdv", "smoothness")
#: End error of the morph and the VAE's floor, each the mean over the two ends (see
#: :func:`impus_lite.perceptual.end_errors`).
END_METRICS = ("end_lpips", "vae_lpips", "end_psnr", "vae_psnr")


def end_metrics(errors: dict) -> dict:
    """The :data:`END_METRICS` of a result's ``end_errors``: means over ends A and B."""
    def mean(key):
        return (errors[f"{key}_a"] + errors[f"{key}_b"]) / 2
    return {"end_lpips": mean("lpips"), "vae_lpips": mean("vae_lpips"),
            "end_psnr": mean("psnr"), "vae_psnr": mean("vae_psnr")}


@dataclass
class Pair:
    """Two images to morph and the prompt that names what they share."""

    name: str
    image0: Path
    image1: Path
    prompt: str


def find_pairs(root: Union[str, Path], default_prompt: str = DEFAULT_PROMPT) -> list[Pair]:
    """Pairs under ``root``: a folder of pair folders, or one pair folder (sorted by name).

    A pair folder holds exactly two images (sorted by file name: the first is alpha = 0) and
    optionally ``prompt.txt``.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"Pairs folder not found: '{root}'.")
    folders = [root] if _images_in(root) else sorted(p for p in root.iterdir() if p.is_dir())
    pairs = []
    for folder in folders:
        images = _images_in(folder)
        if len(images) != 2:
            raise InputError(f"'{folder}' should hold exactly two images, found {len(images)}.")
        prompt_file = folder / "prompt.txt"
        prompt = prompt_file.read_text().strip() if prompt_file.is_file() else default_prompt
        pairs.append(Pair(folder.name, images[0], images[1], prompt))
    if not pairs:
        raise InputError(f"No image pairs under '{root}'.")
    return pairs


def find_images(root: Union[str, Path]) -> list[tuple[Path, str]]:
    """Every image under ``root`` (recursively, sorted) with its prompt: the ``prompt.txt`` of
    its folder when there is one, else its file name with "_" as spaces ("dog_face.png" ->
    "dog face")."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"Images folder not found: '{root}'.")
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        prompt_file = path.parent / "prompt.txt"
        prompt = prompt_file.read_text().strip() if prompt_file.is_file() else path.stem.replace("_", " ")
        found.append((path, prompt))
    if not found:
        raise InputError(f"No images under '{root}'.")
    return found


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def variants(ablations: Sequence[str], methods: Sequence[str] = ("impus",)) -> list[tuple[str, str]]:
    """The (method, ablation) rows to run: IMPUS once per ablation, every other method once
    with its own settings ("full")."""
    from .config import METHODS

    for name in ablations:
        if name not in ABLATIONS:
            raise InputError(f"Unknown ablation '{name}': use some of {', '.join(ABLATIONS)}.")
    for method in methods:
        if method not in METHODS:
            raise InputError(f"Unknown method '{method}': use some of {', '.join(METHODS)}.")
    rows = [("impus", name) for name in ablations] if "impus" in methods else []
    return rows + [(method, "full") for method in methods if method != "impus"]


def evaluate_pair(model, pair: Pair, base: MorphConfig, ablations: Sequence[str], cache_dir: Optional[Path],
                  lpips=None, progress: bool = True, on_result: Optional[Callable] = None,
                  methods: Sequence[str] = ("impus",)) -> list[dict]:
    """One row per (method, ablation) of :func:`variants` for ``pair``: metrics, frame count,
    UNet evaluations, seconds, and what it ran with (weights' dtype, image size, the machine
    that computed it: :attr:`MorphResult.ran_with`)."""
    from .dispatch import morph
    from .perceptual import pdv, ppl_path_sum, smoothness

    for path in (pair.image0, pair.image1):
        open_rgb(path)
    rows = []
    for method, name in variants(ablations, methods):
        config = base.replace(method=method, **(ABLATIONS[name] if method == "impus" else {}))
        result = morph(model, pair.image0, pair.image1, pair.prompt, config, cache_dir=cache_dir,
                       lpips=lpips, progress=progress)
        d = result.distances
        label = row_label(method, name, comparing=len(methods) > 1, result_label=result.label)
        row = {"pair": pair.name, "label": label, "method": method, "ablation": name, "frames": len(result.frames),
               "ppl_path_sum": ppl_path_sum(d), "pdv": pdv(d), "smoothness": smoothness(d),
               **end_metrics(result.end_errors),
               "unet_evals": result.unet_evals, "seconds": round(result.seconds, 3),
               "reused_stages": " ".join(stage for stage, stats in result.stats.items() if stats.cached),
               "lora_rank": result.lora_rank, "lpips_trunk": result.lpips_trunk,
               "dtype": result.ran_with.get("dtype", ""), "size": result.ran_with.get("size", ""),
               "machine": result.ran_with.get("machine") or result.computed_on}
        rows.append(row)
        if on_result is not None:
            on_result(pair, label, result)
    return rows


#: IMPUS's ablations that change only how the alphas are chosen: compared with other methods,
#: their rows are named by the schedule (``MorphResult.label``, e.g. "impus (search)").
SCHEDULE_ABLATIONS = ("full", "uniform", "searched", "rescheduled", "beta")


def row_label(method: str, ablation: str, comparing: bool, result_label: str = "") -> str:
    """The name of a row in tables, strips and plots. Alone, IMPUS's rows are its ablations'
    names. Compared with other methods, a row is named by its result's label when it has one
    ("impus (reschedule)", "impus (search)", "aid (inverted codes)"), else by its method, and
    IMPUS's other ablations as "impus (no_lora)" and so on."""
    if method != "impus":
        return result_label or method
    if not comparing:
        return ablation
    if ablation in SCHEDULE_ABLATIONS and result_label:
        return result_label
    return "impus" if ablation == "full" else f"impus ({ablation})"


def file_slug(label: str) -> str:
    """A row label as part of a file name: "impus (search)" -> "impus-search"."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", label).strip("-")


def summarise(rows: Sequence[dict]) -> list[dict]:
    """Mean of each metric (and of cost) per method and ablation, IMPUS's ablations first in
    :data:`ABLATIONS` order, then the other methods in the order of the rows."""
    out = []
    order = [("impus", name) for name in ABLATIONS]
    order += list(dict.fromkeys((r.get("method", "impus"), r["ablation"]) for r in rows
                                if r.get("method", "impus") != "impus"))
    for method, name in order:
        group = [r for r in rows if (r.get("method", "impus"), r["ablation"]) == (method, name)]
        if not group:
            continue
        row = {"label": group[0].get("label", row_label(method, name, False)), "method": method,
               "ablation": name, "pairs": len(group)}
        for key in (*METRICS, *END_METRICS, "frames", "unet_evals", "seconds"):
            row[key] = float(np.mean([r[key] for r in group]))
        reused = [r.get("reused_stages", "") for r in group]
        row["reused_stages"] = reused[0] if len(set(reused)) == 1 else "; ".join(reused)
        out.append(row)
    return out


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A GitHub-markdown table of ``rows`` (floats with 4 significant digits)."""
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: Sequence[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        fields = list(dict.fromkeys(key for row in rows for key in row))  # every row's keys, in order
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_summary(summary: Sequence[dict], path: Path) -> Path:
    """Bar charts of PPL, PDV (on a log axis: it spans orders of magnitude), smoothness and
    UNet evaluations per row: IMPUS's ablations by name, the other methods by theirs (PNG).
    The evaluations are those a row computed; stages it loaded from the cache (an earlier row's,
    see ``reused_stages``) are not counted, and the panel's title says so.

    Draws on a bare ``matplotlib.figure.Figure``: no pyplot state or backend is touched.
    """
    from matplotlib.figure import Figure

    keys = (*METRICS, "unet_evals")
    titles = {"pdv": "pdv (log axis)",
              "unet_evals": "UNet evaluations computed by the row\n(stages loaded from the cache not counted)"}
    fig = Figure(figsize=(4 * len(keys), 3.4))
    axes = fig.subplots(1, len(keys))
    comparing = len({r.get("method", "impus") for r in summary}) > 1
    names = [r.get("label") or row_label(r.get("method", "impus"), r["ablation"], comparing) for r in summary]
    for ax, key in zip(axes, keys):
        ax.bar(range(len(names)), [r[key] for r in summary], color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
        ax.set_title(titles.get(key, key), fontsize=9)
        if key == "pdv" and all(r[key] > 0 for r in summary):
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def frame_realism(frames: dict[str, list], inputs: torch.Tensor,
                  weights: str = "auto") -> tuple[dict[str, dict], str]:
    """FID and KID (:mod:`impus_lite.metrics.fid`, torchmetrics' Inception) of each row's
    frames (all pairs together) against all the input images, and a one-sentence note: the
    sample sizes (tens of images, where FID is usually quoted on 10,000 or more, so only the
    ranking of rows means much), or why nothing was computed.

    Args:
        frames: row name -> frames (K, 3, H, W) in [-1, 1] of each pair.
        inputs: (2P, 3, H, W) in [-1, 1], both inputs of every pair.
        weights: "auto" (the real Inception weights; downloads on first use) or "random".
    """
    from .errors import ModelLoadError
    from .metrics import inception
    from .metrics import fid as fid_of
    from .metrics import kid as kid_of

    try:
        network = inception(weights)
    except ModelLoadError as error:
        return {}, str(error)
    out = {}
    for name, images in frames.items():
        fake = torch.cat(images)
        kid_mean, _ = kid_of(inputs, fake, network, subset_size=min(len(inputs), len(fake)))
        out[name] = {"fid": fid_of(inputs, fake, network), "kid": kid_mean}
    per_row = len(torch.cat(next(iter(frames.values())))) if frames else 0
    sizes = f"{len(inputs)} inputs, {per_row} frames per row"
    return out, (f"FID and KID of each row's frames against the inputs ({sizes}; "
                 f"{'random' if weights == 'random' else 'Inception'} weights): far below the "
                 "thousands of images FID is meant for, so compare rows, not papers.")


def data_realism(frames: dict[str, list], references: Optional[torch.Tensor], lpips,
                 k: int = 3) -> tuple[dict[str, dict], str]:
    """Realism against a model's training images, with the perceptual trunk: for each row, the
    mean over all its frames of the LPIPS to the nearest training image
    (:func:`impus_lite.perceptual.lpips_to_data`) and the k-NN precision of its frames against the
    training set in the trunk's features (:func:`impus_lite.perceptual.knn_precision`, k = 3).

    Args:
        frames: row name -> frames (K, 3, H, W) in [-1, 1] of each pair.
        references: (N, 3, h, w) in [-1, 1], the training images; None: nothing is computed.
        lpips: an :class:`impus_lite.perceptual.Lpips`.
    Returns:
        row name -> {"lpips_to_data", "knn_precision"}, and a one-sentence note.
    """
    from .perceptual import knn_precision, lpips_to_data

    if references is None:
        return {}, ""
    real = lpips.features(references)
    out = {}
    for name, images in frames.items():
        fake = torch.cat(images).float().cpu()
        out[name] = {"lpips_to_data": float(lpips_to_data(fake, references, lpips)[0].mean()),
                     "knn_precision": knn_precision(real, lpips.features(fake), k)[0]}
    return out, (f"lpips_to_data: mean LPIPS of each frame to its nearest of {len(references)} "
                 f"training images; knn_precision: share of frames inside the training set's "
                 f"{k}-NN balls in LPIPS-AlexNet features (Kynkaanniemi et al. 2019).")


def training_references(model_name: str, size: int) -> tuple[Optional[torch.Tensor], str]:
    """The training images a model's realism is measured against, (N, 3, size, size) in [-1, 1]:
    the classroom model's emoji (rebuilt from the Noto Color Emoji font), else None and why."""
    if model_name != "classroom":
        return None, ""
    from .classroom import build_emoji_dataset
    try:
        pixels = build_emoji_dataset(progress=False).pixels()
    except FileNotFoundError as error:
        return None, f"No distance to the training data: {error}"
    if pixels.shape[-1] != size:
        pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    return pixels, ""


def run_evaluation(model_name: str, pairs_root: Union[str, Path], out_dir: Union[str, Path],
                   base: MorphConfig, ablations: Sequence[str] = tuple(ABLATIONS),
                   device: Optional[str] = None, dtype: Optional[str] = None,
                   progress: bool = True, methods: Sequence[str] = ("impus",),
                   inception_weights: str = "auto",
                   references: Optional[torch.Tensor] = None) -> Optional[dict]:
    """Evaluate every pair under ``pairs_root`` and write the tables and plots to ``out_dir``.

    Writes ``results.csv`` (a row per pair and ablation), ``summary.csv``, ``summary.md``,
    ``summary.png``, ``results.json``, each row's strip in ``strips/<pair>-<row>.png`` and all
    of them, one under another and labelled, in ``strips.png`` (``strips-<rank>.png`` per
    process under ``accelerate``). Under ``accelerate launch`` each process takes every
    n-th pair and writes ``parts/results-<rank>.json``; the main process merges them. Returns
    the merged results on the main process (None on the others).

    ``methods``: the methods compared (:func:`variants`). In one process, each row's FID and KID
    of all its frames against all the inputs (:func:`frame_realism`) join the summary when the
    Inception weights can be had (``inception_weights``: "auto" or "random" for tests);
    otherwise the summary says in one sentence why they are missing. Likewise each row's LPIPS
    to the nearest training image and k-NN precision (:func:`data_realism`) against
    ``references`` (N, 3, h, w) in [-1, 1], by default the classroom model's emoji when the
    model is "classroom" and their font is installed.
    """
    from accelerate import PartialState

    from .cache import atomic_write_bytes
    from .models import load_model
    from .perceptual import load_lpips
    from .viz import png_bytes, stack_strips, strip

    if base.frames is None:
        raise InputError("Evaluation compares rows at one frame count: set frames=N.")
    # accelerate picks gloo for CPU processes only when told the run is on the CPU.
    on_cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    state = PartialState(cpu=on_cpu)
    out = Path(out_dir)
    pairs = find_pairs(pairs_root)
    mine = pairs[state.process_index::state.num_processes]
    model = load_model(model_name, device=device or str(state.device), dtype=dtype or base.precision)
    lpips = load_lpips(device=model.device)
    rows = []
    frames: dict[str, list] = {}
    inputs = []
    labelled = []
    for pair in mine:
        strips = {}
        rows += evaluate_pair(model, pair, base, ablations, out / "cache" / pair.name, lpips, progress,
                              on_result=lambda p, name, r: strips.__setitem__(name, r),
                              methods=methods)
        for name, result in strips.items():
            image = strip(result.frames, result.alphas)   # drawn once: saved, then stacked
            atomic_write_bytes(out / "strips" / f"{pair.name}-{file_slug(name)}.png", png_bytes(image))
            frames.setdefault(name, []).append(result.images)
            labelled.append((f"{pair.name}\n{name}", image))
        size = next(iter(strips.values())).images.shape[-1]
        inputs.append(torch.cat([load_image(path, size, base.resize_mode, base.resample)
                                 for path in (pair.image0, pair.image1)]))
    if labelled:
        name = "strips.png" if state.num_processes == 1 else f"strips-{state.process_index}.png"
        stack_strips(labelled).save(out / name)
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    (parts / f"results-{state.process_index}.json").write_text(json.dumps(rows))
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    merged = []
    for k in range(state.num_processes):
        merged += json.loads((parts / f"results-{k}.json").read_text())
    summary = summarise(merged)
    realism_note = ""
    if state.num_processes == 1:
        realism, realism_note = frame_realism(frames, torch.cat(inputs), inception_weights)
        if references is None and frames:
            references, data_note = training_references(model_name, next(iter(frames.values()))[0].shape[-1])
        else:
            data_note = ""
        to_data, to_data_note = data_realism(frames, references, lpips)
        realism_note = " ".join(n for n in (realism_note, to_data_note, data_note) if n)
        for row in summary:  # frames are keyed by the rows' labels, as the strips are
            row.update(realism.get(row["label"], {}))
            row.update(to_data.get(row["label"], {}))
    else:
        realism_note = "FID, KID and the realism against the training data are computed in a single process only."
    write_csv(merged, out / "results.csv")
    write_csv(summary, out / "summary.csv")
    columns = ("label", "method", "ablation", "pairs", "frames", *METRICS, *END_METRICS, "unet_evals", "seconds")
    columns += tuple(k for k in ("fid", "kid", "lpips_to_data", "knn_precision") if any(k in r for r in summary))
    reuse_note = ""
    if any(r.get("reused_stages") for r in summary):
        columns += ("reused_stages",)
        reuse_note = (" unet_evals and seconds count what a row computed: the stages in reused_stages "
                      "came from the pair's cache (an earlier row, or an earlier run), at no cost here.")
    trunk = merged[0]["lpips_trunk"] if merged else "?"
    ran = sorted({f"{r['dtype']} weights, {r['size']}x{r['size']} pixels, on {r['machine']}" for r in merged
                  if r.get("machine")})
    ran_note = f" Seconds measured with {'; '.join(ran)}." if ran else ""
    (out / "summary.md").write_text(
        f"Model `{model_name}`, LPIPS AlexNet ({trunk} trunk), images in [-1, 1]; "
        f"means over {len(pairs)} pairs. ppl_path_sum and pdv: DiffMorpher's PPL and PDV on these "
        f"{base.frames} frames (its paper: 17); smoothness: AID's 1 - Gini.{reuse_note}{ran_note} {realism_note}\n\n"
        + markdown_table(summary, columns) + "\n")
    plot_summary(summary, out / "summary.png")
    results = {"model": model_name, "config": base.to_dict(), "rows": merged, "summary": summary}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results
