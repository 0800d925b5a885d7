"""The command line ``python -m impus_lite.classroom build-data | train | export | evaluate | pairs``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..errors import ImpusError
from ..models import CLASSROOM_DIR
from .data import NOTO_EMOJI_FONT, build_emoji_dataset, default_data_dir
from .evaluate import evaluate
from .export import export, weights_megabytes
from .pairs import SWITCH_PAIRS
from .tokenizer import caption_words
from .train import ARCHITECTURES, TrainConfig, set_threads, train


def _parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m impus_lite.classroom",
        description="Build the emoji data set, train, export and evaluate the classroom model.")
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build-data", help="render the emoji data set and tokenizer")
    build.add_argument("--font", default=NOTO_EMOJI_FONT, help="path of NotoColorEmoji.ttf")
    build.add_argument("--out", default=str(default_data_dir()), help="data set folder")

    run = commands.add_parser("train", help="train (or resume) the VAE, then UNet + text encoder")
    run.add_argument("--data", default=defaults.data_dir, help="data set folder")
    run.add_argument("--checkpoints", default=defaults.checkpoint_dir,
                     help="checkpoint folder; an existing run there is resumed")
    run.add_argument("--arch", default=defaults.arch, choices=sorted(ARCHITECTURES))
    run.add_argument("--seed", type=int, default=defaults.seed)
    run.add_argument("--vae-steps", type=int, default=defaults.vae_steps, help="total VAE steps")
    run.add_argument("--unet-steps", type=int, default=defaults.unet_steps,
                     help="total UNet steps (raise it to extend a finished run)")
    run.add_argument("--vae-batch-size", type=int, default=defaults.vae_batch_size)
    run.add_argument("--unet-batch-size", type=int, default=defaults.unet_batch_size)
    run.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    run.add_argument("--log-every", type=int, default=defaults.log_every)
    run.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    run.add_argument("--export", action="store_true",
                     help="export to data/classroom when training ends")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    out = commands.add_parser("export", help="save the trained model into data/classroom")
    out.add_argument("--checkpoints", default=defaults.checkpoint_dir)
    out.add_argument("--out", default=str(CLASSROOM_DIR))
    out.add_argument("--no-ema", action="store_true", help="export the raw, not the EMA weights")

    check = commands.add_parser("evaluate", help="measure generation and inversion quality")
    check.add_argument("--model", default="classroom", help="'classroom' or a model folder")
    check.add_argument("--data", default=str(default_data_dir()))
    check.add_argument("--prompts", type=int, default=100)
    check.add_argument("--steps", type=int, default=25, help="DDIM sampling steps")
    check.add_argument("--guidance", type=float, default=4.0)
    check.add_argument("--inversion-steps", type=int, default=50)
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--grid", default=None,
                       help="PNG to save: each generated image next to its nearest training image")
    check.add_argument("--threads", type=int, default=None)

    pairs = commands.add_parser(
        "pairs", help="morph related emoji: how switch-like the paths are, and the end frames")
    pairs.add_argument("--model", default="classroom", help="'classroom' or a model folder")
    pairs.add_argument("--data", default=str(default_data_dir()))
    pairs.add_argument("--frames", type=int, default=9, help="uniform frames per morph")
    pairs.add_argument("--figure", default=None,
                       help="PNG to save: input | VAE reconstruction | morph end frame per emoji")
    pairs.add_argument("--folders", default=None, metavar="DIR",
                       help="only write the pairs as pair folders for `impus_lite evaluate` "
                            "(the first --count of them) and stop")
    pairs.add_argument("--count", type=int, default=len(SWITCH_PAIRS),
                       help=f"how many of the {len(SWITCH_PAIRS)} pairs (default all)")
    pairs.add_argument("--threads", type=int, default=None)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` and run the command: 0 when done, 2 with one sentence on bad input (a
    missing folder, font or model), as ``python -m impus_lite`` does."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (ImpusError, FileNotFoundError) as error:
        message = str(error) if isinstance(error, ImpusError) or not error.filename else \
            f"No such file or folder: '{error.filename}'."
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _run(args) -> int:
    if args.command == "build-data":
        data = build_emoji_dataset(args.font)
        folder = data.save(args.out)
        print(f"{len(data)} images, {len(caption_words(data.captions))} caption words -> {folder}")
    elif args.command == "train":
        config = TrainConfig(
            data_dir=args.data, checkpoint_dir=args.checkpoints, arch=args.arch, seed=args.seed,
            vae_steps=args.vae_steps, unet_steps=args.unet_steps,
            vae_batch_size=args.vae_batch_size, unet_batch_size=args.unet_batch_size,
            checkpoint_every=args.checkpoint_every, log_every=args.log_every,
            threads=args.threads, progress=not args.no_progress)
        train(config)
        if args.export:
            print(f"exported to {export(args.checkpoints)}")
    elif args.command == "export":
        folder = export(args.checkpoints, args.out, use_ema=not args.no_ema)
        print(f"exported to {folder} ({weights_megabytes(folder):.1f} MB of weights)")
    elif args.command == "evaluate":
        set_threads(args.threads)
        report = evaluate(args.model, args.data, args.prompts, args.steps, args.guidance,
                          args.inversion_steps, seed=args.seed, grid_path=args.grid)
        print("\n".join(report.lines()))
    elif args.command == "pairs":
        from .pairs import end_frames_figure, morph_pairs, report_lines, write_pair_folders

        chosen = SWITCH_PAIRS[:max(1, args.count)]
        if args.folders:
            for folder in write_pair_folders(args.folders, chosen, args.data):
                print(f"wrote {folder}")
            return 0
        set_threads(args.threads)
        morphs = morph_pairs(args.model, pairs=chosen, frames=args.frames, data_dir=args.data)
        print("\n".join(report_lines(morphs)))
        if args.figure:
            print(f"wrote {end_frames_figure(morphs, args.figure)}")
    return 0
