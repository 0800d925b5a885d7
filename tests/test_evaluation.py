import json
import os
import socket
import subprocess
import sys

import torch
import pytest
from PIL import Image

from conftest import TINY_CONFIG, smooth_image
from impus_lite.bench import SavedActivations, bench_presets, format_report, training_memory
from impus_lite.cli import main
from impus_lite.errors import InputError
from impus_lite.evaluation import ABLATIONS, evaluate_pair, find_pairs, markdown_table, summarise


@pytest.fixture
def pairs_root(tmp_path):
    root = tmp_path / "pairs"
    for k, name in enumerate(("one", "two")):
        folder = root / name
        folder.mkdir(parents=True)
        smooth_image(2 * k, (40, 40)).save(folder / "a.png")
        smooth_image(2 * k + 1, (40, 40)).save(folder / "b.png")
    (root / "two" / "prompt.txt").write_text("a texture\n")
    return root


def test_find_pairs_reads_folders_and_prompts(pairs_root):
    pairs = find_pairs(pairs_root)
    assert [p.name for p in pairs] == ["one", "two"]
    assert pairs[0].prompt == "a photo" and pairs[1].prompt == "a texture"
    assert pairs[0].image0.name == "a.png" and pairs[0].image1.name == "b.png"
    assert len(find_pairs(pairs_root / "one")) == 1


def test_find_pairs_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        find_pairs(tmp_path / "nothing")
    (tmp_path / "p").mkdir()
    smooth_image(0).save(tmp_path / "p" / "only.png")
    with pytest.raises(InputError, match="exactly two images"):
        find_pairs(tmp_path)


def test_ablation_rows_differ_where_they_should(tiny_model, pairs_root, lpips_random, tmp_path):
    pair = find_pairs(pairs_root)[0]
    base = TINY_CONFIG.replace(frames=3, reschedule_passes=2, lpips_tol=0.0, sample_steps=2)
    rows = {r["ablation"]: r for r in evaluate_pair(tiny_model, pair, base, list(ABLATIONS), tmp_path / "c",
                                                    lpips_random, progress=False)}
    assert set(rows) == set(ABLATIONS)
    assert all(r["frames"] == 3 for r in rows.values())
    assert rows["no_lora"]["lora_rank"] == 0 and rows["full"]["lora_rank"] >= 1
    # Schedules share the trained stages (cache): they cost only their renders, and say so.
    assert rows["uniform"]["unet_evals"] < rows["no_text_opt"]["unet_evals"]
    assert rows["full"]["reused_stages"] == ""
    assert {"text", "lora", "reinversion"} <= set(rows["uniform"]["reused_stages"].split())
    assert not {"text", "lora"} & set(rows["no_text_opt"]["reused_stages"].split())   # other embeddings
    # The rescheduled row renders a second pass and keeps the more even one.
    assert rows["rescheduled"]["unet_evals"] > rows["uniform"]["unet_evals"]
    assert rows["rescheduled"]["pdv"] <= rows["uniform"]["pdv"]
    assert rows["searched"]["unet_evals"] != rows["uniform"]["unet_evals"]
    # One pair, one VAE: every row has the same floor, and its own end error.
    assert len({r["vae_psnr"] for r in rows.values()}) == 1
    assert rows["no_lora"]["end_lpips"] != rows["full"]["end_lpips"]
    summary = summarise(list(rows.values()))
    assert [s["ablation"] for s in summary] == list(ABLATIONS)
    assert {s["ablation"]: s["reused_stages"] for s in summary}["uniform"] == rows["uniform"]["reused_stages"]
    table = markdown_table(summary, ("ablation", "pdv"))
    assert table.count("\n") == len(ABLATIONS) + 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_evaluate_splits_pairs_across_accelerate_processes(tiny_model, pairs_root, tmp_path):
    # Two CPU processes under `accelerate launch`: each morphs one pair, the main one merges.
    out = tmp_path / "eval"
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               "-m", "impus_lite", "evaluate", str(pairs_root), "--model", "tiny", "--device", "cpu",
               "--frames", "2", "--ablations", "uniform", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    parts = [{row["pair"] for row in json.loads((out / "parts" / f"results-{k}.json").read_text())}
             for k in range(2)]
    assert parts == [{"one"}, {"two"}]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert sorted(r["pair"] for r in rows) == ["one", "two"]
    assert done.stdout.count("| impus | uniform |") == 1  # only the main process prints the table


