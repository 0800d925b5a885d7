"""The command line: ``python -m impus_lite morph|evaluate|bench ...`` (and ``impus-lite``).

Errors a user can act on (missing file, bad option, model not available) print one sentence and
exit with status 2; nothing already written in the output folder is removed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import ImpusError, InputError

DESCRIPTION = "Morph one image into another with a diffusion model (IMPUS, ICLR 2024)."


def _add_device_flags(p) -> None:
    p.add_argument("--device", help="'cuda', 'cpu', 'mps' (default: the best available)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"),
                   help="weights precision (default: the preset's; 'fast' takes bf16 on GPUs that "
                        "support it, fp16 on older ones, fp32 on the CPU; 'paper' fp32)")


def _add_morph(sub) -> None:
    from .config import METHODS, PRESETS, SCHEDULES
    from .models import DEFAULT_MODEL

    p = sub.add_parser("morph", help="morph image A into image B",
                       description="Morph image A into image B and write DIR/morph.gif, DIR/morph.mp4, "
                                   "DIR/strip.png, DIR/frames/ and DIR/morph.json. Stage outputs are "
                                   "cached in DIR/cache, so a rerun with other sampling settings "
                                   "skips training, and the same command again loads the finished "
                                   "morph (with the costs its run recorded).")
    p.add_argument("--autocast", choices=("auto", "bf16"),
                   help="IMPUS's inference stages under bf16 autocast on a CPU: 'auto' only where the "
                        "CPU computes bf16 natively (AMX, AVX512-BF16), 'bf16' always (default: off)")
    p.add_argument("image_a", help="first image (any format Pillow reads, any size)")
    p.add_argument("image_b", help="second image")
    p.add_argument("--prompt", required=True,
                   help="what both images show, e.g. 'a photo of an animal'")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"hub id or folder of an SD 1.x/2.x model, 'classroom' (small, offline, CPU) "
                        f"or 'tiny' (random weights, for tests); default {DEFAULT_MODEL}")
    p.add_argument("--preset", default="fast", choices=sorted(PRESETS),
                   help="'fast' (default, this package's tuned settings) or 'paper' (IMPUS's)")
    count = p.add_mutually_exclusive_group()
    count.add_argument("--frames", type=int, help="number of frames, perceptually even (>= 2)")
    count.add_argument("--lpips-step", type=float,
                       help="LPIPS distance between consecutive frames; the frame count follows "
                            "(default 0.2)")
    p.add_argument("--schedule", choices=SCHEDULES,
                   help="how alphas are chosen (default: the preset's)")
    p.add_argument("--method", choices=METHODS, default="impus",
                   help="morphing method: 'impus' (default), or a neighbour run on the same "
                        "engine for comparison: " + ", ".join(METHODS[1:]))
    p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of a method other than impus (its module's Options), the value "
                        "read as JSON where it parses (e.g. --method-option form=\"outer\" "
                        "--method-option lora_steps=50); repeatable")
    p.add_argument("--size", type=int, help="image side in pixels (default: the model's resolution)")
    p.add_argument("--resize", choices=("crop", "resize"),
                   help="'crop' keeps the aspect ratio and cuts the centre square ('fast'); "
                        "'resize' stretches ('paper', as the reference code)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    _add_device_flags(p)
    p.add_argument("--fps", type=float, default=8.0, help="frames per second of the GIF/MP4")
    p.add_argument("--no-cache", action="store_true", help="do not read or write DIR/cache")
    p.add_argument("--out", required=True, help="output folder (created if missing)")


def parse_method_options(items: Sequence[str]) -> dict:
    """``["rank=8", "form=outer", "adain=false"]`` -> ``{"rank": 8, "form": "outer", "adain": False}``:
    each value read as JSON when it parses, else kept as text."""
    import json

    from .errors import InputError

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"A method option is KEY=VALUE, got '{item}'.")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def _output_folder(path: str) -> Path:
    """``--out`` as a folder this process can write, created if missing; checked before any
    work, so that a morph is not lost for want of a place to write it."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"Cannot use '{folder}' as the output folder: {error.strerror or error}.") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"Cannot write to the output folder '{folder}'.")
    return folder


