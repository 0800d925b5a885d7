"""Barycenters and displacement interpolation against closed forms.

In 1D the W2 barycenter of N(m0, s0^2) and N(m1, s1^2) with weights (1 - a, a) is
N((1 - a) m0 + a m1, ((1 - a) s0 + a s1)^2); the barycenter of two Diracs is a Dirac at the
interpolated position; the barycenter of a cloud and its translate by s is the cloud translated
by a s. The linear mixture obeys none of these, which the tests also check.
"""

import numpy as np
import ot as pot
import pytest

from impus_lite import ot as iot

GRID = np.linspace(-6.0, 6.0, 121)
M0, S0, M1, S1 = -2.0, 0.5, 2.0, 1.0


@pytest.fixture(scope="module")
def gaussians():
    return iot.gaussian_histogram(GRID, M0, S0), iot.gaussian_histogram(GRID, M1, S1)


def dirac(n, index):
    h = np.zeros(n)
    h[index] = 1.0
    return h


@pytest.mark.parametrize("alpha", [0.25, 0.6])
@pytest.mark.parametrize("solver", [iot.displacement_interpolation_1d, iot.lp_barycenter_1d])
def test_gaussian_barycenter_interpolates_mean_and_std(gaussians, solver, alpha):
    h0, h1 = gaussians
    bary = solver(h0, h1, alpha, GRID)
    mean, std = iot.histogram_mean_std(bary, GRID)
    assert bary.shape == GRID.shape and bary.sum() == pytest.approx(1.0)
    assert mean == pytest.approx((1 - alpha) * M0 + alpha * M1, abs=5e-3)
    assert std == pytest.approx((1 - alpha) * S0 + alpha * S1, abs=5e-3)


def test_linear_mixture_keeps_both_bumps(gaussians):
    h0, h1 = gaussians
    mix = iot.linear_mixture(h0, h1, 0.5)
    mean, std = iot.histogram_mean_std(mix, GRID)
    assert mean == pytest.approx(0.0, abs=1e-3)
    expected_std = np.sqrt(0.5 * (S0**2 + M0**2) + 0.5 * (S1**2 + M1**2))
    assert std == pytest.approx(expected_std, abs=5e-3)
    # Half the mass stays where h0 was; the middle, where the barycenter N(0, 0.75^2) peaks,
    # stays nearly empty.
    assert mix[np.abs(GRID - M0) < 1.5].sum() == pytest.approx(0.5, abs=0.01)
    bary = iot.displacement_interpolation_1d(h0, h1, 0.5, GRID)
    middle = np.abs(GRID) <= 0.5
    assert mix[middle].sum() < 0.05
    assert bary[middle].sum() > 0.45


def test_two_diracs_move_rather_than_mix():
    d0, d1 = dirac(100, 10), dirac(100, 50)
    for solver in (iot.displacement_interpolation_1d, iot.lp_barycenter_1d):
        bary = solver(d0, d1, 0.25)
        np.testing.assert_allclose(bary, dirac(100, 20), atol=1e-6)
    mix = iot.linear_mixture(d0, d1, 0.25)
    assert mix[10] == pytest.approx(0.75) and mix[50] == pytest.approx(0.25) and mix[20] == 0


def test_shifted_histogram_is_translated_not_blended():
    rng = np.random.default_rng(0)
    h0 = np.zeros(120)
    h0[5:25] = rng.random(20)  # an irregular profile, so a mirror or blur would show
    h1 = np.roll(h0, 40)
    for alpha, shift in [(0.0, 0), (0.25, 10), (0.5, 20), (1.0, 40)]:
        bary = iot.displacement_interpolation_1d(h0, h1, alpha)
        np.testing.assert_allclose(bary, np.roll(h0, shift) / h0.sum(), atol=1e-12)


def test_displacement_interpolation_splits_off_grid_mass_keeping_the_mean():
    bary = iot.displacement_interpolation_1d(dirac(10, 2), dirac(10, 5), 0.5)
    np.testing.assert_allclose(bary[[3, 4]], [0.5, 0.5])
    assert iot.histogram_mean_std(bary, np.arange(10))[0] == pytest.approx(3.5)


def test_entropic_barycenter_is_blurred_and_converges(gaussians):
    h0, h1 = gaussians
    alpha = 0.25
    exact_std = (1 - alpha) * S0 + alpha * S1
    stds = []
    for reg in (0.5, 0.1, 0.02):
        bary = iot.entropic_barycenter_1d(h0, h1, alpha, reg, GRID)
        mean, std = iot.histogram_mean_std(bary, GRID)
        assert mean == pytest.approx((1 - alpha) * M0 + alpha * M1, abs=5e-3)
        stds.append(std)
    assert stds[0] > stds[1] > stds[2] > exact_std
    assert stds[0] > exact_std + 0.1
    assert stds[2] == pytest.approx(exact_std, abs=0.015)


