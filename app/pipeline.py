"""``CDCPipeline``: image → ``.cdc`` bytes → image, with a conditional diffusion decoder.

Decoding follows Yang & Mandt (2023), Alg. 2: x_N = γ·ε, then for each of the K scheduler steps the
UNet predicts x̂0 = f(x_n, n, ρ, content(ŷ)) (X-parameterisation) and the scheduler (DDIM by
default) moves to x_{n-1}; the last x̂0 is the reconstruction. γ ≤ 1 scales the initial noise (the
official CDC code decodes with γ = 0.8). K and γ default to values measured per ρ by ``app.tune``
and stored in the pipeline's config.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from . import bands, bitstream, tiling
from .bitstream import BitstreamError
from .images import MAX_PIXELS, load_image, to_array
from .models.compressor import STRIDE, CDCCompressor
from .models.entropy_exact import latent_sha256, to_float
from .models.unet import CDCUNet

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "cdc"


class CheckpointError(FileNotFoundError):
    """A checkpoint folder that is missing or cannot be loaded."""


TILE_SIZE = 1024  # window side (pixels) of tiled coding
BAND_PIXELS = 1 << 20  # pixels per row band of tiled decoding (app.bands): the band's memory, not the image's
BAND_RAM = 256 << 20  # bytes of RAM buffers for a tiled decode's short-lived planes, the rest in files (app.bands)
PRECISIONS = ("auto", "fp32", "bf16")  # of the decoder's synthesis (CDCPipeline.synthesis_precision)
# oneDNN ISA limits (ONEDNN_MAX_CPU_ISA) below the first with bf16 dot products (AVX512_CORE_BF16)
_NO_BF16_ISAS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
SCHEDULERS = ("ddim", "dpmpp")
TIMESTEP_SPACINGS = ("trailing", "linspace")
# Before tuning: what the first checkpoint decoded with at every ρ.
UNTUNED_DECODE = ({"rho": 0.0, "num_inference_steps": 4, "noise_scale": 1.0},)


def make_scheduler(name: str = "ddim", timestep_spacing: str = "trailing"):
    """A sampler on the training schedule (cosine, x0 prediction): DDIM (the paper's) or DPM-Solver++(2M).

    ``trailing`` spacing starts K steps at t = T; ``linspace`` spans T…0.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep spacing {timestep_spacing!r}; choose one of {', '.join(TIMESTEP_SPACINGS)}")
    common = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                  timestep_spacing=timestep_spacing)
    if name == "ddim":
        return DDIMScheduler(**common, clip_sample=True, set_alpha_to_one=True)
    return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                       lower_order_final=True, final_sigmas_type="zero")


def scheduler_name(scheduler) -> str:
    """The :data:`SCHEDULERS` name of a scheduler instance."""
    return "dpmpp" if isinstance(scheduler, DPMSolverMultistepScheduler) else "ddim"


def native_bf16() -> bool:
    """Whether this CPU's convolutions run natively in bf16 (AVX512-BF16 or AMX, not limited by
    ``ONEDNN_MAX_CPU_ISA``, oneDNN on): there bf16 is faster than fp32; elsewhere it is emulated and far slower."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")).strip().upper()
    if isa in _NO_BF16_ISAS or not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def image_to_tensor(img: PIL.Image.Image) -> torch.Tensor:
    """RGB image → (1, 3, H, W) float tensor in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1)[None].float() / 127.5 - 1.0