def _methods(text: str) -> list[str]:
    from .config import METHODS

    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise InputError(f"--methods names no method: give one or more of {', '.join(METHODS)}.")
    return methods


def ran_with_line(ran_with: dict, loaded: bool = False) -> str:
    """One line for :attr:`MorphResult.ran_with`, e.g. "ran on cpu: float32 weights, 128x128
    pixels, CPU ... (AVX512 kernels), ..."; "computed on" for a result loaded from the cache."""
    autocast = ran_with["inference_autocast"]
    size = ran_with["size"]
    return (f"{'computed' if loaded else 'ran'} on {ran_with['device']}: {ran_with['dtype']} weights"
            + (f", inference under {autocast} autocast" if autocast else "")
            + f", {size}x{size} pixels; {ran_with['machine']}")


def _run_morph(args) -> int:
    from .config import MorphConfig
    from .models import load_model
    from .dispatch import morph

    from .images import open_rgb
    from .text import check_prompt_not_empty
    from .threads import thread_line

    if args.fps <= 0:
        raise InputError(f"--fps must be positive, got {args.fps:g}.")

    for path in (args.image_a, args.image_b):  # fail on bad files before a model loads
        open_rgb(path)
    check_prompt_not_empty(args.prompt)
    changes = {"seed": args.seed, "method": args.method}
    if args.method_option:
        changes["method_options"] = parse_method_options(args.method_option)
    if args.resize:
        changes["resize_mode"] = args.resize
    if args.dtype:
        changes["precision"] = args.dtype
    if args.autocast:
        changes["autocast"] = args.autocast
    if args.frames is not None:
        changes["frames"] = args.frames
    if args.lpips_step is not None:
        changes["lpips_step"] = args.lpips_step
    if args.schedule:
        changes["schedule"] = args.schedule
    if args.size is not None:
        changes["size"] = args.size
    config = MorphConfig.preset(args.preset, **changes)
    out = _output_folder(args.out)
    model = load_model(args.model, device=args.device, dtype=config.precision)
    result = morph(model, args.image_a, args.image_b, args.prompt, config,
                   cache_dir=None if args.no_cache else out / "cache")
    paths = result.save_all(out, fps=args.fps)
    print(f"{len(result.frames)} frames, alphas {', '.join(f'{a:.3f}' for a in result.alphas)}")
    print(f"LPIPS ({result.lpips_trunk} trunk) between frames: "
          f"{', '.join(f'{d:.3f}' for d in result.distances)}")
    print(f"LoRA rank {result.lora_rank}" + (f" (rPPD {result.rppd:.3f})" if result.rppd is not None else ""))
    e = result.end_errors
    print(f"end frames against the inputs: LPIPS {e['lpips_a']:.3f} / {e['lpips_b']:.3f}, PSNR "
          f"{e['psnr_a']:.1f} / {e['psnr_b']:.1f} dB (the VAE alone: LPIPS {e['vae_lpips_a']:.3f} / "
          f"{e['vae_lpips_b']:.3f}, PSNR {e['vae_psnr_a']:.1f} / {e['vae_psnr_b']:.1f} dB)")
    for note in result.notes:
        print(f"note: {note}")
    if model.device.type == "cpu":
        print(thread_line(result.threads))
    if result.ran_with:
        print(ran_with_line(result.ran_with, result.loaded))
    print(f"{'stage':<12} {'seconds':>8} {'UNet evals':>11}  cached")
    for name, s in result.stats.items():
        flag = "with the whole morph" if result.loaded else ("yes" if s.cached else "")
        print(f"{name:<12} {s.seconds:8.1f} {s.unet_evals:11d}  {flag}")
    print(f"{'total':<12} {result.seconds:8.1f} {result.unet_evals:11d}")
    print(f"wrote {paths['morph.gif']}, {paths['morph.mp4']}, {paths['strip.png']}, "
          f"{paths['frames']}/, {paths['morph.json']}")
    return 0


