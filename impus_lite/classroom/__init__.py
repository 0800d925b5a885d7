"""The classroom model: a small text-to-image latent diffusion model trained on colour emoji.

It has exactly the Stable Diffusion layout (``AutoencoderKL`` VAE, ``UNet2DConditionModel``,
``CLIPTextModel`` + ``CLIPTokenizer``, DDIM scheduler with the SD 1.x noise schedule) so that
every stage of the morph runs on it unchanged, on a laptop CPU, in seconds.

* Data: the single-code-point emoji of Noto Color Emoji (SIL Open Font License 1.1), rendered
  with Pillow, composited on white, cropped to their content and resized to 64x64; each is
  captioned by its lower-case Unicode name ("cat face", "dog face").
* Tokenizer: CLIP's byte-level BPE with merges that make every caption word one token.
* Training, in two stages: the VAE (64x64x3 images <-> 16x16x4 latents, L1 + L2 + a small KL),
  then the UNet and the text encoder jointly on the epsilon loss, with caption dropout for
  classifier-free guidance. Latents are scaled by ``vae.config.scaling_factor`` = 1 / std.

Conventions: images are float tensors (B, 3, 64, 64) in [-1, 1] (white = 1); stored images are
uint8 (N, 64, 64, 3). Command line::

    python -m impus_lite.classroom build-data
    python -m impus_lite.classroom train --threads 1
    python -m impus_lite.classroom export
    python -m impus_lite.classroom evaluate

Modules, each importing only those above it: :mod:`.tokenizer` (caption words, BPE merges),
:mod:`.data` (the emoji data set), :mod:`.train` (networks, losses, the two training stages),
:mod:`.export` (the pipeline into ``data/classroom``), :mod:`.evaluate` (quality figures),
:mod:`.cli` (the command line). Every public name is importable from this package.
"""

from .data import (IMAGE_SIZE, NOTO_BITMAP_SIZE, NOTO_EMOJI_FONT, EmojiDataset,
                   build_emoji_dataset, caption_of, dataset_from_images, default_data_dir,
                   emoji_codepoints, fit_on_white, is_pictographic, render_emoji)
from .tokenizer import (_CLIP_PRETOKEN, _bpe_pieces, caption_words, load_tokenizer, tokenize,
                        word_merges, write_caption_tokenizer)
from .train import (ARCHITECTURES, TrainConfig, _Diffuser, _stored_config, augmented_version,
                    build_text_encoder, build_unet, build_vae, count_parameters,
                    default_train_dir, diffusion_loss, edge_loss, encode_dataset,
                    latent_scaling_factor, psnr_summary, random_crops, reconstruction_psnr,
                    set_threads, shifted_and_scaled, train, train_unet, train_vae,
                    training_noise_scheduler, vae_loss)
from .export import (LICENSE_TEXT, MAX_WEIGHTS_MB, export, pipeline_from_checkpoints,
                     weights_megabytes)
from .evaluate import (EvaluationReport, embed_prompts, evaluate, nearest_indices, psnr,
                       save_grid)
from .cli import main

__all__ = [
    # data
    "IMAGE_SIZE", "NOTO_EMOJI_FONT", "NOTO_BITMAP_SIZE", "default_data_dir", "is_pictographic",
    "emoji_codepoints", "caption_of", "fit_on_white", "render_emoji", "EmojiDataset",
    "dataset_from_images", "build_emoji_dataset",
    # tokenizer
    "caption_words", "word_merges", "write_caption_tokenizer", "load_tokenizer", "tokenize",
    # train
    "default_train_dir", "ARCHITECTURES", "build_vae", "build_unet", "build_text_encoder",
    "count_parameters", "TrainConfig", "set_threads", "training_noise_scheduler", "vae_loss",
    "diffusion_loss", "train_vae", "encode_dataset", "latent_scaling_factor", "train_unet",
    "train", "edge_loss", "random_crops", "reconstruction_psnr", "psnr_summary",
    "shifted_and_scaled", "augmented_version",
    # export
    "MAX_WEIGHTS_MB", "LICENSE_TEXT", "pipeline_from_checkpoints", "weights_megabytes", "export",
    # evaluate
    "embed_prompts", "nearest_indices", "psnr", "EvaluationReport", "evaluate", "save_grid",
    # command line
    "main",
]
