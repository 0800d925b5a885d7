"""IMPUS (Yang et al., ICLR 2024, https://arxiv.org/abs/2311.06792) as this package implements
it: text-embedding optimisation, DDIM inversion, rPPD-ranked LoRA bottleneck, unconditional
adapter, re-inversion and perceptually-uniform alphas. The stages live in
:class:`impus_lite.morph.Morpher`; this module is its entry in the methods family."""

from __future__ import annotations

from ..errors import InputError
from ..morph import Morpher

#: IMPUS reads every MorphConfig field but ``method_options``.
USES = None


def run(model, image0, image1, prompt, config, cache_dir=None, lpips=None, progress=True):
    """Run every IMPUS stage (see :class:`impus_lite.morph.Morpher`)."""
    if config.method_options:
        raise InputError("IMPUS takes no method_options: its settings are MorphConfig fields.")
    return Morpher(model, image0, image1, prompt, config, cache_dir, lpips, progress).run()
