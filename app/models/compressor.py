"""Encoder, mean-scale hyperprior, gain units and content decoder of CDC (Yang & Mandt 2023, Sec. 3.1).

    y = g_a(x) · gain[q]          z = h_a(y)          (μ, σ) = h_s(ẑ)
    ŷ = round(y − μ) + μ          content pyramid, x_base = g_s(ŷ / gain[q])

g_s ends in a linear 3×3 convolution at H/4 and pixel_shuffle(4); with ``base_channels`` a
non-linear synthesis at H/2 and H adds a residual to it (zero at initialisation, so a grown
checkpoint starts out decoding exactly as before).

Rate (Eq. 7's first term) uses the noisy-relaxed likelihoods of y and z; the decoder path uses
the straight-through rounded ŷ. The gain vectors (Cui et al. 2021) give Q rate levels in one model.
Training uses the float h_s; real files use its exact integer version and the stored coding tables
(:mod:`app.models.entropy_exact`), so a file decodes to the same ŷ on every machine.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

with warnings.catch_warnings():  # compressai 1.2.8 uses torch.jit.script, deprecated in torch 2.14
    warnings.simplefilter("ignore", FutureWarning)
    from compressai.entropy_models import EntropyBottleneck, GaussianConditional
    from compressai.layers import GDN
    from compressai.models.base import CompressionModel
    from compressai.models.utils import conv, deconv
    from compressai.ops import quantize_ste
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from .entropy_exact import CHUNK, FRAC, CodingTables, IntegerHyperSynthesis, latent_sha256, to_float

STRIDE = 64  # z lives at H/64
Z_TILE = 16  # z rows and columns per tile of the integer h_s at most (64 × 64 values of y): memory bounded by the tile
Z_HALO = 3  # z cells of context each side of a tile: h_s reaches less than 3 (checked by the tests)
_CDF_BUFFERS = ("_offset", "_quantized_cdf", "_cdf_length", "scale_table")


@dataclass
class CompressorOutput(BaseOutput):
    """compressai style: ``likelihoods`` holds {"y", "z"}; ``content`` the pyramid (fine→coarse)."""

    content: list = None  # defaults as in diffusers: accelerate's fp32 cast rebuilds outputs from a dict
    x_base: torch.Tensor = None
    likelihoods: dict = None


def subpixel_conv_weight(weight: torch.Tensor, r: int = 2) -> torch.Tensor:
    """The 3×3 kernel at H/r that equals ``weight`` (3×3 at H) applied after pixel_shuffle(r):
    conv(pixel_shuffle(u), W) = pixel_shuffle(conv(u, W')), W' of shape (O·r², C·r², 3, 3)."""
    out_channels, in_channels = weight.shape[:2]
    sub = weight.new_zeros(out_channels, r, r, in_channels, r, r, 3, 3)
    for a in range(r):  # output sub-pixel row, column
        for b in range(r):
            for dy in (-1, 0, 1):  # tap offset at H
                for dx in (-1, 0, 1):
                    ey, sy = divmod(a + dy, r)  # tap offset at H/r, input sub-pixel row
                    ex, sx = divmod(b + dx, r)
                    sub[:, a, b, :, sy, sx, ey + 1, ex + 1] = weight[:, :, dy + 1, dx + 1]
    return sub.reshape(out_channels * r * r, in_channels * r * r, 3, 3)


class BaseSynthesis(nn.Sequential):
    """H/4 features → a 3-channel residual at H: per width a 3×3 conv, pixel_shuffle(2) and LeakyReLU
    (H/4 → H/2 → H for two widths), then a zero-initialised 3×3 conv to RGB.

    The last conv runs at H/2 on the un-shuffled features (:func:`subpixel_conv_weight`): the same
    function, without a 24-channel tensor at full resolution."""

    def __init__(self, in_channels: int, widths: tuple[int, ...]):
        if len(widths) != 2:
            raise ValueError(f"base_channels needs two widths (H/2 and H), got {widths}")
        layers, c = [], in_channels
        for width in widths:
            layers += [conv(c, 4 * width, 3, 1), nn.PixelShuffle(2), nn.LeakyReLU(0.2, inplace=True)]
            c = width
        out = conv(c, 3, 3, 1)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        super().__init__(*layers, out)

    def forward(self, f4: torch.Tensor) -> torch.Tensor:
        h = self[2](self[1](self[0](f4)))  # H/2
        h = self[5](self[3](h))  # 4·width channels at H/2; LeakyReLU commutes with pixel_shuffle
        out = self[6]
        weight = subpixel_conv_weight(out.weight)
        return F.pixel_shuffle(F.conv2d(h, weight, out.bias.repeat_interleave(4), padding=1), 2)


class CDCCompressor(CompressionModel, ModelMixin, ConfigMixin):
    """Analysis transform, hyperprior and content decoder.

    Args:
        latent_channels: M, channels of y (at H/16).
        hyper_channels: N, channels of z (at H/64).
        encoder_channels: widths of g_a at H/2, H/4, H/8.
        content_channels: widths of the content pyramid at H/4, H/8, H/16 (the UNet's cond_channels).
        num_quality_levels: Q, number of gain vectors.
        gain_spread: initial log2 gains span ±gain_spread across levels (spread rates from the start).
        base_channels: widths of the x_base synthesis stages at H/2 and H; () = none (the first checkpoints).
    """

    ID_NEUTRAL_CONFIG = {"base_channels": []}  # added later; at [] the model is the one earlier files came from

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 128,
        hyper_channels: int = 64,
        encoder_channels: tuple[int, int, int] = (48, 96, 128),
        content_channels: tuple[int, int, int] = (64, 96, 128),
        num_quality_levels: int = 6,
        gain_spread: float = 1.5,
        base_channels: tuple[int, ...] = (),
    ):
        super().__init__()
        m, n = latent_channels, hyper_channels
        c1, c2, c3 = encoder_channels
        self.g_a = nn.Sequential(
            conv(3, c1), GDN(c1), conv(c1, c2), GDN(c2), conv(c2, c3), GDN(c3), conv(c3, m)
        )
        self.h_a = nn.Sequential(conv(m, n, 3, 1), nn.LeakyReLU(inplace=True), conv(n, n), nn.LeakyReLU(inplace=True), conv(n, n))
        self.h_s = nn.Sequential(
            deconv(n, n), nn.LeakyReLU(inplace=True), deconv(n, n * 3 // 2), nn.LeakyReLU(inplace=True), conv(n * 3 // 2, 2 * m, 3, 1)
        )
        self.entropy_bottleneck = EntropyBottleneck(n)
        self.gaussian_conditional = GaussianConditional(None)
        for module in (self.entropy_bottleneck, self.gaussian_conditional):
            # compressai's own tables are scratch for update(); the stored ones are in self.coding.
            module._non_persistent_buffers_set.update(b for b in _CDF_BUFFERS if hasattr(module, b))
        self.coding = CodingTables()
        self._integer_h_s = None

        log2_gain = torch.linspace(-gain_spread, gain_spread, num_quality_levels)[:, None].repeat(1, m)
        self.log2_gain = nn.Parameter(log2_gain)
        self.log2_inverse_gain = nn.Parameter(-log2_gain.clone())

        k1, k2, k3 = content_channels
        self.content16 = nn.Sequential(conv(m, k3, 3, 1), GDN(k3, inverse=True))
        self.content8 = nn.Sequential(deconv(k3, k2), GDN(k2, inverse=True))
        self.content4 = nn.Sequential(deconv(k2, k1), GDN(k1, inverse=True))
        self.to_base = conv(k1, 3 * 16, 3, 1)
        self.base_refine = BaseSynthesis(k1, tuple(base_channels)) if base_channels else None

    def with_base_synthesis(self, widths) -> "CDCCompressor":
        """A copy with x_base synthesis stages of ``widths`` (zero residual at first: it decodes as before)."""
        config = {k: v for k, v in self.config.items() if not k.startswith("_")}
        grown = type(self)(**{**config, "base_channels": tuple(widths)})
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("base_refine.")}
        missing, unexpected = grown.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("base_refine.") for k in missing):
            raise ValueError(f"cannot grow this compressor: missing {missing}, unexpected {unexpected}")
        return grown.to(self.device, self.dtype)

    def with_encoder_channels(self, widths) -> "CDCCompressor":
        """A copy whose g_a has ``widths`` (≥ the present ones) at H/2, H/4, H/8 and the same y (Net2Net-style:
        a new channel gets fresh input weights and a fresh GDN row, while its weights into the old channels and into
        y start at zero). Analysis only: decoding costs the same."""
        widths = tuple(int(w) for w in widths)
        if len(widths) != 3 or any(w < c for w, c in zip(widths, self.config.encoder_channels)):
            raise ValueError(f"encoder_channels grow to three widths ≥ {tuple(self.config.encoder_channels)}, got {widths}")
        config = {k: v for k, v in self.config.items() if not k.startswith("_")}
        grown = type(self)(**{**config, "encoder_channels": widths})
        fresh = grown.g_a.state_dict()
        state = self.state_dict()
        for name, old in self.g_a.state_dict().items():
            new = fresh[name].clone()
            if name.endswith(".weight"):  # conv: [out, in, k, k]; new inputs into old outputs start at zero
                new[: old.shape[0]] = 0
            new[tuple(slice(0, s) for s in old.shape)] = old
            state[f"g_a.{name}"] = new
        grown.load_state_dict(state)
        return grown.to(self.device, self.dtype)

    # -- pieces ---------------------------------------------------------------------------
    def gain(self, quality: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Per-channel (inverse) gain at ``quality`` ∈ [0, Q−1]; between levels the gains are interpolated
        exponentially (Cui et al. 2021, continuous rate adaptation): log2 gain is linear in q."""
        table = self.log2_inverse_gain if inverse else self.log2_gain
        if not quality.is_floating_point():
            return torch.exp2(table[quality])[:, :, None, None]
        low = quality.floor().long().clamp(0, len(table) - 2)
        frac = (quality - low).to(table.dtype)[:, None]
        return torch.exp2(table[low] * (1 - frac) + table[low + 1] * frac)[:, :, None, None]

    def analysis(self, x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
        """y = g_a(x) · gain[q]; ``x`` in [-1, 1], sides multiples of 64."""
        return self.g_a(x) * self.gain(quality)

    def entropy_parameters(self, z_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ, μ) of y given ẑ in fp32, for training; real files use the integer h_s (``compress``)."""
        with torch.autocast(z_hat.device.type, enabled=False):
            scales, means = self.h_s(z_hat.float()).chunk(2, dim=1)
        return scales, means

    def content(self, y_hat: torch.Tensor, quality: torch.Tensor) -> tuple[list, torch.Tensor]:
        """Content pyramid [H/4, H/8, H/16] and base image x_base ∈ [-1, 1]-ish from ŷ."""
        y_hat = (y_hat * self.gain(quality, inverse=True)).contiguous(memory_format=torch.channels_last)
        f16 = self.content16(y_hat)
        f8 = self.content8(f16)
        f4 = self.content4(f8)
        x_base = F.pixel_shuffle(self.to_base(f4), 4)
        if self.base_refine is not None:
            x_base = x_base + self.base_refine(f4)
        return [f4, f8, f16], x_base

    # -- training -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, quality: torch.Tensor) -> CompressorOutput:
        y = self.analysis(x, quality)
        with torch.autocast(x.device.type, enabled=False):
            y = y.float()
            z = self.h_a(y)
            z_hat, z_likelihoods = self.entropy_bottleneck(z)
            scales, means = self.entropy_parameters(z_hat)
            _, y_likelihoods = self.gaussian_conditional(y, scales, means=means)
            y_hat = quantize_ste(y - means) + means
        content, x_base = self.content(y_hat, quality)
        return CompressorOutput(content=content, x_base=x_base, likelihoods={"y": y_likelihoods, "z": z_likelihoods})

    # -- coding: exact integers from ẑ on (Ballé, Johnston & Minnen 2019) ----------------------
    def update(self, scale_table=None, force: bool = False, update_quantiles: bool = False) -> bool:
        """Fit the coding tables to the float weights and store them in ``coding`` (after training only)."""
        updated = super().update(scale_table, force=force, update_quantiles=update_quantiles)
        if updated:
            self.coding.freeze(self.entropy_bottleneck, self.gaussian_conditional)
        self._integer_h_s = None
        return updated

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """torch's own: compressai's resizes CDF buffers that this model does not save (see ``coding``)."""
        return nn.Module.load_state_dict(self, state_dict, strict=strict, assign=assign)

    def _load_from_state_dict(self, *args, **kwargs):
        self._integer_h_s = None
        super()._load_from_state_dict(*args, **kwargs)

    def _y_parameters(self, z_symbols: torch.Tensor, tile: int = Z_TILE) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale indexes as ``coding.index_dtype``, μ in fixed point as int32) of y from z's integer symbols. The
        integer h_s runs over tiles of at most ``tile`` × ``tile`` z cells with ``Z_HALO`` cells of context on every
        side: the same integers as one pass (exact arithmetic, and h_s reaches less than the halo), in memory bounded
        by the tile (its float64 activations and the last conv's unfolded input are about 40 bytes per y value: 90 MB
        per tile at most)."""
        if self._integer_h_s is None:
            self._integer_h_s = IntegerHyperSynthesis(self.h_s)
        z_fx = (z_symbols << FRAC) + self.coding.z_median_fx()
        n, _, height, width = z_fx.shape
        up = STRIDE // 16
        shape = self._y_shape(z_fx.shape)
        indexes, mu = torch.empty(shape, dtype=self.coding.index_dtype), torch.empty(shape, dtype=torch.int32)
        for a in range(0, height, tile):
            b = min(a + tile, height)
            top, bottom = max(a - Z_HALO, 0), min(b + Z_HALO, height)
            rows = slice((a - top) * up, (b - top) * up)
            for c in range(0, width, tile):
                d = min(c + tile, width)
                left, right = max(c - Z_HALO, 0), min(d + Z_HALO, width)
                cols = slice((c - left) * up, (d - left) * up)
                sigma, mu_tile = self._integer_h_s(z_fx[:, :, top:bottom, left:right])
                indexes[:, :, a * up:b * up, c * up:d * up] = self.coding.scale_indexes(sigma[:, :, rows, cols])
                mu[:, :, a * up:b * up, c * up:d * up] = mu_tile[:, :, rows, cols]  # |μ| ≤ 2^24 (h_s clamps)
        return indexes, mu

    def _y_shape(self, z_shape) -> tuple[int, int, int, int]:
        """(N, C, H, W) of y for a z of ``z_shape`` (y at H/16, z at H/64)."""
        n, _, height, width = z_shape
        return n, self.config.latent_channels, height * STRIDE // 16, width * STRIDE // 16

    @staticmethod
    def _channel_indexes(shape) -> torch.Tensor:
        return torch.arange(shape[1]).view(1, -1, 1, 1).expand(*shape)

    @torch.no_grad()
    def compress(self, y: torch.Tensor, overwrite: bool = False) -> tuple[bytes, bytes, str]:
        """Entropy-code a gained latent ``y`` (CPU, fp32): (z string, y string, ``latent_sha256`` of ŷ · 2^FRAC).
        The residuals round(y − μ) are formed ``CHUNK`` values at a time: no temporary of y's size; with
        ``overwrite`` (and a contiguous ``y``) they take y's own storage, which then holds int32 symbols (at 8192²
        the encode's peak falls by that array, 128 MiB)."""
        z = self.h_a(y)  # floats only up to the symbols, which the file carries
        z_symbols = torch.round(z - to_float(self.coding.z_median_fx())).long()
        z_string = self.coding.encode("z", z_symbols, self._channel_indexes(z_symbols.shape))
        indexes, mu = self._y_parameters(z_symbols)
        y_symbols = y.view(torch.int32) if overwrite and y.is_contiguous() else torch.empty(y.shape, dtype=torch.int32)
        flat_y, flat_mu, flat_i, out = y.reshape(-1), mu.view(-1), indexes.view(-1), y_symbols.view(-1)
        for a in range(0, len(flat_y), CHUNK):
            part = slice(a, a + CHUNK)
            residual = to_float(flat_mu[part]).neg_().add_(flat_y[part]).round_()
            out[part] = self.coding.clamp("y", residual, flat_i[part])  # no escapes: the fast decoder
        digest = latent_sha256(y_symbols, mu)
        del mu, flat_mu  # before the range coder's buffer grows
        return z_string, self.coding.encode("y", y_symbols, indexes), digest

    @torch.no_grad()
    def decompress(self, z_string: bytes, y_string: bytes, shape) -> torch.Tensor:
        """ŷ · 2^FRAC (int32, exact: |symbol| < ``SYMBOL_BOUND``, |μ| ≤ 2^24) from the two strings and the spatial
        shape of z."""
        z_symbols = self.coding.decode("z", z_string, self._channel_indexes((1, self.config.hyper_channels, *shape)))
        read_y = self.coding.reader("y", y_string, math.prod(self._y_shape(z_symbols.shape)))
        indexes, y_fx = self._y_parameters(z_symbols)
        flat = y_fx.view(-1)
        for a, symbols in read_y(indexes):  # μ becomes ŷ · 2^FRAC in place, piece by piece: no array of symbols
            flat[a:a + len(symbols)].add_(symbols.bitwise_left_shift_(FRAC))
        return y_fx
