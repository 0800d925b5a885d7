"""The 2D diffusion model, its DDIM encoder, and optimal transport.

For Gaussian data N(m, S) the probability-flow ODE from data to noise is the Monge map
x -> S^{-1/2} (x - m). The model is trained once per module on such data (a few seconds); the
tests then check the encoder against that closed form, and against another map that also pushes
N(m, S) onto N(0, I) but is not optimal, which it must not resemble.
"""

import numpy as np
import pytest
import torch

from impus_lite import toy_diffusion as td

MEAN = np.array([1.0, -0.5])
COV = np.array([[1.5, 0.6], [0.6, 0.5]])


def rotation(theta):
    return np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])


@pytest.fixture(scope="module")
def gaussian_model():
    data = td.sample_gaussian(20000, MEAN, COV, seed=0)
    return td.train_toy_diffusion(data, steps=1000, batch_size=256, hidden=64, fourier_features=0,
                                  seed=0, progress=False)


@pytest.fixture(scope="module")
def encoded(gaussian_model):
    x = td.sample_gaussian(600, MEAN, COV, seed=1)
    return x, gaussian_model.encode(x, num_steps=100, progress=False)


def mean_sq(a, b):
    return float(np.mean(np.sum((a - b) ** 2, axis=1)))


def test_monge_matrix_is_the_symmetric_inverse_square_root():
    A = td.gaussian_monge_matrix(COV)
    np.testing.assert_allclose(A, A.T, atol=1e-12)
    np.testing.assert_allclose(A @ COV @ A, np.eye(2), atol=1e-12)
    assert np.linalg.eigvalsh(A).min() > 0
    np.testing.assert_allclose(td.gaussian_monge_matrix(np.diag([4.0, 0.25])), np.diag([0.5, 2.0]))


def test_gaussian_monge_map_is_optimal_and_a_rotated_one_is_not():
    x = td.sample_gaussian(300, MEAN, COV, seed=2)
    z = td.gaussian_monge_map(x, MEAN, COV)
    mean, cov = td.fit_gaussian(z)
    np.testing.assert_allclose(mean, 0, atol=0.15)
    np.testing.assert_allclose(cov, np.eye(2), atol=0.2)
    best = td.compare_with_exact_ot(x, z)
    assert best.identical_share == 1.0 and best.cost_ratio == pytest.approx(1.0)
    # z R^T also has law N(0, I), but x -> R S^{-1/2} (x - m) is not a gradient of a convex map.
    other = td.compare_with_exact_ot(x, z @ rotation(0.8).T)
    assert other.identical_share < 0.2 and other.cost_ratio > 1.2


def test_training_is_seeded_and_learns():
    data = td.sample_moons(2000, seed=0)
    a = td.train_toy_diffusion(data, steps=60, batch_size=64, hidden=16, seed=5, progress=False)
    b = td.train_toy_diffusion(data, steps=60, batch_size=64, hidden=16, seed=5, progress=False)
    c = td.train_toy_diffusion(data, steps=60, batch_size=64, hidden=16, seed=6, progress=False)
    assert a.losses == b.losses and a.losses != c.losses
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("fourier_features", [0, 3])
def test_noise_predictor_shapes(fourier_features):
    net = td.NoisePredictor(hidden=8, depth=2, fourier_features=fourier_features)
    assert net.net[0].in_features == 2 + 4 * fourier_features + 32
    x = torch.zeros(5, 2)
    assert net(x, torch.arange(5)).shape == (5, 2)
    torch.testing.assert_close(net(x, 7), net(x, torch.full((5,), 7)))  # a scalar t broadcasts


def test_training_loss_falls(gaussian_model):
    losses = np.asarray(gaussian_model.losses)
    assert len(losses) == 1000
    assert losses[:5].mean() > 0.8  # an untrained predictor: eps has unit variance
    assert losses[-200:].mean() < 0.5 * losses[:5].mean()


def test_ddim_encoder_is_the_gaussian_monge_map(encoded):
    x, z = encoded
    monge = td.gaussian_monge_map(x, MEAN, COV)
    scale = mean_sq(monge, 0 * monge)  # E|S^{-1/2}(x - m)|^2 = 2
    assert scale == pytest.approx(2.0, rel=0.15)
    assert mean_sq(z, monge) < 0.03
    assert mean_sq(z, monge @ rotation(0.8).T) > 0.5
    assert mean_sq(z, x - MEAN) > 0.3  # the code is not just the centred point


