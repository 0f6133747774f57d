"""Exact entropy parameters: everything that feeds the range coder is an integer.

Float convolutions differ in their last bits between kernels (CPU ISA, thread count, oneDNN on or
off, GPU), and one scale index that comes out differently desyncs the range decoder for the rest of
the file. Following Ballé, Johnston & Minnen, "Integer networks for data compression with
latent-variable models" (ICLR 2019), the decoder-side path is computed in fixed point:

* ẑ, the activations of h_s, σ and μ carry ``FRAC`` = 12 fractional bits (int64 tensors).
* :class:`IntegerHyperSynthesis` is a post-training quantisation of the float h_s: each output
  channel's weights are rounded to integers below 2^14 after scaling by a power of two 2^s, biases
  to the accumulator's grid; LeakyReLU's slope 0.01 becomes 655 / 2^16; rounding is to nearest,
  ties to even (IEEE). Convolutions run in float64 on integer values (weights carry the exact
  factor 2^-s, so the sums come out already rescaled): every partial sum is a multiple of 2^-s
  below 2^(53-s) in magnitude (checked when the layers are built), hence exact in any order.
* σ → scale index by integer comparison with the scale table's bounds on the same grid;
  ŷ = symbol + μ is exact in fixed point (the float ŷ is ŷ_fx · 2^-12).
* :class:`CodingTables` holds the range coder's integer CDFs and z's medians, stored with the
  checkpoint; only ``CDCCompressor.update()`` (after training) computes them, with float math.

Strings from a file are untrusted, and compressai's rANS decoder (C++) checks no bounds; see
:meth:`CodingTables.decode` for how it is kept inside its buffer.
"""

from __future__ import annotations

import functools
import hashlib
import math
from bisect import bisect_right
from itertools import accumulate

import numpy as np

import torch
import torch.nn.functional as F
from compressai import ans
from torch import nn

FRAC = 12  # fractional bits of ẑ, activations, σ, μ and ŷ
WEIGHT_BITS = 14  # |integer weight| < 2^14
SLOPE = 655 / 2**16  # LeakyReLU(0.01) on the negative side (exact in float64)
CLAMP = float(1 << 24)  # inputs and activations are clamped to ±2^24 (a bound for the exactness proof)
_EXACT = 1 << 53  # integers below this are exact in float64
RANS_L = 1 << 31  # compressai's rans64: the decoder's state is renormalised to at least this
_PRECISION = 16  # compressai's CDFs sum to 2^16
CHUNK = 1 << 20  # symbols per call into the rANS coder: Python lists of a whole large latent cost GBs
SYMBOL_BOUND = 1 << 18  # decoded |symbol| below this, so that ŷ · 2^12 = symbol · 2^12 + μ (|μ| ≤ 2^24) fits in int32


