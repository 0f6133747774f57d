import io

import numpy as np
import pytest
from PIL import Image

from app.images import ImageError, load_image, to_array


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "I", "1", "F"])
def test_any_mode_becomes_rgb(mode):
    img = Image.new("RGB", (20, 10), (200, 100, 50)).convert(mode)
    out = load_image(img)
    assert out.mode == "RGB" and out.size == (20, 10)


def test_sixteen_bit_png_is_scaled_not_clipped():
    arr = np.full((4, 4), 65535, dtype=np.uint16)
    out = load_image(encoded(Image.fromarray(arr), "PNG"))
    assert np.asarray(out).min() == 255


def test_alpha_is_composited_on_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(load_image(img)).min() == 255


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (30, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    out = load_image(encoded(img, "JPEG", exif=exif))
    assert out.size == (10, 30)


def test_a_callers_image_is_left_as_it_was():
    img = Image.new("RGB", (30, 10), (1, 2, 3))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.info["exif"] = exif.tobytes()
    img.info["icc_profile"] = b"profile"
    out = load_image(img)
    assert out is not img and out.size == (10, 30) and out.info == {}
    assert img.size == (30, 10) and img.info["icc_profile"] == b"profile"


def test_errors_are_one_line_image_errors(tmp_path):
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(b"definitely not an image")
    with pytest.raises(ImageError, match="no such image"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="limit"):
        load_image(Image.new("RGB", (100, 100)), max_pixels=9999)
    png = encoded(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    with pytest.raises(ImageError):
        load_image(png[: len(png) // 2])


def test_to_array_copies_the_pixels_strip_by_strip():
    pixels = np.random.default_rng(0).integers(0, 256, (37, 23, 3), dtype=np.uint8)
    out = to_array(Image.fromarray(pixels), rows=8)
    assert out.dtype == np.uint8 and np.array_equal(out, pixels)
