"""LoRA adapters as a heuristic bottleneck (IMPUS stages 4-6; notebook 05), with peft.

IMPUS fine-tunes the UNet with two separate low-rank adapters (``W' = W + B A``, ``B`` of shape
(out, r) starting at zero, so a new adapter leaves the model unchanged):

* the **conditional** adapter, trained on both images with their own optimised embeddings; its
  rank r is the bottleneck: small r forces one shared representation of both images (a more
  direct path), large r fits each image better. IMPUS picks r from rPPD
  (:func:`rank_from_rppd`);
* the **unconditional** adapter (rank 2), trained on both images with the empty prompt, which
  corrects the bias of the unconditional branch of classifier-free guidance.

Both sit on the attention projections of the UNet (``to_q, to_k, to_v, to_out.0``) and are
switched per branch at sampling time (see :mod:`impus_lite.inversion`).
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .config import LORA_INITS
from .errors import InputError
from .models import DiffusionModel
from .precision import adam_optimizer, loss_scaler
from .runtime import trains_images_together

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
COND_ADAPTER = "cond"
UNCOND_ADAPTER = "uncond"


def rank_from_rppd(rppd: float, outlier: bool = False) -> int:
    """IMPUS's rank rule: ``r = 2 ** max(0, floor(18 rPPD - 6))``, at least 16 for outlier pairs.

    rPPD <= 7/18 gives rank 1; each further 1/18 doubles it. The 18 and 6 are empirical (chosen
    by the IMPUS authors for SD 1.4), and the rule has no upper bound: bound it with
    :func:`max_adapter_rank`.
    """
    if not math.isfinite(rppd) or rppd < 0:
        raise InputError(f"rPPD must be a non-negative number, got {rppd}.")
    rank = 2 ** max(0, math.floor(18 * rppd - 6))
    return max(rank, 16) if outlier else rank


def is_outlier_pair(code0: torch.Tensor, code1: torch.Tensor) -> bool:
    """IMPUS's outlier rule on the two inverted codes (reference code, run_morph.py):
    ``|var(z0) - var(z1)| > 0.1 and min(var(z0), var(z1)) < 0.9``. One code's inversion fell
    short of unit-variance noise while the other's did not; the rank is then at least 16."""
    var0, var1 = float(code0.float().var()), float(code1.float().var())
    return abs(var0 - var1) > 0.1 and min(var0, var1) < 0.9


def max_adapter_rank(model: DiffusionModel) -> int:
    """The narrowest adapted layer's width: min over the UNet's attention projections
    (``LORA_TARGETS``) of min(in_features, out_features). A LoRA of higher rank can express
    nothing more in that layer (320 for SD 1.x; 16 for the tiny model)."""
    widths = [min(m.in_features, m.out_features) for n, m in model.unet.named_modules()
              if n.endswith(LORA_TARGETS) and hasattr(m, "in_features")]
    if not widths:
        raise InputError("The UNet has no attention projections to adapt.")
    return min(widths)


def add_lora(model: DiffusionModel, name: str, rank: int, seed: int = 0, init: str = "gaussian") -> None:
    """Attach a new LoRA adapter ``name`` of rank ``rank`` (scale lora_alpha / r = 1) to the UNet.

    The adapter starts as the identity: B = 0, and A drawn from ``seed``, either
    ``init="gaussian"``: A ~ N(0, (1/r)^2), as the IMPUS reference code's diffusers
    LoRALinearLayer (peft's ``init_lora_weights="gaussian"``), or ``init="kaiming"``: peft's
    default Kaiming-uniform, A ~ U(-b, b) with b = 1/sqrt(in_features) (4-60x smaller than
    1/r at the ranks IMPUS uses). The adapter's weights are float32 so that training is stable
    when the UNet runs in half precision (see :mod:`impus_lite.precision`).
    """
    from peft import LoraConfig

    if rank < 1:
        raise InputError(f"LoRA rank must be >= 1, got {rank}.")
    if init not in LORA_INITS:
        raise InputError(f"Unknown LoRA initialisation '{init}': use one of {', '.join(LORA_INITS)}.")
    model.remove_adapter(name)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian" if init == "gaussian" else True,
                        target_modules=list(LORA_TARGETS))
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.filterwarnings("ignore", message=".*peft_config.*")  # on every adapter after the first
        torch.manual_seed(seed)
        model.unet.add_adapter(config, adapter_name=name)
    model.adapters_changed()
    for param in adapter_parameters(model, name):
        param.data = param.data.float()