def tensor_to_image(x: torch.Tensor) -> PIL.Image.Image:
    """(1, 3, H, W) tensor in [-1, 1] → RGB image."""
    arr = ((x[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return PIL.Image.fromarray(arr, "RGB")


@dataclass
class CDCPipelineOutput(BaseOutput):
    """A round trip: the reconstruction, the ``.cdc`` bytes and their bits per pixel."""

    images: list
    bitstreams: list
    bpp: list


class CDCPipeline(DiffusionPipeline):
    """Compressor (encoder + hyperprior + content decoder), conditional UNet and a diffusers scheduler."""

    model_cpu_offload_seq = "compressor->unet"

    def __init__(self, compressor: CDCCompressor, unet: CDCUNet, scheduler, decode_defaults: list | None = None):
        super().__init__()
        self.register_modules(compressor=compressor, unet=unet, scheduler=scheduler)
        table = UNTUNED_DECODE if decode_defaults is None else decode_defaults
        self.register_to_config(decode_defaults=check_decode_defaults(table))
        self.max_pixels = MAX_PIXELS
        # Images whose padded sides exceed tile_size are encoded in windows of that side and decoded in row
        # bands of about band_pixels pixels (app.tiling).
        self.tile_size = TILE_SIZE
        self.band_pixels = BAND_PIXELS
        self.band_ram = BAND_RAM
        # The content decoder and the UNet in bf16 where the CPU has it natively (app.pipeline.native_bf16)
        self.synthesis_precision = "auto"
        self._analysis_margin = None
        self.last_probes = 0  # encodes run by the last compress() (1, or a bisection's count)
        self._coder = None
        self._model_id = None
        self._refit = False

    # -- properties -------------------------------------------------------------------------
    @property
    def num_quality_levels(self) -> int:
        return self.compressor.config.num_quality_levels

    def decode_settings(self, rho: float) -> tuple[int, float]:
        """The tuned (K, γ) at ρ: linear in ρ between the tuned values (K rounded), constant beyond them."""
        table = self.config.decode_defaults
        rhos = [d["rho"] for d in table]
        steps = np.interp(rho, rhos, [d["num_inference_steps"] for d in table])
        gamma = np.interp(rho, rhos, [d["noise_scale"] for d in table])
        return max(1, int(np.floor(steps + 0.5))), float(gamma)

    @property
    def multiple(self) -> int:
        """Image sides are padded to a multiple of this."""
        return math.lcm(STRIDE, self.unet.downscale_factor)

    @property
    def model_id(self) -> bytes:
        """8-byte hash of the compressor's and UNet's configs, weights and coding tables (as fp32 on the CPU).

        Config entries added after files were written are left out at the value that reproduces the
        earlier model (a module's ``ID_NEUTRAL_CONFIG``), so that those files keep their id."""
        if self._model_id is None:
            self._entropy_coder()  # a model without coding tables gets them first
            h = hashlib.sha256()
            for module in (self.compressor, self.unet):
                neutral = getattr(module, "ID_NEUTRAL_CONFIG", {})
                config = {k: v for k, v in module.config.items() if not k.startswith("_")
                          and not (k in neutral and json.dumps(v, default=list) == json.dumps(neutral[k]))}
                h.update(json.dumps(config, sort_keys=True, default=list).encode())
                for name, tensor in sorted(module.state_dict().items()):
                    h.update(name.encode())
                    h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
            self._model_id = h.digest()[:8]
        return self._model_id

    def band_rows(self, pad_width: int) -> int:
        """Rows per band of a tiled decode at this padded width: about ``band_pixels`` pixels, a multiple of 16."""
        return max(tiling.ALIGN, self.band_pixels // pad_width // tiling.ALIGN * tiling.ALIGN)

    def tiled(self, pad_height: int, pad_width: int) -> bool:
        """Whether an image of this padded size is coded in tiles (larger than one tile on a side)."""
        return max(pad_height, pad_width) > self.tile_size

    def synthesis_dtype(self) -> torch.dtype:
        """The dtype of the decoder's synthesis: bf16 where ``synthesis_precision`` is "bf16", or "auto" on a CPU
        with native bf16 (:func:`native_bf16`); float32 otherwise."""
        if self.synthesis_precision not in PRECISIONS:
            raise ValueError(f"synthesis_precision must be one of {', '.join(PRECISIONS)}, got {self.synthesis_precision!r}")
        bf16 = self.synthesis_precision == "bf16" or (
            self.synthesis_precision == "auto" and self.device.type == "cpu" and native_bf16())
        return torch.bfloat16 if bf16 else torch.float32

    def synthesis_name(self) -> str:
        """:meth:`synthesis_dtype` as benchmarks and evaluations record it: "float32" or "bfloat16"."""
        return str(self.synthesis_dtype()).removeprefix("torch.")

    def synthesis_autocast(self) -> torch.autocast:
        """Autocast of the decoder's synthesis, the content decoder and the UNet (never the entropy path), to
        :meth:`synthesis_dtype`."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.synthesis_dtype() == torch.bfloat16)

    def _entropy_coder(self) -> CDCCompressor:
        """The compressor's fp32 CPU twin, which runs the exact entropy path.

        The coding tables come with the checkpoint; they are fitted here only for a model that has
        none yet or after :meth:`weights_changed`.
        """
        if self._coder is None:
            c = self.compressor
            if self._refit or not c.coding.fitted:
                c.update(force=True)
                self._refit = False
            self._coder = c if c.device.type == "cpu" and c.dtype == torch.float32 else copy.deepcopy(c).to("cpu", torch.float32)
        return self._coder

    def weights_changed(self) -> None:
        """The weights changed (training): refit the coding tables on next use and forget the model id."""
        self._coder = None
        self._analysis_margin = None
        self._model_id = None
        self._refit = True

    def to(self, *args, **kwargs):
        self._coder = None
        self._analysis_margin = None
        return super().to(*args, **kwargs)

    # -- codec ------------------------------------------------------------------------------
    def _quality_x100(self, quality) -> int:
        """A quality in [0, Q−1] (any real number; stored to 1/100 of a level) as hundredths."""
        top = self.num_quality_levels - 1
        if isinstance(quality, bool) or not isinstance(quality, (int, float, np.integer, np.floating)) \
                or not 0 <= float(quality) <= top:  # also rejects NaN
            raise ValueError(f"quality must be a number in [0, {top}], got {quality!r}")
        return round(float(quality) * 100)

    @torch.no_grad()
    def compress(self, image, quality: float | None = None, *, max_bytes: int | None = None,
                 bpp: float | None = None) -> bytes:
        """Encode ``image`` (anything :func:`app.images.load_image` reads) at ``quality`` ∈ [0, Q−1], fractional
        qualities to 1/100 of a level; or as the largest file not above ``max_bytes`` bytes or ``bpp`` bits per pixel
        (bisection over the quality, running the encoder's last step and the entropy coder per probe;
        ``last_probes`` tells how many)."""
        if sum(v is not None for v in (quality, max_bytes, bpp)) != 1:
            raise ValueError("give exactly one of quality, max_bytes and bpp")
        q100 = None if quality is None else self._quality_x100(quality)
        if bpp is not None and not (isinstance(bpp, (int, float)) and bpp > 0 and math.isfinite(bpp)):
            raise ValueError(f"bpp must be a positive number, got {bpp!r}")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer))
                                      or max_bytes < 1):
            raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
        img = load_image(image, self.max_pixels)
        width, height = img.size
        m = self.multiple
        pad_w, pad_h = -(-width // m) * m, -(-height // m) * m
        if self.tiled(pad_h, pad_w):
            bands.return_freed_memory()  # large images: bounded memory over the few page faults it costs
            if self._analysis_margin is None:
                self._analysis_margin = tiling.analysis_margin(self.compressor)
            pixels = to_array(img)
            del img  # the array holds the pixels once
            window = tiling.analysis_window(self.compressor, self.tile_size)
            features = tiling.analysis_tiled(self.compressor, pixels, pad_h, pad_w, window, self._analysis_margin)
            del pixels
        else:
            x = F.pad(image_to_tensor(img), (0, pad_w - width, 0, pad_h - height), mode="replicate")
            features = self.compressor.g_a(x.to(self.device, self.compressor.dtype))

        self.last_probes = 0

        def encode(q100: int, last: bool = False) -> bytes:
            """The file at ``q100``; the ``last`` encode gains the features in place (no second latent)."""
            self.last_probes += 1
            gain = self.compressor.gain(torch.tensor([q100 / 100], device=self.device))
            y = features.mul_(gain) if last else features * gain
            z_string, y_string, digest = self._entropy_coder().compress(y.float().cpu(), overwrite=True)  # y is spent
            check = bytes.fromhex(digest)[: bitstream.CHECK_BYTES]
            header = bitstream.Header(self.model_id, bitstream.quality_from_x100(q100), width, height, pad_w, pad_h, check)
            return bitstream.pack(header, z_string, y_string)

        if q100 is not None:
            return encode(q100, last=True)
        if bpp is not None:
            max_bytes = math.floor(bpp * width * height / 8)
        return self._largest_within(encode, int(max_bytes))

    def _largest_within(self, encode, max_bytes: int) -> bytes:
        """Bisection over the quality in hundredths (the rate grows with it): the largest file ≤ max_bytes."""
        best = encode(0)
        if len(best) > max_bytes:
            raise ValueError(f"no file fits in {max_bytes} bytes: the smallest this model writes for this image "
                             f"is {len(best)} bytes (quality 0)")
        low, high = 0, (self.num_quality_levels - 1) * 100  # encode(low) fits
        top = encode(high)
        if len(top) <= max_bytes:
            return top
        while high - low > 1:
            mid = (low + high) // 2
            data = encode(mid)
            if len(data) <= max_bytes:
                low, best = mid, data
            else:
                high = mid
        return best

    @torch.no_grad()
    def decode_latent(self, data: bytes, verify: bool = True) -> tuple[bitstream.Header, torch.Tensor]:
        """The header and the exact latent ŷ · 2^12 (int32) of ``.cdc`` bytes, by the entropy path only.

        With ``verify`` a latent that does not match the file's check is a :class:`BitstreamError`.
        """
        header, z_string, y_string = bitstream.unpack(data)
        self._check_header(header)
        shape = (header.pad_height // STRIDE, header.pad_width // STRIDE)
        try:
            y_fx = self._entropy_coder().decompress(z_string, y_string, shape)
        except (RuntimeError, ValueError) as e:
            raise BitstreamError(f"corrupt latent data ({e})") from None
        if verify and bytes.fromhex(latent_sha256(y_fx))[: bitstream.CHECK_BYTES] != header.check:
            raise BitstreamError("latent check failed: the file decodes to a different latent here than where it was written")
        return header, y_fx

    @torch.no_grad()
    def decompress(
        self,
        data: bytes,
        num_inference_steps: int | None = None,
        rho: float = 0.9,
        generator: torch.Generator | None = None,
        noise_scale: float | None = None,
        progress: bool = True,
    ) -> PIL.Image.Image:
        """Decode ``.cdc`` bytes with K = ``num_inference_steps`` steps from γ = ``noise_scale`` at perceptual weight ρ.

        K and γ left as None take the tuned values at ρ (:meth:`decode_settings`)."""
        if not 0.0 <= float(rho) <= 1.0:
            raise ValueError(f"rho must be in [0, 1], got {rho}")
        tuned_steps, tuned_gamma = self.decode_settings(float(rho))
        steps = tuned_steps if num_inference_steps is None else int(num_inference_steps)
        gamma = tuned_gamma if noise_scale is None else float(noise_scale)
        if steps < 1:
            raise ValueError(f"num_inference_steps must be ≥ 1, got {steps}")
        if not 0.0 <= gamma <= 1.0:  # also rejects NaN
            raise ValueError(f"noise_scale must be in [0, 1], got {noise_scale}")
        if self.tiled(*self._padded_size(data)):
            bands.return_freed_memory()
            header, y_fx = self.decode_latent(data)
            q = torch.tensor([header.quality_x100 / 100], device=self.device)
            decoder = tiling.TiledDecoder(self, header.pad_height, header.pad_width, self.band_rows(header.pad_width),
                                          self.band_ram)
            y_hat = to_float(y_fx)
            del y_fx  # ŷ held once, as floats
            with bands.reused_memory(), self.synthesis_autocast():
                planes = decoder.content(y_hat, q)
                del y_hat  # the UNet's bands need the planes only
                return decoder.denoise(planes, header.height, header.width, float(rho), steps, gamma, generator)
        header, content, x_base = self.decode_content(data)
        self.set_progress_bar_config(disable=not progress)
        x = self.denoise(content, x_base, float(rho), steps, gamma, generator)
        return tensor_to_image(x[:, :, : header.height, : header.width])

    @staticmethod
    def _padded_size(data: bytes) -> tuple[int, int]:
        header = bitstream.unpack(data)[0]
        return header.pad_height, header.pad_width

    @torch.no_grad()
    def decode_content(self, data: bytes) -> tuple[bitstream.Header, list[torch.Tensor], torch.Tensor]:
        """``.cdc`` bytes → header, content pyramid and x_base (at the padded size, in the UNet's dtype)."""
        header, y_fx = self.decode_latent(data)
        y_hat = to_float(y_fx)

        q = torch.tensor([header.quality_x100 / 100], device=self.device)
        dtype = self.unet.dtype
        with self.synthesis_autocast():
            content, x_base = self.compressor.content(y_hat.to(self.device, self.compressor.dtype), q)
        return header, [f.to(dtype) for f in content], x_base.to(dtype)

    @torch.no_grad()
    def denoise(self, content, x_base, rho, num_inference_steps: int, noise_scale: float, generator=None) -> torch.Tensor:
        """Alg. 2's loop on a batch: x_K = γ·σ_K·ε, then K × (x̂0 = unet(x_k, k, ρ, content), scheduler step).

        ``rho`` is a float or one value per sample; returns x̂0 in [-1, 1] at the padded size."""
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        x = randn_tensor(x_base.shape, generator=generator, device=self.device, dtype=x_base.dtype)
        x = x * (noise_scale * self.scheduler.init_noise_sigma)
        autocast = self.synthesis_autocast()
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(x, t)
            with autocast:
                prediction = self.unet(model_input, t, rho, content, x_base).sample
            prediction = prediction.to(x.dtype).clamp(-1, 1)  # x̂0 is an image
            x = self.scheduler.step(prediction, t, x).prev_sample
        return x

    def _check_header(self, header: bitstream.Header) -> None:
        if header.model_id != self.model_id:
            raise BitstreamError(
                f"file was written by another model (id {header.model_id.hex()}; this checkpoint is {self.model_id.hex()})"
            )
        if header.quality > self.num_quality_levels - 1:
            raise BitstreamError(f"quality {header.quality} is not in this model (0–{self.num_quality_levels - 1})")
        m = self.multiple
        if header.pad_width != -(-header.width // m) * m or header.pad_height != -(-header.height // m) * m:
            raise BitstreamError("corrupt .cdc file (padded size does not match the image size)")
        if header.width * header.height > self.max_pixels:
            raise BitstreamError(f"image is {header.width}x{header.height}; the decoding limit is {self.max_pixels} pixels")

    def __call__(
        self,
        image,
        quality: float,
        num_inference_steps: int | None = None,
        rho: float = 0.9,
        generator: torch.Generator | None = None,
        noise_scale: float | None = None,
    ) -> CDCPipelineOutput:
        """Round trip: compress then decompress one image."""
        data = self.compress(image, quality)
        recon = self.decompress(data, num_inference_steps, rho, generator, noise_scale)
        return CDCPipelineOutput(images=[recon], bitstreams=[data], bpp=[bitstream.bits_per_pixel(data)])


def check_decode_defaults(table) -> list[dict]:
    """Validate a decode-defaults table: entries {rho, num_inference_steps, noise_scale}, sorted by ρ."""
    try:
        rows = [{"rho": float(d["rho"]), "num_inference_steps": int(d["num_inference_steps"]),
                 "noise_scale": float(d["noise_scale"])} for d in table]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"decode_defaults entries need rho, num_inference_steps and noise_scale ({e})") from None
    if not rows or any(not (0 <= d["rho"] <= 1 and d["num_inference_steps"] >= 1 and 0 <= d["noise_scale"] <= 1)
                       for d in rows):
        raise ValueError(f"decode_defaults need ρ and γ in [0, 1] and at least one step: {rows}")
    if any(a["rho"] >= b["rho"] for a, b in zip(rows, rows[1:])):
        raise ValueError("decode_defaults must be sorted by increasing ρ")
    return rows


def load_pipeline(checkpoint: str | Path | None = None, device: str = "cpu") -> CDCPipeline:
    """Load a pipeline folder (default ``checkpoints/cdc``); one-line :class:`CheckpointError` if absent."""
    path = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
    if not (path / "model_index.json").is_file():
        raise CheckpointError(f"no CDC checkpoint at {path} (model_index.json not found)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    try:
        pipe = CDCPipeline.from_pretrained(path, low_cpu_mem_usage=False)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"cannot load checkpoint {path}: {str(e).splitlines()[0]}") from None
    return pipe.to(device)