def test_evaluate_command_writes_tables_and_plots(pairs_root, tmp_path, monkeypatch):
    from impus_lite import config
    monkeypatch.setitem(config.PRESETS, "fast", TINY_CONFIG.replace(frames=None))
    out = tmp_path / "eval"
    code = main(["evaluate", str(pairs_root), "--model", "tiny", "--device", "cpu", "--frames", "3",
                 "--ablations", "full", "uniform", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["rows"]) == 4  # 2 pairs x 2 ablations
    assert (out / "summary.png").stat().st_size > 1000
    summary = (out / "summary.md").read_text()
    assert "| full |" in summary
    assert "Seconds measured with float32 weights, 32x32 pixels, on CPU " in summary
    assert {(r["dtype"], r["size"]) for r in results["rows"]} == {("float32", 32)}
    assert len(list((out / "strips").glob("*.png"))) == 4


def test_bench_counts_cost_per_stage_and_fast_is_cheaper(tiny_model, image_pair):
    small = dict(text_steps=4, inversion_steps=5, lora_steps=2, uncond_lora_steps=1, sample_steps=3,
                 rppd_frames=3)
    report = bench_presets(tiny_model, *image_pair, "a photo", ["paper", "fast"], 3, small, progress=False)
    paper, fast = report["presets"]["paper"], report["presets"]["fast"]
    assert paper["stages"]["text"]["unet_evals"] == 8  # 4 steps x 2 images
    assert paper["total_unet_evals"] == sum(s["unet_evals"] for s in paper["stages"].values())
    assert fast["frames"] == paper["frames"] == 3
    assert report["fast_over_paper_unet_evals"] == pytest.approx(
        fast["total_unet_evals"] / paper["total_unet_evals"])
    text = format_report(report)
    assert "fast / paper UNet evaluations" in text and "reinversion" in text and "VAE PSNR dB" in text
    assert paper["end_errors"]["vae_lpips_a"] >= 0 and fast["end_psnr"] > 0


def test_bench_runs_each_preset_from_the_dtype_the_model_came_with(image_pair, monkeypatch):
    import impus_lite.dispatch as dispatch
    from impus_lite import load_model

    model = load_model("tiny", device="cpu", dtype="bf16")
    seen, real = [], dispatch.morph
    monkeypatch.setattr(dispatch, "morph", lambda m, *a, **k: (seen.append(m.dtype), real(m, *a, **k))[1])
    small = dict(text_steps=2, inversion_steps=3, lora_steps=1, uncond_lora_steps=1, sample_steps=2,
                 rppd_frames=3)
    bench_presets(model, *image_pair, "a photo", ["paper", "fast"], 3, small, progress=False)
    assert seen == [torch.bfloat16, torch.bfloat16]      # paper casts to fp32 inside its run only
    assert model.dtype == torch.bfloat16


def test_bench_with_a_results_folder_measures_once_then_reads_what_was_measured(tiny_model, image_pair,
                                                                                tmp_path):
    small = dict(text_steps=2, inversion_steps=3, lora_steps=1, uncond_lora_steps=1, sample_steps=2,
                 rppd_frames=2)
    first = bench_presets(tiny_model, *image_pair, "a photo", ["fast"], 3, small, progress=False,
                          results_dir=tmp_path)
    assert "recorded_in" not in first and len(list(tmp_path.glob("result-*.pt"))) == 1
    evals = tiny_model.unet_evals
    again = bench_presets(tiny_model, *image_pair, "a photo", ["fast"], 3, small, progress=False,
                          results_dir=tmp_path)
    assert tiny_model.unet_evals == evals                 # nothing ran: the stored run's figures
    assert again["presets"]["fast"]["stages"] == first["presets"]["fast"]["stages"]
    assert again["machine"] == first["machine"] and again["recorded_in"] == str(tmp_path)
    assert f"machine: {first['machine']} (recorded in {tmp_path})" in format_report(again)


def test_saved_activations_counts_what_autograd_keeps_until_backward():
    import torch
    x = torch.randn(1000, requires_grad=True)
    w = torch.randn(1000, requires_grad=True)
    with SavedActivations() as meter:
        y = (x * w).sum()          # the product saves both float32 factors: 2 x 4000 bytes
        assert meter.live == meter.peak == 8000
        y.backward()
        assert meter.live == 0 and meter.peak == 8000
    with SavedActivations() as meter:
        with torch.no_grad():
            (x * w).sum()
    assert meter.peak == 0


def test_training_memory_reports_weights_and_grows_with_the_image(tiny_model, tmp_path, capsys):
    tiny_model.remove_adapters()
    small, large = training_memory(tiny_model, 32), training_memory(tiny_model, 64)
    unet_mb = sum(p.numel() * p.element_size() for p in tiny_model.unet.parameters()) / 2**20
    assert small["weights_mb"]["unet"] == pytest.approx(unet_mb, abs=1e-3)
    for key in ("text_step_saved_mb", "lora_step_saved_mb"):
        assert 0 < small[key] < large[key]
    assert tiny_model.adapter_names() == []   # the probe's adapter is gone again
    out = tmp_path / "memory.json"
    assert main(["bench", "--model", "tiny", "--training-memory", "--size", "32", "--out", str(out)]) == 0
    assert "saved for backward, one LoRA step" in capsys.readouterr().out
    assert json.loads(out.read_text())["lora_step_saved_mb"] == pytest.approx(small["lora_step_saved_mb"])


def test_sd15_architecture_has_the_real_parameter_counts():
    import json as _json

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from impus_lite.models import ARCHITECTURES_DIR
    spec = _json.loads((ARCHITECTURES_DIR / "sd15.json").read_text())
    with init_empty_weights():
        counts = [sum(p.numel() for p in m.parameters()) for m in (
            UNet2DConditionModel(**spec["unet"]), AutoencoderKL(**spec["vae"]),
            CLIPTextModel(CLIPTextConfig(**spec["text_encoder"])))]
    assert counts == [859_520_964, 83_653_863, 123_060_480]


def test_loss_scaling_brings_fp16_gradients_closer_to_fp32():
    from impus_lite.bench import format_gradient_precision, gradient_precision
    report = gradient_precision("tiny", "cpu", dtypes=("fp16", "bf16"), seeds=(0, 1, 2))
    rows = {(r["dtype"], r["mode"]): r for r in report["rows"]}
    assert set(rows) == {("fp16", "unscaled"), ("fp16", "scaled"), ("bf16", "unscaled")}
    unscaled, scaled = rows[("fp16", "unscaled")], rows[("fp16", "scaled")]
    assert scaled["loss_scale"] == 2.0 ** 16 and unscaled["loss_scale"] == 1.0
    # Measured on the tiny model: unscaled, 0.1% of the embedding gradient underflows to zero and
    # the relative error is about 3x the scaled one (6.4e-3 against 2.3e-3).
    assert scaled["embedding"]["relative_error"] < unscaled["embedding"]["relative_error"]
    assert scaled["embedding"]["zeroed"] <= unscaled["embedding"]["zeroed"]
    for row in rows.values():
        assert row["embedding"]["cosine"] > 0.99 and row["lora"]["cosine"] > 0.99
    assert "emb rel.err" in format_gradient_precision(report)


def test_bench_round_trip_compares_the_grids(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    smooth_image(0).save(folder / "red_square.png")
    smooth_image(1).save(folder / "blue_disc.png")
    out = tmp_path / "round_trip.json"
    assert main(["bench", "--model", "tiny", "--device", "cpu", "--round-trip", "--pair", str(folder),
                 "--inversion-steps", "10", "--sample-steps", "4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["names"] == ["blue_disc.png", "red_square.png"]
    assert report["prompts"] == ["blue disc", "red square"]
    assert report["spacings"]["leading"]["grid_ends"] == [901, 751]
    assert report["spacings"]["trailing"]["grid_ends"] == [999, 999]
    assert all(len(s["mse"]) == 2 for s in report["spacings"].values())


def test_evaluate_compares_methods_in_one_table(pairs_root, tmp_path, monkeypatch):
    from impus_lite import config
    monkeypatch.setitem(config.PRESETS, "fast", TINY_CONFIG.replace(frames=None))
    out = tmp_path / "eval"
    code = main(["evaluate", str(pairs_root), "--model", "tiny", "--device", "cpu", "--frames", "3",
                 "--methods", "impus,slerp", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["ablation"]) for r in results["rows"]] == [("impus", "full"), ("slerp", "full")] * 2
    assert [(r["method"], r["pairs"]) for r in results["summary"]] == [("impus", 2), ("slerp", 2)]
    slerp, impus = results["summary"][1], results["summary"][0]
    assert slerp["unet_evals"] < impus["unet_evals"]  # no training, no rPPD probe
    summary = (out / "summary.md").read_text()
    assert "| slerp | slerp | full |" in summary and "DiffMorpher's PPL and PDV on these 3 frames" in summary
    # IMPUS's row is named by how its alphas were chosen (fast: the reschedule), not "full".
    assert "| impus (reschedule) | impus | full |" in summary
    assert [r["label"] for r in results["summary"]] == ["impus (reschedule)", "slerp"]
    assert "FID" in summary  # the values, or the one sentence saying why they are missing
    assert len(list((out / "strips").glob("*-slerp.png"))) == 2
    assert len(list((out / "strips").glob("*-impus-reschedule.png"))) == 2  # not "full" beside other methods
    one = Image.open(out / "strips" / f"{sorted(p.name for p in pairs_root.iterdir())[0]}-slerp.png")
    together = Image.open(out / "strips.png")       # 2 pairs x 2 methods, one under another
    assert together.size == (150 + one.width, 4 * one.height)
    assert main(["evaluate", str(pairs_root), "--model", "tiny", "--methods", "impus,morphing",
                 "--out", str(tmp_path / "other")]) == 2
    assert not (tmp_path / "other").exists()


def test_frame_realism_ranks_rows_with_a_random_inception(tmp_path):
    import torch
    from impus_lite.evaluation import frame_realism
    inputs = torch.rand(4, 3, 32, 32) * 2 - 1
    near = [inputs + 0.01 * torch.randn_like(inputs)]
    far = [-inputs.flip(-1)]
    values, note = frame_realism({"near": near, "far": far}, inputs, weights="random")
    assert values["near"]["fid"] < values["far"]["fid"]
    assert all(v["fid"] >= 0 for v in values.values())
    assert "4 inputs, 4 frames per row" in note and "random weights" in note


def test_bench_runs_other_methods_next_to_the_presets(tiny_model, image_pair):
    report = bench_presets(tiny_model, image_pair[0], image_pair[1], "a photo", ["fast"], frames=3,
                           overrides={k: v for k, v in TINY_CONFIG.to_dict().items()
                                      if k in ("text_steps", "lora_steps", "inversion_steps", "sample_steps")},
                           progress=False, methods=["impus", "slerp"])
    assert list(report["presets"]) == ["fast", "slerp"]
    slerp = report["presets"]["slerp"]
    assert list(slerp["stages"]) == ["encode", "inversion", "frames"] and slerp["frames"] == 3
    assert slerp["total_unet_evals"] < report["presets"]["fast"]["total_unet_evals"]
    assert "slerp" in format_report(report)


def test_data_realism_scores_training_images_above_their_ghosts(lpips):
    from impus_lite.evaluation import data_realism
    g = torch.Generator().manual_seed(0)
    # A "training set" of smooth random images; the frames of one row are training images, of
    # another the cross-dissolves of pairs of them (ghosts the data does not contain).
    base = torch.nn.functional.interpolate(torch.rand(40, 3, 4, 4, generator=g) * 2 - 1, size=32, mode="bilinear")
    references = base[:36]
    ghosts = 0.5 * base[:8:2] + 0.5 * base[1:8:2]
    values, note = data_realism({"data": [references[:4]], "ghosts": [ghosts]}, references, lpips)
    assert values["data"]["lpips_to_data"] < 1e-6 and values["data"]["knn_precision"] == 1.0
    assert values["ghosts"]["lpips_to_data"] > 0.02
    assert "36 training images" in note
    assert data_realism({"data": [references[:4]]}, None, lpips) == ({}, "")


def test_every_compared_row_gets_its_realism_against_the_training_images(pairs_root, tmp_path, monkeypatch):
    from impus_lite import config
    from impus_lite.evaluation import run_evaluation
    monkeypatch.setitem(config.PRESETS, "fast", TINY_CONFIG.replace(frames=None))
    g = torch.Generator().manual_seed(1)
    references = torch.rand(12, 3, 32, 32, generator=g) * 2 - 1
    results = run_evaluation("tiny", pairs_root, tmp_path / "eval", TINY_CONFIG.replace(frames=3),
                             ablations=["full"], device="cpu", progress=False, methods=["impus", "slerp"],
                             inception_weights="random", references=references)
    rows = results["summary"]
    assert [r["label"] for r in rows] == ["impus (reschedule)", "slerp"]
    for row in rows:
        assert 0 < row["lpips_to_data"] < 2 and 0 <= row["knn_precision"] <= 1 and row["fid"] >= 0
    summary = (tmp_path / "eval" / "summary.md").read_text()
    assert "lpips_to_data" in summary.splitlines()[2] and "12 training images" in summary
