"""Loading a Stable-Diffusion-shaped model, by hub id, local folder or built-in name.

Three kinds of name are understood by :func:`load_model`:

* a Hugging Face hub id of any SD 1.x / 2.x model (default :data:`DEFAULT_MODEL`), downloaded
  once into the Hugging Face cache;
* a local folder written by ``StableDiffusionPipeline.save_pretrained``;
* ``"tiny"``: a random model of the SD layout built in code (for tests and smoke runs),
  ``"classroom"``: the small emoji model shipped in ``data/classroom``, and ``"sd15-random"`` /
  ``"sd21-random"``: the exact Stable Diffusion 1.5 (512 px) / 2.1 (768 px, v-prediction,
  1024-wide text encoder) architectures with random weights (benchmarks without a download;
  about 4 / 5 GB written to the cache on first use).

Every one of them goes through ``StableDiffusionPipeline.from_pretrained``: tests exercise the
same loading code users run. Latents follow the SD convention ``z = vae.encode(x).mean *
scaling_factor`` with images ``x`` in [-1, 1].
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch

from .errors import InputError, ModelLoadError
from .workers import MIN_ROWS_PER_WORKER, free_workers, map_chunks, useful_workers

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
BUILTIN_MODELS = ("tiny", "classroom", "sd15-random", "sd21-random")
#: Built-in random models of real architectures: name -> ``architectures/<file>.json``.
RANDOM_ARCHITECTURES = {"sd15-random": "sd15", "sd21-random": "sd21"}
ARCHITECTURES_DIR = Path(__file__).resolve().parent / "architectures"
REPO_ROOT = Path(__file__).resolve().parent.parent
CLASSROOM_DIR = REPO_ROOT / "data" / "classroom"
TINY_VERSION = "3"

#: The SD 1.x noise schedule (scaled-linear betas, 1000 steps), shared by the built-in models.
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def impus_cache_dir() -> Path:
    """Folder for built models and downloads of impus_lite (``$IMPUS_LITE_CACHE`` or ~/.cache)."""
    root = os.environ.get("IMPUS_LITE_CACHE") or Path.home() / ".cache" / "impus_lite"
    return Path(root)


def pick_device(device: Union[str, torch.device, None] = None) -> torch.device:
    """The device to run on: the one asked for, else CUDA, else Apple MPS, else the CPU.

    Raises:
        InputError: ``device`` is no device name torch knows, or one this machine does not have.
    """
    if device is not None:
        try:
            chosen = torch.device(device)
        except (RuntimeError, ValueError, TypeError):
            raise InputError(f"Unknown device '{device}': use cpu, cuda, cuda:N or mps.") from None
        if (chosen.type == "cuda" and not torch.cuda.is_available()) or \
                (chosen.type == "mps" and not _mps_available()):
            raise InputError(f"Device '{device}' is not available here: torch sees no {chosen.type.upper()} "
                             "device (use cpu, or leave the device out to take the best one found).")
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


#: ``DiffusionModel._active_adapter`` after a mixed batch: adapters enabled, none switched on alone.
PER_ROW = "<per row>"


DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as reports and notes write it: "float32", "bfloat16" (``str`` without "torch.")."""
    return str(dtype).replace("torch.", "")


def pick_dtype(device: torch.device, dtype: Union[str, torch.dtype, None] = None) -> torch.dtype:
    """The weights precision: ``dtype`` when given, else the device's half precision.

    On CUDA: bf16 where the GPU computes it natively (compute capability 8 and up: A100, H100,
    L4, RTX 30xx and later), fp16 on older GPUs (T4, V100), whose bf16 is emulated. fp32 on the
    CPU and elsewhere. Training keeps its trainable tensors in fp32 whatever this returns
    (see :mod:`impus_lite.precision`).
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelLoadError(f"Unknown dtype '{dtype}': use fp32, fp16 or bf16.")
        dtype = DTYPES[dtype]
    if dtype is not None:
        return dtype
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    return torch.float32


def run_dtype(model: "DiffusionModel", precision: Optional[str]) -> torch.dtype:
    """The weights' dtype a morph runs in: ``model.dtype`` when ``precision`` is None (the
    config leaves it to the loaded model), else :func:`pick_dtype` of ``precision``."""
    return model.dtype if precision is None else pick_dtype(model.device, precision)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AMX tiles or AVX512-BF16), as
    torch's own CPU feature checks report (:func:`impus_lite.runtime.native_bf16_units`)."""
    from .runtime import native_bf16_units
    return bool(native_bf16_units())


