"""What a notebook or script needs to know about where it runs: smoke mode, the device, the data.

Smoke mode: the environment variable ``IMPUS_LITE_SMOKE=1`` asks every notebook to shrink its
work (tiny or classroom model, few steps, few frames) so that the whole set executes on two CPU
cores in CI. Without it a notebook does the real thing on the GPU it finds.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Optional

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
REPO_URL = "https://github.com/impus-lite/impus_lite"


def is_smoke() -> bool:
    """True when ``IMPUS_LITE_SMOKE`` is set to 1/true/yes (case-insensitive)."""
    return os.environ.get("IMPUS_LITE_SMOKE", "").strip().lower() in ("1", "true", "yes")


def data_path(*parts: str) -> Path:
    """Path of a file shipped in the repository's ``data/`` folder, e.g. ``data_path("pairs")``."""
    return DATA_DIR.joinpath(*parts)


def colab_badge(notebook: str) -> str:
    """Markdown of the 'Open in Colab' badge for ``notebooks/<notebook>``."""
    slug = REPO_URL.replace("https://github.com/", "")
    return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"(https://colab.research.google.com/github/{slug}/blob/main/notebooks/{notebook})")


def gpu_report() -> str:
    """One line on the accelerator found and what that means for the notebooks."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return (f"GPU: {props.name} with {props.total_memory / 2**30:.1f} GiB; Stable Diffusion "
                "morphs run here.")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "Apple GPU (MPS) found; Stable Diffusion runs, slowly; the classroom model is quick."
    from .threads import planned_thread_line
    return ("No GPU: the notebooks use the small classroom model (in full and in smoke mode); for "
            "Stable Diffusion open them on Colab with a GPU runtime.\n" + planned_thread_line(small_model=True))


#: Environment variable that overrides the model every notebook loads (see notebook_model_name).
MODEL_ENV = "IMPUS_LITE_MODEL"
#: Short names IMPUS_LITE_MODEL accepts besides load_model's names, a hub id or a folder.
MODEL_SHORT_NAMES = ("sd15",)


def notebook_model_name() -> str:
    """The model a notebook should load here.

    ``IMPUS_LITE_MODEL`` decides when set: ``classroom``, ``tiny``, ``sd15`` (Stable Diffusion
    1.5), any other built-in name of :func:`impus_lite.load_model`, a hub id or a folder; e.g.
    ``%env IMPUS_LITE_MODEL=classroom`` keeps a Colab GPU session on the classroom model (fast,
    and the lessons' measured numbers are on it). Otherwise, smoke mode: the classroom model
    when it ships in data/classroom, else the tiny random one; full mode: Stable Diffusion 1.5
    on a CUDA GPU, the classroom model (or tiny) on a CPU.
    """
    from .models import DEFAULT_MODEL

    chosen = os.environ.get(MODEL_ENV, "").strip()
    if chosen:
        return DEFAULT_MODEL if chosen.lower() == "sd15" else chosen
    classroom = (DATA_DIR / "classroom" / "model_index.json").is_file()
    if not is_smoke() and torch.cuda.is_available():
        return DEFAULT_MODEL
    return "classroom" if classroom else "tiny"


@contextlib.contextmanager
def one_torch_thread():
    """Run torch on one CPU thread inside the block, then restore the setting.

    For small problems (2D toy models, small optimal-transport solves): they gain nothing from
    more threads, and on a busy machine extra threads slow them down many times over.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def cpu_model_name() -> str:
    """The CPU's model name ("model name" in /proc/cpuinfo; elsewhere what platform reports)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16_units() -> list[str]:
    """The units of this CPU that compute bf16 matrix products natively, "AMX" (tiles) and
    "AVX512-BF16", as torch's own CPU feature checks report them; empty where they are missing."""
    checks = (("_is_amx_tile_supported", "AMX"), ("_is_avx512_bf16_supported", "AVX512-BF16"))
    return [label for name, label in checks if getattr(torch.cpu, name, lambda: False)()]


def cpu_kernels() -> str:
    """What torch computes with on this CPU: the vector kernels ATen dispatches to ("AVX512",
    "AVX2", ...; ``ATEN_CPU_CAPABILITY`` can lower them) and the native bf16 units
    (:func:`native_bf16_units`), e.g. "AVX512 kernels, AVX512-BF16"."""
    return ", ".join([f"{torch.backends.cpu.get_cpu_capability()} kernels", *native_bf16_units()])


def machine_description(device: torch.device) -> str:
    """One line naming the machine: GPU name and memory, or CPU model, core count and the
    kernels torch runs there (:func:`cpu_kernels`)."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}"
    if device.type == "mps":
        return f"Apple GPU (MPS) beside CPU {cpu_model_name()}, torch {torch.__version__}"
    threads = torch.get_num_threads()
    return (f"CPU {cpu_model_name()} ({cpu_kernels()}), {os.cpu_count()} cores, "
            f"{threads} torch thread{'s' if threads != 1 else ''}, torch {torch.__version__}")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for :func:`peak_memory_mb` (CUDA only; a CPU process's peak never resets)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MB: the CUDA allocator's peak since :func:`reset_peak_memory` on a GPU, the
    process's peak resident set size on a CPU (which includes Python and the model, and never
    goes down)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


#: Latents of at most this many cells per channel are trained on together, all images of a
#: step in one batched UNet call (the classroom model's 16x16: about a third faster on a CPU);
#: larger ones, one image per backward pass (SD's 64x64: the activations of one image at a time).
BATCHED_TRAINING_CELLS = 32 * 32


#: Frames per UNet call for large latents when ``MorphConfig.batch_size`` is None: 4 frames,
#: 8 latents with both guidance branches (SD's 64x64, sized for a 16 GB T4).
LARGE_LATENT_FRAMES_PER_CALL = 4


def frames_per_call(batch_size: Optional[int], latent_side: int, max_frames: int = 64) -> int:
    """How many frames one UNet call renders: ``batch_size`` when set; otherwise, for latents of
    at most :data:`BATCHED_TRAINING_CELLS` cells (``latent_side`` squared: the classroom model's
    16x16), every frame one render asks for, up to ``max_frames``, and
    :data:`LARGE_LATENT_FRAMES_PER_CALL` for larger ones.

    Small latents on a CPU cost less per latent in larger batches (the classroom UNet: 11 ms
    per latent at batch 2, 7.4 ms at batch 8 and more, one thread of a 2-core EPYC), so the
    README morph's first render pass of 9 frames runs as one call of 18 latents instead of
    4 + 4 + 1 frames. Frames agree with the smaller batches' to float rounding.
    """
    if batch_size is not None:
        return int(batch_size)
    if latent_side * latent_side <= BATCHED_TRAINING_CELLS:
        return max(1, int(max_frames))
    return LARGE_LATENT_FRAMES_PER_CALL


def trains_images_together(latents: torch.Tensor) -> bool:
    """Whether the images of ``latents`` (B, C, h, w) go through one batched backward pass
    (h * w at most :data:`BATCHED_TRAINING_CELLS`) rather than one pass each."""
    return latents.shape[-2] * latents.shape[-1] <= BATCHED_TRAINING_CELLS
