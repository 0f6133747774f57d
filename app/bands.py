"""The UNet over row bands, exactly: layer by layer over the whole image, activations in RAM up to a budget, then in files.

Each layer (a stretch of the network between two GroupNorms) runs band by band over the whole image and
writes its output to a :class:`Plane`, which also sums each channel as it is written. The next
GroupNorm therefore normalises by the whole image's statistics (computed from those sums), and every
convolution sees its true neighbours: a band is read with the rows its layer reaches beyond it, and the
image's own top and bottom edges keep the convolutions' zero padding. The result equals the UNet's forward
on the whole image up to float rounding, while memory holds one band of one layer and the planes that fit the
RAM budget (the rest lives in files, whose page cache the kernel may drop): it depends on the band's size and
the budget, not the image's.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D

ALIGN = 16  # band edges on multiples of the coarsest plane's scale (pixels per row at H/16)
MMAP_THRESHOLD = 4 << 20  # bytes: allocations from this size up get pages of their own (see return_freed_memory)
REUSE_THRESHOLD = 64 << 20  # the same inside a band loop (see reused_memory)
TRIM_THRESHOLD = 128 << 10  # glibc's default: free memory at the heap's top beyond this goes back to the OS


def _libc(name: str):
    """A function of the C library, or None where there is none by that name (not glibc)."""
    import ctypes
    import ctypes.util

    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), name)
    except (OSError, AttributeError, TypeError):
        return None


def return_freed_memory() -> bool:
    """Let freed tensors' memory go back to the OS (glibc only; False elsewhere).

    glibc serves allocations above a threshold with their own pages, but raises that threshold after the first
    such free, up to 32 MiB, so freed whole-image arrays stay in the process (on a 4096² decode about 350 MiB of
    peak RSS). A fixed threshold (``mallopt(M_MMAP_THRESHOLD)``) keeps every large array's pages its own,
    returned when it is freed; the pipeline sets it when it takes the tiled path."""
    mallopt = _libc("mallopt")
    return mallopt is not None and mallopt(-3, MMAP_THRESHOLD) == 1  # -3: M_MMAP_THRESHOLD


@contextlib.contextmanager
def reused_memory():
    """Inside: tensors up to 64 MiB come from the heap, so that a band loop reuses the memory it frees; after: the
    fixed threshold again, and the heap's free pages back to the OS (``malloc_trim``). Without it every band
    tensor costs fresh pages, faulted in and zeroed by the kernel: a 4032 × 3024 decode faulted 27 GiB in and took
    32.8 s on this CPU, about 22 s in reused memory, at the same peak RSS (8192²: 257 → 189 s, 1.67 → 1.66 GiB).
    The decoder uses it; g_a's windows do not (at 8192² 64 → 44 s, but 1.75 → 1.94 GiB). No-op off glibc."""
    mallopt, malloc_trim = _libc("mallopt"), _libc("malloc_trim")
    if mallopt is None or malloc_trim is None:
        yield
        return
    mallopt(-3, REUSE_THRESHOLD)
    mallopt(-1, 2 * REUSE_THRESHOLD)  # -1: M_TRIM_THRESHOLD
    try:
        yield
    finally:
        mallopt(-3, MMAP_THRESHOLD)
        mallopt(-1, TRIM_THRESHOLD)
        malloc_trim(0)


class PlaneStore:
    """Where planes keep their values. Planes that live through a whole UNet pass (``lasting``: the content planes
    and the skips) in anonymous files; the others in RAM buffers, up to ``ram_bytes`` of them, beyond that in files
    too. Dropped planes hand their buffer or file back for reuse: a reused buffer costs no page faults, and
    rewriting a file's pages is about ten times faster here than growing a new file (4.9 against 0.5 GB/s into the
    page cache). On a 2-core CPU a 4032 × 3024 UNet pass took 14.9 s all in files, 12.1 s with 256 MiB of buffers."""

    def __init__(self, ram_bytes: int):
        self.ram_left = ram_bytes
        self._buffers, self._files = [], []

    def take(self, shape: tuple, dtype: torch.dtype, lasting: bool = False):
        """(handle, storage): a (C, H, W) tensor if the plane is not ``lasting`` and a free RAM buffer holds it or the
        RAM left does, else a file of that size."""
        size = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        if not lasting:
            fits = [i for i, b in enumerate(self._buffers) if b.numel() >= size]
            if fits or size <= self.ram_left:
                if fits:
                    buf = self._buffers.pop(min(fits, key=lambda i: self._buffers[i].numel()))
                else:
                    buf = torch.empty(size, dtype=torch.uint8)
                    self.ram_left -= size
                return buf, buf[:size].view(dtype).view(shape)
        f = self._files.pop() if self._files else tempfile.TemporaryFile()
        if os.fstat(f.fileno()).st_size < size:
            f.truncate(size)
        return f, f

    def give(self, handle) -> None:
        (self._buffers if isinstance(handle, torch.Tensor) else self._files).append(handle)


