"""The checks of notebook 05 (impus_lite.checks.adapters): the package's own answer is right, a
plausible mistake is wrong, a stub is "not written", and none of them raises unless strict."""

import math

import pytest
import torch

from impus_lite import checks
from impus_lite.lora import rank_from_rppd
from impus_lite.perceptual import rppd


@pytest.fixture(autouse=True)
def lenient(monkeypatch):
    monkeypatch.delenv(checks.STRICT_ENV, raising=False)


def stub(*args):
    raise NotImplementedError("write it")


def test_check_rppd():
    assert checks.check_rppd(rppd).status == "right"
    assert checks.check_rppd(lambda steps, end: steps.sum() / (len(steps) * end)).status == "right"
    # dividing by the number of frames K instead of the K-1 steps
    assert checks.check_rppd(lambda steps, end: steps.sum() / ((len(steps) + 1) * end)).status == "wrong"
    assert checks.check_rppd(stub).status == "not written"


def test_check_rank_rule():
    assert checks.check_rank_rule(rank_from_rppd).status == "right"
    # forgetting the max(0, ...): 2 ** -3 below the first threshold
    assert checks.check_rank_rule(lambda v, o: 2.0 ** math.floor(18 * v - 6)).status == "wrong"
    # an outlier pair set to 16 whatever the rule gives
    assert checks.check_rank_rule(
        lambda v, o: 16 if o else 2 ** max(0, math.floor(18 * v - 6))).status == "wrong"
    assert checks.check_rank_rule(stub).status == "not written"


def test_check_lora_forward():
    def right(x, W, A, B, alpha, r):
        return x @ W.T + (alpha / r) * (x @ A.T) @ B.T

    assert checks.check_lora_forward(right).status == "right"
    assert checks.check_lora_forward(lambda x, W, A, B, alpha, r: x @ W.T + (x @ A.T) @ B.T).status == "wrong"
    assert checks.check_lora_forward(lambda x, W, A, B, alpha, r: x @ W.T).status == "wrong"
    assert checks.check_lora_forward(stub).status == "not written"


def test_check_lora_forward_uses_a_real_peft_layer_with_nonzero_b():
    from impus_lite.checks.adapters import _lora_layer

    layer, x = _lora_layer()
    assert type(layer).__module__.startswith("peft.")
    assert float(layer.lora_B["default"].weight.detach().abs().max()) > 0
    with torch.no_grad():
        assert not torch.allclose(layer(x), layer.base_layer(x))


def test_check_rppd_straight():
    assert checks.check_rppd_straight(lambda K: 1 / (K - 1) ** 2).status == "right"
    assert checks.check_rppd_straight(1 / 81).status == "right"
    assert checks.check_rppd_straight(0.0123).status == "right"
    assert checks.check_rppd_straight(lambda K: 1 / (K - 1)).status == "wrong"  # additive distance
    assert checks.check_rppd_straight(1 / 9).status == "wrong"
    assert checks.check_rppd_straight(stub).status == "not written"
    assert checks.check_rppd_straight(...).status == "not written"


def test_strict_mode_raises(monkeypatch):
    monkeypatch.setenv(checks.STRICT_ENV, "1")
    with pytest.raises(checks.CheckFailed):
        checks.check_rppd(stub)
    with pytest.raises(checks.CheckFailed):
        checks.check_rppd_straight(1 / 9)
    assert checks.check_rank_rule(rank_from_rppd)
