import math

import numpy as np
import pytest
import torch

from impus_lite.interp import lerp, slerp


def unit(seed, shape=(1, 4, 8, 8)):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x / x.norm()


def test_slerp_hits_both_ends_exactly():
    x0, x1 = unit(0), unit(1)
    out = slerp(x0, x1, [0.0, 1.0])
    assert out.shape == (2, *x0.shape)
    assert torch.allclose(out[0], x0, atol=1e-12) and torch.allclose(out[1], x1, atol=1e-12)


def test_slerp_keeps_unit_norm_and_lerp_shrinks_it():
    x0, x1 = unit(2), unit(3)
    alphas = torch.linspace(0, 1, 11)
    norms = slerp(x0, x1, alphas).flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.ones(11, dtype=torch.float64), atol=1e-10)
    # Nearly orthogonal unit vectors: the midpoint of the chord has norm ~ 1/sqrt(2).
    mid = lerp(x0, x1, 0.5).norm().item()
    assert mid == pytest.approx(1 / math.sqrt(2), abs=0.05)


def test_slerp_moves_at_constant_angular_speed():
    x0, x1 = unit(4), unit(5)
    theta = torch.arccos((x0 * x1).sum())
    out = slerp(x0, x1, [0.25, 0.5])
    angle = torch.arccos((x0 * out[0]).sum() / out[0].norm())
    assert angle.item() == pytest.approx(0.25 * theta.item(), rel=1e-9)


def test_slerp_keeps_a_common_norm_of_gaussian_codes():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(4, 32, 32, generator=g), torch.randn(4, 32, 32, generator=g)
    x1 = x1 * x0.norm() / x1.norm()
    out = slerp(x0, x1, 0.3)
    assert out.norm().item() == pytest.approx(x0.norm().item(), rel=1e-5)


def test_parallel_vectors_fall_back_to_lerp_without_nan():
    x0 = unit(6)
    x1 = x0 * 2.0
    out = slerp(x0, x1, [0.5])
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0], 1.5 * x0, atol=1e-12)


def test_lerp_values_and_float_alpha_shape():
    x0, x1 = torch.zeros(2, 3), torch.ones(2, 3)
    assert lerp(x0, x1, 0.25).shape == (2, 3)
    assert torch.allclose(lerp(x0, x1, [0.0, 0.25, 1.0])[:, 0, 0], torch.tensor([0.0, 0.25, 1.0]))


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="one shape"):
        slerp(torch.zeros(3), torch.zeros(4), 0.5)


@pytest.mark.parametrize("gap", [1e-3, 1e-6, 1e-9])
def test_nearly_opposite_codes_keep_their_norm_and_ends(gap):
    # float64 unit vectors: near opposition slerp amplifies any difference of the two norms by
    # about 1 / gap, so the norms must be equal to float64 precision for this check
    x0 = unit(7, (4, 16, 16))
    x1 = -x0 + gap * unit(8, (4, 16, 16))                             # cos theta rounds to -1 below 1e-8
    x1 = x1 / x1.norm()
    out = slerp(x0, x1, [0.0, 0.25, 0.5, 0.75, 1.0])
    norms = out.flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.ones(5, dtype=torch.float64), atol=1e-6), norms
    assert torch.allclose(out[0], x0, atol=1e-9) and torch.allclose(out[-1], x1, atol=1e-9)
    quarter = torch.arccos((out[1] * x0).sum() / (out[1].norm() * x0.norm()))
    assert quarter.item() == pytest.approx(math.pi / 4, rel=1e-3)              # a quarter of a half turn


def test_exactly_opposite_vectors_are_a_clear_error():
    x0 = unit(9)
    with pytest.raises(ValueError, match="opposite"):
        slerp(x0, -3 * x0, 0.5)


@pytest.mark.parametrize("alpha", [0.25, np.float32(0.25), np.float64(0.25), torch.tensor(0.25)])
def test_any_single_alpha_returns_the_shape_of_the_inputs(alpha):
    x0, x1 = unit(10, (4, 8, 8)), unit(11, (4, 8, 8))
    assert slerp(x0, x1, alpha).shape == (4, 8, 8)
    assert lerp(x0, x1, alpha).shape == (4, 8, 8)
