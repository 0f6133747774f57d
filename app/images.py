"""Load any image a user may have into 8-bit RGB, safely."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 8192 * 8192  # tiled coding (README, "Large images"); 67 MP peaks at about 1.55 GiB on the CPU
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm"}


class ImageError(ValueError):
    """An input that is not a readable image, or one that is too large."""


def load_image(source, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Return ``source`` (path, bytes, file object or PIL image) as an 8-bit RGB image.

    EXIF orientation is applied; grayscale, palette, 16-bit and CMYK images become RGB;
    transparency is composited onto white (the codec stores no alpha channel).
    """
    own = not isinstance(source, Image.Image)  # an image we opened may be changed in place (large photos: no copies)
    if not own:
        img = source
    else:
        if isinstance(source, (bytes, bytearray)):
            source = io.BytesIO(source)
        elif isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
            raise ImageError(f"no such image file: {source}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(source)
        except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise ImageError(f"not a readable image ({e})") from None
        except OSError as e:
            raise ImageError(f"cannot read image: {e}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels")
    if width == 0 or height == 0:
        raise ImageError("image is empty (0 pixels)")
    try:
        if own:
            ImageOps.exif_transpose(img, in_place=True)
        else:
            img = ImageOps.exif_transpose(img)
        img = _to_rgb(img, copy=not own)
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"cannot decode image: {e}") from None
    img.info = {}  # pixels only: no ICC/EXIF/XMP travels into any encoder (keeps codec comparisons fair)
    return img


def to_array(img: Image.Image, rows: int = 256) -> np.ndarray:
    """An RGB image's pixels as an (H, W, 3) uint8 array, copied ``rows`` rows at a time: ``np.asarray`` goes through
    ``tobytes()``, which holds the pixels twice more while it joins them (about 400 MiB for a 67 MP photo)."""
    width, height = img.size
    out = np.empty((height, width, 3), dtype=np.uint8)
    for r in range(0, height, rows):
        out[r:r + rows] = np.asarray(img.crop((0, r, width, min(r + rows, height))))
    return out


def image_files(folder, recursive: bool = False) -> list[Path]:
    """Sorted image files (by suffix) in ``folder``; SystemExit with one line if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"error: {folder} is not a folder")
    paths = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"error: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return paths


def _to_rgb(img: Image.Image, copy: bool = True) -> Image.Image:
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode != "F" and (img.mode.startswith("I;16") or arr.max() > 255):
            arr = arr / 257.0
        elif img.mode == "F" and arr.max() <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return img.convert("RGB") if copy or img.mode != "RGB" else img
