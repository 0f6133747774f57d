import numpy as np
import pytest
from PIL import Image

from app import classical


@pytest.fixture(scope="module")
def photo():
    """A deterministic 96x64 image with smooth structure and some noise."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:64, 0:96]
    base = np.stack([128 + 100 * np.sin(x / 9.0), 128 + 100 * np.cos(y / 7.0), (x + y) * 1.5], axis=-1)
    noise = rng.normal(0, 12, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("codec", classical.CODECS)
def test_round_trip(photo, codec):
    data = classical.encode(photo, codec, 80)
    out = classical.decode(data)
    assert out.mode == "RGB" and out.size == photo.size
    err = np.abs(np.asarray(out, np.float32) - np.asarray(photo, np.float32)).mean()
    assert err < 20


@pytest.mark.parametrize("codec", classical.CODECS)
def test_higher_quality_is_bigger(photo, codec):
    assert len(classical.encode(photo, codec, 90)) > len(classical.encode(photo, codec, 10))


@pytest.mark.parametrize("codec", classical.CODECS)
def test_encode_at_most_respects_budget(photo, codec):
    budget = len(classical.encode(photo, codec, 50))
    res = classical.encode_at_most(photo, codec, budget)
    assert res is not None and res.codec == codec
    assert len(res.data) <= budget
    assert len(res.data) >= budget * 0.8  # close to the budget, not some tiny file
    assert res.bpp == pytest.approx(8 * len(res.data) / (96 * 64))
    assert res.image.size == photo.size


@pytest.mark.parametrize("codec", classical.CODECS)
def test_encode_at_most_impossible(photo, codec):
    assert classical.encode_at_most(photo, codec, 10) is None


def test_sweep(photo):
    results = classical.sweep(photo, "jpeg", [10, 50])
    assert [r.quality for r in results] == [10, 50]
    assert results[0].bpp < results[1].bpp
    assert all(r.encode_s >= 0 and r.decode_s >= 0 for r in results)


def test_bad_arguments(photo):
    with pytest.raises(ValueError, match="unknown codec"):
        classical.encode(photo, "bmp", 50)
    with pytest.raises(ValueError, match="quality"):
        classical.encode(photo, "jpeg", 0)
    with pytest.raises(ValueError, match="quality"):
        classical.encode(photo, "webp", 101)
