"""Tiled coding (app.tiling): windows, whole-image noise, shared GroupNorm, and tiled vs untiled round trips."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from app import tiling
from app.bench import synthetic_image
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


def test_shared_group_norm_over_one_window_is_group_norm(tiny_pipeline):
    norm = torch.nn.GroupNorm(4, 16)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 16, 8, 12)
    shared = tiling.SharedGroupNorm(torch.nn.Sequential(norm))
    with shared:
        shared.collect(0, torch.ones(2, 1, 8, 12, dtype=torch.bool))
        joint = norm(x)
        shared.apply(0)
        again = norm(x[:1])
    # statistics over both samples together, then replayed for one of them
    xg = x.view(1, 2, 4, 4, 8, 12).transpose(1, 2).reshape(1, 4, -1)
    ref = ((xg - xg.mean(-1, keepdim=True)) / torch.sqrt(xg.var(-1, unbiased=False, keepdim=True) + norm.eps))
    ref = ref.view(4, 2, 4, 8, 12).transpose(0, 1).reshape(2, 16, 8, 12) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    assert torch.allclose(joint, ref, atol=1e-5) and torch.allclose(again, joint[:1], atol=1e-6)
    assert type(norm).forward is torch.nn.GroupNorm.forward and "forward" not in vars(norm)


def test_measured_margins_cover_the_receptive_field(tiny_pipeline):
    c = tiny_pipeline.compressor
    margin = tiling.analysis_margin(c)
    assert margin % tiling.ALIGN == 0 and 16 <= margin <= 64  # g_a: four 5×5 stride-2 convs reach 30 pixels
    assert tiling.content_margin(c, torch.tensor([1.0])) % tiling.ALIGN == 0


def _tiled(pipe, tile, margin, joint_tiles, batch=1):
    p = copy.copy(pipe)
    p.tile_size, p.tile_margin, p.joint_tiles, p.tile_batch = tile, margin, joint_tiles, batch
    return p


def test_tiled_analysis_gives_the_untiled_latent(tiny_pipeline):
    img = synthetic_image(300, 190)
    untiled = tiny_pipeline.compress(img, quality=1.5)
    tiled = _tiled(tiny_pipeline, 128, 0, 1)
    assert tiled.tiled(192, 320)
    pad = torch.nn.functional.pad(image_to_tensor(img), (0, 20, 0, 2), mode="replicate")
    y = tiling.analysis_tiled(tiny_pipeline.compressor, np.asarray(img), 192, 320, 128, tiling.analysis_margin(tiny_pipeline.compressor))
    assert torch.allclose(y, tiny_pipeline.compressor.g_a(pad), atol=1e-5)
    assert tiled.compress(img, quality=1.5) == untiled


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_tiled_decode_matches_untiled_at_the_seams(tiny_pipeline, gamma):
    img = synthetic_image(576, 512)
    data = tiny_pipeline.compress(img, quality=2)

    def decode(pipe):
        out = pipe.decompress(data, 1, 0.5, torch.Generator().manual_seed(3), gamma, progress=False)
        return np.asarray(out, dtype=np.int16)

    untiled = decode(tiny_pipeline)
    # every core in the statistics batch (the whole image's statistics); margin 176 covers the tiny random UNet's reach
    tiled = _tiled(tiny_pipeline, 448, 176, 99)
    seams = [c[0] for c in tiling.axis_windows(512, 448, 176)[1:]]
    assert len(seams) >= 3
    diff = np.abs(decode(tiled) - untiled)
    assert diff[seams].max() <= 1 and diff[:, seams].max() <= 1 and diff[np.array(seams) - 1].max() <= 1
    assert diff.mean() < 0.01
    # too little context shows at the seams: the check can fail
    cut = np.abs(decode(_tiled(tiny_pipeline, 128, 16, 99, batch=3)) - untiled)
    assert cut[[c[0] for c in tiling.axis_windows(512, 128, 16)[1:]]].max() > 4


def test_accumulated_statistics_are_the_joint_ones_at_their_fixed_point():
    """Sums over windows one at a time, normalised by the whole image's statistics, give those statistics back."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.GroupNorm(4, 8))
    x = torch.randn(1, 3, 64, 96)
    tiles = tiling.grid(64, 96, 48, 16)
    windows = torch.cat([x[..., r[2]:r[3], c[2]:c[3]] for r, c in tiles])
    mask = torch.zeros(len(tiles), 1, *windows.shape[-2:], dtype=torch.bool)
    for i, (r, c) in enumerate(tiles):
        mask[i, :, r[0] - r[2]: r[1] - r[2], c[0] - c[2]: c[1] - c[2]] = True
    norms = tiling.SharedGroupNorm(net)
    with norms, torch.no_grad():
        norms.collect(0, mask)
        net(windows)
        joint = [tuple(v.clone() for v in pair) for pair in norms.stats[0]]
        for i in range(len(tiles)):
            norms.collect(0, mask[i:i + 1], accumulate=True)
            net(windows[i:i + 1])
        norms.finish()
        first = net[0](x).view(2, -1)  # the first GroupNorm's input on the whole image, untiled
    assert all(torch.allclose(a, b, atol=1e-5) for pair, again in zip(joint, norms.stats[0]) for a, b in zip(pair, again))
    assert torch.allclose(joint[0][0], first.mean(1), atol=1e-5) and torch.allclose(joint[0][1], first.var(1, unbiased=False), atol=1e-5)
