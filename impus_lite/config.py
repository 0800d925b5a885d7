"""The one configuration of a morph: a frozen dataclass with named presets.

``MorphConfig.preset("paper")`` holds the IMPUS reference defaults (../SPEC: 2,500 text steps,
250 inversion steps, LPIPS step 0.2, ...). ``MorphConfig.preset("fast")`` is this package's
default: far fewer UNet evaluations for the same number of frames. Change a field with
``config.replace(field=value)``; every field is used by :func:`impus_lite.morph.morph`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from .errors import InputError
from .images import RESAMPLERS, RESIZE_MODES

SCHEDULES = ("perceptual", "reschedule", "uniform", "beta")
PRECISIONS = ("fp32", "fp16", "bf16")
AUTOCASTS = ("bf16", "auto")
TIMESTEP_SPACINGS = ("leading", "trailing")
RPPD_PROBES = ("reference", "equation")
LORA_INITS = ("gaussian", "kaiming")
#: The morphing methods, one module each in :mod:`impus_lite.methods`.
METHODS = ("impus", "slerp", "diffmorpher", "wang-golland", "aid", "freemorph")


@dataclass(frozen=True)
class MorphConfig:
    """Settings of a morph. Distances are LPIPS (AlexNet, images in [-1, 1]).

    Attributes:
        method: which morphing method runs (:mod:`impus_lite.methods`): "impus" (this
            package's pipeline), "slerp", "diffmorpher", "wang-golland" or "aid". Each method
            reads the fields it can honour; the result's notes name the ones it ignored.
        method_options: settings of a method other than IMPUS that no field covers (e.g.
            ``{"attention_fraction": 0.6}`` for DiffMorpher), checked by the method; None = its
            published defaults (see each method module's ``Options``).
        size: image side in pixels; None = the model's resolution (512 for SD 1.x).
        resize_mode: "crop" (keep aspect, cut the centre square) or "resize" (stretch, as the
            reference code does).
        resample: "bilinear" (the reference's torchvision Resize) or "lanczos".
        precision: weights precision the model should be loaded in ("fp32", "fp16", "bf16");
            None = the device's default (bf16 on GPUs that support it, else fp16, fp32 on the
            CPU). The CLI, ``evaluate`` and ``bench`` load the model so; :class:`Morpher` notes a
            model loaded otherwise. Training keeps its trainable tensors in fp32 either way.
        autocast: bf16 autocast (``torch.autocast("cpu")``) for IMPUS's inference stages on a CPU
            with fp32 weights (inversion, rPPD probe, re-inversion, frames; the training stages
            stay in fp32): "bf16" always, "auto" only where the CPU computes bf16 natively (AMX
            or AVX512-BF16; elsewhere it is emulated and several times slower), None never. On
            a GPU, ``precision`` already picks half-precision weights and this does nothing.
        timestep_spacing: where the DDIM grids of inversion and sampling lie (diffusers'
            ``timestep_spacing``). "leading" is the reference's: 250-step inversion ends at
            t = 997 but 16-step sampling starts at t = 931, so sampling treats the code as less
            noisy than it is. "trailing" puts the last inversion step and the first sampling
            step both at t = 999, whatever the step counts: the grids meet.
        text_steps, text_lr: per-image text-embedding optimisation (Adam); 0 steps skips it.
        inversion_steps: DDIM inversion steps, before and after LoRA.
        lora_rank: conditional LoRA rank; None = from rPPD (IMPUS's rule); 0 = no LoRA.
        rppd_frames: uniform frames of the un-adapted model that measure rPPD. The rank rule
            is calibrated on IMPUS's 10: with fewer frames each step is longer and rPPD larger.
        rppd_probe: which rPPD the rank rule reads (see :func:`impus_lite.perceptual.rppd_probe`).
            "equation" is the paper's: K uniform frames from alpha 0 to 1 rendered with the
            schedule's guidance, ``sum of K-1 gaps / ((K-1) LPIPS(end0, end1))``. "reference"
            is what the reference code (run_morph.py) computes: image 0's reconstruction at the
            minimum guidance, then K frames at alpha = 1 - k/K (k = 1..K, the first near image 1,
            the last image 0 itself) all at the maximum guidance, K gaps starting from image 0,
            divided by (K-1) times the distance from image 0 at minimum guidance to image 1 at
            maximum guidance. It is larger (about 0.1 on SD) and so raises the rank about fourfold.
        lora_init: how the adapters' A matrices start (B starts at 0 either way). "gaussian"
            draws A from N(0, (1/r)^2) like the reference's diffusers LoRA layers; "kaiming" is
            peft's default Kaiming-uniform, 4-60x smaller at ranks 1-64, so the same steps move
            the model less.
        max_lora_rank: upper bound on the conditional rank; None = the narrowest adapted layer's
            width (a larger rank adds nothing). The reference has none: an rPPD of 3 asks for
            rank 2^48. The result's notes say when the bound applied.
        lora_steps, lora_lr: conditional LoRA training (AdamW; both images each step).
        uncond_lora_rank, uncond_lora_steps, uncond_lora_lr: the separate unconditional
            adapter; rank 0 = none (the unconditional branch then uses the conditional adapter).
        sample_steps: DDIM steps per rendered frame.
        min_guidance, max_guidance: guidance ``w(a) = max - |a - 0.5| * 2 * (max - min)``.
        schedule: "perceptual" (IMPUS's search), "reschedule" (DiffMorpher's, iterated),
            "uniform" or "beta".
        frames: number of frames; None = follows from ``lpips_step`` (perceptual and
            reschedule schedules).
        lpips_step, lpips_tol: target consecutive distance and acceptance tolerance.
        search_candidates: alphas rendered per search round (1 = binary search).
        reschedule_passes: render passes of the "reschedule" schedule (2 = DiffMorpher's;
            later passes reschedule through every frame rendered so far).
        reschedule_damping: how far each reschedule pass stays at the previous alphas (0 =
            DiffMorpher's full step; 0.3 keeps 30% of the previous alphas).
        beta_a, beta_b: the Beta prior of the "beta" schedule.
        max_frames: upper bound on frames from the perceptual search.
        batch_size: frames rendered per UNet call (each frame is two latents, its guidance
            branches); None = :func:`impus_lite.runtime.frames_per_call`: every frame of a
            render pass in one call where the latents are small (the classroom model's 16x16),
            4 where they are not (SD's 64x64). Frames agree to float rounding either way.
        seed: seeds every random draw (text and LoRA training).
    """

    method: str = "impus"
    method_options: Optional[dict] = None
    size: Optional[int] = None
    resize_mode: str = "resize"
    resample: str = "bilinear"
    precision: Optional[str] = "fp32"
    autocast: Optional[str] = None
    timestep_spacing: str = "leading"
    text_steps: int = 2500
    text_lr: float = 2e-3
    inversion_steps: int = 250
    lora_rank: Optional[int] = None
    rppd_frames: int = 10
    rppd_probe: str = "reference"
    lora_init: str = "gaussian"
    max_lora_rank: Optional[int] = None
    lora_steps: int = 150
    lora_lr: float = 1e-3
    uncond_lora_rank: int = 2
    uncond_lora_steps: int = 15
    uncond_lora_lr: float = 1e-3
    sample_steps: int = 16
    min_guidance: float = 1.5
    max_guidance: float = 3.0
    schedule: str = "perceptual"
    frames: Optional[int] = None
    lpips_step: float = 0.2
    lpips_tol: float = 0.01
    search_candidates: int = 1
    reschedule_passes: int = 2
    reschedule_damping: float = 0.0
    beta_a: float = 2.0
    beta_b: float = 2.0
    max_frames: int = 64
    batch_size: Optional[int] = None
    seed: int = 0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise InputError(f"Unknown schedule '{self.schedule}': use one of {', '.join(SCHEDULES)}.")
        for name, allowed in (("method", METHODS), ("resize_mode", RESIZE_MODES), ("resample", RESAMPLERS),
                              ("timestep_spacing", TIMESTEP_SPACINGS), ("rppd_probe", RPPD_PROBES),
                              ("lora_init", LORA_INITS)):
            if getattr(self, name) not in allowed:
                raise InputError(f"Unknown {name} '{getattr(self, name)}': use one of {', '.join(allowed)}.")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise InputError(f"Unknown precision '{self.precision}': use one of {', '.join(PRECISIONS)} or None.")
        if self.autocast is not None and self.autocast not in AUTOCASTS:
            raise InputError(f"Unknown autocast '{self.autocast}': use one of {', '.join(AUTOCASTS)} or None.")
        if self.max_lora_rank is not None and self.max_lora_rank < 1:
            raise InputError(f"max_lora_rank must be >= 1 or None, got {self.max_lora_rank}.")
        if self.frames is not None and self.frames < 2:
            raise InputError(f"A morph needs at least 2 frames, got {self.frames}.")
        if self.frames is None and self.schedule in ("uniform", "beta"):
            raise InputError(f"The '{self.schedule}' schedule needs a frame count (frames=N).")
        if self.lpips_step <= 0:
            raise InputError(f"The LPIPS step must be positive, got {self.lpips_step}.")
        if self.size is not None and self.size < 8:
            raise InputError(f"Image size must be at least 8 pixels, got {self.size}.")
        for name in ("text_steps", "lora_steps", "uncond_lora_steps", "uncond_lora_rank"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("inversion_steps", "sample_steps", "rppd_frames", "search_candidates",
                     "reschedule_passes", "batch_size"):
            if name == "batch_size" and self.batch_size is None:
                continue
            if getattr(self, name) < 1 or (name == "rppd_frames" and self.rppd_frames < 2):
                raise InputError(f"{name} is too small: {getattr(self, name)}.")
        if not 0.0 <= self.reschedule_damping < 1.0:
            raise InputError(f"reschedule_damping must be in [0, 1), got {self.reschedule_damping}.")
        if self.lora_rank is not None and self.lora_rank < 0:
            raise InputError(f"lora_rank must be >= 0 or None, got {self.lora_rank}.")

    @classmethod
    def preset(cls, name: str, **changes) -> "MorphConfig":
        """A named preset ("paper" or "fast") with optional field changes."""
        if name not in PRESETS:
            raise InputError(f"Unknown preset '{name}': use one of {', '.join(PRESETS)}.")
        return dataclasses.replace(PRESETS[name], **changes)

    def replace(self, **changes) -> "MorphConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def guidance(self, alpha: float) -> float:
        """``w(alpha) = max_w - |alpha - 0.5| * 2 * (max_w - min_w)``: min at the ends, max mid-way."""
        return self.max_guidance - abs(alpha - 0.5) * 2 * (self.max_guidance - self.min_guidance)


PRESETS = {
    # The IMPUS reference code (GoL2022/IMPUS run_morph.py) wherever a choice changes the result:
    # stretch to the model's size (bilinear), fp32, leading DDIM grids (inversion ends at t=997,
    # sampling starts at t=931), the code's rPPD probe, Gaussian LoRA initialisation. What it
    # cannot reproduce (random draws, the unbounded rank) is listed in docs/pages/methods.md.
    "paper": MorphConfig(),
    # Fewer, better-used UNet evaluations: 50-step inversion (for speed; the reference code's
    # run_morph.py comments that 250 steps are not clearly better than 50; the results page's
    # "Inversion and sampling on one grid" measures the round trip), 100 text steps at a higher rate, 10 DDIM steps per frame, and alphas from
    # three batched render passes of the reschedule (through every frame rendered, with the
    # fitted distance exponent) instead of a frame-by-frame binary search. Sized so that a
    # morph costs no more UNet evaluations than DiffMorpher's for the same frames (1,290 against
    # 1,300 at 9 frames); ``reschedule_passes=6`` evens out near-step paths further at 280-420
    # more. The rPPD probe keeps 10 frames: the rank rule is calibrated on 10. Measured in the
    # README's "Evaluation, cost and speed" and "IMPUS among its neighbours".
    # It also keeps the aspect ratio (centre crop, Lanczos), runs in the device's half precision
    # on a GPU, puts inversion and sampling on trailing grids that meet at t=999, and reads the
    # paper's rPPD equation.
    "fast": MorphConfig(resize_mode="crop", resample="lanczos", precision=None,
                        timestep_spacing="trailing", rppd_probe="equation", text_steps=100,
                        text_lr=1e-2, inversion_steps=50, lora_steps=100, sample_steps=10,
                        schedule="reschedule", reschedule_passes=3),
}
