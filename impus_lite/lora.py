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

from .errors import InputError
from .models import DiffusionModel

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
COND_ADAPTER = "cond"
UNCOND_ADAPTER = "uncond"


def rank_from_rppd(rppd: float, outlier: bool = False) -> int:
    """IMPUS's rank rule: ``r = 2 ** max(0, floor(18 rPPD - 6))``, at least 16 for outlier pairs.

    rPPD <= 7/18 gives rank 1; each further 1/18 doubles it.
    """
    if not math.isfinite(rppd) or rppd < 0:
        raise InputError(f"rPPD must be a non-negative number, got {rppd}.")
    rank = 2 ** max(0, math.floor(18 * rppd - 6))
    return max(rank, 16) if outlier else rank


def is_outlier_code(codes: torch.Tensor) -> bool:
    """IMPUS's sanity check on an inverted code: its variance differs from 1 by more than 0.1
    and is below 0.9 (the inversion did not reach unit-variance noise)."""
    var = float(codes.float().var())
    return abs(var - 1.0) > 0.1 and var < 0.9


def add_lora(model: DiffusionModel, name: str, rank: int, seed: int = 0) -> None:
    """Attach a new LoRA adapter ``name`` of rank ``rank`` (scale lora_alpha / r = 1) to the UNet.

    The adapter starts as the identity (peft initialises B = 0 and A at random, here from
    ``seed``). Its weights are float32 so that training is stable when the UNet runs in fp16.
    """
    from peft import LoraConfig

    if rank < 1:
        raise InputError(f"LoRA rank must be >= 1, got {rank}.")
    model.remove_adapter(name)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=list(LORA_TARGETS))
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
    matrices change. Each image's loss is back-propagated on its own (the gradients add up to
    those of the sum), so the peak memory holds one image's activations, not all of them.

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
    optimizer = torch.optim.AdamW(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.unet.train()
    try:
        with model.using_adapter(name):
            for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
                optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for z, e in zip(latents, embeddings):   # one image's graph in memory at a time;
                    loss = model.diffusion_loss(z, e, generator)
                    loss.backward()                       # gradients of the sum accumulate
                    total += float(loss.detach())
                optimizer.step()
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
    """Attach adapter ``name`` of rank ``rank`` and fill it with ``state`` (from :func:`adapter_state`)."""
    from peft.utils import set_peft_model_state_dict

    add_lora(model, name, rank)
    result = set_peft_model_state_dict(model.unet, state, adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise KeyError(f"Adapter weights do not match the model: unexpected keys {unexpected[:3]}...")
    for param in adapter_parameters(model, name):
        param.data = param.data.float()
