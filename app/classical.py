"""Classical codecs (JPEG, WebP, AVIF via Pillow) for comparisons at equal rate.

Settings are the ones a careful user would pick:
  * JPEG: 4:2:0 chroma subsampling, optimised Huffman tables (libjpeg), quality 1-100.
  * WebP: lossy, ``method=6`` (slowest, best compression), quality 0-100.
  * AVIF: libavif defaults (speed 6, 4:2:0, full range), quality 0-100.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

from PIL import Image

CODECS = ("jpeg", "webp", "avif")

_FORMATS = {"jpeg": "JPEG", "webp": "WEBP", "avif": "AVIF"}
_OPTIONS = {
    "jpeg": {"subsampling": 2, "optimize": True},
    "webp": {"method": 6},
    "avif": {},
}
QUALITY_RANGE = {"jpeg": (1, 100), "webp": (0, 100), "avif": (0, 100)}

# Qualities for rate-distortion sweeps: about 0.05-1.5 bpp on Kodak-like photos.
SWEEP_QUALITIES = {
    "jpeg": (2, 4, 6, 8, 10, 15, 20, 30, 40, 50, 65, 80),
    "webp": (0, 2, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80),
    "avif": (0, 10, 18, 24, 30, 35, 40, 45, 50, 55, 60, 68),
}


@dataclass
class ClassicalResult:
    """One encoded image: its bytes, the decoded image, the rate and the codec times."""

    codec: str
    quality: int
    data: bytes
    image: Image.Image
    bpp: float
    encode_s: float = 0.0
    decode_s: float = 0.0


def _check(codec: str, quality: int | None = None) -> None:
    if codec not in _FORMATS:
        raise ValueError(f"unknown codec {codec!r}; choose from {', '.join(CODECS)}")
    if quality is not None:
        lo, hi = QUALITY_RANGE[codec]
        if not (isinstance(quality, int) and lo <= quality <= hi):
            raise ValueError(f"{codec} quality must be an integer in [{lo}, {hi}], got {quality!r}")


def encode(img: Image.Image, codec: str, quality: int) -> bytes:
    """Encode an image with a classical codec at the given quality."""
    _check(codec, quality)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, _FORMATS[codec], quality=quality, **_OPTIONS[codec])
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    """Decode JPEG/WebP/AVIF bytes to an RGB image."""
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def bits_per_pixel(data: bytes, img: Image.Image) -> float:
    """Rate of ``data`` in bits per pixel of ``img``."""
    return 8 * len(data) / (img.width * img.height)


def _timed_encode(img: Image.Image, codec: str, quality: int) -> tuple[bytes, float]:
    t0 = time.perf_counter()
    data = encode(img, codec, quality)
    return data, time.perf_counter() - t0


def _result(img: Image.Image, codec: str, quality: int, data: bytes, encode_s: float) -> ClassicalResult:
    t0 = time.perf_counter()
    out = decode(data)
    decode_s = time.perf_counter() - t0
    return ClassicalResult(codec, quality, data, out, bits_per_pixel(data, img), encode_s, decode_s)


def encode_at_most(img: Image.Image, codec: str, max_bytes: int) -> ClassicalResult | None:
    """Largest file not exceeding ``max_bytes`` (binary search over quality), or None.

    Assumes the size grows with quality, which holds for these encoders up to rare
    one-step wiggles; the answer always respects the budget.
    """
    _check(codec)
    lo, hi = QUALITY_RANGE[codec]
    best = None
    while lo <= hi:
        q = (lo + hi) // 2
        data, seconds = _timed_encode(img, codec, q)
        if len(data) <= max_bytes:
            if best is None or len(data) > len(best[1]):
                best = (q, data, seconds)
            lo = q + 1
        else:
            hi = q - 1
    return None if best is None else _result(img, codec, *best)


def sweep(img: Image.Image, codec: str, qualities=None) -> list[ClassicalResult]:
    """Encode ``img`` at each quality (default: ``SWEEP_QUALITIES[codec]``)."""
    _check(codec)
    qualities = SWEEP_QUALITIES[codec] if qualities is None else qualities
    return [_result(img, codec, q, *_timed_encode(img, codec, q)) for q in qualities]