def test_ddim_encoder_pairing_is_the_exact_ot_plan(encoded):
    x, z = encoded
    result = td.compare_with_exact_ot(x, z)
    assert result.identical_share > 0.9
    assert result.cost_ratio < 1.01
    assert result.map_cost < 0.5 * result.independent_cost
    shuffled = td.compare_with_exact_ot(x, z[np.random.default_rng(0).permutation(len(z))])
    assert shuffled.identical_share < 0.05 and shuffled.cost_ratio > 2


def test_codes_are_standard_gaussian_and_decode_back(gaussian_model, encoded):
    x, z = encoded
    mean, cov = td.fit_gaussian(z)
    np.testing.assert_allclose(mean, 0, atol=0.2)
    np.testing.assert_allclose(cov, np.eye(2), atol=0.2)
    x_back, path = gaussian_model.decode(z, num_steps=100, return_trajectory=True, progress=False)
    assert path.shape == (101, 600, 2)
    np.testing.assert_allclose(path[0], z, atol=1e-6)
    np.testing.assert_allclose(path[-1], x_back)
    assert mean_sq(x_back, x) < 0.01


def test_samples_follow_the_data_law(gaussian_model):
    samples = gaussian_model.sample(2000, num_steps=50, seed=3, progress=False)
    mean, cov = td.fit_gaussian(samples)
    np.testing.assert_allclose(mean, MEAN, atol=0.12)
    np.testing.assert_allclose(cov, COV, atol=0.2)


def test_forward_noise_ends_at_the_standard_gaussian(gaussian_model):
    x = td.sample_gaussian(4000, MEAN, COV, seed=4)
    almost_clean = gaussian_model.forward_noise(x, 0, seed=1)
    assert mean_sq(almost_clean, x) < 1e-3  # abar_0 = 1 - 1e-4
    noise = gaussian_model.forward_noise(x, 999, seed=1)
    mean, cov = td.fit_gaussian(noise)
    np.testing.assert_allclose(mean, 0, atol=0.06)
    np.testing.assert_allclose(cov, np.eye(2), atol=0.08)


def test_datasets_are_seeded_and_shaped():
    np.testing.assert_array_equal(td.sample_moons(50, seed=3), td.sample_moons(50, seed=3))
    assert not np.array_equal(td.sample_moons(50, seed=3), td.sample_moons(50, seed=4))
    moons = td.sample_moons(4000, noise=0.0)
    assert moons.shape == (4000, 2)
    upper = np.hypot(moons[:, 0] + 0.5, moons[:, 1] + 0.25)
    lower = np.hypot(moons[:, 0] - 0.5, moons[:, 1] - 0.25)
    assert np.all(np.minimum(np.abs(upper - 1), np.abs(lower - 1)) < 1e-9)  # on the two arcs
    mix = td.sample_gaussian_mixture(4000, centers=[(-2, 0), (2, 0)], std=0.1, seed=0)
    assert np.all(np.abs(np.abs(mix[:, 0]) - 2) < 0.6)
    assert abs(np.mean(mix[:, 0] > 0) - 0.5) < 0.05


@pytest.mark.parametrize("call, message", [
    (lambda: td.sample_gaussian(10, MEAN, [[1.0, 2.0], [2.0, 1.0]]), "positive definite"),
    (lambda: td.sample_moons(0), "positive integer"),
    (lambda: td.sample_gaussian_mixture(10, centers=[1.0, 2.0]), "shape"),
    (lambda: td.train_toy_diffusion(np.zeros((10, 3)), steps=1), r"\(n, 2\)"),
    (lambda: td.compare_with_exact_ot(np.zeros((4, 2)), np.zeros((5, 2))), "one shape"),
    (lambda: td.gaussian_monge_map(np.zeros((4, 2)), MEAN, np.eye(2) * -1), "positive definite"),
    (lambda: td.fit_gaussian(np.zeros((2, 2))), "at least 3"),
    (lambda: td.NoisePredictor(fourier_features=-1), "fourier_features"),
])
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_bad_step_count_raises_value_error(gaussian_model):
    with pytest.raises(ValueError, match="num_steps"):
        gaussian_model.encode(np.zeros((3, 2)), num_steps=0, progress=False)
    with pytest.raises(ValueError, match="timestep"):
        gaussian_model.forward_noise(np.zeros((3, 2)), 1000)
