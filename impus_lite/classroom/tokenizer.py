"""The caption tokenizer: CLIP's byte-level BPE with merges that make every caption word one
token; writing, loading and applying it."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence, Union

import torch

from ..models import write_clip_tokenizer

_CLIP_PRETOKEN = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def caption_words(captions: Sequence[str]) -> list[str]:
    """The distinct words of the captions as CLIP's pre-tokenizer splits them (runs of
    letters, single digits, runs of punctuation), lower-case, sorted."""
    words = set()
    for caption in captions:
        words.update(_CLIP_PRETOKEN.findall(caption.lower()))
    return sorted(words)


def _bpe_pieces(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one word with the merge ranks given (lowest rank merges first)."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, math.inf), i, pair) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, _, best = min(pairs)
        if rank == math.inf:
            break
        merged, i = [], 0
        while i < len(pieces):
            if i < len(pieces) - 1 and (pieces[i], pieces[i + 1]) == best:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def word_merges(words: Sequence[str]) -> list[str]:
    """BPE merges (``"c a"``, ``"ca t</w>"``, ...) after which each word is one token.

    Merges are appended until every word is whole; a merge appended last has the lowest
    priority, so it never splits a word that was already whole."""
    merges: list[str] = []
    ranks: dict[tuple[str, str], int] = {}
    unfinished = sorted(set(words), key=lambda w: (len(w), w))
    while unfinished:
        still = []
        for word in unfinished:
            pieces = _bpe_pieces(word, ranks)
            if len(pieces) > 1:
                pair = (pieces[0], pieces[1])
                if pair not in ranks:
                    ranks[pair] = len(merges)
                    merges.append(f"{pair[0]} {pair[1]}")
                still.append(word)
        unfinished = still
    return merges


def write_caption_tokenizer(folder: Union[str, Path], captions: Sequence[str]) -> Path:
    """Write a ``CLIPTokenizer`` (vocab.json, merges.txt, ...) in which every word of the
    captions is a single token; other text falls back to characters. Returns the folder."""
    return write_clip_tokenizer(folder, word_merges(caption_words(captions)))


def load_tokenizer(folder: Union[str, Path]):
    """The ``CLIPTokenizer`` saved in ``folder``."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Token ids (B, 77), padded to the tokenizer's full length as Stable Diffusion does."""
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids
