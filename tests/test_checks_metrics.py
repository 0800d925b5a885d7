"""The evaluation lessons' checks (impus_lite.checks.metrics): the package's own answer passes, a
plausible mistake is wrong, a stub is "not written", and none of them raises outside strict mode."""

import numpy as np
import pytest
import torch

from impus_lite import checks
from impus_lite import perceptual as P
from impus_lite.methods.diffmorpher import channel_statistics, interpolate_codes


@pytest.fixture(autouse=True)
def not_strict(monkeypatch):
    monkeypatch.delenv(checks.STRICT_ENV, raising=False)


def stub(*args, **kwargs):
    raise NotImplementedError("write it")


# ---- right answers (the package's, or the closed form) ----------------------------------------

def ppl_right(frames, distance):
    return P.ppl_path_sum(P.consecutive_distances(frames, distance))


def rppd_straight_right(K):
    return 1 / (K - 1) ** 2


def knn_right(real, fake, k=3):
    return P.knn_precision(real, fake, k)


def dissolve_right(alpha, rms):
    return min(alpha, 1 - alpha) * rms


def adain_right(s, z0, z1, alpha):
    (m0, s0), (m1, s1), (m, sd) = channel_statistics(z0), channel_statistics(z1), channel_statistics(s)
    return ((s.double() - m) / sd * ((1 - alpha) * s0 + alpha * s1) + (1 - alpha) * m0 + alpha * m1).float()


# ---- plausible mistakes -----------------------------------------------------------------------

def ppl_mean(frames, distance):
    return float(np.mean(P.consecutive_distances(frames, distance)))


def rppd_straight_metric(K):
    return 1 / (K - 1)


def knn_counting_self(real, fake, k=3):
    radii = torch.cdist(real, real).kthvalue(k, dim=1).values
    return float((torch.cdist(fake, real) <= radii[None]).any(dim=1).double().mean())


def dissolve_far(alpha, rms):
    return max(alpha, 1 - alpha) * rms


def adain_variances(s, z0, z1, alpha):
    (m0, s0), (m1, s1), (m, sd) = channel_statistics(z0), channel_statistics(z1), channel_statistics(s)
    target = ((1 - alpha) * s0 ** 2 + alpha * s1 ** 2).sqrt()
    return ((s.double() - m) / sd * target + (1 - alpha) * m0 + alpha * m1).float()


def adain_whole_code(s, z0, z1, alpha):
    def stats(x):
        x = x.double()
        return x.mean(), x.std(unbiased=False)
    (m0, s0), (m1, s1), (m, sd) = stats(z0), stats(z1), stats(s)
    return ((s.double() - m) / sd * ((1 - alpha) * s0 + alpha * s1) + (1 - alpha) * m0 + alpha * m1).float()


CASES = [
    (checks.check_ppl, ppl_right, [ppl_mean]),
    (checks.check_rppd_straight, rppd_straight_right, [rppd_straight_metric]),
    (checks.check_knn_precision, knn_right, [knn_counting_self]),
    (checks.check_dissolve_distance, dissolve_right, [dissolve_far]),
    (checks.check_adain, adain_right, [adain_variances, adain_whole_code]),
]
IDS = [case[0].__name__ for case in CASES]


@pytest.mark.parametrize("check, right, wrongs", CASES, ids=IDS)
def test_the_right_answer_passes(check, right, wrongs):
    result = check(right)
    assert result.status == "right", result.line


@pytest.mark.parametrize("check, right, wrongs", CASES, ids=IDS)
def test_a_plausible_mistake_is_wrong_with_a_hint(check, right, wrongs, capsys):
    for wrong in wrongs:
        result = check(wrong)
        assert result.status == "wrong", (wrong.__name__, result.line)
        assert result.hint
    assert "✗ wrong" in capsys.readouterr().out


@pytest.mark.parametrize("check, right, wrongs", CASES, ids=IDS)
def test_a_stub_is_not_written_yet(check, right, wrongs):
    assert check(stub).status == "not written"


@pytest.mark.parametrize("check, right, wrongs", CASES, ids=IDS)
def test_strict_mode_raises_only_for_what_is_not_right(check, right, wrongs, monkeypatch):
    monkeypatch.setenv(checks.STRICT_ENV, "1")
    assert check(right)
    with pytest.raises(checks.CheckFailed):
        check(stub)
    with pytest.raises(checks.CheckFailed):
        check(wrongs[0])


def test_the_checks_answers_are_the_closed_forms_the_lessons_derive():
    """The straight path's rPPD is 1/(K-1)^2 under a squared distance and 1/(K-1) under a metric;
    AdaIN gives back the end codes at alpha 0 and 1."""
    x0, x1 = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    path = torch.cat([(1 - a) * x0 + a * x1 for a in np.linspace(0, 1, 10)])
    squared = P.rppd(P.consecutive_distances(path, lambda a, b: (a - b).pow(2).flatten(1).mean(1)), 1.0)
    metric = P.rppd(P.consecutive_distances(path, lambda a, b: (a - b).abs().flatten(1).mean(1)), 1.0)
    assert squared == pytest.approx(1 / 81) and metric == pytest.approx(1 / 9)
    z0, z1 = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8) * 2
    ends = interpolate_codes(z0, z1, [0.0, 1.0])
    assert torch.allclose(ends[0:1], z0, atol=1e-5) and torch.allclose(ends[1:2], z1, atol=1e-5)
