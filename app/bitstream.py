"""The ``.cdc`` container: a fixed header, the hyper-latent and latent strings, a CRC32.

Layout of format version 2 (big-endian)::

    magic      4s   b"\\x89CDC"
    version    B    FORMAT_VERSION (2)
    model_id   8s   hash of the writing model's config, weights and coding tables
    quality    H    quality in hundredths of a level (level x 100)
    width      H    original width
    height     H    original height
    pad_width  H    padded width (a multiple of the model's stride)
    pad_height H    padded height
    check      4s   first 4 bytes of the SHA-256 of the exact decoded latent (``latent_sha256``)
    z_length   I    bytes of the hyper-latent string
    y_length   I    bytes of the latent string
    z string, y string
    crc32      I    of everything before it

Version 1 (one-byte quality, no check) was written before the entropy path was exact; its files
are refused with a request to re-encode. bpp is always 8 x file bytes / (width x height).
This module knows nothing of torch.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib

MAGIC = b"\x89CDC"
FORMAT_VERSION = 2
CHECK_BYTES = 4
_HEADER = struct.Struct(">4sB8sHHHHH4sII")
_CRC = struct.Struct(">I")


class BitstreamError(ValueError):
    """A ``.cdc`` file that is truncated, corrupt, foreign or of an unknown version."""


@dataclasses.dataclass(frozen=True)
class Header:
    """``quality`` is in levels: an int for a whole level, else a multiple of 0.01."""

    model_id: bytes
    quality: int | float
    width: int
    height: int
    pad_width: int
    pad_height: int
    check: bytes = bytes(CHECK_BYTES)

    @property
    def quality_x100(self) -> int:
        """The stored quality field: hundredths of a level."""
        return round(self.quality * 100)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model_id"] = self.model_id.hex()
        d["check"] = self.check.hex()
        return d


def quality_from_x100(x100: int) -> int | float:
    """The stored hundredths as a quality in levels: an int for a whole level."""
    return x100 // 100 if x100 % 100 == 0 else x100 / 100


def pack(header: Header, z_string: bytes, y_string: bytes) -> bytes:
    """Serialise one image's header and strings into ``.cdc`` bytes."""
    if len(header.model_id) != 8:
        raise ValueError("model_id must be 8 bytes")
    if len(header.check) != CHECK_BYTES:
        raise ValueError(f"check must be {CHECK_BYTES} bytes")
    if not (0 <= header.quality_x100 < 65536 and abs(header.quality * 100 - header.quality_x100) < 1e-6):
        raise ValueError(f"quality {header.quality} does not fit the format (hundredths of a level, 0 to 655.35)")
    for name in ("width", "height", "pad_width", "pad_height"):
        if not 0 < getattr(header, name) < 65536:
            raise ValueError(f"{name}={getattr(header, name)} does not fit the format")
    body = _HEADER.pack(
        MAGIC, FORMAT_VERSION, header.model_id, header.quality_x100,
        header.width, header.height, header.pad_width, header.pad_height, header.check,
        len(z_string), len(y_string),
    ) + z_string + y_string
    return body + _CRC.pack(zlib.crc32(body))


def unpack(data: bytes) -> tuple[Header, bytes, bytes]:
    """Parse ``.cdc`` bytes; raise :class:`BitstreamError` on any defect."""
    data = bytes(data)
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise BitstreamError("not a .cdc file (bad magic bytes)")
    if len(data) > len(MAGIC) and data[len(MAGIC)] == 1:
        raise BitstreamError("format version 1 .cdc files (written before exact entropy coding) are no longer read; re-encode the image")
    if len(data) < _HEADER.size + _CRC.size:
        raise BitstreamError(f"truncated .cdc file ({len(data)} bytes, header needs {_HEADER.size + _CRC.size})")
    (_, version, model_id, quality, width, height, pad_w, pad_h, check, z_len, y_len) = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise BitstreamError(f"unsupported .cdc format version {version} (this build reads {FORMAT_VERSION})")
    expected = _HEADER.size + z_len + y_len + _CRC.size
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "trailing bytes in"
        raise BitstreamError(f"{kind} .cdc file ({len(data)} bytes, header says {expected})")
    (crc,) = _CRC.unpack_from(data, expected - _CRC.size)
    if zlib.crc32(data[: expected - _CRC.size]) != crc:
        raise BitstreamError("corrupt .cdc file (CRC32 mismatch)")
    if not (0 < width <= pad_w and 0 < height <= pad_h):
        raise BitstreamError("corrupt .cdc file (inconsistent image size)")
    header = Header(model_id, quality_from_x100(quality), width, height, pad_w, pad_h, check)
    z_start = _HEADER.size
    return header, data[z_start : z_start + z_len], data[z_start + z_len : z_start + z_len + y_len]


def bits_per_pixel(data: bytes) -> float:
    """8 x file bytes / original pixels, from the file itself."""
    header, _, _ = unpack(data)
    return 8.0 * len(data) / (header.width * header.height)
