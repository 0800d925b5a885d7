"""Each image's own caption, for the methods whose public code takes one prompt per image
(AID's ``prompt_start``/``prompt_end``, DiffMorpher's ``prompt_0``/``prompt_1``, FreeMorph's
per-image captions): one rule for all of them, first match wins (:func:`image_captions`):

1. ``<stem>.txt`` next to the image file: its text;
2. the file name, when it reads as a caption ("cat_face.png" -> "cat face");
3. the morph's shared prompt (a pair folder's ``prompt.txt`` or ``--prompt``), for both.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

#: File-name words that say nothing about the picture (see :func:`stem_caption`).
GENERIC_WORDS = frozenset({"image", "img", "photo", "picture", "pic", "input", "source", "target",
                           "start", "end", "frame", "left", "right", "first", "second", "pair",
                           "test", "sample", "untitled", "scan", "dsc", "dscn", "screenshot", "copy",
                           "final", "edit", "crop", "resized", "small", "large", "jpeg", "png"})


def caption_file(image) -> Optional[str]:
    """The text of ``<stem>.txt`` next to an image file (stripped), or None (no such file, an
    empty one, or an image that is not a file path)."""
    if not isinstance(image, (str, Path)):
        return None
    path = Path(image).with_suffix(".txt")
    if not path.is_file():
        return None
    text = path.read_text().strip()
    return text or None


def stem_caption(image) -> Optional[str]:
    """A caption from an image file's name, or None when the name is not a useful caption.

    The stem is split at "_", "-", "." and spaces, lower-cased, and its alphabetic words kept
    ("cat_face.png" -> "cat face", "dog-face-02.jpg" -> "dog face"). It is useful when at least
    one word has three or more letters and is not in :data:`GENERIC_WORDS` ("a.png", "b.jpg",
    "IMG_0001.jpg", "image_left.png" are not)."""
    if not isinstance(image, (str, Path)):
        return None
    words = [w for w in re.split(r"[\s_\-.]+", Path(image).stem.lower()) if w.isalpha()]
    if not any(len(w) >= 3 and w not in GENERIC_WORDS for w in words):
        return None
    return " ".join(words)


def image_captions(images: Sequence, prompt: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """Each image's caption and where it came from, first match wins:

    1. ``<stem>.txt`` next to the image file ("caption file");
    2. the file name, when :func:`stem_caption` finds it useful ("file name");
    3. the morph's shared prompt ("shared prompt"): a pair folder's ``prompt.txt`` (read by
       :func:`impus_lite.evaluation.find_pairs`) or the ``--prompt`` given, for both images.

    Returns ((caption 0, caption 1), (source 0, source 1))."""
    captions, sources = [], []
    for image in images:
        for source, caption in (("caption file", caption_file(image)), ("file name", stem_caption(image)),
                                ("shared prompt", prompt)):
            if caption:
                captions.append(caption)
                sources.append(source)
                break
    return tuple(captions), tuple(sources)