class _IntegerConv:
    """One conv (or transposed conv) of h_s in fixed point, optionally followed by LeakyReLU(0.01)."""

    def __init__(self, conv: nn.Conv2d | nn.ConvTranspose2d, leaky: bool):
        transposed = isinstance(conv, nn.ConvTranspose2d)
        w = conv.weight.detach().cpu().double()
        out_dim = 1 if transposed else 0
        per_out = w.transpose(0, out_dim).reshape(w.shape[out_dim], -1)
        # Power-of-two scale per output channel from the largest weight: exact float operations only.
        shifts = [WEIGHT_BITS - math.frexp(p)[1] for p in per_out.abs().amax(1).tolist()]
        if min(shifts) < 1:
            raise ValueError("h_s weight too large for the integer hyper-synthesis")
        scale = torch.tensor([math.ldexp(1.0, s) for s in shifts], dtype=torch.float64)
        view = (1, -1, 1, 1) if transposed else (-1, 1, 1, 1)
        weight = torch.round(w * scale.view(view))
        bias = conv.bias.detach().cpu().double() if conv.bias is not None else torch.zeros(len(shifts), dtype=torch.float64)
        bias = torch.round(bias * scale * 2.0**FRAC)
        bound = weight.transpose(0, out_dim).abs().reshape(len(shifts), -1).sum(1) * CLAMP + bias.abs()
        if bound.max() >= _EXACT:
            raise ValueError("h_s layer does not fit exact float64 integer arithmetic")
        self.weight, self.bias = weight / scale.view(view), bias / scale  # exact: powers of two
        op = F.conv_transpose2d if transposed else F.conv2d
        kwargs = {"output_padding": conv.output_padding} if transposed else {}
        self.op = functools.partial(op, stride=conv.stride, padding=conv.padding, **kwargs)
        self.leaky = leaky

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Integer-valued float64 in and out."""
        out = self.op(x, self.weight, self.bias).round_().clamp_(-CLAMP, CLAMP)
        return torch.maximum(out, (out * SLOPE).round_()) if self.leaky else out


class IntegerHyperSynthesis:
    """h_s of the mean-scale hyperprior in fixed point: ẑ_fx ↦ (σ_fx, μ_fx), exact on any machine.

    Built from the float ``h_s`` (an ``nn.Sequential`` of convs and LeakyReLU(0.01)) by exact
    operations only, so every machine derives the same integers from the same checkpoint.
    """

    def __init__(self, h_s: nn.Sequential):
        modules = list(h_s)
        self.layers = []
        for i, m in enumerate(modules):
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                leaky = i + 1 < len(modules) and isinstance(modules[i + 1], nn.LeakyReLU)
                self.layers.append(_IntegerConv(m, leaky))
            elif not (isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.01):
                raise TypeError(f"no integer version of {type(m).__name__}")

    def __call__(self, z_fx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 in, (σ, μ) as int64 out, all with ``FRAC`` fractional bits."""
        x = z_fx.double().clamp_(-CLAMP, CLAMP)
        for layer in self.layers:
            x = layer(x)
        sigma, mu = x.long().chunk(2, dim=1)
        return sigma, mu


def to_float(x_fx: torch.Tensor) -> torch.Tensor:
    """A fixed-point tensor as float32 (exact below 2^24 · 2^-FRAC, correctly rounded above)."""
    return x_fx.float().mul_(2.0**-FRAC)


def latent_sha256(y_fx: torch.Tensor, mu_fx: torch.Tensor | None = None) -> str:
    """SHA-256 (hex) of ŷ · 2^12 as little-endian int64 in C order (N, C, H, W): the exact latent, given whole
    (``y_fx``) or as symbols and μ (ŷ · 2^12 = symbol · 2^12 + μ), hashed ``CHUNK`` values at a time (no int64
    copy of a large latent)."""
    h = hashlib.sha256()
    flat = y_fx.reshape(-1)
    mu = None if mu_fx is None else mu_fx.reshape(-1)
    for a in range(0, len(flat), CHUNK):
        chunk = flat[a:a + CHUNK].to(torch.int64)
        if mu is not None:
            chunk = chunk.bitwise_left_shift(FRAC).add_(mu[a:a + CHUNK])
        h.update(memoryview(chunk.cpu().numpy().astype("<i8", copy=False)).cast("B"))
    return h.hexdigest()


