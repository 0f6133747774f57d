"""Tiled coding (app.tiling, app.bands): windows, whole-image noise, the banded UNet, tiled vs untiled round trips."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from app import bands, tiling
from app.bench import synthetic_image
from app.models import CDCCompressor, CDCUNet
from app.pipeline import image_to_tensor


@pytest.mark.parametrize("length,tile,margin", [(1024, 256, 32), (704, 320, 64), (64, 128, 16), (4032, 1024, 64)])
def test_windows_partition_and_hold_their_margin(length, tile, margin):
    wins = tiling.axis_windows(length, tile, margin)
    assert [w[0] for w in wins][0] == 0 and wins[-1][1] == length
    assert all(a[1] == b[0] for a, b in zip(wins, wins[1:]))  # cores partition the axis
    assert len({w[3] - w[2] for w in wins}) == 1  # one window size: they batch
    for c0, c1, w0, w1 in wins:
        assert w1 - w0 <= max(tile, length) and all(v % tiling.ALIGN == 0 for v in (c0, w0, w1))
        assert w0 <= max(c0 - margin, 0) and w1 >= min(c1 + margin, length)


def test_whole_noise_equals_one_draw():
    shape = (1, 3, 96, 192)
    whole = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    noise = tiling.WholeNoise(shape, gen, [0, 32, 48])
    assert torch.equal(noise.rows(32, 80), whole[:, :, 32:80]) and torch.equal(noise.rows(0, 96), whole)
    assert torch.equal(torch.randn(4, generator=gen), torch.randn(4, generator=torch.Generator().manual_seed(5).set_state(
        _after(shape, 5))))


def _after(shape, seed):
    g = torch.Generator().manual_seed(seed)
    torch.randn(shape, generator=g)
    return g.get_state()


@pytest.mark.parametrize("band,ram", [(16, 0), (48, 0), (48, 1 << 16), (160, 1 << 30)])
def test_banded_unet_is_the_unet(band, ram):
    """Layer by layer over row bands (whole-image GroupNorm statistics, true neighbours) equals the forward."""
    torch.manual_seed(0)
    unet = CDCUNet(block_out_channels=(16, 24, 32), cond_channels=(8, 8, 8), layers_per_block=2, time_embed_dim=32,
                   norm_num_groups=8).eval()
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.2)  # large weights: every layer's statistics and reach matter
    h, w = 160, 96
    x, x_base = torch.randn(1, 3, h, w), torch.randn(1, 3, h, w) * 0.5
    content = [torch.randn(1, 8, h // s, w // s) for s in (4, 8, 16)]
    with torch.no_grad():
        ref = unet(x, 500, 0.3, content, x_base).sample
    runner = bands.BandRunner(h, w, band, torch.device("cpu"), torch.float32, ram)  # planes in files, some or all in RAM

    def plane(t, scale):
        p = runner.plane(t.shape[1], scale)
        p.write(0, t)
        return p

    out = bands.BandedUNet(unet, runner)(plane(x, 1), 500, 0.3, [plane(c, s) for c, s in zip(content, (4, 8, 16))],
                                         plane(x_base, 1))
    assert torch.allclose(out.read(0, h), ref, atol=2e-5)


@pytest.mark.parametrize("ram,lasting", [(0, False), (1 << 20, False), (1 << 20, True)])
def test_plane_sums_what_was_written(ram, lasting):
    store = bands.PlaneStore(ram)
    p = bands.Plane(4, 8, 5, 1, torch.float32, store, lasting)
    in_ram = ram > 0 and not lasting  # lasting planes go to files
    assert isinstance(p._storage, torch.Tensor) == in_ram and store.ram_left == ram - in_ram * 4 * 8 * 5 * 4
    x = torch.randn(1, 4, 8, 5)
    p.write(3, x[..., 3:, :])
    p.write(0, x[..., :3, :])
    assert torch.equal(p.read(0, 8), x) and torch.equal(p.read(2, 6), x[..., 2:6, :])
    assert torch.allclose(p.sum, x.double().sum((0, 2, 3))) and torch.allclose(p.sumsq, x.double().square().sum((0, 2, 3)))
    mean, var = bands.group_stats([p], 2)
    assert torch.allclose(mean, x.view(2, -1).mean(1)) and torch.allclose(var, x.view(2, -1).var(1, unbiased=False))
    with pytest.raises(ValueError):
        p.write(6, x)
    del p  # a dropped plane hands its buffer or file back
    assert len(store._buffers) == in_ram and len(store._files) == (not in_ram)


def test_plane_buffers_are_reused_within_the_budget():
    store = bands.PlaneStore(1000 * 4)
    a = bands.Plane(1, 10, 100, 1, torch.float32, store)  # the whole budget
    b = bands.Plane(1, 10, 10, 1, torch.float32, store)  # none left: a file
    assert isinstance(a._storage, torch.Tensor) and not isinstance(b._storage, torch.Tensor)
    address = a._storage.data_ptr()
    del a
    c = bands.Plane(2, 5, 10, 1, torch.float32, store)  # a smaller plane takes the freed buffer
    assert c._storage.data_ptr() == address and store.ram_left == 0
    x = torch.randn(1, 2, 5, 10)
    c.write(0, x)
    assert torch.equal(c.read(0, 5), x)


def test_measured_margins_cover_the_receptive_field(tiny_pipeline):
    c = tiny_pipeline.compressor
    margin = tiling.analysis_margin(c)
    assert margin % tiling.ALIGN == 0 and 16 <= margin <= 64  # g_a: four 5×5 stride-2 convs reach 30 pixels
    assert tiling.content_margin(c, torch.tensor([1.0])) % tiling.ALIGN == 0


def test_encoder_windows_shrink_as_g_a_widens_so_its_first_activation_stays_in_budget():
    def window(c1, tile=1024):
        return tiling.analysis_window(CDCCompressor(encoder_channels=(c1, 96, 128)), tile)
    assert window(48) == 1024 and window(96) == 720 and window(8) == 1024 and window(48, 512) == 512
    for c1 in (48, 64, 96, 192):
        assert window(c1) % tiling.ALIGN == 0 and c1 * (window(c1) // 2) ** 2 * 4 <= tiling.ANALYSIS_BYTES


def _tiled(pipe, tile, band_pixels=None):
    p = copy.copy(pipe)
    p.tile_size = tile
    if band_pixels is not None:
        p.band_pixels = band_pixels
    return p


def test_tiled_analysis_gives_the_untiled_latent(tiny_pipeline):
    img = synthetic_image(300, 190)
    untiled = tiny_pipeline.compress(img, quality=1.5)
    tiled = _tiled(tiny_pipeline, 128)
    assert tiled.tiled(192, 320)
    pad = torch.nn.functional.pad(image_to_tensor(img), (0, 20, 0, 2), mode="replicate")
    y = tiling.analysis_tiled(tiny_pipeline.compressor, np.asarray(img), 192, 320, 128, tiling.analysis_margin(tiny_pipeline.compressor))
    assert torch.allclose(y, tiny_pipeline.compressor.g_a(pad), atol=1e-5)
    assert tiled.compress(img, quality=1.5) == untiled


@pytest.mark.parametrize("gamma,ram", [(0.0, 1 << 30), (1.0, 0)])
def test_tiled_decode_is_the_untiled_one(tiny_pipeline, gamma, ram):
    img = synthetic_image(576, 500)
    data = tiny_pipeline.compress(img, quality=2)

    def decode(pipe):
        out = pipe.decompress(data, 2, 0.5, torch.Generator().manual_seed(3), gamma, progress=False)
        return np.asarray(out, dtype=np.int16)

    untiled = decode(tiny_pipeline)
    tiled = _tiled(tiny_pipeline, 256, band_pixels=576 * 48)  # bands of 48 rows: 11 of them
    tiled.band_ram = ram  # activations in RAM, or all in files
    assert tiled.band_rows(576) == 48
    diff = np.abs(decode(tiled) - untiled)
    assert diff.max() <= 1 and diff.mean() < 0.001


def test_freed_memory_goes_back_to_the_os_on_glibc():
    import platform

    from app.bands import return_freed_memory

    assert return_freed_memory() == (platform.libc_ver()[0] == "glibc")