def autocast_dtype(device: torch.device, setting: Optional[str]) -> Optional[torch.dtype]:
    """The dtype inference stages autocast to for ``MorphConfig.autocast`` = ``setting`` on
    ``device``: bf16 on a CPU for "bf16", and for "auto" where :func:`cpu_has_native_bf16`;
    None otherwise (and always on a GPU, whose weights ``precision`` already makes half)."""
    if setting is None or device.type != "cpu":
        return None
    if setting == "auto" and not cpu_has_native_bf16():
        return None
    return torch.bfloat16


# --------------------------------------------------------------------------------------------
# Tokenizer files for the built-in models
# --------------------------------------------------------------------------------------------

def _byte_symbols() -> list[str]:
    """The 256 printable symbols CLIP's byte-level BPE uses for the 256 byte values."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
                 + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_clip_tokenizer(folder: Union[str, Path], merges: Sequence[str] = (),
                         model_max_length: int = 77) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` that ``transformers.CLIPTokenizer`` loads.

    The vocabulary holds every byte symbol, alone and word-final (``"a"``, ``"a</w>"``), the
    token of every merge, and CLIP's ``<|startoftext|>`` / ``<|endoftext|>``. With no merges
    the tokenizer is character-level; merges such as ``["c a", "ca t</w>"]`` make whole words.

    Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    vocab: dict[str, int] = {}
    for token in tokens + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
         "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "do_lower_case": True}))
    return folder


# --------------------------------------------------------------------------------------------
# The tiny random model
# --------------------------------------------------------------------------------------------

def build_tiny_pipeline(seed: int = 0):
    """A random ``StableDiffusionPipeline`` of the SD layout, small enough for CPU tests.

    32x32 images, a VAE with scale factor 4 (8x8x4 latents, scaled to unit standard deviation),
    a two-level UNet with cross attention of width 32 and a two-layer CLIP text encoder on a
    character tokenizer. Its weights are random (the UNet's output layer scaled by 0.3 so that
    DDIM inversion is as well-posed as on a trained model): it tests code paths, not image quality.
    """
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1,
        block_out_channels=(8, 16, 16), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )
    # A random UNet's noise prediction jumps with t and z far more than a trained one's; a smaller
    # output layer makes the probability-flow ODE smooth enough to invert, as for a trained model.
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.3)
        unet.conv_out.bias.mul_(0.3)
    # Scale latents to unit standard deviation, as SD's 0.18215 does for its VAE.
    with torch.no_grad():
        probe = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        raw_std = float(vae.encode(probe).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=round(1.0 / raw_std, 5))
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(tmp)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_architecture_pipeline(name: str = "sd15", seed: int = 0):
    """A ``StableDiffusionPipeline`` with the architecture of ``architectures/<name>.json`` and
    random weights (the tokenizer is character-level): real timings and memory, no download."""
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    spec = json.loads((ARCHITECTURES_DIR / f"{name}.json").read_text())
    scheduler = DDIMScheduler(**{**SD_SCHEDULER_CONFIG, **spec.get("scheduler", {})})
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(tmp)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**spec["vae"]), unet=UNet2DConditionModel(**spec["unet"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**spec["text_encoder"])), tokenizer=tokenizer,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def _built_model_dir(name: str, build) -> Path:
    """Folder ``<cache>/<name>`` holding ``build()`` saved with ``save_pretrained`` (made once)."""
    folder = impus_cache_dir() / name
    if not (folder / "model_index.json").is_file():
        staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
        build().save_pretrained(staging)
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            staging.rename(folder)
        except OSError:  # another process won the race; its copy is identical
            import shutil
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def tiny_model_dir() -> Path:
    """Folder of the tiny model, written with ``save_pretrained`` on first use."""
    return _built_model_dir(f"tiny-v{TINY_VERSION}", build_tiny_pipeline)


# --------------------------------------------------------------------------------------------
# The loaded model
# --------------------------------------------------------------------------------------------

@dataclass
class DiffusionModel:
    """A Stable-Diffusion-shaped model ready for morphing.

    Attributes:
        name: what the user asked for (hub id, folder, ``tiny`` or ``classroom``).
        vae, unet, text_encoder, tokenizer: the diffusers / transformers components.
        scheduler_config: the training noise schedule; DDIM schedulers are built from it.
        device, dtype: where the weights live and their precision.
        unet_evals: running count of latents passed through the UNet (a batch of B adds B);
            the machine-independent cost unit of this package.
        unet_calls: running count of UNet forward calls (batching lowers it, not unet_evals).
        batch_workers: CPU threads that may split one batch of independent rows, e.g. a render
            pass's frames (:mod:`impus_lite.workers`); :func:`load_model` sets it from
            :func:`impus_lite.threads.choose_threads` on a CPU, 1 elsewhere.

    Several threads may run the UNet at once (the counters and adapter switches take a lock,
    per-row adapters are per thread) as long as they ask for the same adapter.
    """

    name: str
    vae: torch.nn.Module
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    device: torch.device
    dtype: torch.dtype
    unet_evals: int = 0
    unet_calls: int = 0
    _fingerprint: Optional[str] = field(default=None, repr=False)
    _active_adapter: Optional[str] = field(default=None, repr=False)  # None: unknown, "": none, PER_ROW
    adapter_owner: Optional[object] = field(default=None, repr=False)  # who attached the adapters
    #: dtype the inference UNet calls autocast to (None: none); set per morph from
    #: ``MorphConfig.autocast`` (see :func:`autocast_dtype`).
    inference_autocast: Optional[torch.dtype] = field(default=None, repr=False)
    _noise_schedule: Optional[tuple] = field(default=None, repr=False)  # (config repr, scheduler)
    batch_workers: int = 1
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _row_adapters: threading.local = field(default_factory=threading.local, repr=False)
    _row_hooks: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        def count(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            with self._lock:
                self.unet_evals += int(sample.shape[0])
                self.unet_calls += 1
        self.unet.register_forward_pre_hook(count, with_kwargs=True)

    # ---- geometry -----------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The image side the UNet was trained for (512 for SD 1.x)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def prediction_type(self) -> str:
        """``"epsilon"`` or ``"v_prediction"`` (SD 2.x 768)."""
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def fingerprint(self) -> str:
        """A short digest of the name and of a sample of the weights: a cache key that changes
        when a folder's weights are retrained."""
        if self._fingerprint is None:
            digest = hashlib.sha256(self.name.encode())
            for module in (self.unet, self.vae, self.text_encoder):
                params = list(module.parameters())
                for p in params[:: max(1, len(params) // 16)]:
                    digest.update(repr(round(float(p.detach().double().sum()), 6)).encode())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    # ---- schedules and the training loss ------------------------------------------------
    def ddim_scheduler(self, timestep_spacing: Optional[str] = None):
        """A fresh ``diffusers.DDIMScheduler`` (eta = 0) on the model's training noise schedule.

        ``timestep_spacing`` ("leading" or "trailing") overrides the stored config's grid."""
        from diffusers import DDIMScheduler
        return DDIMScheduler.from_config(self._scheduler_config(timestep_spacing))

    def ddim_inverse_scheduler(self, timestep_spacing: Optional[str] = None):
        """A fresh ``diffusers.DDIMInverseScheduler`` on the model's training noise schedule
        (``timestep_spacing`` as for :meth:`ddim_scheduler`)."""
        import inspect

        from diffusers import DDIMInverseScheduler
        config = self._scheduler_config(timestep_spacing)
        accepted = inspect.signature(DDIMInverseScheduler.__init__).parameters
        # keys only DDIMScheduler takes (thresholding, ...) would make diffusers warn on every call
        return DDIMInverseScheduler.from_config({k: v for k, v in config.items()
                                                 if k in accepted or k.startswith("_")})

    def noise_schedule(self):
        """The ``DDIMScheduler`` of :meth:`diffusion_loss`, built once per ``scheduler_config``.

        The losses use only its stateless part (``num_train_timesteps``, ``add_noise``,
        ``get_velocity``: the training schedule's ``alphas_cumprod``), so one instance serves
        every step; building a fresh one per step cost about 0.5 ms. Samplers take
        :meth:`ddim_scheduler`, a fresh one, since ``set_timesteps`` changes its state.
        """
        stamp = repr(sorted(self.scheduler_config.items()))
        if self._noise_schedule is None or self._noise_schedule[0] != stamp:
            self._noise_schedule = (stamp, self.ddim_scheduler())
        return self._noise_schedule[1]

    def _scheduler_config(self, timestep_spacing: Optional[str]) -> dict:
        if timestep_spacing is None:
            return self.scheduler_config
        return {**self.scheduler_config, "timestep_spacing": timestep_spacing}

    def diffusion_loss(self, latents: torch.Tensor, embeddings: torch.Tensor,
                       generator: torch.Generator) -> torch.Tensor:
        """The plain denoising loss ``|| target - unet(z_t, t, e) ||^2`` (mean over elements).

        ``z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps`` with ``t ~ U{0, ..., T-1}`` and
        ``eps ~ N(0, I)`` drawn from ``generator`` (a CPU generator, so that a seed gives the same
        draws on every device); the target is ``eps`` for epsilon models and the velocity
        ``sqrt(abar_t) eps - sqrt(1 - abar_t) z`` for v-prediction models.

        Args:
            latents: (B, 4, h, w) VAE latents (already times the scaling factor).
            embeddings: (B, L, D) text embeddings (may require grad).
        Returns:
            A scalar float32 tensor.
        """
        scheduler = self.noise_schedule()
        batch = latents.shape[0]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        prediction, target = self._denoise(latents, embeddings, t, noise)
        return torch.nn.functional.mse_loss(prediction, target)

    def diffusion_losses(self, latents: torch.Tensor, embeddings: torch.Tensor,
                         generators) -> torch.Tensor:
        """Per-sample denoising losses (B,) of one batched UNet call, each exactly what
        :meth:`diffusion_loss` gives for that sample alone.

        ``generators`` is one generator per sample (sample i draws its t and eps from
        ``generators[i]``), or a single generator that draws t_0, eps_0, t_1, eps_1, ... in
        turn, as B calls of :meth:`diffusion_loss` in a row would. One batched call is faster
        than B calls on a CPU; its activations take B times the memory.
        """
        scheduler = self.noise_schedule()
        batch = latents.shape[0]
        if isinstance(generators, torch.Generator):
            generators = [generators] * batch
        if len(generators) != batch:
            raise InputError(f"diffusion_losses needs one generator per sample, got {len(generators)} for {batch}.")
        draws = [(torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=g),
                  torch.randn((1, *latents.shape[1:]), generator=g, dtype=torch.float32))
                 for g in generators]
        t = torch.cat([d[0] for d in draws])
        noise = torch.cat([d[1] for d in draws])
        prediction, target = self._denoise(latents, embeddings, t, noise)
        return (prediction - target).pow(2).flatten(1).mean(dim=1)

    def _denoise(self, latents, embeddings, t, noise):
        """(prediction, target) in float32 for latents noised to ``t`` with ``noise``."""
        scheduler = self.noise_schedule()
        latents = latents.detach().float().cpu()
        noisy = scheduler.add_noise(latents, noise, t)
        target = scheduler.get_velocity(latents, noise, t) if self.prediction_type == "v_prediction" else noise
        prediction = self.unet(noisy.to(self.device, self.dtype), t.to(self.device),
                               encoder_hidden_states=embeddings.to(self.device, self.dtype)).sample
        return prediction.float(), target.to(self.device)

    # ---- VAE ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents (B, 4, H/f, W/f), f = vae_scale_factor.

        Uses the posterior mean times ``vae.config.scaling_factor`` (deterministic)."""
        images = images.to(self.device, self.vae.dtype)
        latents = self.vae.encode(images).latent_dist.mean
        return latents.float() * self.vae.config.scaling_factor

    def worker_chunks(self, items: int, rows_per_item: int = 1, workers: Optional[int] = None,
                      min_rows: int = MIN_ROWS_PER_WORKER) -> int:
        """Into how many chunks a call splits ``items`` independent items of ``rows_per_item``
        rows each, one chunk per batch worker (:func:`impus_lite.workers.map_chunks`): 1 off the
        CPU; else ``workers`` (None: :attr:`batch_workers` as far as CPUs are idle,
        :func:`impus_lite.workers.free_workers`), as far as every chunk keeps ``min_rows`` rows."""
        if self.device.type != "cpu":
            return 1
        available = free_workers(self.batch_workers) if workers is None else workers
        return useful_workers(available, items, rows_per_item, min_rows)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, workers: Optional[int] = None) -> torch.Tensor:
        """Latents (B, 4, h, w) -> images (B, 3, h*f, w*f) in [-1, 1] (float32, clamped).

        On a CPU the rows are split among ``workers`` threads (None: :attr:`batch_workers` as far
        as CPUs are idle; :mod:`impus_lite.workers`); each image is decoded on its own either way."""
        chunks = self.worker_chunks(latents.shape[0], workers=workers, min_rows=1)
        if chunks > 1:
            return torch.cat(map_chunks(lambda start, stop: self.decode(latents[start:stop], workers=1),
                                        latents.shape[0], chunks))
        latents = latents.to(self.device, self.vae.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(latents).sample.float().clamp(-1, 1)

    def cast(self, dtype: torch.dtype) -> None:
        """Cast the UNet, VAE and text encoder weights to ``dtype`` (in place)."""
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(dtype)
        self.dtype = dtype

    # ---- adapters -----------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        """Names of the LoRA adapters attached to the UNet."""
        config = getattr(self.unet, "peft_config", None) or {}
        return list(config)

    @contextlib.contextmanager
    def using_adapter(self, name: Optional[str]) -> Iterator[None]:
        """Run the UNet with LoRA adapter ``name`` active, or with none when ``name`` is None.

        The adapter stays active after the block; switching is skipped when it already is (peft
        walks every layer to switch, which costs as much as a small UNet's forward pass).
        """
        names = self.adapter_names()
        if name is not None and name not in names:
            raise KeyError(f"No adapter named '{name}' (have: {names}).")
        with self._lock:
            if names and self._active_adapter != (name or ""):
                if name is None:
                    self.unet.disable_adapters()
                else:
                    if self._active_adapter in ("", None):
                        self.unet.enable_adapters()
                    self.unet.set_adapter(name)
                self._active_adapter = name or ""
        yield

    @contextlib.contextmanager
    def using_adapters_per_row(self, names: Sequence[Optional[str]]) -> Iterator[None]:
        """Run the UNet with LoRA adapter ``names[i]`` on batch row ``i`` (None: no adapter), in one
        call: peft's mixed-batch LoRA forward (inference only; the rows' base outputs are one
        batched matmul, each adapter's low-rank term is added to its rows). Saves the per-call
        adapter switch of :meth:`using_adapter`, which walks every layer.
        """
        known = set(self.adapter_names())
        missing = sorted({n for n in names if n is not None} - known)
        if missing:
            raise KeyError(f"No adapter named {missing} (have: {sorted(known)}).")
        with self._lock:
            # disabled, or unknown (peft keeps a disabled flag across adapters deleted and added):
            # mixed batches need them enabled
            if self._active_adapter in ("", None):
                self.unet.enable_adapters()
                self._active_adapter = PER_ROW
            self._install_row_hooks()
        previous = getattr(self._row_adapters, "rows", None)
        self._row_adapters.rows = ["__base__" if n is None else n for n in names]
        try:
            yield
        finally:
            self._row_adapters.rows = previous

    def _install_row_hooks(self) -> None:
        """Give every LoRA layer a pre-hook that passes this thread's per-row adapter names
        (set by :meth:`using_adapters_per_row`; none set: the call is left as it is)."""
        from peft.tuners.lora import LoraLayer

        if self._row_hooks:
            return
        local = self._row_adapters

        def add_rows(module, args, kwargs):
            rows = getattr(local, "rows", None)
            return None if rows is None else (args, {**kwargs, "adapter_names": rows})

        self._row_hooks = [module.register_forward_pre_hook(add_rows, with_kwargs=True)
                           for module in self.unet.modules() if isinstance(module, LoraLayer)]

    def adapters_changed(self) -> None:
        """Call after adding or deleting adapters on ``unet`` directly: the active one is unknown
        (and new LoRA layers get their per-row hooks on the next mixed batch)."""
        with self._lock:
            self._active_adapter = None
            for handle in self._row_hooks:
                handle.remove()
            self._row_hooks = []

    def remove_adapter(self, name: str) -> None:
        """Detach LoRA adapter ``name`` if it is attached; the others stay."""
        if name in self.adapter_names():
            self.unet.delete_adapters(name)
            self.adapters_changed()

    def remove_adapters(self) -> None:
        """Detach every LoRA adapter: the UNet is the base model again."""
        for name in self.adapter_names():
            self.unet.delete_adapters(name)
        self.adapters_changed()
        self.adapter_owner = None


def _resolve(name: str) -> tuple[str, bool]:
    """Map a model name to (path or hub id, is_local)."""
    if name == "tiny":
        return str(tiny_model_dir()), True
    if name in RANDOM_ARCHITECTURES:
        arch = RANDOM_ARCHITECTURES[name]
        return str(_built_model_dir(name, lambda: build_architecture_pipeline(arch))), True
    if name == "classroom":
        if not (CLASSROOM_DIR / "model_index.json").is_file():
            raise ModelLoadError(
                f"The classroom model is not in '{CLASSROOM_DIR}': use a checkout of the "
                "impus_lite repository (it ships there), or pass --model tiny or a hub id.")
        return str(CLASSROOM_DIR), True
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"'{path}' is not a diffusers model folder (no model_index.json): save one with "
                "StableDiffusionPipeline.save_pretrained or pass a hub id.")
        return str(path), True
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelLoadError(
            f"Model '{name}' is neither a folder nor a hub id of the form 'owner/name'; "
            f"try {DEFAULT_MODEL!r}, 'classroom' or 'tiny'.")
    return name, False


def load_model(name: str = DEFAULT_MODEL, device: Union[str, torch.device, None] = None,
               dtype: Union[str, torch.dtype, None] = None) -> DiffusionModel:
    """Load a Stable Diffusion 1.x/2.x model for morphing.

    Args:
        name: hub id, local folder, ``"tiny"`` or ``"classroom"`` (see the module docstring).
        device: ``"cuda"``, ``"cpu"``, ... ; default: CUDA if present, else MPS, else CPU.
        dtype: default fp16 on CUDA and fp32 elsewhere.

    Raises:
        ModelLoadError: with one sentence naming the cache folder and the offline options when
            the weights are neither cached nor downloadable.
    """
    from diffusers import StableDiffusionPipeline

    device = pick_device(device)
    dtype = pick_dtype(device, dtype)
    source, is_local = _resolve(name)
    try:
        with warnings.catch_warnings():  # newer diffusers renames torch_dtype; older ones need it
            warnings.filterwarnings("ignore", message=".*torch_dtype.*")
            pipe = StableDiffusionPipeline.from_pretrained(
                source, torch_dtype=dtype, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False,
            )
    except (OSError, ValueError, EnvironmentError) as error:
        if is_local:
            raise ModelLoadError(f"Could not load the model folder '{source}': {error}") from None
        from huggingface_hub import constants
        raise ModelLoadError(
            f"Could not load '{name}': it is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and could not be downloaded; connect to the internet "
            "once (or log in with `hf auth login` for gated models), pass a local folder, or "
            "use the offline models --model classroom or --model tiny.") from None
    if hasattr(pipe.vae, "enable_slicing"):
        pipe.vae.enable_slicing()  # decode a batch of frames one at a time: bounded peak memory
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.to(device)
        module.requires_grad_(False)
        module.eval()
    workers = 1
    if device.type == "cpu":  # the machine's share of CPUs (cgroup quota, affinity), not the host's
        from .threads import apply_threads
        workers = apply_threads(unet_parameters=sum(p.numel() for p in pipe.unet.parameters())).workers
    return DiffusionModel(
        name=name, vae=pipe.vae, unet=pipe.unet, text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer, scheduler_config=dict(pipe.scheduler.config),
        device=device, dtype=dtype, batch_workers=workers,
    )
