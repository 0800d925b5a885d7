"""Attention interpolation between two generation trajectories, as diffusers attention processors.

DiffMorpher (Zhang et al., CVPR 2024, https://arxiv.org/abs/2312.07409, section 3.3) and AID
(He et al., NeurIPS 2024, https://arxiv.org/abs/2403.17924) render the frame at ``alpha`` while
its self-attention looks at the generations of the two endpoints. Two passes:

1. **Record.** Generate endpoint 0 (alpha = 0) and endpoint 1 (alpha = 1) inside
   :func:`recording`: every chosen self-attention layer stores its keys ``K_e = W_k h_e`` and
   values ``V_e = W_v h_e`` (e = 0, 1) at every recorded timestep in an :class:`AttentionBank`.
2. **Interpolate.** Render frames inside :func:`interpolating`: at every timestep the bank
   holds, each chosen layer computes its own queries ``Q = W_q h`` and attends with one of the
   :data:`FORMS`; at the other timesteps it runs the processor it replaced, unchanged.

    ===========  ================================================================  ============
    inner        Attn(Q, (1-a) K_0 + a K_1, (1-a) V_0 + a V_1)                     DiffMorpher;
                                                                                   AID inner
    outer        (1-a) Attn(Q, K_0, V_0) + a Attn(Q, K_1, V_1)                     AID outer
    fused        (1-a) Attn(Q, [K, K_0], [V, V_0]) + a Attn(Q, [K, K_1], [V, V_1])  AID fused
    fused-inner  Attn(Q, [K, (1-a) K_0 + a K_1], [V, (1-a) V_0 + a V_1])           AID variant
    ===========  ================================================================  ============

with ``Attn(Q, K, V) = softmax(Q K^T / sqrt(d)) V`` per head of width d and ``[., .]`` the
concatenation along the token axis (K, V the frame's own keys and values). A form is one
function of the signature of :func:`inner_interpolation` registered in :data:`FORMS`: every
form receives the frame's own keys and values as well as the endpoints'. Cross-attention
interpolation (:func:`interpolating_cross`) computes the endpoints' keys and values from their
text embeddings, so nothing needs recording. FreeMorph (Cao et al., ICCV 2025) runs all its
frames, ends included, as one batch and reads the endpoints from that batch instead of a bank
(:func:`interpolating_batch_ends`), or gives every frame the frames' mean attention output
(:func:`averaging_frames`).

The projections run through the layer's own ``to_q``, ``to_k``, ``to_v`` and ``to_out``, so LoRA
adapters that peft attached to them (and their weights, e.g. from ``unet.set_adapters``) act
as in the plain UNet. The attention itself follows diffusers' ``AttnProcessor2_0``
(``torch.nn.functional.scaled_dot_product_attention``); only the keys and values differ.

Batches: a UNet call of ``R * B`` rows renders B frames (the alphas given to
:func:`interpolating`) in R blocks of B rows, R being the rows of each recorded endpoint call:
1 without classifier-free guidance, 2 with it, the branches in the order the sampler batches
them (:func:`impus_lite.inversion.guidance_noise`: all conditional rows, then all
unconditional rows). Row ``r * B + i`` attends with endpoint row r and alpha ``alphas[i]``.

Memory: the bank holds 2 x 2 tensors (N, C) per recorded row, layer and timestep. For SD 1.x at
512 px, DiffMorpher's choice (the nine decoder self-attention layers, 30 of 50 steps, no
guidance) is 0.83 G numbers for both endpoints: 3.3 GB in fp32, 1.7 GB in half precision;
every self-attention layer (16 layers) 5.5 GB in fp32.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F

#: UNet parts whose self-attention layers :func:`self_attention_layers` can choose.
UNET_PARTS = {"down": "down_blocks", "mid": "mid_block", "up": "up_blocks"}

KeyValue = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------
# What the endpoints' generations leave behind
# --------------------------------------------------------------------------------------------

class AttentionBank:
    """Self-attention keys and values of the endpoint trajectories.

    ``entries[(endpoint, layer, timestep)] = (K, V)``, each (R, N, H*d): the R rows of the
    recorded UNet call (see the module docstring), N tokens, H heads of width d, in the UNet's
    dtype on its device. ``layer`` is the processor's name in ``unet.attn_processors``;
    ``timestep`` the integer diffusion timestep the UNet was called with.
    """

    def __init__(self):
        self.entries: dict[tuple[int, str, int], KeyValue] = {}

    def store(self, endpoint: int, layer: str, timestep: int, key: torch.Tensor, value: torch.Tensor) -> None:
        if endpoint not in (0, 1):
            raise ValueError(f"An endpoint is 0 or 1, got {endpoint}.")
        self.entries[(endpoint, layer, int(timestep))] = (key.detach(), value.detach())

    def endpoints(self, layer: str, timestep: Optional[int]) -> Optional[tuple[KeyValue, KeyValue]]:
        """((K_0, V_0), (K_1, V_1)) of ``layer`` at ``timestep``, or None unless both are recorded."""
        if timestep is None:
            return None
        start = self.entries.get((0, layer, int(timestep)))
        end = self.entries.get((1, layer, int(timestep)))
        return None if start is None or end is None else (start, end)

    def timesteps(self) -> list[int]:
        """The timesteps recorded for both endpoints, in decreasing order (sampling order)."""
        seen = {e: {t for (end, _, t) in self.entries if end == e} for e in (0, 1)}
        return sorted(seen[0] & seen[1], reverse=True)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.entries.values() for t in kv)

    def __len__(self) -> int:
        return len(self.entries)


class TimestepClock:
    """The timestep of the UNet call in progress, read by a forward pre-hook on the UNet (the
    attention processors are not told it)."""

    def __init__(self):
        self.timestep: Optional[int] = None

    def read(self, module, args, kwargs) -> None:
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        self.timestep = None if t is None else int(torch.as_tensor(t).reshape(-1)[0])


# --------------------------------------------------------------------------------------------
# Attention and the interpolation forms
# --------------------------------------------------------------------------------------------

def _attention_inputs(attn, hidden_states: torch.Tensor, temb: Optional[torch.Tensor],
                      attention_mask: Optional[torch.Tensor], key_tokens: Optional[int] = None):
    """What diffusers' ``AttnProcessor2_0`` does before the projections: spatial norm, (B, C, H, W)
    -> (B, HW, C) tokens, the mask shaped (B, heads, 1, key tokens) for ``key_tokens`` keys
    (None: the hidden states' own tokens), group norm. Returns (hidden states, mask)."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.flatten(2).transpose(1, 2)
    batch, tokens, _ = hidden_states.shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, key_tokens or tokens, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, attention_mask


def _attention_output(attn, out: torch.Tensor, shape: torch.Size, residual: torch.Tensor) -> torch.Tensor:
    """What ``AttnProcessor2_0`` does after attending: output projection and dropout, back to the
    input's ``shape``, the residual connection, the rescale."""
    out = attn.to_out[1](attn.to_out[0](out))
    if len(shape) == 4:
        out = out.transpose(-1, -2).reshape(shape)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def attention(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``softmax(Q K^T / sqrt(d)) V`` per head, as diffusers' ``AttnProcessor2_0`` computes it.

    Args:
        attn: the diffusers ``Attention`` module (its ``heads``, ``norm_q``, ``norm_k``).
        query: (B, N, H*d); key, value: (B, M, H*d) (M may differ from N).
        mask: None or (B, H, N, M) as ``AttnProcessor2_0`` prepares it.
    Returns:
        (B, N, H*d) in the query's dtype.
    """
    batch, heads = query.shape[0], attn.heads
    width = key.shape[-1] // heads
    q, k, v = (x.reshape(batch, -1, heads, width).transpose(1, 2) for x in (query, key, value))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(batch, -1, heads * width).to(query.dtype)


def _lerp(x0: torch.Tensor, x1: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``(1 - alpha) x0 + alpha x1`` in float32, back in x0's dtype (exactly x0 at alpha 0)."""
    return ((1 - alpha) * x0.float() + alpha * x1.float()).to(x0.dtype)


def inner_interpolation(attn, query: torch.Tensor, own: KeyValue, start: KeyValue, end: KeyValue,
                        alpha: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``Attn(Q, (1-a) K_0 + a K_1, (1-a) V_0 + a V_1)``: the keys and values interpolated
    between the endpoints' (DiffMorpher's form, AID's "inner" interpolation). The frame's own
    keys and values ``own`` are not used.

    Args:
        query: (B, N, H*d) the frame's queries; own, start, end: (K, V) pairs, each (B, N, H*d).
        alpha: (B, 1, 1) float32, 0 = endpoint 0.
    Returns:
        (B, N, H*d), before the output projection.
    """
    return attention(attn, query, _lerp(start[0], end[0], alpha), _lerp(start[1], end[1], alpha), mask)


#: Interpolation forms by name: ``form(attn, query, own, start, end, alpha, mask) -> (B, N, H*d)``.
FORMS: dict[str, Callable[..., torch.Tensor]] = {"inner": inner_interpolation}


# --------------------------------------------------------------------------------------------
# The processors
# --------------------------------------------------------------------------------------------

class KeyValueProcessor:
    """A self-attention processor that computes Q, K, V with the layer's own projections (and
    the norms, reshapes, output projection, residual and rescaling of diffusers'
    ``AttnProcessor2_0``) and leaves the attention of Q over K, V to :meth:`attend`.

    It runs ``previous``, the processor it replaced, unchanged for cross-attention and whenever
    :meth:`applies` is False.
    """

    def __init__(self, layer: str, previous, clock: TimestepClock):
        self.layer, self.previous, self.clock = layer, previous, clock

    def applies(self) -> bool:
        return True

    def attend(self, attn, query, key, value, mask) -> torch.Tensor:
        return attention(attn, query, key, value, mask)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 *args, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None or not self.applies():
            return self.previous(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual, shape = hidden_states, hidden_states.shape
        hidden_states, attention_mask = _attention_inputs(attn, hidden_states, temb, attention_mask)
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        out = self.attend(attn, query, key, value, attention_mask)
        return _attention_output(attn, out, shape, residual)


class RecordingProcessor(KeyValueProcessor):
    """Plain self-attention that stores its K and V in ``bank`` under ``endpoint`` at the
    ``timesteps`` given (None: every timestep)."""

    def __init__(self, layer, previous, clock, bank: AttentionBank, endpoint: int,
                 timesteps: Optional[Sequence[int]] = None):
        super().__init__(layer, previous, clock)
        self.bank, self.endpoint = bank, endpoint
        self.timesteps = None if timesteps is None else {int(t) for t in timesteps}

    def applies(self) -> bool:
        return self.timesteps is None or self.clock.timestep in self.timesteps

    def attend(self, attn, query, key, value, mask):
        self.bank.store(self.endpoint, self.layer, self.clock.timestep, key, value)
        return attention(attn, query, key, value, mask)


class InterpolatingProcessor(KeyValueProcessor):
    """Self-attention with the endpoints' keys and values from ``bank`` combined by ``form``
    (a name in :data:`FORMS`) at ``alphas`` (one per frame of the batch; see the module
    docstring for the row layout), wherever the bank holds this layer and timestep."""

    def __init__(self, layer, previous, clock, bank: AttentionBank, alphas: torch.Tensor, form: str = "inner"):
        super().__init__(layer, previous, clock)
        self.bank, self.alphas, self.form = bank, alphas, FORMS[form]

    def applies(self) -> bool:
        return self.bank.endpoints(self.layer, self.clock.timestep) is not None

    def attend(self, attn, query, key, value, mask):
        start, end = self.bank.endpoints(self.layer, self.clock.timestep)
        rows, frames, recorded = query.shape[0], self.alphas.numel(), start[0].shape[0]
        if rows != recorded * frames:
            raise ValueError(f"Attention interpolation at layer {self.layer}: a batch of {rows} rows is "
                             f"not {recorded} recorded row(s) x {frames} alpha(s).")
        start, end = [tuple(x.repeat_interleave(frames, dim=0) for x in kv) for kv in (start, end)]
        alpha = self.alphas.to(query.device, torch.float32).repeat(recorded).view(-1, 1, 1)
        return self.form(attn, query, (key, value), start, end, alpha, mask)


# --------------------------------------------------------------------------------------------
# Installing them
# --------------------------------------------------------------------------------------------

def self_attention_layers(unet, parts: Sequence[str] = ("down", "mid", "up")) -> list[str]:
    """Names (keys of ``unet.attn_processors``) of the self-attention layers in the UNet
    ``parts`` ("down", "mid", "up"; DiffMorpher's code interpolates in "up" only)."""
    from diffusers.models.attention_processor import Attention

    unknown = set(parts) - set(UNET_PARTS)
    if unknown:
        raise ValueError(f"Unknown UNet parts {sorted(unknown)}: use {', '.join(UNET_PARTS)}.")
    prefixes = tuple(UNET_PARTS[p] + "." for p in parts)
    return [f"{name}.processor" for name, module in unet.named_modules()
            if isinstance(module, Attention) and not module.is_cross_attention and name.startswith(prefixes)]


@contextlib.contextmanager
def installed(unet, make: Callable[[str, object, TimestepClock], object],
              layers: Optional[Sequence[str]] = None, clock=None) -> Iterator[TimestepClock]:
    """Inside the block, ``make(name, previous, clock)`` is the attention processor of every
    layer in ``layers`` (default: every self-attention layer), installed with diffusers'
    ``unet.set_attn_processor``; the previous processors are restored on exit, also after an
    exception. Yields the clock the processors read: ``clock`` (any object whose
    ``read(module, args, kwargs)`` a forward pre-hook calls before every UNet call), by default
    a :class:`TimestepClock`."""
    layers = self_attention_layers(unet) if layers is None else list(layers)
    saved = dict(unet.attn_processors)
    missing = set(layers) - set(saved)
    if missing:
        raise ValueError(f"The UNet has no attention layers {sorted(missing)[:3]}.")
    clock = TimestepClock() if clock is None else clock
    chosen = set(layers)
    unet.set_attn_processor({name: make(name, proc, clock) if name in chosen else proc
                             for name, proc in saved.items()})
    handle = unet.register_forward_pre_hook(clock.read, with_kwargs=True)
    try:
        yield clock
    finally:
        handle.remove()
        unet.set_attn_processor(saved)


def recording(unet, bank: AttentionBank, endpoint: int, timesteps: Optional[Sequence[int]] = None,
              layers: Optional[Sequence[str]] = None):
    """Context manager: UNet calls inside it store the self-attention K and V of ``layers``
    (default: all) in ``bank`` as ``endpoint`` (0 or 1), at ``timesteps`` (default: all). The
    outputs are those of plain attention."""
    return installed(unet, lambda name, prev, clock: RecordingProcessor(name, prev, clock, bank, endpoint,
                                                                        timesteps), layers)


def interpolating(unet, bank: AttentionBank, alphas: Union[float, Sequence[float], torch.Tensor],
                  form: str = "inner", layers: Optional[Sequence[str]] = None):
    """Context manager: UNet calls inside it render frames at ``alphas`` (one per frame of the
    batch) with the self-attention of ``layers`` (default: all) interpolated by ``form`` between
    the endpoints recorded in ``bank``, at the timesteps the bank holds."""
    if form not in FORMS:
        raise ValueError(f"Unknown attention interpolation form '{form}': use one of {', '.join(FORMS)}.")
    alphas = torch.as_tensor(alphas, dtype=torch.float32).reshape(-1)
    return installed(unet, lambda name, prev, clock: InterpolatingProcessor(name, prev, clock, bank, alphas,
                                                                            form), layers)


# --------------------------------------------------------------------------------------------
# AID's outer and fused forms, and interpolated cross-attention
# (He et al., NeurIPS 2024, https://arxiv.org/abs/2403.17924; github.com/QY-H00/
# attention-interpolation-diffusion, interpolation.py)
# --------------------------------------------------------------------------------------------

def _with_own(own: KeyValue, kv: KeyValue) -> KeyValue:
    """``([K, K_e], [V, V_e])``: the frame's own keys and values and another pair, concatenated
    along the token axis (B, N + M, H*d)."""
    return torch.cat([own[0], kv[0]], dim=1), torch.cat([own[1], kv[1]], dim=1)


def _mask_for_both(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A (B, H, N, M) mask for keys ``[K, K_e]`` of twice the length (None stays None)."""
    return None if mask is None else torch.cat([mask, mask], dim=-1)


def outer_interpolation(attn, query: torch.Tensor, own: KeyValue, start: KeyValue, end: KeyValue,
                        alpha: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(1-a) Attn(Q, K_0, V_0) + a Attn(Q, K_1, V_1)``: the frame's queries attend to each
    endpoint and the two attention outputs are interpolated (AID's "outer" interpolation,
    ``OuterInterpolatedAttnProcessor`` with ``is_fused=False``). ``own`` is not used.

    Shapes as :func:`inner_interpolation`; returns (B, N, H*d)."""
    return _lerp(attention(attn, query, *start, mask), attention(attn, query, *end, mask), alpha)


def fused_interpolation(attn, query: torch.Tensor, own: KeyValue, start: KeyValue, end: KeyValue,
                        alpha: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(1-a) Attn(Q, [K, K_0], [V, V_0]) + a Attn(Q, [K, K_1], [V, V_1])``: AID's fused
    outer interpolation, the public code's default (``load_aid(atype="fused_outer",
    is_fused=True)``). Each endpoint's keys and values are concatenated after the frame's own
    ``own = (K, V)`` along the token axis, so the frame attends to itself and to one endpoint
    at a time; the two outputs are interpolated. At ``a = 0`` on endpoint 0's own trajectory
    ``K = K_0``: attention over a duplicated key set equals plain attention.

    Shapes as :func:`inner_interpolation`; returns (B, N, H*d)."""
    both = _mask_for_both(mask)
    return _lerp(attention(attn, query, *_with_own(own, start), both),
                 attention(attn, query, *_with_own(own, end), both), alpha)


def fused_inner_interpolation(attn, query: torch.Tensor, own: KeyValue, start: KeyValue, end: KeyValue,
                              alpha: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``Attn(Q, [K, (1-a) K_0 + a K_1], [V, (1-a) V_0 + a V_1])``: AID's fused inner
    interpolation (``atype="fused_inner"``): the interpolated keys and values concatenated
    after the frame's own.

    Shapes as :func:`inner_interpolation`; returns (B, N, H*d)."""
    mixed = (_lerp(start[0], end[0], alpha), _lerp(start[1], end[1], alpha))
    return attention(attn, query, *_with_own(own, mixed), _mask_for_both(mask))


FORMS.update({"outer": outer_interpolation, "fused": fused_interpolation,
              "fused-inner": fused_inner_interpolation})


def cross_attention_layers(unet, parts: Sequence[str] = ("down", "mid", "up")) -> list[str]:
    """Names (keys of ``unet.attn_processors``) of the cross-attention layers in the UNet
    ``parts``, as :func:`self_attention_layers` names the self-attention ones."""
    from diffusers.models.attention_processor import Attention

    unknown = set(parts) - set(UNET_PARTS)
    if unknown:
        raise ValueError(f"Unknown UNet parts {sorted(unknown)}: use {', '.join(UNET_PARTS)}.")
    prefixes = tuple(UNET_PARTS[p] + "." for p in parts)
    return [f"{name}.processor" for name, module in unet.named_modules()
            if isinstance(module, Attention) and module.is_cross_attention and name.startswith(prefixes)]


class CrossInterpolatingProcessor(KeyValueProcessor):
    """Cross-attention whose keys and values are combined by ``form`` between the two endpoints'
    text embeddings, AID's interpolation applied to cross-attention.

    The endpoints' keys and values ``K_e = W_k c_e``, ``V_e = W_v c_e`` come from
    ``embeddings`` (2, L, D), the text embeddings of endpoint 0 and 1 (they do not depend on the
    trajectory, so nothing is recorded); the frame's own ``K = W_k c(a)`` from the embeddings it
    is called with. Row ``r * B + i`` of a call of ``R * B`` rows uses ``alphas[i]`` (the
    layout of :class:`InterpolatingProcessor`). Self-attention runs ``previous`` unchanged.
    The "inner" form on linearly interpolated embeddings equals plain cross-attention, ``W_k``
    being linear; the other forms differ."""

    def __init__(self, layer, previous, clock, embeddings: torch.Tensor, alphas: torch.Tensor,
                 form: str = "fused"):
        super().__init__(layer, previous, clock)
        self.embeddings, self.alphas, self.form = embeddings, alphas, FORMS[form]

    def __call__(self, attn, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 *args, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is None:
            return self.previous(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                 *args, **kwargs)
        residual, shape = hidden_states, hidden_states.shape
        hidden_states, attention_mask = _attention_inputs(attn, hidden_states, temb, attention_mask,
                                                          encoder_hidden_states.shape[1])
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        context = torch.cat([encoder_hidden_states,
                             self.embeddings.to(encoder_hidden_states.device, encoder_hidden_states.dtype)])
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        keys, values = attn.to_k(context), attn.to_v(context)
        own = (keys[:batch], values[:batch])
        frames = self.alphas.numel()
        if batch % frames:
            raise ValueError(f"Cross-attention interpolation at layer {self.layer}: a batch of {batch} rows "
                             f"is not a multiple of {frames} alpha(s).")
        start, end = [(keys[batch + e:batch + e + 1].expand(batch, -1, -1),
                       values[batch + e:batch + e + 1].expand(batch, -1, -1)) for e in (0, 1)]
        alpha = self.alphas.to(query.device, torch.float32).repeat(batch // frames).view(-1, 1, 1)
        out = self.form(attn, query, own, start, end, alpha, attention_mask)
        return _attention_output(attn, out, shape, residual)


def interpolating_cross(unet, embeddings: torch.Tensor, alphas: Union[float, Sequence[float], torch.Tensor],
                        form: str = "fused", layers: Optional[Sequence[str]] = None):
    """Context manager: UNet calls inside it render frames at ``alphas`` (one per frame of the
    batch) with the cross-attention of ``layers`` (default: all) combined by ``form`` between
    the endpoints' text embeddings ``embeddings`` (2, L, D)."""
    if form not in FORMS:
        raise ValueError(f"Unknown attention interpolation form '{form}': use one of {', '.join(FORMS)}.")
    if embeddings.shape[0] != 2:
        raise ValueError(f"Cross-attention interpolation needs the two endpoints' embeddings, got "
                         f"{embeddings.shape[0]}.")
    layers = cross_attention_layers(unet) if layers is None else list(layers)
    alphas = torch.as_tensor(alphas, dtype=torch.float32).reshape(-1)
    return installed(unet, lambda name, prev, clock: CrossInterpolatingProcessor(
        name, prev, clock, embeddings, alphas, form), layers)


# --------------------------------------------------------------------------------------------
# Endpoints read from the batch itself, and attention averaged over the frames
# (FreeMorph, Cao et al., ICCV 2025, https://arxiv.org/abs/2507.01953; github.com/yukangcao/
# FreeMorph, aid_attention.py: AID's processors applied to one batch that holds every frame)
# --------------------------------------------------------------------------------------------

def _frame_blocks(rows: int, frames: int, layer: str) -> int:
    """How many blocks of ``frames`` rows a UNet call of ``rows`` rows holds (R in the module
    docstring's layout); a batch that is not a whole number of blocks raises ValueError."""
    if frames < 1 or rows % frames:
        raise ValueError(f"Attention over the frames at layer {layer}: a batch of {rows} rows is not a "
                         f"multiple of {frames} frame(s).")
    return rows // frames


def batch_ends(x: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and the last row of every block of ``frames`` rows of ``x`` (R * N, T, C),
    each repeated over its block: two tensors of ``x``'s shape. Row ``r * N + i`` of the first
    is row ``r * N`` of ``x`` (endpoint 0 of its block), of the second row ``r * N + N - 1``."""
    blocks = x.reshape(-1, frames, *x.shape[1:])
    first = blocks[:, :1].expand_as(blocks).reshape(x.shape)
    last = blocks[:, -1:].expand_as(blocks).reshape(x.shape)
    return first, last


def frame_mean(x: torch.Tensor, frames: int) -> torch.Tensor:
    """Every row of each block of ``frames`` rows of ``x`` (R * N, T, C) replaced by the block's
    mean over its rows, ``(1/N) sum_i x_i``, computed in float32, in ``x``'s dtype."""
    blocks = x.reshape(-1, frames, *x.shape[1:]).float()
    return blocks.mean(dim=1, keepdim=True).expand_as(blocks).reshape(x.shape).to(x.dtype)


class BatchEndsProcessor(KeyValueProcessor):
    """Self-attention combined by ``form`` (a name in :data:`FORMS`) between the first and the
    last frame of its own batch, frame ``i`` at ``alphas[i]``:

        outer   (1-a_i) Attn(Q_i, K_0, V_0) + a_i Attn(Q_i, K_{N-1}, V_{N-1})
        fused   (1-a_i) Attn(Q_i, [K_i, K_0], [V_i, V_0]) + a_i Attn(Q_i, [K_i, K_{N-1}], [V_i, V_{N-1}])

    where the endpoints' K, V are computed in the same UNet call as the frame's (no bank: the
    N frames, ends included, run as one batch; a call of ``R * N`` rows holds R such blocks).
    An end row at alpha 0 (first) or 1 (last) attends as plain attention does."""

    def __init__(self, layer, previous, clock, alphas: torch.Tensor, form: str = "outer"):
        super().__init__(layer, previous, clock)
        self.alphas, self.form = alphas, FORMS[form]

    def attend(self, attn, query, key, value, mask):
        frames = self.alphas.numel()
        blocks = _frame_blocks(query.shape[0], frames, self.layer)
        first_k, last_k = batch_ends(key, frames)
        first_v, last_v = batch_ends(value, frames)
        alpha = self.alphas.to(query.device, torch.float32).repeat(blocks).view(-1, 1, 1)
        return self.form(attn, query, (key, value), (first_k, first_v), (last_k, last_v), alpha, mask)


class FrameMeanProcessor(KeyValueProcessor):
    """Attention whose output, for every frame, is the mean over the N frames of the batch of
    each frame's own attention, ``(1/N) sum_i Attn(Q_i, K_i, V_i)`` (before the output
    projection; the residual stays each frame's own). Acts on self-attention and, unlike the
    other processors here, on cross-attention too (keys and values from the text)."""

    def __init__(self, layer, previous, clock, frames: int):
        super().__init__(layer, previous, clock)
        self.frames = int(frames)

    def attend(self, attn, query, key, value, mask):
        _frame_blocks(query.shape[0], self.frames, self.layer)
        return frame_mean(attention(attn, query, key, value, mask), self.frames)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 *args, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, None, attention_mask, temb, *args, **kwargs)
        residual, shape = hidden_states, hidden_states.shape
        hidden_states, attention_mask = _attention_inputs(attn, hidden_states, temb, attention_mask,
                                                          encoder_hidden_states.shape[1])
        context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        out = self.attend(attn, attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context), attention_mask)
        return _attention_output(attn, out, shape, residual)


def interpolating_batch_ends(unet, alphas: Union[Sequence[float], torch.Tensor], form: str = "outer",
                             layers: Optional[Sequence[str]] = None):
    """Context manager: UNet calls inside it render the N = len(alphas) frames of each batch
    block with the self-attention of ``layers`` (default: all) combined by ``form`` between the
    block's first and last frame (:class:`BatchEndsProcessor`), at every timestep."""
    if form not in FORMS:
        raise ValueError(f"Unknown attention interpolation form '{form}': use one of {', '.join(FORMS)}.")
    alphas = torch.as_tensor(alphas, dtype=torch.float32).reshape(-1)
    return installed(unet, lambda name, prev, clock: BatchEndsProcessor(name, prev, clock, alphas, form),
                     layers)


def averaging_frames(unet, frames: int, layers: Optional[Sequence[str]] = None):
    """Context manager: UNet calls inside it give every frame of each block of ``frames`` rows
    the frames' mean attention output (:class:`FrameMeanProcessor`) at ``layers`` (default:
    every self- and cross-attention layer), at every timestep."""
    if layers is None:
        layers = self_attention_layers(unet) + cross_attention_layers(unet)
    return installed(unet, lambda name, prev, clock: FrameMeanProcessor(name, prev, clock, frames), layers)
