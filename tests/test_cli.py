import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import smooth_image
from impus_lite.cli import main

FAST_TINY = ["--model", "tiny", "--device", "cpu", "--frames", "3", "--size", "32"]


@pytest.fixture
def small_preset(monkeypatch):
    """The CLI's presets shrunk to a few steps per stage, so the tiny model runs in seconds."""
    from impus_lite import config
    from conftest import TINY_CONFIG
    monkeypatch.setitem(config.PRESETS, "fast", TINY_CONFIG.replace(frames=None))


def test_cli_writes_every_output(image_pair, tmp_path, small_preset, capsys):
    out = tmp_path / "out"
    code = main(["morph", str(image_pair[0]), str(image_pair[1]), "--prompt", "a photo", *FAST_TINY,
                 "--out", str(out)])
    assert code == 0
    for name in ("morph.gif", "morph.mp4", "strip.png", "morph.json"):
        assert (out / name).stat().st_size > 100, name
    frames = sorted((out / "frames").glob("frame_*.png"))
    assert len(frames) == 3 and Image.open(frames[0]).size == (32, 32)
    summary = json.loads((out / "morph.json").read_text())
    assert len(summary["alphas"]) == 3 and len(summary["distances"]) == 2
    assert summary["config"]["frames"] == 3 and "trunk=imagenet" in summary["lpips"]
    assert summary["unet_evals"] > 0 and "text" in summary["stages"]
    assert summary["threads"]["torch_threads"] >= 1 and summary["threads"]["source"]
    assert summary["method"] == "impus (reschedule)"
    # What the config left open is recorded as used: the model's dtype and size, the machine.
    assert summary["config"]["precision"] is None
    ran = summary["ran_with"]
    assert (ran["device"], ran["dtype"], ran["inference_autocast"], ran["size"]) == ("cpu", "float32", None, 32)
    assert " kernels" in ran["machine"] and summary["fps"] == 8.0
    gif = Image.open(out / "morph.gif")
    assert gif.n_frames == 4  # 3 frames forward and the middle one back
    printed = capsys.readouterr().out
    assert "UNet evals" in printed and "torch thread" in printed
    assert "ran on cpu: float32 weights, 32x32 pixels; CPU " in printed
    assert any((out / "cache").glob("text-*.pt"))
    assert "with the whole morph" not in printed
    # The same command again loads the finished morph, with the costs its first run recorded.
    assert main(["morph", str(image_pair[0]), str(image_pair[1]), "--prompt", "a photo", *FAST_TINY,
                 "--fps", "4", "--out", str(out)]) == 0
    again = json.loads((out / "morph.json").read_text())
    assert again["loaded_from_result_cache"] and again["unet_evals"] == summary["unet_evals"]
    assert again["ran_with"] == ran and again["fps"] == 4.0
    assert again["alphas"] == summary["alphas"]
    printed = capsys.readouterr().out
    assert "loaded whole from the result cache" in printed and "with the whole morph" in printed
    assert "computed on cpu: float32 weights" in printed


def test_cli_help_explains_every_flag():
    result = subprocess.run([sys.executable, "-m", "impus_lite", "morph", "--help"],
                            capture_output=True, text=True, check=True)
    for flag in ("--prompt", "--model", "--preset", "--frames", "--lpips-step", "--size", "--seed",
                 "--out", "--resize", "--schedule"):
        assert flag in result.stdout


def _bad_input(tmp_path, name):
    good = tmp_path / "good.png"
    smooth_image(0).save(good)
    if name == "missing":
        return [str(tmp_path / "missing.png"), str(good)], "not found"
    if name == "not_an_image":
        path = tmp_path / "notes.png"
        path.write_text("not pixels")
        return [str(path), str(good)], "not an image"
    if name == "truncated":
        path = tmp_path / "cut.png"
        smooth_image(1, (200, 200)).save(path)
        path.write_bytes(path.read_bytes()[:300])
        return [str(path), str(good)], "truncated or damaged"
    return [str(good), str(good)], None


