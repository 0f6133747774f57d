"""Large images in pieces: g_a over overlapping windows, the decoder over row bands.

The entropy-coded latent stays whole. Encoding: cores partition the (padded) image, each window is its core
plus g_a's measured receptive radius of context on every interior side, so the tiled latent is the untiled
one. Decoding: the content decoder runs on row bands of the latent that hold its measured reach, and the UNet
runs layer by layer over row bands (:mod:`app.bands`: activations in RAM up to a budget, then in files), so
that every GroupNorm normalises by the whole image's statistics and every convolution sees its true
neighbours: the decode equals the untiled one up to float rounding, in memory bounded by the band and the budget.

The initial noise is the whole image's (:class:`WholeNoise`: the same draws as the untiled decode), cut into
bands.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import PIL.Image
import torch
from diffusers.utils.torch_utils import randn_tensor

from . import bands

ALIGN = 16  # window edges on multiples of this: ŷ's stride and the UNet's downscale factor (checked)
# UNet bands per band of the content decoder, whose 48 px reach above and below a 256-row band makes it decode
# 1.38× the rows (1.19× at 512: a 4032 × 3024 content decode 7.0 → 6.1 s on a 2-core CPU)
CONTENT_BANDS = 2
# bytes of g_a's first activation (H/2, float32) per encoder window at most: the 48-channel g_a at 1024 px; a wider
# g_a gets smaller windows (96 channels: 720 px), so the encoder's peak does not grow with its width
ANALYSIS_BYTES = 48 << 20
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


def analysis_window(compressor, tile: int) -> int:
    """Side (pixels, a multiple of ``ALIGN``, at most ``tile``) of the encoder's windows: g_a's first activation
    within :data:`ANALYSIS_BYTES`."""
    side = 2 * math.isqrt(ANALYSIS_BYTES // (4 * compressor.config.encoder_channels[0]))
    return min(tile, side // ALIGN * ALIGN)


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
    """Decodes ŷ band by band into an 8-bit image: the content decoder on the latent rows that hold its reach, the
    UNet layer by layer (:class:`app.bands.BandedUNet`), the scheduler step per band; see the module docstring."""

    def __init__(self, pipe, pad_h: int, pad_w: int, band: int, ram_bytes: int):
        if pipe.unet.downscale_factor % ALIGN and ALIGN % pipe.unet.downscale_factor:
            raise ValueError(f"the UNet's downscale factor {pipe.unet.downscale_factor} does not divide into {ALIGN}")
        self.pipe = pipe
        cfg = pipe.unet.config
        finest = cfg.block_out_channels[0] * (pad_h // cfg.unshuffle) * (pad_w // cfg.unshuffle) * pipe.unet.dtype.itemsize
        # RAM buffers pay where they hold the finest level's planes, which carry most of the bytes; where those do not
        # fit, smaller planes in RAM only raise the peak (8192²: 1.38 → 1.68 GiB for 98 → 97 s on a 2-core CPU)
        ram = ram_bytes if finest <= ram_bytes else 0
        self.runner = bands.BandRunner(pad_h, pad_w, band, pipe.device, pipe.unet.dtype, ram)

    @torch.no_grad()
    def content(self, y_hat, quality) -> list[bands.Plane]:
        """Planes of the content pyramid and x_base, by bands of ``CONTENT_BANDS`` UNet bands (the decoder's reach
        is recomputed once per band). Each band is decoded in windows of at most ``pipe.tile_size``
        columns, each window from the latent cells that hold the decoder's reach around it, so that the decoder's
        full-resolution activations are bounded by the window, not the image's width."""
        pipe, runner = self.pipe, self.runner
        margin = content_margin(pipe.compressor, quality)
        columns = axis_windows(runner.width, pipe.tile_size, margin)
        planes = None
        for r0, r1 in runner.bands(CONTENT_BANDS * runner.band):
            la, lb = max(r0 - margin, 0) // ALIGN, min(r1 + margin, runner.height) // ALIGN
            pieces = []
            for c0, c1, w0, w1 in columns:
                latent = y_hat[..., la:lb, w0 // ALIGN: w1 // ALIGN].to(pipe.device, pipe.compressor.dtype)
                feats = _flat(pipe.compressor.content(latent, quality))
                scales = [(lb - la) * ALIGN // f.shape[-2] for f in feats]
                rows = [slice((r0 - la * ALIGN) // s, (r1 - la * ALIGN) // s) for s in scales]
                pieces.append([f[..., r, (c0 - w0) // s: (c1 - w0) // s] for f, r, s in zip(feats, rows, scales)])
            if planes is None:
                planes = [runner.plane(f.shape[1], s, lasting=True) for f, s in zip(pieces[0], scales)]
            for plane, s, parts in zip(planes, scales, zip(*pieces)):
                plane.write(r0 // s, torch.cat(parts, dim=-1))
        return planes

    @torch.no_grad()
    def denoise(self, planes, height, width, rho, steps, gamma, generator) -> PIL.Image.Image:
        """The RGB image (height × width) from the content planes: K steps of the banded UNet from x_K = γ·ε."""
        pipe, runner = self.pipe, self.runner
        pad_h, pad_w = runner.height, runner.width
        *pyramid, x_base = planes
        cores = runner.bands()
        x = runner.plane(3, 1)
        noise = self._noise((1, 3, pad_h, pad_w), generator, [r0 for r0, _ in cores]) if gamma > 0 else None
        for r0, r1 in cores:
            if noise is None:
                x.write(r0, torch.zeros(1, 3, r1 - r0, pad_w, dtype=pipe.unet.dtype))
            else:
                x.write(r0, noise.rows(r0, r1) * (gamma * pipe.scheduler.init_noise_sigma))
        pipe.scheduler.set_timesteps(steps, device=pipe.device)
        schedulers = {r0: copy.deepcopy(pipe.scheduler) for r0, _ in cores}  # a multistep sampler keeps state per band
        unet = bands.BandedUNet(pipe.unet, runner)
        for t in pipe.scheduler.timesteps:
            model_input = runner.run(lambda v: pipe.scheduler.scale_model_input(v, t), [x], 3, 1, 0)
            prediction = unet(model_input, t, rho, pyramid, x_base)
            x = self._step(runner, schedulers, prediction, t, x)
        out = PIL.Image.new("RGB", (width, height))  # filled band by band: no second copy of the image
        for r0, r1 in cores:
            if r0 < height:
                band = x.read(r0, min(r1, height))[..., :width]
                pixels = ((band.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0)
                out.paste(PIL.Image.fromarray(pixels.numpy(), "RGB"), (0, r0))
        return out

    @staticmethod
    def _step(runner, schedulers, prediction, t, x):
        """x_{k-1} per band, each band with its own scheduler (a clipped x̂0 step is per pixel)."""
        out = runner.plane(3, 1)
        for r0, r1 in runner.bands():
            step = schedulers[r0].step(prediction.read(r0, r1).to(runner.device).clamp(-1, 1), t,
                                       x.read(r0, r1).to(runner.device))
            out.write(r0, step.prev_sample)
        return out

    def _noise(self, shape, generator, starts):
        """ε as the untiled decode draws it: replayed by bands where the draw is a CPU float32 one, else whole."""
        on_cpu = (generator.device if generator is not None else self.pipe.device).type == "cpu"
        if on_cpu and self.pipe.unet.dtype == torch.float32:
            return WholeNoise(shape, generator, starts)
        return _DrawnNoise(randn_tensor(shape, generator=generator, device=self.pipe.device, dtype=self.pipe.unet.dtype))
