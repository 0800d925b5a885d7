import io

import numpy as np
import pytest
from PIL import Image

from impus_lite.errors import InputError
from impus_lite.images import fit_square, load_image, open_rgb, pil_to_tensor, tensor_digest, tensor_to_pil


def test_rgba_is_composited_on_white(tmp_path):
    path = tmp_path / "t.png"
    Image.new("RGBA", (10, 10), (255, 0, 0, 0)).save(path)
    x = load_image(path, 8)
    assert x.shape == (1, 3, 8, 8)
    assert torch_allclose(x, 1.0)


def torch_allclose(x, value, atol=1e-6):
    return bool((x - value).abs().max() <= atol)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "LA", "I;16"])
def test_other_modes_become_rgb(tmp_path, mode):
    path = tmp_path / f"m{mode.replace(';', '')}.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    Image.new("RGB", (12, 9), (10, 200, 30)).convert(mode).save(path)
    image = open_rgb(path)
    assert image.mode == "RGB" and image.size == (12, 9)


def test_exif_rotation_is_applied(tmp_path):
    path = tmp_path / "rot.jpg"
    image = Image.new("RGB", (40, 20), "white")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(path, exif=exif)
    assert open_rgb(path).size == (20, 40)


def test_crop_keeps_aspect_and_resize_stretches():
    image = Image.new("RGB", (60, 20), "black")
    image.paste((255, 255, 255), (0, 0, 20, 20))  # a white square on the left third
    cropped = np.asarray(fit_square(image, 20, "crop"))
    stretched = np.asarray(fit_square(image, 20, "resize"))
    assert cropped.mean() < 10            # the centre third is black
    assert 60 < stretched.mean() < 110    # a third of the stretched image is white


def test_tensor_round_trip_and_range():
    image = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5)
    x = pil_to_tensor(image)
    assert x.min() >= -1 and x.max() <= 1
    assert np.array_equal(np.asarray(tensor_to_pil(x)[0]), np.asarray(image))


def test_digest_changes_with_content():
    a = pil_to_tensor(Image.new("RGB", (4, 4), "red"))
    b = a.clone()
    b[0, 0, 0, 0] += 0.01
    assert tensor_digest(a) == tensor_digest(a.clone()) != tensor_digest(b)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        open_rgb(tmp_path / "nope.png")


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello")
    with pytest.raises(InputError, match="not an image"):
        open_rgb(path)


def test_truncated_file(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[:400])
    with pytest.raises(InputError, match="truncated or damaged"):
        open_rgb(path)


def test_bad_resize_mode():
    with pytest.raises(InputError, match="resize mode"):
        fit_square(Image.new("RGB", (4, 4)), 4, "zoom")


def test_a_16_bit_greyscale_image_keeps_its_tones(tmp_path):
    grey = np.linspace(0, 255, 64 * 64).reshape(64, 64).astype(np.uint8)
    path = tmp_path / "grey16.png"
    Image.fromarray(grey.astype(np.uint16) * 257).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(open_rgb(path)).astype(int)
    assert np.abs(rgb[..., 0] - grey).max() <= 1 and rgb.shape == (64, 64, 3)


def test_an_image_too_large_to_open_safely_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)       # 300 x 300 is then over twice the limit
    with pytest.raises(InputError, match="too large"):
        open_rgb(path)