@pytest.mark.parametrize("case, extra, message", [
    ("missing", [], "not found"),
    ("not_an_image", [], "not an image"),
    ("truncated", [], "truncated or damaged"),
    ("ok", ["--prompt", ""], "prompt is empty"),
    ("ok", ["--prompt", "y" * 120], "at most 77"),
    ("ok", ["--frames", "1"], "at least 2 frames"),
    ("ok", ["--model", "./no/such/folder"], "neither a folder nor a hub id"),
    ("ok", ["--fps", "0"], "--fps must be positive"),
    ("ok", ["--size", "0"], "at least 8 pixels"),
    ("ok", ["--device", "gpu"], "Unknown device 'gpu'"),
    ("ok", ["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "gpu"], "ot available here"
     if not torch.cuda.is_available() else "Unknown device"),
])
def test_bad_input_gets_one_sentence_and_exit_2(case, extra, message, tmp_path, small_preset, capsys):
    images, expected = _bad_input(tmp_path, case)
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.gif").write_bytes(b"GIF89a earlier result")
    args = ["morph", *images, *FAST_TINY, "--out", str(out)]
    if "--prompt" not in extra:
        args += ["--prompt", "a photo"]
    if "--frames" in extra:
        args.remove("--frames"), args.remove("3")
    if "--model" in extra:
        i = args.index("--model")
        del args[i:i + 2]
    code = main(args + extra)
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]  # earlier lines may be the model loader's progress bars
    assert last.startswith("error: ") and (expected or message) in last
    assert "Traceback" not in err and err.count("error: ") == 1
    assert (out / "earlier.gif").read_bytes() == b"GIF89a earlier result"


