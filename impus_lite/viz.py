"""Looking at morphs: strips, GIF/MP4 export, distance plots and an ipywidgets alpha slider."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

from .cache import atomic_write_bytes


def strip(frames: Sequence[Image.Image], alphas: Optional[Sequence[float]] = None,
          max_width: int = 2048) -> Image.Image:
    """Frames side by side, each labelled with its alpha when given; scaled to ``max_width``."""
    frames = list(frames)
    w, h = frames[0].size
    label = 14 if alphas is not None else 0
    canvas = Image.new("RGB", (w * len(frames), h + label), "white")
    draw = ImageDraw.Draw(canvas)
    for k, frame in enumerate(frames):
        canvas.paste(frame.convert("RGB").resize((w, h)), (k * w, label))
        if alphas is not None:
            draw.text((k * w + 2, 1), f"{alphas[k]:.3f}", fill="black")
    if canvas.width > max_width:
        canvas = canvas.resize((max_width, round(canvas.height * max_width / canvas.width)),
                               Image.Resampling.LANCZOS)
    return canvas


def stack_strips(rows: Sequence[tuple[str, Image.Image]], label_width: int = 150) -> Image.Image:
    """Strips one under another, each with its label (may hold newlines) in a white column on
    the left; a strip narrower than the widest is left-aligned. Returns one RGB image of width
    ``label_width`` + the widest strip and height the sum of the strips' heights."""
    width = label_width + max(image.width for _, image in rows)
    canvas = Image.new("RGB", (width, sum(image.height for _, image in rows)), "white")
    draw = ImageDraw.Draw(canvas)
    top = 0
    for label, image in rows:
        canvas.paste(image.convert("RGB"), (label_width, top))
        draw.multiline_text((4, top + 4), label, fill="black")
        top += image.height
    return canvas


def _upscale(frames: Sequence[Image.Image], min_side: int) -> list[Image.Image]:
    out = []
    for f in frames:
        scale = max(1, -(-min_side // min(f.size)))
        out.append(f.resize((f.width * scale, f.height * scale), Image.Resampling.NEAREST) if scale > 1 else f)
    return out


def gif_bytes(frames: Sequence[Image.Image], fps: float = 8.0, boomerang: bool = True,
              min_side: int = 128) -> bytes:
    """An endlessly looping GIF (forward, then back when ``boomerang``); small frames are
    enlarged to ``min_side`` pixels (nearest neighbour) so they can be seen."""
    import imageio.v3 as iio

    frames = _upscale(frames, min_side)
    seq = frames + frames[-2:0:-1] if boomerang and len(frames) > 2 else frames
    return iio.imwrite("<bytes>", np.stack([np.asarray(f.convert("RGB")) for f in seq]),
                       extension=".gif", duration=1000.0 / fps, loop=0)


def mp4_bytes(frames: Sequence[Image.Image], fps: float = 8.0, boomerang: bool = True,
              min_side: int = 128) -> bytes:
    """An H.264 MP4 (imageio-ffmpeg); sides are rounded up to even numbers as yuv420p needs."""
    import tempfile

    import imageio.v2 as imageio

    frames = _upscale(frames, min_side)
    seq = frames + frames[-2:0:-1] if boomerang and len(frames) > 2 else frames
    arrays = []
    for f in seq:
        a = np.asarray(f.convert("RGB"))
        h, w = a.shape[:2]
        arrays.append(np.pad(a, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "morph.mp4"
        writer = imageio.get_writer(path, fps=fps, codec="libx264", pixelformat="yuv420p",
                                    macro_block_size=1, ffmpeg_log_level="error")
        for a in arrays:
            writer.append_data(a)
        writer.close()
        return path.read_bytes()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_result(result, path: Union[str, Path], fps: float = 8.0) -> Path:
    """Save a :class:`~impus_lite.morph.MorphResult` by extension (.gif, .mp4, .png strip, .json:
    ``result.summary()`` with ``fps`` added)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        data = gif_bytes(result.frames, fps)
    elif suffix == ".mp4":
        data = mp4_bytes(result.frames, fps)
    elif suffix == ".png":
        data = png_bytes(strip(result.frames, result.alphas))
    elif suffix == ".json":  # the summary, and the frame rate the animations beside it use
        data = json.dumps({**result.summary(), "fps": fps}, indent=2).encode()
    else:
        from .errors import InputError
        raise InputError(f"Cannot save a morph as '{suffix}': use .gif, .mp4, .png or .json.")
    return atomic_write_bytes(path, data)


def save_all(result, out_dir: Union[str, Path], fps: float = 8.0) -> dict[str, Path]:
    """Write morph.gif, morph.mp4, strip.png, frames/frame_XXX.png and morph.json in ``out_dir``
    (frame files beyond this morph's count, left by an earlier morph there, are removed)."""
    if fps <= 0:
        from .errors import InputError
        raise InputError(f"Frames per second must be positive, got {fps}.")
    out = Path(out_dir)
    paths = {}
    for stale in (out / "frames").glob("frame_*.png"):
        if not re.fullmatch(r"frame_\d{3}", stale.stem) or int(stale.stem[6:]) >= len(result.frames):
            stale.unlink()
    for k, frame in enumerate(result.frames):
        atomic_write_bytes(out / "frames" / f"frame_{k:03d}.png", png_bytes(frame))
    paths["frames"] = out / "frames"
    for name in ("strip.png", "morph.gif", "morph.mp4", "morph.json"):
        paths[name] = save_result(result, out / name, fps)
    return paths


def plot_distances(alphas: Sequence[float], distances: Sequence[float], step: Optional[float] = None,
                   ax=None, label: Optional[str] = None):
    """Consecutive distances ``d_k`` (K - 1 of them) against the middle of each step's alphas,
    ``(alphas[k] + alphas[k + 1]) / 2`` (matplotlib): the sum of the points is the path's length
    (PPL as a sum of steps), not the area under the line."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    mids = [(a + b) / 2 for a, b in zip(alphas[:-1], alphas[1:])]
    ax.plot(mids, distances, "o-", label=label)
    if step is not None:
        ax.axhline(step, color="grey", ls="--", lw=1)
    ax.set_xlabel("alpha (middle of the step)")
    ax.set_ylabel("LPIPS to next frame")
    ax.set_xlim(0, 1)
    return ax


def show_strip(frames: Sequence[Image.Image], alphas: Optional[Sequence[float]] = None, title: str = ""):
    """Show frames in one matplotlib row, titled with their alphas."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(frames), figsize=(1.6 * len(frames), 1.9), squeeze=False)
    for k, (ax, frame) in enumerate(zip(axes[0], frames)):
        ax.imshow(frame)
        ax.set_axis_off()
        if alphas is not None:
            ax.set_title(f"{alphas[k]:.2f}", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def alpha_slider(frames: Sequence[Image.Image], alphas: Sequence[float], size: int = 256):
    """An ipywidgets slider over the frames, showing the frame and its alpha."""
    import ipywidgets as widgets

    image = widgets.Image(value=png_bytes(frames[0].resize((size, size))), format="png", width=size)
    label = widgets.Label(f"alpha = {alphas[0]:.3f}")
    slider = widgets.IntSlider(value=0, min=0, max=len(frames) - 1, description="frame")

    def update(change):
        k = change["new"]
        image.value = png_bytes(frames[k].resize((size, size)))
        label.value = f"alpha = {alphas[k]:.3f}"

    slider.observe(update, names="value")
    return widgets.VBox([widgets.HBox([slider, label]), image])
