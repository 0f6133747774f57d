import io
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app import metrics
from app.metrics import LPIPSUnavailable, image_metrics, load_lpips, lpips_distance, ms_ssim, psnr

DATA = Path(__file__).parent / "data" / "lpips"
# Published LPIPS-alex (official implementation) for pyiqa 0.1.16's ResultsCalibra (TID2013) pairs.
TID2013_LPIPS_ALEX = {"I03": 0.7237, "I04": 0.2572, "I06": 0.0508, "I08": 0.0521, "I19": 0.4253}


def _open(path):
    return Image.open(path).convert("RGB")


@pytest.fixture
def no_lpips_weights(tmp_path, monkeypatch):
    missing = tmp_path / "missing.safetensors"
    monkeypatch.setitem(metrics.LPIPS_WEIGHTS, "alex", missing)
    metrics._default_lpips.cache_clear()
    yield missing
    metrics._default_lpips.cache_clear()


def test_lpips_committed_pair():
    ref, dist = _open(DATA / "ref.png"), _open(DATA / "dist.png")
    assert lpips_distance(ref, dist) == pytest.approx(0.3137, abs=5e-4)
    assert lpips_distance(ref, ref) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", sorted(TID2013_LPIPS_ALEX))
def test_lpips_tid2013_calibration(name):
    wheel = os.environ.get("CDC_PYIQA_WHEEL")
    if not wheel:
        pytest.skip("set CDC_PYIQA_WHEEL to a pyiqa-0.1.16 wheel (not committed: see tests/data/lpips/README.md)")
    with zipfile.ZipFile(wheel) as z:
        ref, dist = (_open(io.BytesIO(z.read(f"ResultsCalibra/{d}/{name}.bmp"))) for d in ("ref_dir", "dist_dir"))
    assert lpips_distance(ref, dist) == pytest.approx(TID2013_LPIPS_ALEX[name], abs=5e-4)


def test_psnr_known_values():
    a = np.zeros((8, 8, 3), np.uint8)
    b = np.full((8, 8, 3), 16, np.uint8)  # MSE 256
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 256))
    assert psnr(Image.fromarray(a), Image.fromarray(b)) == psnr(a, b)
    assert psnr(a, a) == math.inf
    assert psnr(_open(DATA / "ref.png"), _open(DATA / "dist.png")) == pytest.approx(26.946, abs=1e-3)


def test_ms_ssim():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (161, 170, 3), dtype=np.uint8)
    assert ms_ssim(a, a) == pytest.approx(1.0, abs=1e-5)
    assert ms_ssim(a[:160], a[:160]) is None
    assert ms_ssim(_open(DATA / "ref.png"), _open(DATA / "dist.png")) == pytest.approx(0.9076, abs=1e-4)


def test_image_metrics_keys():
    a = np.zeros((32, 32, 3), np.uint8)
    assert image_metrics(a, a) == {"psnr": math.inf, "ms_ssim": None, "lpips": pytest.approx(0.0, abs=1e-6)}


def test_lpips_too_small_is_none():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (31, 40, 3), dtype=np.uint8)
    assert lpips_distance(a, 255 - a) > 0
    for h, w in ((30, 40), (1, 1), (7, 7), (17, 31)):
        assert lpips_distance(a[:h, :w], a[:h, :w]) is None
    assert image_metrics(a[:17, :31], a[:17, :31]) == {"psnr": math.inf, "ms_ssim": None, "lpips": None}


def test_size_mismatch():
    a, b = np.zeros((32, 32, 3), np.uint8), np.zeros((32, 33, 3), np.uint8)
    for fn in (psnr, ms_ssim, lpips_distance, image_metrics):
        with pytest.raises(ValueError, match="sizes differ"):
            fn(a, b)
    with pytest.raises(ValueError):
        psnr(a.astype(np.float32), a)


def test_lpips_unavailable(no_lpips_weights):
    a = np.zeros((32, 32, 3), np.uint8)
    assert lpips_distance(a, a) is None
    assert image_metrics(a, a)["lpips"] is None
    with pytest.raises(LPIPSUnavailable, match="not found"):
        load_lpips(weights=no_lpips_weights)


def test_lpips_vgg_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(metrics.LPIPS_WEIGHTS, "vgg", tmp_path / "vgg16.safetensors")
    with pytest.raises(LPIPSUnavailable):
        load_lpips("vgg")


def test_lpips_rejects_bad_weights(tmp_path):
    from safetensors.torch import save_file

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    partial = tmp_path / "partial.safetensors"
    save_file({"net.slice1.0.weight": torch.zeros(64, 3, 11, 11)}, str(partial))
    for path in (corrupt, partial):
        with pytest.raises(LPIPSUnavailable):
            load_lpips(weights=path)


def test_load_lpips_differentiable():
    model = load_lpips()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1).requires_grad_(True)
    d = model(x, y)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