def test_an_out_that_is_a_file_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import impus_lite.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    images, _ = _bad_input(tmp_path, "ok")
    taken = tmp_path / "taken"
    taken.write_text("a file the user keeps")
    assert main(["morph", *images, "--prompt", "a photo", "--out", str(taken)]) == 2
    assert "output folder" in capsys.readouterr().err and taken.read_text() == "a file the user keeps"


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "PAIRS", "--out", "OUT", "--methods", ","], "names no method"),
    (["bench", "--methods", " , "], "names no method"),
    (["bench", "--round-trip", "--inversion-steps", "0"], "at least 1"),
    (["bench", "--out", "TMP"], "is a folder"),
])
def test_evaluate_and_bench_refuse_empty_settings_in_one_sentence(argv, message, tmp_path, capsys):
    argv = [str(tmp_path) if a == "TMP" else str(tmp_path / a) if a in ("PAIRS", "OUT") else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_second_morph_into_one_folder_leaves_no_frames_of_the_first(image_pair, tmp_path, small_preset):
    out = tmp_path / "out"
    base = ["morph", *map(str, image_pair), *FAST_TINY, "--prompt", "a photo", "--out", str(out)]
    assert main(base) == 0 and len(list((out / "frames").glob("*.png"))) == 3
    args = base.copy()
    args[args.index("--frames") + 1] = "2"
    umask = os.umask(0o022)
    try:
        assert main(args) == 0
    finally:
        os.umask(umask)
    assert sorted(p.name for p in (out / "frames").glob("*.png")) == ["frame_000.png", "frame_001.png"]
    for written in (out / "morph.gif", out / "morph.json", out / "frames" / "frame_001.png"):
        assert written.stat().st_mode & 0o777 == 0o644, written      # as open() would, not mkstemp's 0600


def test_the_dtype_flag_of_evaluate_overrides_the_presets_precision(tmp_path, monkeypatch):
    import impus_lite.evaluation as evaluation

    seen = {}
    monkeypatch.setattr(evaluation, "run_evaluation",
                        lambda model, pairs, out, base, *a, **k: seen.update(precision=base.precision))
    assert main(["evaluate", str(tmp_path), "--preset", "paper", "--dtype", "bf16", "--out", str(tmp_path / "o")]) == 0
    assert seen["precision"] == "bf16"


def test_the_classroom_command_answers_bad_input_in_one_sentence(tmp_path, capsys):
    from impus_lite.classroom.cli import main as classroom_main

    assert classroom_main(["export", "--checkpoints", str(tmp_path / "none")]) == 2
    assert classroom_main(["train", "--data", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 2 and "Traceback" not in err


def test_cli_subprocess_exit_status_on_bad_input(tmp_path):
    result = subprocess.run([sys.executable, "-m", "impus_lite", "morph", str(tmp_path / "a.png"),
                             str(tmp_path / "b.png"), "--prompt", "x", "--out", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Image not found" in result.stderr and "Traceback" not in result.stderr


def test_palette_png_and_cmyk_jpeg_morph_with_a_bounded_rank(tmp_path, small_preset):
    # Inputs a new user tries first: the tiny model's rPPD on this pair (0.78) asks for rank 256.
    palette, cmyk = tmp_path / "palette.png", tmp_path / "cmyk.jpg"
    smooth_image(3, (40, 30)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(palette)
    smooth_image(4, (50, 60)).convert("CMYK").save(cmyk)
    out = tmp_path / "out"
    assert main(["morph", str(palette), str(cmyk), "--prompt", "a photo", *FAST_TINY, "--out", str(out)]) == 0
    summary = json.loads((out / "morph.json").read_text())
    assert summary["lora_rank"] == 16  # the tiny UNet's narrowest attention projection
    assert any("bounded to 16" in note for note in summary["notes"])
    assert set(summary["end_errors"]) >= {"lpips_a", "psnr_b", "vae_psnr_a"}


def test_paper_preset_stretches_and_the_dtype_flag_overrides_its_precision(image_pair, tmp_path, monkeypatch):
    from impus_lite import config
    from conftest import TINY_CONFIG
    monkeypatch.setitem(config.PRESETS, "paper", TINY_CONFIG.replace(
        frames=None, resize_mode="resize", resample="bilinear", precision="fp32"))
    out = tmp_path / "out"
    assert main(["morph", str(image_pair[0]), str(image_pair[1]), "--prompt", "a photo", *FAST_TINY,
                 "--preset", "paper", "--dtype", "bf16", "--out", str(out)]) == 0
    summary = json.loads((out / "morph.json").read_text())
    used = summary["config"]
    assert (used["resize_mode"], used["resample"], used["precision"]) == ("resize", "bilinear", "bf16")
    assert summary["ran_with"]["dtype"] == "bfloat16"


def test_the_autocast_flag_reaches_the_config_and_the_notes(image_pair, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["morph", str(image_pair[0]), str(image_pair[1]), "--prompt", "a photo", *FAST_TINY,
                 "--autocast", "bf16", "--out", str(out)]) == 0
    summary = json.loads((out / "morph.json").read_text())
    assert summary["config"]["autocast"] == "bf16"
    assert (summary["ran_with"]["dtype"], summary["ran_with"]["inference_autocast"]) == ("float32", "bfloat16")
    assert any("bf16 autocast" in note for note in summary["notes"])
    assert "note: inference stages under bf16 autocast" in capsys.readouterr().out


def test_method_options_from_the_command_line(tmp_path, capsys):
    from impus_lite.cli import parse_method_options
    assert parse_method_options(["rank=8", "form=outer", "adain=false", "guidance=1.5"]) == \
        {"rank": 8, "form": "outer", "adain": False, "guidance": 1.5}
    pair = [tmp_path / "a.png", tmp_path / "b.png"]
    for k, path in enumerate(pair):
        smooth_image(k, (32, 32)).save(path)
    code = main(["morph", str(pair[0]), str(pair[1]), "--prompt", "a photo", "--model", "tiny",
                 "--device", "cpu", "--frames", "3", "--method", "slerp", "--method-option",
                 "guidance=2.0", "--out", str(tmp_path / "out")])
    assert code == 0
    summary = json.loads((tmp_path / "out" / "morph.json").read_text())
    assert summary["config"]["method"] == "slerp" and summary["config"]["method_options"] == {"guidance": 2.0}
    assert summary["config"]["size"] is None and summary["ran_with"]["size"] == 32  # the tiny model's own
    assert main(["morph", str(pair[0]), str(pair[1]), "--prompt", "a photo", "--model", "tiny",
                 "--method", "slerp", "--method-option", "strength", "--out", str(tmp_path / "o2")]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_evaluate_and_bench_default_to_the_shipped_classroom_model():
    from impus_lite.cli import build_parser
    parser = build_parser()
    assert parser.parse_args(["evaluate", "PAIRS", "--out", "o"]).model == "classroom"
    assert parser.parse_args(["bench"]).model == "classroom"
    assert parser.parse_args(["morph", "a.png", "b.png", "--prompt", "p", "--out", "o"]).model != "tiny"
