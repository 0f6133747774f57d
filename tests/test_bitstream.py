import struct

import pytest

from app import bitstream
from app.bitstream import BitstreamError, Header, pack, unpack

HEADER = Header(model_id=b"\x01" * 8, quality=3, width=65, height=33, pad_width=128, pad_height=64)


def sample() -> bytes:
    return pack(HEADER, b"zz-string", b"the y string")


def test_round_trip():
    header, z, y = unpack(sample())
    assert header == HEADER and z == b"zz-string" and y == b"the y string"
    assert bitstream.bits_per_pixel(sample()) == 8 * len(sample()) / (65 * 33)
    assert header.to_dict()["model_id"] == "01" * 8


@pytest.mark.parametrize("cut", range(0, 60))
def test_truncated_at_any_byte(cut):
    data = sample()
    with pytest.raises(BitstreamError):
        unpack(data[:cut] if cut < len(data) else data[:-1])


def test_every_single_bit_flip_is_caught():
    data = sample()
    for i in range(len(data) * 8):
        corrupt = bytearray(data)
        corrupt[i // 8] ^= 1 << (i % 8)
        with pytest.raises(BitstreamError):
            unpack(bytes(corrupt))


def test_bad_magic_version_trailing_bytes():
    data = sample()
    with pytest.raises(BitstreamError, match="magic"):
        unpack(b"\x89PNG" + data[4:])
    with pytest.raises(BitstreamError, match="version"):
        unpack(data[:4] + bytes([bitstream.FORMAT_VERSION + 1]) + data[5:])
    with pytest.raises(BitstreamError, match="trailing"):
        unpack(data + b"\x00")
    with pytest.raises(BitstreamError):
        unpack(b"")


def test_inconsistent_size_with_valid_crc():
    body = struct.pack(">4sB8sBHHHHII", bitstream.MAGIC, 1, b"\0" * 8, 0, 100, 10, 64, 64, 0, 0)
    import zlib

    with pytest.raises(BitstreamError, match="size"):
        unpack(body + struct.pack(">I", zlib.crc32(body)))


def test_pack_rejects_unrepresentable_headers():
    with pytest.raises(ValueError):
        pack(Header(b"\0" * 8, 0, 70000, 1, 70016, 64), b"", b"")
    with pytest.raises(ValueError):
        pack(Header(b"\0" * 7, 0, 1, 1, 64, 64), b"", b"")
