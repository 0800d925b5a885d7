"""The Stable Diffusion 1.5 architecture, random weights, every stage of a morph on the CPU.

The GPU path of the notebooks (the real UNet, VAE and 77x768 text encoder; training through a
half-precision UNet with fp32 adapters and embedding and a scaled loss) runs here at 32x32 with
one step of everything (``bench.SMOKE_CHANGES``), in fp32 and fp16, through the same
``bench --steps-smoke`` code that prints the 512x512 figures in the README. Building the model
writes about 4 GB to the impus_lite cache once; the test takes minutes on two cores (fp16
convolutions are slow on CPUs without AVX-512: the VAE decodes most of the time).
"""

import math

import pytest

from impus_lite.bench import format_steps_smoke, steps_smoke
from impus_lite.morph import STAGES
from impus_lite.runtime import data_path


@pytest.fixture(scope="module")
def sd15_report():
    pair = data_path("pairs", "emoji_cat_dog")
    return steps_smoke("sd15-random", pair / "cat_face.png", pair / "dog_face.png", "cat face dog face",
                       dtypes=("fp32", "fp16"), device="cpu", size=32, progress=False)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_every_stage_runs_on_the_sd15_architecture(sd15_report, dtype):
    run = sd15_report["runs"][dtype]
    assert set(run["stages"]) == set(STAGES) | {"export"}
    assert run["finite"], f"{dtype} frames are not finite"
    for stage in ("text", "inversion", "rppd", "lora", "reinversion", "frames"):
        assert run["stages"][stage]["unet_evals"] > 0, stage
    assert all(s["peak_memory_mb"] > 0 for s in run["stages"].values())
    # The rank from a random model's rPPD is bounded by SD 1.5's narrowest attention projection.
    assert 1 <= run["lora_rank"] <= 320 and math.isfinite(run["rppd"])
    assert sd15_report["size"] == 32


def test_half_precision_costs_the_same_unet_evaluations(sd15_report):
    runs = sd15_report["runs"]
    assert runs["fp16"]["total_unet_evals"] == runs["fp32"]["total_unet_evals"]
    assert "fp16 evals" in format_steps_smoke(sd15_report)