def _add_evaluate(sub) -> None:
    from .config import METHODS, PRESETS
    from .evaluation import ABLATIONS

    p = sub.add_parser("evaluate", help="ablations and methods with PPL, PDV and smoothness over image pairs",
                       description="Morph every pair under PAIRS once per ablation and write "
                                   "results.csv, summary.csv, summary.md, summary.png, strips/ "
                                   "and strips.png to DIR. Run under `accelerate launch` to "
                                   "split the pairs across GPUs.")
    p.add_argument("pairs", help="a folder of pair folders (two images and an optional prompt.txt "
                                 "each), or one pair folder")
    p.add_argument("--model", default="classroom",
                   help="model name, as for morph (default classroom: shipped, offline)")
    p.add_argument("--preset", default="fast", choices=sorted(PRESETS), help="base settings")
    p.add_argument("--frames", type=int, default=9, help="frames per morph (default 9)")
    p.add_argument("--ablations", nargs="+", default=None, choices=list(ABLATIONS),
                   metavar="NAME", help=f"IMPUS rows to run (default all: {', '.join(ABLATIONS)}; "
                                        "with --methods, only 'full')")
    p.add_argument("--methods", default="impus",
                   help="comma-separated methods to compare, each with its own settings, e.g. "
                        f"'{','.join(METHODS)}' (default impus)")
    _add_device_flags(p)
    p.add_argument("--out", required=True, help="output folder")


def _run_evaluate(args) -> int:
    from .config import MorphConfig
    from .evaluation import ABLATIONS, run_evaluation, variants

    base = MorphConfig.preset(args.preset, frames=args.frames,
                              **({"precision": args.dtype} if args.dtype else {}))  # as morph's --dtype
    methods = _methods(args.methods)
    ablations = args.ablations or (["full"] if methods != ["impus"] else list(ABLATIONS))
    variants(ablations, methods)  # unknown names fail before a model loads
    _output_folder(args.out)
    results = run_evaluation(args.model, args.pairs, args.out, base, ablations, args.device, args.dtype,
                             methods=methods)
    if results is not None:
        print((Path(args.out) / "summary.md").read_text())
        print(f"wrote {args.out}/results.csv, summary.csv, summary.md, summary.png, strips/, strips.png")
    return 0


