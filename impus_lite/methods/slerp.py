"""Slerp: the baseline every diffusion-morphing paper starts from (e.g. DiffMorpher,
https://arxiv.org/abs/2312.07409, section 3; Song et al.'s DDIM, https://arxiv.org/abs/2010.02502,
interpolate codes this way). No training:

    z_k = DDIM-inversion(E(x_k), c)             k = 0, 1, guidance 1
    z(a) = slerp(z_0, z_1, a),  c(a) = lerp(c_0, c_1, a)
    x(a) = D(DDIM-sample(z(a), c(a), w))

With one shared prompt c_0 = c_1 and the lerp is the identity. At guidance w = 1 (the default)
frame 0 and 1 are the inversions' round trips; a larger w sharpens the frames but moves the
ends away from the inputs."""

from __future__ import annotations

from dataclasses import dataclass

from ..interp import lerp, slerp
from ..inversion import ddim_sample
from ..text import encode_prompt, unconditional_embedding
from .base import frame_schedule, parse_options, start_run

NAME = "slerp"
#: MorphConfig fields slerp reads besides the common ones.
USES = ("timestep_spacing", "inversion_steps", "sample_steps", "schedule", "frames",
        "lpips_step", "lpips_tol", "search_candidates", "reschedule_passes",
        "reschedule_damping", "beta_a", "beta_b", "max_frames")


@dataclass(frozen=True)
class Options:
    """Slerp's settings.

    Attributes:
        guidance: classifier-free guidance scale of every frame (1 = none).
    """

    guidance: float = 1.0


def run(model, image0, image1, prompt, config, cache_dir=None, lpips=None, progress=True):
    """Morph by slerp of inverted codes; returns a MorphResult (stages encode, inversion,
    frames)."""
    options = parse_options(Options, NAME, config.method_options)
    run = start_run(NAME, USES, model, image0, image1, prompt, config, cache_dir, lpips, progress)
    c = config
    latents = run.latents()
    cond = encode_prompt(model, prompt).expand(2, -1, -1)
    uncond = unconditional_embedding(model)
    codes = run.inverted_codes(latents, cond, c.inversion_steps, (prompt, prompt))

    def render(alphas):
        k = len(alphas)
        start = slerp(codes[0:1], codes[1:2], alphas).reshape(k, *codes.shape[1:])
        embedding = lerp(cond[0:1], cond[1:2], alphas).reshape(k, *cond.shape[1:])
        out = ddim_sample(model, start, embedding, uncond, options.guidance, c.sample_steps,
                          progress=False, timestep_spacing=c.timestep_spacing)
        return model.decode(out).cpu()

    return run.finish(frame_schedule(run, render))