def test_entropic_barycenter_reports_underflow(gaussians):
    h0, h1 = gaussians
    with pytest.raises(ValueError, match="overflowed"):
        iot.entropic_barycenter_1d(h0, h1, 0.5, 0.01, GRID, method="sinkhorn")


def test_free_support_barycenter_of_shifted_clouds_is_the_shifted_cloud():
    rng = np.random.default_rng(1)
    X0 = rng.normal(size=(40, 2)) * [1.0, 0.4]
    shift = np.array([3.0, -1.0])
    X1 = (X0 + shift)[rng.permutation(40)]
    for alpha in (0.25, 0.7):
        expected = X0 + alpha * shift
        bary = iot.free_support_barycenter(X0, X1, alpha, seed=3)
        assert bary.shape == X0.shape
        assert pot.emd2([], [], pot.dist(bary, expected)) < 1e-12
        moved = iot.displacement_interpolation_points(X0, X1, alpha)
        np.testing.assert_allclose(moved, expected, atol=1e-12)  # row i is X0_i moved


def test_free_support_barycenter_of_two_points_is_their_weighted_mean():
    bary = iot.free_support_barycenter(np.array([[0.0, 0.0]]), np.array([[4.0, 2.0]]), 0.25)
    np.testing.assert_allclose(bary, [[1.0, 0.5]])


def test_convolutional_barycenter_moves_a_disc():
    size, radius = 32, 4
    c0, c1 = np.array([8.0, 8.0]), np.array([24.0, 22.0])
    d0, d1 = iot.disc_image(size, c0, radius), iot.disc_image(size, c1, radius)
    rows, cols = np.indices((size, size))
    for alpha in (0.25, 0.5):
        centre = (1 - alpha) * c0 + alpha * c1
        near = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= (radius + 2) ** 2
        bary = iot.convolutional_barycenter(d0, d1, alpha, reg=0.002)
        np.testing.assert_allclose(iot.image_centroid(bary), centre, atol=0.05)
        assert bary[near].sum() > 0.95
        mix = iot.linear_mixture(d0, d1, alpha)
        np.testing.assert_allclose(iot.image_centroid(mix), centre, atol=1e-9)  # same centroid
        if alpha == 0.5:  # ... but no mass there: two ghosts instead of one disc
            assert mix[near].sum() == 0


def test_convolutional_barycenter_endpoints_are_the_inputs_blurred():
    d0 = iot.disc_image(24, (8, 8), 4)
    sq = iot.square_image(24, (15, 15), 5)
    bary = iot.convolutional_barycenter(d0, sq, 0.0, reg=0.002)
    assert np.abs(bary - d0 / d0.sum()).sum() < 0.3
    assert np.abs(bary - sq / sq.sum()).sum() > 1.5


def test_shapes_drawn_on_the_grid():
    assert iot.disc_image(16, (8, 8), 3).sum() == 29  # lattice points with r^2 <= 9
    assert iot.square_image(16, (8, 8), 2).sum() == 25
    ring = iot.ring_image(32, (16, 16), 10, 3)
    assert ring[16, 16] == 0 and ring[16, 26] == 1 and ring[16, 23] == 0
    np.testing.assert_allclose(iot.image_centroid(ring), [16, 16])


@pytest.mark.parametrize("call, message", [
    (lambda: iot.displacement_interpolation_1d(dirac(5, 0), dirac(5, 1), 1.5), "alpha"),
    (lambda: iot.displacement_interpolation_1d(dirac(5, 0), dirac(6, 1), 0.5), "one length"),
    (lambda: iot.lp_barycenter_1d(-dirac(5, 0), dirac(5, 1), 0.5), "non-negative"),
    (lambda: iot.linear_mixture(np.zeros(4), dirac(4, 1), 0.5), "positive total mass"),
    (lambda: iot.displacement_interpolation_1d(dirac(3, 0), dirac(3, 1), 0.5, x=[0, 2, 1]),
     "increasing"),
    (lambda: iot.entropic_barycenter_1d(dirac(5, 0), dirac(5, 1), 0.5, 0.0), "reg"),
    (lambda: iot.entropic_barycenter_1d(dirac(5, 0), dirac(5, 1), 0.5, 1.0, method="exact"),
     "method"),
    (lambda: iot.free_support_barycenter(np.zeros((3, 2)), np.zeros((3, 3)), 0.5), "dimension"),
    (lambda: iot.convolutional_barycenter(np.ones((4, 4)), np.ones((4, 5)), 0.5), "one shape"),
])
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
