import dataclasses
import struct
import zlib

import pytest

from app import bitstream
from app.bitstream import BitstreamError, Header, pack, unpack

HEADER = Header(model_id=b"\x01" * 8, quality=3, width=65, height=33, pad_width=128, pad_height=64, check=b"\xab\xcd\x01\x02")


def sample() -> bytes:
    return pack(HEADER, b"zz-string", b"the y string")


def test_round_trip():
    header, z, y = unpack(sample())
    assert header == HEADER and z == b"zz-string" and y == b"the y string"
    assert bitstream.bits_per_pixel(sample()) == 8 * len(sample()) / (65 * 33)
    assert header.to_dict()["model_id"] == "01" * 8 and header.to_dict()["check"] == "abcd0102"
    assert isinstance(header.quality, int) and header.quality_x100 == 300


def test_quality_is_stored_in_hundredths_of_a_level():
    data = pack(dataclasses.replace(HEADER, quality=2.37), b"z", b"y")
    assert struct.unpack_from(">H", data, 13) == (237,)
    assert unpack(data)[0].quality == 2.37
    for bad in (-1, 655.36, 1.234):
        with pytest.raises(ValueError, match="quality"):
            pack(dataclasses.replace(HEADER, quality=bad), b"", b"")


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


def test_version_1_files_get_a_clear_message():
    body = struct.pack(">4sB8sBHHHHII", bitstream.MAGIC, 1, b"\0" * 8, 0, 64, 64, 64, 64, 0, 0)
    with pytest.raises(BitstreamError, match="version 1 .* re-encode"):
        unpack(body + struct.pack(">I", zlib.crc32(body)))


def test_inconsistent_size_with_valid_crc():
    body = struct.pack(">4sB8sHHHHH4sII", bitstream.MAGIC, 2, b"\0" * 8, 0, 100, 10, 64, 64, b"\0" * 4, 0, 0)
    with pytest.raises(BitstreamError, match="size"):
        unpack(body + struct.pack(">I", zlib.crc32(body)))


def test_pack_rejects_unrepresentable_headers():
    with pytest.raises(ValueError):
        pack(Header(b"\0" * 8, 0, 70000, 1, 70016, 64), b"", b"")
    with pytest.raises(ValueError):
        pack(Header(b"\0" * 7, 0, 1, 1, 64, 64), b"", b"")
    with pytest.raises(ValueError):
        pack(Header(b"\0" * 8, 0, 1, 1, 64, 64, b"\0"), b"", b"")
