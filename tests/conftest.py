"""Shared fixtures: the tiny random model (through the real loader) and LPIPS.

Tests run offline: no hub downloads. LPIPS is the real LPIPS-Alex from the shipped trunk
(``lpips``); tests of the pipeline's mechanics on the tiny random model, whose step sizes were
chosen on it, use the random trunk (``lpips_random``).
"""

import os

os.environ.setdefault("IMPUS_LITE_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from impus_lite.config import MorphConfig  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model():
    from impus_lite.models import load_model
    return load_model("tiny", device="cpu")


@pytest.fixture(scope="session")
def lpips():
    from impus_lite.perceptual import load_lpips
    return load_lpips(device="cpu")


@pytest.fixture(scope="session")
def lpips_random():
    from impus_lite.perceptual import load_lpips
    return load_lpips("random", device="cpu")


def smooth_image(seed: int, size=(40, 48), mode="RGB") -> Image.Image:
    """A smooth random colour image of ``size`` (width, height): a 5x4 random grid upsampled."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray((rng.random((4, 5, 3)) * 255).astype(np.uint8))
    return small.resize(size, Image.BILINEAR).convert(mode)


@pytest.fixture
def image_pair(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.jpg"
    smooth_image(1, (40, 48)).save(a)
    smooth_image(2, (64, 50)).save(b)
    return a, b


#: The smallest settings that still run every stage (tiny model, a few steps each).
TINY_CONFIG = MorphConfig.preset(
    "fast", text_steps=3, inversion_steps=4, rppd_frames=3, lora_steps=2, uncond_lora_steps=2,
    sample_steps=3, frames=3, lora_rank=None, batch_size=4)


@pytest.fixture
def tiny_config():
    return TINY_CONFIG


def assert_check_contract(check, right, wrong, monkeypatch, capsys):
    """What every exercise check promises: the right function passes, ``wrong`` fails with a
    hint, a stub raising NotImplementedError reads "not written", and none of these raises
    unless checks are strict, when anything but right raises CheckFailed."""
    from impus_lite import checks

    def stub(*args, **kwargs):
        raise NotImplementedError("write it")

    monkeypatch.delenv(checks.STRICT_ENV, raising=False)
    assert check(right).status == "right"
    result = check(wrong)
    assert result.status == "wrong" and result.hint
    assert check(stub).status == "not written"
    out = capsys.readouterr().out
    assert "✓ right" in out and "✗ wrong" in out and "not written yet" in out
    monkeypatch.setenv(checks.STRICT_ENV, "1")
    assert check(right)
    with pytest.raises(checks.CheckFailed):
        check(wrong)
    with pytest.raises(checks.CheckFailed, match="not written"):
        check(stub)
    monkeypatch.delenv(checks.STRICT_ENV)
