import pytest
import torch

from app.models import CDCCompressor, CDCUNet
from app.models.compressor import BaseSynthesis
from conftest import make_tiny_pipeline


def test_compressor_forward_returns_content_base_and_likelihoods():
    c = make_tiny_pipeline().compressor
    x = torch.rand(2, 3, 64, 128) * 2 - 1
    out = c(x, torch.tensor([0, 3]))
    assert out.x_base.shape == x.shape
    assert [f.shape[-2:] for f in out.content] == [(16, 32), (8, 16), (4, 8)]
    assert out.likelihoods["y"].shape == (2, 16, 4, 8) and out.likelihoods["z"].shape == (2, 8, 1, 2)
    assert all(((lik > 0) & (lik <= 1)).all() for lik in out.likelihoods.values())
    out.x_base.sum().backward()
    assert c.g_a[0].weight.grad is not None  # straight-through rounding passes gradients


def test_gains_start_spread_so_levels_differ_in_rate():
    c = CDCCompressor(latent_channels=16, hyper_channels=8, encoder_channels=(8, 8, 16), content_channels=(16, 16, 16))
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    bits = []
    for q in (0, c.config.num_quality_levels - 1):
        out = c(x, torch.tensor([q]))
        bits.append(-sum(torch.log2(lik).sum() for lik in out.likelihoods.values()).item())
    assert bits[1] > bits[0]


def test_base_synthesis_runs_its_last_conv_at_half_resolution_with_the_same_result():
    torch.manual_seed(0)
    synthesis = BaseSynthesis(16, (8, 4))
    torch.nn.init.normal_(synthesis[6].weight)  # zero at initialisation
    torch.nn.init.normal_(synthesis[6].bias)
    f4 = torch.randn(2, 16, 6, 10)
    at_full_resolution = synthesis[6](torch.nn.Sequential(*list(synthesis)[:6])(f4))
    out = synthesis(f4)
    assert out.shape == (2, 3, 24, 40)
    torch.testing.assert_close(out, at_full_resolution, rtol=1e-5, atol=1e-5)
    assert [name for name, _ in synthesis.named_parameters()] == ["0.weight", "0.bias", "3.weight", "3.bias", "6.weight", "6.bias"]


def test_a_widened_encoder_gives_the_same_latent_and_trains_its_new_channels():
    c = make_tiny_pipeline().compressor
    for gdn in (c.g_a[1], c.g_a[3], c.g_a[5]):  # off-diagonal GDN terms, as a trained g_a has
        torch.nn.init.uniform_(gdn.gamma, 0.05, 0.3)
    x, q = torch.rand(2, 3, 64, 64) * 2 - 1, torch.tensor([1, 3])
    wide = c.with_encoder_channels((12, 16, 20))
    assert tuple(wide.config.encoder_channels) == (12, 16, 20) and wide.g_a[6].weight.shape[1] == 20
    torch.testing.assert_close(wide.analysis(x, q), c.analysis(x, q), rtol=1e-5, atol=1e-6)
    wide.analysis(x, q).square().mean().backward()
    assert wide.g_a[6].weight.grad[:, 16:].abs().sum() > 0  # the new channels reach y once trained
    with pytest.raises(ValueError, match="three widths"):
        c.with_encoder_channels((4, 16, 20))


def test_content_runs_channels_last_with_the_same_values():
    c = make_tiny_pipeline().compressor.with_base_synthesis((8, 4))
    torch.nn.init.normal_(c.base_refine[6].weight, std=0.1)
    y_hat = torch.randn(1, 16, 4, 6).round()
    q = torch.tensor([1])
    content, x_base = c.content(y_hat, q)
    f16 = c.content16(y_hat * c.gain(q, inverse=True))  # the contiguous (NCHW) path
    f4 = c.content4(c.content8(f16))
    expected = torch.nn.functional.pixel_shuffle(c.to_base(f4), 4) + c.base_refine(f4)
    torch.testing.assert_close(content[0], f4, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_base, expected, rtol=1e-5, atol=1e-5)


def test_unet_predicts_x0_shape_and_depends_on_rho():
    torch.manual_seed(0)
    unet = CDCUNet(block_out_channels=(16, 16, 16), cond_channels=(8, 8, 8), layers_per_block=1, time_embed_dim=32, norm_num_groups=8)
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)
    x = torch.randn(1, 3, 64, 64)
    content = [torch.randn(1, 8, 16 >> i, 16 >> i) for i in range(3)]
    base = torch.zeros_like(x)
    a = unet(x, 999, 0.0, content, base).sample
    b = unet(x, 999, 0.9, content, base).sample
    assert a.shape == x.shape and not torch.allclose(a, b)
    assert unet.downscale_factor == 16


def test_paper_sized_config_is_expressible():
    cfg = dict(unshuffle=1, block_out_channels=(64, 128, 192, 256, 320, 384), cond_channels=(64, 128, 192, 256, 320, 384))
    unet = CDCUNet(**cfg)
    assert unet.downscale_factor == 32
    assert sum(p.numel() for p in unet.parameters()) > 10 * sum(p.numel() for p in CDCUNet().parameters())