def adapter_parameters(model: DiffusionModel, name: str) -> list[torch.nn.Parameter]:
    """The LoRA A and B matrices of adapter ``name``."""
    return [p for n, p in model.unet.named_parameters()
            if (f".lora_A.{name}." in n or f".lora_B.{name}." in n)]


def train_lora(model: DiffusionModel, name: str, latents: Sequence[torch.Tensor],
               embeddings: Sequence[torch.Tensor], steps: int, lr: float = 1e-3, seed: int = 0,
               progress: bool = True, desc: str = "LoRA") -> list[float]:
    """Train adapter ``name`` (AdamW) on several images at once.

    Each step draws one t and eps per image and minimises the sum of the per-image diffusion
    losses ``sum_i || eps - eps_theta+BA(z_i,t, t, e_i) ||^2``. Only the adapter's A and B
    matrices change. Small latents (:func:`impus_lite.runtime.trains_images_together`) go
    through one batched UNet call per step; larger ones are back-propagated one image at a time
    (the gradients add up to those of the sum), so the peak memory holds one image's
    activations. The draws are the same either way (image 0's t and eps, then image 1's, ...).
    Through an fp16 UNet the losses are scaled (:func:`impus_lite.precision.loss_scaler`).

    Args:
        latents: one (1, 4, h, w) latent per image; embeddings: one (1, L, D) per image.
    Returns:
        The summed loss of every step.
    """
    if len(latents) != len(embeddings):
        raise InputError("train_lora needs one embedding per image.")
    params = adapter_parameters(model, name)
    if not params:
        raise KeyError(f"No LoRA adapter named '{name}': call add_lora first.")
    for p in model.unet.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = adam_optimizer(params, lr=lr, decoupled_weight_decay=True)
    scaler = loss_scaler(model)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    stacked_latents = torch.cat([z.to(latents[0].device) for z in latents])
    stacked_embeddings = torch.cat([e.to(embeddings[0].device) for e in embeddings])
    together = len(latents) > 1 and trains_images_together(stacked_latents)
    model.unet.train()
    try:
        with model.using_adapter(name):
            for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
                optimizer.zero_grad(set_to_none=True)
                total = 0.0
                if together:
                    losses_now = model.diffusion_losses(stacked_latents, stacked_embeddings, generator)
                    scaler.scale(losses_now.sum()).backward()
                    total = float(losses_now.detach().sum())
                for z, e in ([] if together else zip(latents, embeddings)):  # one graph at a time;
                    loss = model.diffusion_loss(z, e, generator)
                    scaler.scale(loss).backward()         # gradients of the sum accumulate
                    total += float(loss.detach())
                scaler.step(optimizer)
                scaler.update()
                losses.append(total)
    finally:
        model.unet.eval()
        for p in params:
            p.requires_grad_(False)
    return losses


def adapter_state(model: DiffusionModel, name: str) -> dict[str, torch.Tensor]:
    """The weights of adapter ``name`` (keys without the adapter name), on the CPU."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model.unet, adapter_name=name)
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def load_adapter_state(model: DiffusionModel, name: str, rank: int, state: dict[str, torch.Tensor]) -> None:
    """Attach adapter ``name`` of rank ``rank`` and fill it with ``state`` (from :func:`adapter_state`);
    the initial draw is overwritten, so its kind does not matter."""
    from peft.utils import set_peft_model_state_dict

    add_lora(model, name, rank)
    result = set_peft_model_state_dict(model.unet, state, adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise KeyError(f"Adapter weights do not match the model: unexpected keys {unexpected[:3]}...")
    for param in adapter_parameters(model, name):
        param.data = param.data.float()