class CodingTables(nn.Module):
    """The range coder's integer tables (int32 buffers, saved with the checkpoint).

    ``z_*``: one CDF per channel of z (``EntropyBottleneck``) and the channel medians in fixed point;
    ``y_*``: one CDF per entry of the scale table (``GaussianConditional``) and the bounds between
    entries in fixed point. CDFs are stored back to back (``*_cdf``) with their lengths; ``*_offset``
    is each CDF's first symbol. Sizes come from the checkpoint.
    """

    NAMES = ("z_cdf", "z_cdf_length", "z_offset", "z_median", "y_cdf", "y_cdf_length", "y_offset", "scale_bounds")

    def __init__(self):
        super().__init__()
        for name in self.NAMES:
            self.register_buffer(name, torch.zeros(0, dtype=torch.int32))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self.NAMES:
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def fitted(self) -> bool:
        return self.y_cdf.numel() > 0

    @torch.no_grad()
    def freeze(self, entropy_bottleneck, gaussian_conditional) -> None:
        """Take the tables compressai's ``update()`` just computed (the one place float math makes them)."""
        for prefix, module in (("z", entropy_bottleneck), ("y", gaussian_conditional)):
            lengths = module._cdf_length.int().cpu()
            cdf = module._quantized_cdf.int().cpu()
            setattr(self, f"{prefix}_cdf", torch.cat([row[:n] for row, n in zip(cdf, lengths.tolist())]))
            setattr(self, f"{prefix}_cdf_length", lengths)
            setattr(self, f"{prefix}_offset", module._offset.int().cpu())
        self.z_median = torch.round(entropy_bottleneck.quantiles[:, 0, 1].detach().double().cpu() * 2**FRAC).int()
        self.scale_bounds = torch.floor(gaussian_conditional.scale_table[:-1].double().cpu() * 2**FRAC).int()

    def _coder_args(self, prefix: str) -> tuple[list, list, list]:
        lengths = getattr(self, f"{prefix}_cdf_length").tolist()
        flat = getattr(self, f"{prefix}_cdf").tolist()
        starts = [0, *accumulate(lengths)]
        return [flat[a:b] for a, b in zip(starts, starts[1:])], lengths, getattr(self, f"{prefix}_offset").tolist()

    def clamp(self, prefix: str, symbols: torch.Tensor, indexes: torch.Tensor) -> torch.Tensor:
        """Integer-valued ``symbols`` limited to the regular symbols of their CDFs, as int32, so that the string holds
        no escape (which only the slow bounds-checked decoder reads, see :meth:`decode`): a residual beyond the
        table's tail, rare (about one latent value in 10^5, 1–4 bins beyond), is coded as the table's last symbol."""
        low = getattr(self, f"{prefix}_offset")
        high = low + getattr(self, f"{prefix}_cdf_length") - 3
        i = indexes.long()
        return torch.minimum(torch.maximum(symbols, low[i]), high[i]).int()

    def encode(self, prefix: str, symbols: torch.Tensor, indexes: torch.Tensor) -> bytes:
        """Range-code integer ``symbols`` with CDF ``indexes`` (compressai's rANS coder, fed ``CHUNK`` symbols at a
        time: the same string as one call)."""
        args = self._coder_args(prefix)
        symbols, indexes = symbols.reshape(-1), indexes.reshape(-1)
        encoder = ans.BufferedRansEncoder()
        for a in range(0, len(symbols), CHUNK):
            encoder.encode_with_indexes(symbols[a:a + CHUNK].tolist(), indexes[a:a + CHUNK].tolist(), *args)
        return encoder.flush()

    def decode(self, prefix: str, string: bytes, indexes: torch.Tensor) -> torch.Tensor:
        """The symbols (int32) of ``string`` for CDF ``indexes`` (same shape); ``ValueError`` for a string that
        cannot be one this coder wrote. See :meth:`reader`."""
        symbols = torch.empty(indexes.numel(), dtype=torch.int32)
        for a, part in self.reader(prefix, string, indexes.numel())(indexes):
            symbols[a:a + len(part)] = part
        return symbols.view(indexes.shape)

    def reader(self, prefix: str, string: bytes, count: int):
        """``read(indexes)``: :meth:`decode` of ``string``'s ``count`` symbols as (start, int32 symbols) pieces in
        order, so that a caller can use each piece without holding them all; the stream is set up now (its padded
        copies, 12 bytes per symbol at their peak, come and go before the caller builds the indexes).

        compressai's decoder reads one 32-bit word at most per symbol, except in the escape that codes a value
        outside the table, whose reads only the data bound. It runs here with the escape unreachable (each CDF
        gains a last symbol of zero width) on the string padded with zero words to 2 + N words (N symbols): it
        stays inside that buffer whatever the bytes, and agrees with the real decoding up to the first escape.
        Only a string that meets one (a value outside the table; this encoder writes none, see :meth:`clamp`) is
        decoded again, by :func:`decode_checked`, whose symbols from that piece on are the last piece.
        The decoder continues one stream over calls of ``CHUNK`` symbols (the same symbols as one call). An
        escape's value of ``SYMBOL_BOUND`` or more in magnitude, which no table comes near, is a ``ValueError``.
        """
        if len(string) % 4 or len(string) < 8:
            raise ValueError(f"a rANS string is whole 32-bit words, at least two ({len(string)} bytes)")
        cdfs, lengths, offsets = self._coder_args(prefix)
        unreachable = [c + [1 << _PRECISION] for c in cdfs], [n + 1 for n in lengths], offsets
        decoder = ans.RansDecoder()
        decoder.set_stream(bytes(string).ljust(4 * (2 + count), b"\0"))
        escape = (getattr(self, f"{prefix}_offset") + getattr(self, f"{prefix}_cdf_length") - 2).int()

        def read(indexes: torch.Tensor):
            flat = indexes.reshape(-1)
            if len(flat) != count:
                raise ValueError(f"{len(flat)} indexes for a stream of {count} symbols")
            for a in range(0, count, CHUNK):
                chunk = flat[a:a + CHUNK]
                part = torch.tensor(decoder.decode_stream(chunk.tolist(), *unreachable), dtype=torch.int32)
                if bool((part == escape[chunk.long()]).any()):
                    rest = decode_checked(string, flat, cdfs, lengths, offsets)[a:]
                    if bool((rest.abs() >= SYMBOL_BOUND).any()):
                        raise ValueError(f"a latent value beyond ±{SYMBOL_BOUND}")
                    yield a, rest.int()
                    return
                yield a, part

        return read

    @property
    def index_dtype(self) -> torch.dtype:
        """The smallest integer type of a scale index: uint8 for up to 256 scales (compressai's table has 64)."""
        return torch.uint8 if len(self.y_cdf_length) <= 256 else torch.int16

    def scale_indexes(self, sigma_fx: torch.Tensor) -> torch.Tensor:
        """Index of σ in the scale table (as :attr:`index_dtype`), by integer comparison: #{bounds < σ}
        (compressai's rule)."""
        return torch.bucketize(sigma_fx.contiguous(), self.scale_bounds.long(), out_int32=True).to(self.index_dtype)

    def z_median_fx(self) -> torch.Tensor:
        return self.z_median.long().view(1, -1, 1, 1)


