"""Prompt encoding and per-image text-embedding optimisation (IMPUS stage 2, notebook 03).

A prompt becomes the CLIP text encoder's last hidden state, a (1, L, D) tensor (L = 77 tokens
and D = 768 for SD 1.x). IMPUS starts both images from the embedding ``e`` of one shared prompt
and optimises a copy of the whole (L, D) matrix for each image with the plain diffusion loss

    e_i = argmin_e  E_{t, eps} || eps - eps_theta(sqrt(abar_t) z_i + sqrt(1 - abar_t) eps, t, e) ||^2,

a textual inversion of the whole prompt. Interpolating between e_0 and e_1 then moves between
two embeddings that each reconstruct their own image well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .errors import InputError
from .models import DiffusionModel
from .precision import adam_optimizer, loss_scaler
from .runtime import trains_images_together
from .workers import map_chunks


def check_prompt_not_empty(prompt: str) -> None:
    """Raise :class:`InputError` for a missing or blank prompt (no model needed)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("The prompt is empty: name what the two images share, e.g. 'a photo of an animal'.")


def check_prompt(model: DiffusionModel, prompt: str) -> None:
    """Raise :class:`InputError` for an empty prompt or one longer than the tokenizer allows."""
    check_prompt_not_empty(prompt)
    limit = int(model.tokenizer.model_max_length)
    count = len(model.tokenizer(prompt, truncation=False, verbose=False).input_ids)
    if count > limit:
        raise InputError(
            f"The prompt is {count} tokens long but the text encoder reads at most {limit} "
            "(start and end tokens included): shorten it.")


@torch.no_grad()
def encode_prompt(model: DiffusionModel, prompt: str, allow_empty: bool = False) -> torch.Tensor:
    """Text embedding of ``prompt``: float32 tensor (1, L, D) on the model's device.

    The tokens are padded to the tokenizer's ``model_max_length`` (77), as in Stable Diffusion.
    ``allow_empty=True`` is for the unconditional embedding of ``""``.
    """
    if not allow_empty:
        check_prompt(model, prompt)
    tokens = model.tokenizer(prompt, padding="max_length", truncation=True,
                             max_length=model.tokenizer.model_max_length, return_tensors="pt")
    hidden = model.text_encoder(tokens.input_ids.to(model.device))[0]
    return hidden.float()


def unconditional_embedding(model: DiffusionModel) -> torch.Tensor:
    """The embedding of the empty prompt (1, L, D): the unconditional branch of guidance."""
    return encode_prompt(model, "", allow_empty=True)


@dataclass
class OptimizedEmbedding:
    """Result of :func:`optimize_embedding`.

    Attributes:
        embedding: (1, L, D) float32, on the model's device.
        losses: the diffusion loss at every step (noisy: each step draws one t and one eps).
    """

    embedding: torch.Tensor
    losses: list[float] = field(default_factory=list)


def optimize_embedding(model: DiffusionModel, latents: torch.Tensor, embedding: torch.Tensor,
                       steps: int, lr: float = 2e-3, seed: int = 0,
                       progress: bool = True, desc: str = "text embedding") -> OptimizedEmbedding:
    """Optimise a copy of ``embedding`` so the model denoises ``latents`` well (Adam).

    Minimises the diffusion loss of :meth:`DiffusionModel.diffusion_loss` over the whole
    (L, D) embedding, one random t and eps per step, ``steps`` Adam steps of rate ``lr``.
    Model weights stay frozen; the embedding and Adam's state are fp32, and through an fp16
    UNet the loss is scaled (:func:`impus_lite.precision.loss_scaler`). ``steps = 0`` returns
    the embedding unchanged.

    Args:
        latents: (1, 4, h, w) latent of one image.
        embedding: (1, L, D) starting embedding (the shared prompt's).
    """
    return optimize_embeddings(model, latents, embedding, steps, lr, [seed], progress, desc)[0]


def optimize_embeddings(model: DiffusionModel, latents: torch.Tensor, embedding: torch.Tensor,
                        steps: int, lr: float = 2e-3, seeds: Sequence[int] = (0,),
                        progress: bool = True, desc: str = "text embedding",
                        workers: Optional[int] = None) -> list[OptimizedEmbedding]:
    """:func:`optimize_embedding` for B images at once, in one batched UNet call per step.

    Image i starts from ``embedding`` and draws its t and eps from ``seeds[i]``, so each result
    is what :func:`optimize_embedding` gives for that image alone (up to float rounding): the
    loss is the sum of the per-image losses, whose gradient for embedding i is image i's own,
    and Adam's update is elementwise. Latents larger than
    :data:`impus_lite.runtime.BATCHED_TRAINING_CELLS` are optimised one image after another.
    On a CPU the images are split among ``workers`` threads (None: ``model.batch_workers`` as
    far as CPUs are idle; :mod:`impus_lite.workers`), each optimising its own: the classroom
    model's two images take 16% less time than one batch of two on a 2-core AMD EPYC.

    Args:
        latents: (B, 4, h, w), one latent per image; seeds: B seeds.
        embedding: (1, L, D) starting embedding.
    Returns:
        B :class:`OptimizedEmbedding`, in the order of ``latents``.
    """
    if steps < 0:
        raise InputError(f"Text optimisation steps must be >= 0, got {steps}.")
    count = latents.shape[0]
    if len(seeds) != count:
        raise InputError(f"optimize_embeddings needs one seed per image, got {len(seeds)} for {count}.")
    if count > 1 and not trains_images_together(latents):  # bound the memory: one at a time
        return [optimize_embeddings(model, latents[i:i + 1], embedding, steps, lr, [seeds[i]],
                                    progress, f"{desc} {i}")[0] for i in range(count)]
    chunks = model.worker_chunks(count, workers=workers, min_rows=1)
    if chunks > 1 and steps > 0:  # independent problems: one chunk of images per CPU worker
        def optimize_rows(start: int, stop: int) -> list[OptimizedEmbedding]:
            with torch.enable_grad():
                return _optimize_in_one_thread(model, latents[start:stop], embedding, steps, lr,
                                               seeds[start:stop], progress and start == 0, desc)
        return [result for part in map_chunks(optimize_rows, count, chunks) for result in part]
    return _optimize_in_one_thread(model, latents, embedding, steps, lr, seeds, progress, desc)


def _optimize_in_one_thread(model: DiffusionModel, latents: torch.Tensor, embedding: torch.Tensor,
                            steps: int, lr: float, seeds: Sequence[int], progress: bool,
                            desc: str) -> list[OptimizedEmbedding]:
    """:func:`optimize_embeddings` of every image in this thread, in one batched UNet call per step."""
    count = latents.shape[0]
    param = torch.nn.Parameter(embedding.detach().float().expand(count, -1, -1).clone())
    losses: list[list[float]] = [[] for _ in range(count)]
    if steps > 0:
        optimizer = adam_optimizer([param], lr=lr)
        scaler = loss_scaler(model)
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        with model.using_adapter(None):
            for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
                per_image = model.diffusion_losses(latents, param, generators)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(per_image.sum()).backward()
                scaler.step(optimizer)
                scaler.update()
                for i, value in enumerate(per_image.detach().tolist()):
                    losses[i].append(value)
    final = param.detach()
    # each its own copy: a row of the batch would carry the whole batch into torch.save
    return [OptimizedEmbedding(final[i:i + 1].clone(), losses[i]) for i in range(count)]