class Plane:
    """A (1, C, H, W) activation at ``scale`` pixels per row and column, kept by a :class:`PlaneStore` (as C × H × W),
    with the per-channel sum and sum of squares (float64 over the bands) of everything written."""

    def __init__(self, channels: int, height: int, width: int, scale: int, dtype: torch.dtype, store: PlaneStore,
                 lasting: bool = False):
        self.channels, self.height, self.width, self.scale, self.dtype = channels, height, width, scale, dtype
        self._np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        self._row_bytes = width * self._np_dtype.itemsize
        handle, self._storage = store.take((channels, height, width), dtype, lasting)
        weakref.finalize(self, store.give, handle)
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.sumsq = torch.zeros(channels, dtype=torch.float64)

    def write(self, row: int, band: torch.Tensor) -> None:
        """Rows ``row …`` of the plane from ``band`` (1, C, rows, W); each row is written once."""
        rows = band.shape[-2]
        if row < 0 or row + rows > self.height or band.shape[1] != self.channels or band.shape[-1] != self.width:
            raise ValueError(f"band {tuple(band.shape)} at row {row} does not fit the plane {self.channels}×{self.height}×{self.width}")
        b = band.detach().to("cpu", self.dtype)
        self.sum += b.sum(dim=(0, 2, 3)).double()
        self.sumsq += torch.einsum("bchw,bchw->c", b, b).double()
        if isinstance(self._storage, torch.Tensor):
            self._storage[:, row: row + rows] = b[0]
            return
        fd = self._storage.fileno()
        for c, channel in enumerate(b[0].numpy()):
            data = np.ascontiguousarray(channel)
            if os.pwrite(fd, memoryview(data).cast("B"), (c * self.height + row) * self._row_bytes) != data.nbytes:
                raise OSError("short write to a band file")

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as a (1, C, rows, W) tensor (a view where the plane is in RAM: not to be written to)."""
        if isinstance(self._storage, torch.Tensor):
            return self._storage[None, :, start:stop]
        out = np.empty((self.channels, stop - start, self.width), self._np_dtype)
        fd = self._storage.fileno()
        for c in range(self.channels):
            if os.preadv(fd, [memoryview(out[c]).cast("B")], (c * self.height + start) * self._row_bytes) != out[c].nbytes:
                raise OSError("short read from a band file")
        return torch.from_numpy(out)[None]


def group_stats(planes: list[Plane], groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance per group of the planes' channels concatenated, over the whole image (float32)."""
    s1 = torch.cat([p.sum for p in planes]).view(groups, -1).sum(1)
    s2 = torch.cat([p.sumsq for p in planes]).view(groups, -1).sum(1)
    n = planes[0].height * planes[0].width * (sum(p.channels for p in planes) // groups)
    mean = s1 / n
    return mean.float(), (s2 / n - mean.square()).clamp_min(0).float()


def group_norm(x: torch.Tensor, norm: torch.nn.GroupNorm, stats) -> torch.Tensor:
    """``norm`` applied to ``x`` with the given (whole-image) statistics instead of ``x``'s own, in float32 (as
    autocast runs GroupNorm: a bf16 ``x`` is normalised in float32)."""
    x, c = x.float(), x.shape[1]
    mean, var = (s.to(x.device, torch.float32).repeat_interleave(c // norm.num_groups) for s in stats)
    scale = torch.rsqrt(var + norm.eps)
    shift = -mean * scale
    if norm.affine:
        scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
    return torch.addcmul(shift.view(1, c, 1, 1), x, scale.view(1, c, 1, 1))


class BandRunner:
    """Runs local functions of planes band by band over an image of ``height`` × ``width`` pixels (multiples of 16),
    its planes in RAM up to ``ram_bytes``, the rest in files."""

    def __init__(self, height: int, width: int, band: int, device: torch.device, dtype: torch.dtype, ram_bytes: int = 0):
        if height % ALIGN or width % ALIGN or band % ALIGN or band <= 0:
            raise ValueError(f"image {height}×{width} and band {band} must be positive multiples of {ALIGN}")
        self.height, self.width, self.band, self.device, self.dtype = height, width, band, device, dtype
        self.store = PlaneStore(ram_bytes)

    def bands(self, rows: int | None = None):
        """Core bands (first row, end row) in pixels, of ``rows`` rows (default: the runner's band)."""
        rows = rows or self.band
        return [(r, min(r + rows, self.height)) for r in range(0, self.height, rows)]

    def plane(self, channels: int, scale: int, lasting: bool = False) -> Plane:
        return Plane(channels, self.height // scale, self.width // scale, scale, self.dtype, self.store, lasting)

    def run(self, fn, inputs: list[Plane], channels: int, scale: int, reach: int, lasting: bool = False) -> Plane:
        """The plane of ``fn(*bands of inputs)``, an output at ``scale`` with ``channels`` channels whose rows depend
        on input rows at most ``reach`` pixels away: each band is read that much wider (clipped at the image's
        edges, aligned to every plane's rows) and the output cropped to the core."""
        out = self.plane(channels, scale, lasting)
        step = max([scale] + [p.scale for p in inputs])
        for r0, r1 in self.bands():
            a = max(0, (r0 - reach) // step * step)
            b = min(self.height, -(-(r1 + reach) // step) * step)
            y = fn(*(p.read(a // p.scale, b // p.scale).to(self.device) for p in inputs))
            out.write(r0 // scale, y[..., (r0 - a) // scale: (r1 - a) // scale, :])
        return out


class BandedUNet:
    """``CDCUNet.forward`` computed layer by layer over row bands (see the module docstring); planes in, plane out."""

    def __init__(self, unet, runner: BandRunner):
        for block in _resnets(unet):
            if (block.time_embedding_norm != "default" or block.upsample is not None or block.downsample is not None
                    or block.time_emb_proj is None or not isinstance(block.nonlinearity, torch.nn.SiLU)):
                raise ValueError("BandedUNet supports diffusers ResnetBlock2D in its default form only")
        if not (unet.config.cond_image and unet.config.prediction_type == "sample"):
            raise ValueError("BandedUNet supports the X-parameterised UNet with x_base (cond_image=True)")
        self.unet, self.runner = unet, runner

    @torch.no_grad()
    def __call__(self, sample: Plane, timestep, rho: float, content: list[Plane], x_base: Plane) -> Plane:
        unet, run, cfg = self.unet, self.runner.run, self.unet.config
        u = cfg.unshuffle
        dev = self.runner.device
        t = torch.as_tensor(timestep, device=dev).reshape(1)
        r = torch.as_tensor(rho, device=dev, dtype=torch.float32).reshape(1)
        dtype = unet.conv_in.weight.dtype
        temb = unet.time_embedding(unet.time_proj(t).to(dtype)) + unet.rho_embedding(unet.rho_proj(r * 1000).to(dtype))

        def conv_in(x, base, c0):
            h = torch.cat([F.pixel_unshuffle(x, u), F.pixel_unshuffle(base, u)], dim=1)
            return unet.conv_in(h) + unet.cond_in[0](c0)

        h = run(conv_in, [sample, x_base, content[0]], unet.conv_in.out_channels, u, u)
        skips = []
        for i, blocks in enumerate(unet.down):
            for block in blocks:
                h = self._resnet(block, [h], temb, lasting=True)
                skips.append(h)
            if i < len(unet.downsamplers):
                down, cond = unet.downsamplers[i], unet.cond_in[i + 1]
                h = run(lambda x, c, down=down, cond=cond: down(x) + cond(c), [h, content[i + 1]],
                        down.out_channels, 2 * h.scale, 2 * h.scale)
        h = self._resnet(unet.mid, [h], temb)
        for i, blocks in enumerate(unet.up):
            for block in blocks:
                h = self._resnet(block, [h, skips.pop()], temb)
            if i < len(unet.upsamplers):
                up = unet.upsamplers[i]
                h = run(up, [h], up.out_channels, h.scale // 2, h.scale // 2)
        stats = group_stats([h], unet.norm_out.num_groups)

        def conv_out(x, base):
            return F.pixel_shuffle(unet.conv_out(F.silu(group_norm(x, unet.norm_out, stats), inplace=True)), u) + base

        return run(conv_out, [h, x_base], sample.channels, 1, u)

    def _resnet(self, block: ResnetBlock2D, inputs: list[Plane], temb: torch.Tensor, lasting: bool = False) -> Plane:
        """One ResnetBlock2D (default form) in two layers: conv1 up to norm2, then conv2 and the shortcut."""
        run, scale = self.runner.run, inputs[0].scale
        act = block.nonlinearity
        stats1 = group_stats(inputs, block.norm1.num_groups)
        time = block.time_emb_proj(act(temb))[:, :, None, None]

        def first(*xs):
            return block.conv1(F.silu(group_norm(_cat(xs), block.norm1, stats1), inplace=True)) + time

        hidden = run(first, inputs, block.conv1.out_channels, scale, scale)
        stats2 = group_stats([hidden], block.norm2.num_groups)

        def second(hid, *xs):
            x = _cat(xs)
            if block.conv_shortcut is not None:
                x = block.conv_shortcut(x)
            return (x + block.conv2(F.silu(group_norm(hid, block.norm2, stats2), inplace=True))) / block.output_scale_factor

        return run(second, [hidden, *inputs], block.conv2.out_channels, scale, scale, lasting)


def _cat(xs):
    return xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)


def _resnets(unet):
    return [m for m in unet.modules() if isinstance(m, ResnetBlock2D)]