def _add_bench(sub) -> None:
    from .config import PRESETS

    p = sub.add_parser("bench", help="UNet evaluations, seconds and peak memory per stage, per preset",
                       description="Morph one pair once per preset and print the cost of every "
                                   "stage. --model sd15-random / sd21-random build the exact Stable "
                                   "Diffusion 1.5 / 2.1 architectures with random weights (timings "
                                   "and memory without a download). The other modes measure one "
                                   "thing each instead of comparing presets.")
    p.add_argument("--model", default="classroom",
                   help="'tiny', 'classroom' (default), 'sd15-random', 'sd21-random' or any model name")
    p.add_argument("--pair", default=None,
                   help="folder with two images (default: data/pairs/emoji_cat_dog); with --round-trip "
                        "a folder of pair folders (default: data/pairs)")
    p.add_argument("--prompt", default="cat face dog face", help="prompt (default 'cat face dog face')")
    p.add_argument("--presets", nargs="+", default=["paper", "fast"], choices=sorted(PRESETS))
    p.add_argument("--methods", default="impus",
                   help="comma-separated methods: impus once per preset, each other method once on "
                        "the first preset with its own settings (default impus)")
    p.add_argument("--frames", type=int, default=16, help="frames per morph (default 16)")
    p.add_argument("--size", type=int, help="image side (default: the model's resolution)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--training-memory", action="store_true",
                      help="print the weights and the activations one training step saves for "
                           "backward (works for sd15-random on a CPU)")
    mode.add_argument("--steps-smoke", action="store_true",
                      help="run every stage with a handful of steps once per --dtypes and print "
                           "seconds, UNet evaluations and peak memory per stage")
    mode.add_argument("--gradient-precision", action="store_true",
                      help="compare the text-embedding and LoRA gradients of the --dtypes half "
                           "precisions, with and without loss scaling, against fp32")
    mode.add_argument("--round-trip", action="store_true",
                      help="latent error of DDIM inversion then sampling (guidance 1) on the "
                           "leading and trailing timestep grids, for every image under --pair "
                           "(prompt: its folder's prompt.txt, else its file name)")
    mode.add_argument("--concurrent", type=int, nargs="+", metavar="N",
                      help="load test: the README morph as N processes started at once, for each N, "
                           "against N times one alone (e.g. --concurrent 2 4)")
    p.add_argument("--wait-policy", choices=("passive", "active"),
                   help="--concurrent: OMP_WAIT_POLICY of the morphs (default: passive, as "
                        "impus_lite sets it; active spins, to see the difference)")
    p.add_argument("--dtypes", nargs="+", choices=("fp32", "fp16", "bf16"),
                   help="precisions for --steps-smoke (default fp32 fp16 bf16) and "
                        "--gradient-precision (default fp16 bf16)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="--gradient-precision: one t and noise draw per seed (default 0)")
    p.add_argument("--inversion-steps", type=int, default=50, help="--round-trip: inversion steps (default 50)")
    p.add_argument("--sample-steps", type=int, default=12, help="--round-trip: sampling steps (default 12)")
    _add_device_flags(p)
    p.add_argument("--out", default=None, help="write the report as JSON here (e.g. out/bench.json)")


def _run_bench(args) -> int:
    from . import bench
    from .evaluation import find_pairs
    from .runtime import data_path

    if args.round_trip and min(args.inversion_steps, args.sample_steps) < 1:
        raise InputError("--inversion-steps and --sample-steps must be at least 1.")
    if args.out:
        if Path(args.out).is_dir():
            raise InputError(f"--out names a file to write the report to; '{args.out}' is a folder.")
        _output_folder(str(Path(args.out).parent))
    if args.concurrent:
        from .loadtest import concurrent_morphs, format_concurrent
        report = concurrent_morphs(args.concurrent, args.wait_policy)
        text = format_concurrent(report)
    elif args.steps_smoke:
        pair = find_pairs(args.pair or data_path("pairs", "emoji_cat_dog"))[0]
        report = bench.steps_smoke(args.model, pair.image0, pair.image1, args.prompt,
                                   args.dtypes or ("fp32", "fp16", "bf16"), args.device, args.size)
        text = bench.format_steps_smoke(report)
    elif args.gradient_precision:
        report = bench.gradient_precision(args.model, args.device, args.dtypes or ("fp16", "bf16"),
                                          args.size, seeds=args.seeds)
        text = bench.format_gradient_precision(report)
    else:
        from .models import load_model
        model = load_model(args.model, device=args.device, dtype=args.dtype)
        if args.training_memory:
            report = bench.training_memory(model, args.size)
            text = bench.format_training_memory(report)
        elif args.round_trip:
            import torch

            from .images import load_image
            from .evaluation import find_images
            found = find_images(args.pair or data_path("pairs"))
            size = args.size or model.resolution
            images = torch.cat([load_image(path, size) for path, _ in found])
            report = bench.round_trip_errors(model, images, [prompt for _, prompt in found], args.inversion_steps,
                                             args.sample_steps, names=[path.name for path, _ in found])
            text = bench.format_round_trip(report)
        else:
            pair = find_pairs(args.pair or data_path("pairs", "emoji_cat_dog"))[0]
            overrides = {"size": args.size} if args.size else {}
            methods = _methods(args.methods)
            report = bench.bench_presets(model, pair.image0, pair.image1, args.prompt, args.presets,
                                         args.frames, overrides, methods=methods)
            text = bench.format_report(report)
    print(text)
    if args.out:
        print(f"wrote {bench.write_report(report, args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m impus_lite", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_morph(sub)
    _add_evaluate(sub)
    _add_bench(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` and run the command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return {"morph": _run_morph, "evaluate": _run_evaluate, "bench": _run_bench}[args.command](args)
    except ImpusError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished stages are kept in the cache", file=sys.stderr)
        return 130
    return 1