def decode_checked(string: bytes, indexes, cdfs: list, lengths: list, offsets: list) -> torch.Tensor:
    """compressai's rANS decoding (``RansDecoder.decode_with_indexes``) in Python, every read bounds-checked:
    the same symbols (int64, one per CDF index of the flat ``indexes``) for any string compressai writes;
    ``ValueError`` for one that ends before its last symbol or escapes with more than the 8 nibbles of a 32-bit
    value. The indexes are read ``CHUNK`` at a time (a Python list of a whole large latent costs GBs)."""
    words = np.frombuffer(string, dtype="<u4").tolist()
    if len(words) < 2:
        raise ValueError("a rANS string needs at least two words")
    x, p = words[0] | words[1] << 32, 2
    tables = [(cdf, n - 2, offset) for cdf, n, offset in zip(cdfs, lengths, offsets)]
    out = torch.empty(len(indexes), dtype=torch.int64)
    try:
        for a in range(0, len(indexes), CHUNK):
            chunk = indexes[a:a + CHUNK]
            values = []
            for c in (chunk.tolist() if isinstance(chunk, torch.Tensor) else chunk):
                cdf, escape, offset = tables[c]
                cum = x & 0xFFFF
                s = bisect_right(cdf, cum) - 1
                start = cdf[s]
                x = (cdf[s + 1] - start) * (x >> _PRECISION) + cum - start
                if x < RANS_L:
                    x = x << 32 | words[p]
                    p += 1
                if s == escape:  # a 4-bit count, then the value's nibbles, its sign in the lowest bit
                    count, x, p = _nibble(x, p, words)
                    if count > 8:
                        raise ValueError("corrupt rANS string (escape longer than 32 bits)")
                    raw = 0
                    for j in range(count):
                        nibble, x, p = _nibble(x, p, words)
                        raw |= nibble << 4 * j
                    s = -(raw >> 1) - 1 if raw & 1 else (raw >> 1) + s
                values.append(s + offset)
            out[a:a + len(values)] = torch.tensor(values, dtype=torch.int64)
    except IndexError:
        raise ValueError("corrupt rANS string (it ends before its last symbol)") from None
    return out


def _nibble(x: int, p: int, words: list) -> tuple[int, int, int]:
    """compressai's ``Rans64DecGetBits`` for 4 bits: (bits, state, read position)."""
    x, bits = x >> 4, x & 15
    if x < RANS_L:
        x, p = x << 32 | words[p], p + 1
    return bits, x, p
