"""Tiles for large images: g_a, the content decoder and the UNet run over overlapping windows.

The entropy-coded latent stays whole. Cores partition the (padded) image; each window is its core
plus at least ``margin`` pixels of context on every interior side, and all windows of an image have
one size, so they batch. Convolutions are local, but the UNet's GroupNorm normalises over the whole
image: the tiles share its statistics (:class:`SharedGroupNorm`). When every window fits in one batch
(``joint_tiles``) they are computed jointly over all the cores: the whole image's, in one pass.
Otherwise statistics passes over all the windows sum each layer's statistics over the cores, per step:
the first with each window normalised by its own, each further one normalised by the previous pass's
sums, a fixed-point iteration towards the whole image's; the last pass decodes with them. (Statistics
from a sample are not enough: from half of a Kodak image's cores, 0.2 dB off at ρ = 0.9.) With shared
statistics the UNet is a local operator, and a tile's core matches the untiled decode as far as the
margin covers the network's reach.

The initial noise is the whole image's (:class:`WholeNoise`: the same draws as the untiled decode),
cut into windows.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

ALIGN = 16  # window edges on multiples of this: ŷ's stride and the UNet's downscale factor (checked)
_DRAW_CHUNK = 1 << 22  # randn draws discarded per call while skipping ahead


def axis_windows(length: int, tile: int, margin: int, align: int = ALIGN) -> list[tuple[int, int, int, int]]:
    """(core start, core end, window start, window end) along an axis: the cores partition [0, length),
    the windows share one size ≤ max(tile, length ≤ tile) and reach ``margin`` beyond their core or the axis' end."""
    if length <= tile:
        return [(0, length, 0, length)]
    if tile - 2 * margin < align:
        raise ValueError(f"tile {tile} leaves no core with margin {margin}")
    n = math.ceil(length / (tile - 2 * margin))
    core = -(-math.ceil(length / n) // align) * align
    size = min(length, core + 2 * margin)
    out = []
    for c0 in range(0, length, core):
        w0 = min(max(c0 - margin, 0), length - size)
        out.append((c0, min(c0 + core, length), w0, w0 + size))
    return out


def grid(height: int, width: int, tile: int, margin: int) -> list[tuple[tuple, tuple]]:
    """Row-major list of (row window, column window) pairs, each as :func:`axis_windows` gives it."""
    return [(r, c) for r in axis_windows(height, tile, margin) for c in axis_windows(width, tile, margin)]


def reach(fn, shape, scale: int, generator: torch.Generator) -> int:
    """Measured receptive radius of ``fn`` in input pixels: how far beyond a perturbed input cell's own footprint
    any output changes. ``fn`` maps a (1, C, h, w) input whose cells cover ``scale`` pixels to a list of outputs."""
    x = torch.randn(shape, generator=generator)
    base = fn(x)
    ci, cj = shape[-2] // 2, shape[-1] // 2
    x2 = x.clone()
    x2[..., ci, cj] += 1.0
    radius = 0
    for a, b in zip(base, fn(x2)):
        s = shape[-1] * scale / a.shape[-1]  # pixels per output cell
        changed = torch.nonzero((a - b).abs().amax(dim=(0, 1)) > 0, as_tuple=True)
        for idx, centre, size in zip(changed, (ci, cj), a.shape[-2:]):
            if len(idx) == 0:
                continue
            lo, hi = int(idx.min()), int(idx.max())
            if lo == 0 or hi == size - 1:
                raise ValueError("the probe is smaller than the receptive field: use a larger shape")
            # span of the changed output cells against the perturbed cell's own footprint
            radius = max(radius, math.ceil(centre * scale - lo * s), math.ceil((hi + 1) * s - (centre + 1) * scale))
    return radius


def align_up(value: int, align: int = ALIGN) -> int:
    return -(-value // align) * align


class WholeNoise:
    """ε of the whole (1, C, H, W) image as the untiled decode draws it (float32, CPU generator), given by row bands
    without holding it: one pass keeps the generator's state where each band starts in each channel, and a band
    is redrawn from there. torch draws a CPU float32 randn in order, so consecutive draws of multiples of 16
    values equal one draw of them all. Leaves the generator where the whole draw would."""

    def __init__(self, shape, generator: torch.Generator | None, starts):
        self.generator = generator if generator is not None else torch.default_generator
        _, self.channels, self.height, self.width = shape
        if self.width % 16:
            raise ValueError("WholeNoise needs a width that is a multiple of 16")
        self.states = {}
        for c in range(self.channels):
            row = 0
            for start in sorted(set(starts)) + [self.height]:
                self._skip((start - row) * self.width)
                self.states[c, start] = self.generator.get_state()
                row = start
        self.final = self.generator.get_state()

    def _skip(self, count: int) -> None:
        while count > 0:
            torch.randn(min(count, _DRAW_CHUNK), generator=self.generator)
            count -= _DRAW_CHUNK

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """ε[:, :, start:stop] (start must be one of the band starts)."""
        bands = []
        for c in range(self.channels):
            self.generator.set_state(self.states[c, start])
            bands.append(torch.randn((stop - start) * self.width, generator=self.generator).view(stop - start, self.width))
        self.generator.set_state(self.final)
        return torch.stack(bands)[None]


class _DrawnNoise:
    """The whole image's noise, drawn at once (a GPU generator or dtype whose draws cannot be replayed in pieces)."""

    def __init__(self, whole: torch.Tensor):
        self.whole = whole

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.whole[:, :, start:stop]


class SharedGroupNorm:
    """The UNet's GroupNorms with statistics shared by every tile, inside a ``with`` block.

    ``collect(step, mask)`` normalises by each GroupNorm's statistics over the masked pixels of the whole batch
    (the cores: ``mask`` is (B, 1, H, W) at the input resolution) and records them for that step; with
    ``accumulate`` it adds them to running sums instead, which :meth:`finish` turns into the statistics of all the
    batches together. ``apply(step)`` reuses the recorded ones in the same order."""

    def __init__(self, unet: nn.Module):
        self.norms = [m for m in unet.modules() if isinstance(m, nn.GroupNorm)]
        self.stats: dict[int, list] = {}
        self._sums: dict[tuple, list] = {}
        self._mask = None
        self._step = None
        self._pos = 0
        self._accumulate = False

    def __enter__(self):
        for norm in self.norms:
            norm.forward = lambda x, norm=norm: self._forward(norm, x)
        return self

    def __exit__(self, *exc):
        for norm in self.norms:
            del norm.forward

    def collect(self, step: int, mask: torch.Tensor, accumulate: bool = False) -> None:
        self._step, self._mask, self._pos, self._accumulate = step, mask, 0, accumulate
        if not accumulate:
            self.stats[step] = []

    def finish(self) -> None:
        """Statistics of everything accumulated so far (count-weighted means of the batches' sums)."""
        self.stats = {}
        for (step, pos), (n, s1, s2) in sorted(self._sums.items()):
            mean = s1 / n
            self.stats.setdefault(step, []).append((mean.float(), (s2 / n - mean.square()).clamp_min(0).float()))
        self._sums = {}

    def apply(self, step: int) -> None:
        self._step, self._mask, self._pos = step, None, 0

    def _forward(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g = norm.num_groups
        xg = x.view(b, g, c // g, h, w)
        if self._mask is not None:
            s = self._mask.shape[-2] // h
            m = self._mask[:, :, ::s, ::s][:, :, None].to(x.dtype)  # (B, 1, 1, h, w)
            count = m.sum() * (c // g)
            mean = (xg * m).sum(dim=(0, 2, 3, 4)) / count
            var = ((xg - mean.view(1, g, 1, 1, 1)).square() * m).sum(dim=(0, 2, 3, 4)) / count
            if self._accumulate:
                n, m1, v = count.double(), mean.double(), var.double()
                sums = self._sums.setdefault((self._step, self._pos), [0.0, 0.0, 0.0])
                sums[0], sums[1], sums[2] = sums[0] + n, sums[1] + n * m1, sums[2] + n * (v + m1.square())
                if self._step in self.stats:  # refining: normalise by the shared estimate
                    mean, var = self.stats[self._step][self._pos]
            else:
                self.stats[self._step].append((mean, var))
        else:
            mean, var = self.stats[self._step][self._pos]
        self._pos += 1
        y = ((xg - mean.view(1, g, 1, 1, 1)) * torch.rsqrt(var.view(1, g, 1, 1, 1) + norm.eps)).view(b, c, h, w)
        if norm.affine:
            y = y * norm.weight.view(1, c, 1, 1) + norm.bias.view(1, c, 1, 1)
        return y


def content_margin(compressor, quality: torch.Tensor) -> int:
    """Measured receptive radius (pixels, aligned) of ``compressor.content`` around a latent cell."""
    m = compressor.config.latent_channels
    gen = torch.Generator().manual_seed(0)
    device, dtype = compressor.device, compressor.dtype
    for cells in (16, 32, 64):
        try:
            radius = reach(lambda y: [v.float().cpu() for v in _flat(compressor.content(y.to(device, dtype), quality))],
                           (1, m, cells, cells), ALIGN, gen)
            return align_up(radius)
        except ValueError:
            continue
    raise ValueError("the content decoder's receptive field exceeds 64 latent cells")


def analysis_margin(compressor) -> int:
    """Measured receptive radius (pixels, aligned) of g_a: the context a tile of y needs."""
    gen = torch.Generator().manual_seed(0)
    device, dtype = compressor.device, compressor.dtype
    return align_up(reach(lambda x: [compressor.g_a(x.to(device, dtype)).float().cpu()], (1, 3, 256, 256), 1, gen))


def _flat(content):
    pyramid, x_base = content
    return [*pyramid, x_base]


def analysis_tiled(compressor, pixels: np.ndarray, pad_h: int, pad_w: int, tile: int, margin: int) -> torch.Tensor:
    """g_a of the image (H, W, 3 uint8), replicate-padded to pad_h × pad_w as the untiled encoder pads it, by windows."""
    height, width = pixels.shape[:2]
    y = None
    for (r0, r1, _, _), (c0, c1, _, _) in grid(pad_h, pad_w, tile, margin):
        a, b = max(r0 - margin, 0), min(r1 + margin, pad_h)
        c, d = max(c0 - margin, 0), min(c1 + margin, pad_w)
        rows, cols = np.minimum(np.arange(a, b), height - 1), np.minimum(np.arange(c, d), width - 1)
        window = torch.from_numpy(pixels[rows][:, cols]).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        out = compressor.g_a(window.to(compressor.device, compressor.dtype))
        s = (b - a) // out.shape[-2]
        if y is None:
            y = out.new_empty(1, out.shape[1], pad_h // s, pad_w // s)
        y[..., r0 // s: r1 // s, c0 // s: c1 // s] = out[..., (r0 - a) // s: (r1 - a) // s, (c0 - c) // s: (c1 - c) // s]
    return y


class TiledDecoder:
    """Decodes ŷ tile by tile (content decoder and UNet) into an 8-bit image; see the module docstring."""

    def __init__(self, pipe, tile: int, margin: int, batch: int, joint_tiles: int, passes: int):
        if pipe.unet.downscale_factor % ALIGN and ALIGN % pipe.unet.downscale_factor:
            raise ValueError(f"the UNet's downscale factor {pipe.unet.downscale_factor} does not divide into {ALIGN}")
        self.pipe, self.tile, self.margin, self.batch, self.joint_tiles = pipe, tile, margin, batch, joint_tiles
        self.passes = passes

    @torch.no_grad()
    def __call__(self, y_hat, quality, height, width, rho, steps, gamma, generator) -> np.ndarray:
        pipe = self.pipe
        pad_h, pad_w = y_hat.shape[-2] * ALIGN, y_hat.shape[-1] * ALIGN
        tiles = grid(pad_h, pad_w, self.tile, self.margin)
        joint = len(tiles) <= self.joint_tiles
        self.y_hat, self.quality, self.rho, self.gamma = y_hat, quality, rho, gamma
        self.content_margin = content_margin(pipe.compressor, quality)
        self.out = np.empty((height, width, 3), np.uint8)
        starts = [r[2] for r, _ in tiles]
        self.noise = self._noise((1, 3, pad_h, pad_w), generator, starts) if gamma > 0 else None
        pipe.scheduler.set_timesteps(steps, device=pipe.device)
        with SharedGroupNorm(pipe.unet) as norms:
            if joint:
                self._run(tiles, norms, "joint")
                return self.out
            for _ in range(self.passes):
                for i in range(0, len(tiles), self.batch):
                    self._run(tiles[i: i + self.batch], norms, "accumulate")
                norms.finish()
            for i in range(0, len(tiles), self.batch):
                self._run(tiles[i: i + self.batch], norms, "apply")
        return self.out

    def _noise(self, shape, generator, starts):
        """ε as the untiled decode draws it: replayed by bands where the draw is a CPU float32 one, else whole."""
        on_cpu = (generator.device if generator is not None else self.pipe.device).type == "cpu"
        if on_cpu and self.pipe.unet.dtype == torch.float32:
            return WholeNoise(shape, generator, starts)
        return _DrawnNoise(randn_tensor(shape, generator=generator, device=self.pipe.device, dtype=self.pipe.unet.dtype))

    def _content(self, r, c):
        """Content pyramid and x_base on window (r, c), from the latent window that holds its reach."""
        pipe, cm = self.pipe, self.content_margin
        h, w = self.y_hat.shape[-2:]
        la, lb = max(r[2] - cm, 0) // ALIGN, min(r[3] + cm, h * ALIGN) // ALIGN
        lc, ld = max(c[2] - cm, 0) // ALIGN, min(c[3] + cm, w * ALIGN) // ALIGN
        y = self.y_hat[..., la:lb, lc:ld].to(pipe.device, pipe.compressor.dtype)
        crops = []
        for f in _flat(pipe.compressor.content(y, self.quality)):
            s = (lb - la) * ALIGN // f.shape[-2]
            crops.append(f[..., (r[2] - la * ALIGN) // s: (r[3] - la * ALIGN) // s,
                           (c[2] - lc * ALIGN) // s: (c[3] - lc * ALIGN) // s].to(pipe.unet.dtype))
        return crops

    def _run(self, tiles, norms: SharedGroupNorm, mode: str) -> None:
        """Decode a batch of windows: with statistics over their cores (``joint``), with the shared ones
        (``apply``), or only to add their cores' statistics to the sums (``accumulate``)."""
        pipe = self.pipe
        parts = [self._content(r, c) for r, c in tiles]
        *content, x_base = [torch.cat(level) for level in zip(*parts)]
        del parts
        if self.noise is None:
            x = torch.zeros_like(x_base)
        else:
            x = torch.cat([self.noise.rows(r[2], r[3])[..., c[2]:c[3]] for r, c in tiles]).to(pipe.device, x_base.dtype)
            x = x * (self.gamma * pipe.scheduler.init_noise_sigma)
        mask = None
        if mode != "apply":
            mask = torch.zeros(len(tiles), 1, *x.shape[-2:], dtype=torch.bool, device=pipe.device)
            for i, (r, c) in enumerate(tiles):
                mask[i, :, r[0] - r[2]: r[1] - r[2], c[0] - c[2]: c[1] - c[2]] = True
        scheduler = copy.deepcopy(pipe.scheduler)
        for step, t in enumerate(scheduler.timesteps):
            norms.apply(step) if mask is None else norms.collect(step, mask, accumulate=mode == "accumulate")
            model_input = scheduler.scale_model_input(x, t)
            prediction = pipe.unet(model_input, t, self.rho, content, x_base).sample.clamp(-1, 1)
            x = scheduler.step(prediction, t, x).prev_sample
        if mode == "accumulate":
            return
        pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        height, width = self.out.shape[:2]
        for i, (r, c) in enumerate(tiles):
            r1, c1 = min(r[1], height), min(c[1], width)
            if r[0] < r1 and c[0] < c1:
                self.out[r[0]:r1, c[0]:c1] = pixels[i, r[0] - r[2]: r1 - r[2], c[0] - c[2]: c1 - c[2]]
