"""Speed, size and memory of the codec on one image, or of a training step (timing only, never quality).

    python -m app.bench [--device cpu|cuda] [--json] [--checkpoint DIR] [--rho R] [--steps K] [--size 768x512] [--repeats 3]
                        [--no-reference]
    python -m app.bench --train [--device cpu|cuda] [--json] [--train-steps 5] [--train-batch 32] [--train-crop 256]
                                [--fused-adam] [--channels-last] [--compile]

``--train`` times ``app.train``'s real step (``Trainer.step`` plus crop sampling) on the checkpoint's
models with its λs, on synthetic photos: a short warm-up, then a timed stretch; crops/s is what a
GPU round's quality scales with. The speed flags are ``app.train``'s; the warm-up's seconds
(``train_warmup_s``) include cudnn autotuning and, with ``--compile``, the compilation.

The image is a deterministic synthetic one. Without a checkpoint the default configuration
runs with random weights (labelled so): the speed is the same, the picture is not. Each timing
is the median of ``--repeats`` runs after one warm-up run; CUDA is synchronised around each.
The reference is one forward of the paper-sized UNet (base width 64 at full resolution,
multipliers 1-6, no pixel-unshuffle) on the same image size, with random weights (``--no-reference``
skips it). Images larger than one tile are coded in tiles (``app.tiling``): the UNet then runs layer by
layer over row bands, so its single forward and GFLOPs are not reported; the row bands' height is.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from app.bitstream import bits_per_pixel
from app.evaluate import machine_info
from app.pipeline import PRECISIONS

PAPER_UNET = {"unshuffle": 1, "block_out_channels": (64, 128, 192, 256, 320, 384), "cond_image": False}


def synthetic_image(width: int, height: int) -> Image.Image:
    """A fixed photo-like test card: smooth gradients, edges and fine noise (made in bands of rows, so that a
    large one costs little more memory than its pixels)."""
    rng = np.random.default_rng(0)
    out = np.empty((height, width, 3), np.uint8)
    for top in range(0, height, 256):
        rows = min(256, height - top)
        y, x = np.mgrid[top:top + rows, 0:width] / max(width, height)
        r = 0.5 + 0.4 * np.sin(7 * x + 3 * y)
        g = 0.5 + 0.4 * np.cos(5 * y - 2 * x) * (x < 0.6)
        b = 0.3 + 0.5 * ((x - 0.5) ** 2 + (y - 0.3) ** 2 < 0.05)
        band = np.stack([r, g, b], axis=-1) + rng.normal(0, 0.04, (rows, width, 3))
        out[top:top + rows] = (np.clip(band, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(out)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up run, and its result."""
    out = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _max_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def gflops(module: torch.nn.Module, args, kwargs) -> float:
    """GFLOPs of one forward (FlopCounterMode: 2 FLOPs per multiply-add)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args, **kwargs)
    return counter.get_total_flops() / 1e9


class _Captured(Exception):
    pass


def capture_unet_inputs(pipe, data: bytes) -> tuple[tuple, dict]:
    """The (args, kwargs) of the UNet's first call during a one-step decode (which stops there)."""
    captured = []

    def hook(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Captured

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe.decompress(data, num_inference_steps=1, generator=torch.Generator().manual_seed(0), progress=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured[0]


def reference_unet(width: int, height: int, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    """Params, GFLOPs and forward time of the paper-sized UNet (random weights) at this size."""
    from app.models.unet import CDCUNet

    widths = PAPER_UNET["block_out_channels"]
    unet = CDCUNet(**PAPER_UNET, cond_channels=widths).to(device, dtype).eval()
    f = unet.downscale_factor
    h, w = -(-height // f) * f, -(-width // f) * f
    gen = torch.Generator(device).manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    content = [randn(1, c, h >> i, w >> i) for i, c in enumerate(widths)]
    args = (randn(1, 3, h, w), torch.tensor([500], device=device), 0.9, content)
    with torch.no_grad():
        seconds, _ = timed(lambda: unet(*args), device, repeats)
    return {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in PAPER_UNET.items()},
            "params": count_params(unet), "gflops": gflops(unet, args, {}), "forward_s": seconds}


def load(checkpoint: str | None, device: str):
    """(pipeline, weights label): the checkpoint, else the default config with random weights."""
    from app.models import CDCCompressor, CDCUNet
    from app.pipeline import CDCPipeline, CheckpointError, load_pipeline, make_scheduler

    try:
        return load_pipeline(checkpoint, device=device), "checkpoint"
    except CheckpointError:
        if checkpoint is not None:
            raise
    torch.manual_seed(0)
    pipe = CDCPipeline(CDCCompressor(), CDCUNet(), make_scheduler())
    return pipe.to(device), "random (no checkpoint found: default config, timing only)"


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    pipe, weights = load(args.checkpoint, args.device)
    pipe.synthesis_precision = args.precision
    synthesis = pipe.synthesis_name()
    steps, noise_scale = pipe.decode_settings(args.rho)
    steps = args.steps or steps
    level = pipe.num_quality_levels // 2
    img = synthetic_image(*args.size)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        mem_before = torch.cuda.memory_allocated(device) / 2**20
    else:
        mem_before = _max_rss_mib()
    encode_s, data = timed(lambda: pipe.compress(img, quality=level), device, args.repeats)

    def decode():
        gen = torch.Generator().manual_seed(0)
        return pipe.decompress(data, steps, args.rho, gen, noise_scale, progress=False)

    decode_s, _ = timed(decode, device, args.repeats)
    mem_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _max_rss_mib()

    tiled = pipe.tiled(*pipe._padded_size(data))
    forward_s = unet_gflops = unet_input = None
    if not tiled:
        unet_args, unet_kwargs = capture_unet_inputs(pipe, data)
        with torch.no_grad(), pipe.synthesis_autocast():
            forward_s, _ = timed(lambda: pipe.unet(*unet_args, **unet_kwargs), device, args.repeats)
        unet_gflops, unet_input = gflops(pipe.unet, unet_args, unet_kwargs), list(unet_args[0].shape)
    megapixels = img.width * img.height / 1e6
    return {
        "machine": machine_info(args.device), "weights": weights, "image": f"{img.width}x{img.height}",
        "level": level, "bpp": bits_per_pixel(data), "synthesis": synthesis, "rho": args.rho, "steps": steps, "noise_scale": noise_scale, "repeats": args.repeats,
        "tiled": tiled, "tile_size": pipe.tile_size, "band_rows": pipe.band_rows(pipe._padded_size(data)[1]) if tiled else None,
        "unet_input": unet_input,
        "encode_s": encode_s, "decode_s": decode_s, "decode_per_step_s": decode_s / steps, "unet_forward_s": forward_s,
        "encode_s_per_mpx": encode_s / megapixels, "decode_s_per_mpx": decode_s / megapixels,
        "unet_params": count_params(pipe.unet), "compressor_params": count_params(pipe.compressor),
        "unet_gflops": unet_gflops,
        "memory": {"kind": "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS",
                   "before_mib": mem_before, "peak_mib": mem_peak},
        "paper_unet": None if args.no_reference else reference_unet(img.width, img.height, device, pipe.unet.dtype,
                                                                     args.repeats),
    }


def report(r: dict) -> str:
    ref, m = r["paper_unet"], r["machine"]
    tiled = r["tiled"]
    forward = ("UNet layer by layer over row bands" if tiled else
               f"UNet forward alone on {'x'.join(map(str, r['unet_input'][-2:]))}: {r['unet_forward_s']:.3f} s")
    gflops = "" if tiled else f", {r['unet_gflops']:.4g} GFLOPs/forward"
    return "\n".join([
        f"{m['device']} ({m.get('gpu') or m['cpu']}), torch {m['torch']}, {m['torch_threads']} threads",
        f"weights: {r['weights']}",
        f"image {r['image']}, level {r['level']} ({r['bpp']:.3f} bpp), median of {r['repeats']} after a warm-up",
        f"tiles         {'encoder windows of %d px, decoder bands of %d rows' % (r['tile_size'], r['band_rows']) if tiled else 'none (one window)'}",
        f"encode        {r['encode_s']:.3f} s ({r['encode_s_per_mpx']:.3f} s/Mpx)",
        f"decode        {r['decode_s']:.3f} s at ρ = {r['rho']:g}, K = {r['steps']}, γ = {r['noise_scale']:g}, {r['synthesis']} synthesis: "
        f"{r['decode_per_step_s']:.3f} s/step, {r['decode_s_per_mpx']:.3f} s/Mpx ({forward})",
        f"UNet          {r['unet_params'] / 1e6:.2f} M params{gflops}; compressor {r['compressor_params'] / 1e6:.2f} M params",
        f"memory        {r['memory']['kind']}: {r['memory']['before_mib']:.0f} MiB before, "
        f"{r['memory']['peak_mib']:.0f} MiB peak",
    ] + ([] if ref is None else [
        f"paper UNet    {ref['params'] / 1e6:.2f} M params, {ref['gflops']:.4g} GFLOPs/forward, {ref['forward_s']:.3f} s/forward"
        + ("" if tiled else f" ({ref['forward_s'] / r['unet_forward_s']:.1f}x ours)")]))


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError("width and height must be positive")
    return w, h


def train_throughput(args) -> dict:
    """Crops/s, steps/s and peak memory of the training step, after ``--train-warmup`` untimed steps."""
    from app import train, train_data
    from app.pipeline import DEFAULT_CHECKPOINT

    pipe, weights = load(args.checkpoint, "cpu")
    pipe = pipe.to(torch.float32)
    lambdas = train.prior_lambdas(train.prior_state(args.checkpoint or DEFAULT_CHECKPOINT)) or \
        train.DEFAULT_LAMBDAS[: pipe.num_quality_levels]
    targs = train.parse_args(["--data", "synthetic", "--device", args.device, "--batch-size", str(args.train_batch),
                              "--crop", str(args.train_crop), "--lambdas", *map(str, lambdas), *train.speed_flags(args),
                              "--stage", args.train_stage, "--mixed-precision", args.mixed_precision])
    trainer = train.Trainer(pipe, targs)
    device = trainer.device
    sampler = train_data.CropSampler([synthetic_image(768, 512), synthetic_image(512, 768)], targs.crop, device, 0)

    def step():
        trainer.step(sampler.batch(targs.batch_size), targs.lr)

    t0 = time.perf_counter()
    for _ in range(args.train_warmup):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.train_steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _max_rss_mib()
    return {
        "machine": machine_info(args.device), "device": args.device, "weights": weights,
        "train_stage": targs.stage, "mixed_precision": targs.mixed_precision,
        "train_batch_size": targs.batch_size, "train_crop": targs.crop, "train_speed": train.speed_flags(targs),
        "train_warmup_steps": args.train_warmup, "train_warmup_s": warmup_s, "train_steps": args.train_steps,
        "train_steps_per_s": args.train_steps / seconds, "train_crops_per_s": args.train_steps * targs.batch_size / seconds,
        "memory": {"kind": "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS", "peak_mib": peak},
    }


def train_report(r: dict) -> str:
    m = r["machine"]
    return "\n".join([
        f"{m['device']} ({m.get('gpu') or m['cpu']}), torch {m['torch']}, {m['torch_threads']} threads; weights: {r['weights']}",
        f"{r['train_stage']} training step, batch {r['train_batch_size']} × {r['train_crop']}², "
        f"mixed precision {r['mixed_precision']}, {' '.join(r['train_speed']) or 'no speed flags'}; "
        f"{r['train_warmup_steps']} warm-up steps in {r['train_warmup_s']:.1f} s, {r['train_steps']} timed steps",
        f"throughput    {r['train_crops_per_s']:.1f} crops/s ({r['train_steps_per_s']:.3f} steps/s)",
        f"memory        {r['memory']['kind']}: {r['memory']['peak_mib']:.0f} MiB peak",
    ])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m app.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object (last line) instead of text")
    p.add_argument("--checkpoint", help="pipeline folder (default: the default checkpoint, else random weights)")
    p.add_argument("--rho", type=float, default=0.9, help="perceptual weight ρ of the timed decode (default 0.9)")
    p.add_argument("--steps", type=int, help="decoding steps (default: the pipeline's tuned value at ρ)")
    p.add_argument("--size", type=_size, default=(768, 512), help="image size WIDTHxHEIGHT (default 768x512)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up (default 3)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="the decoder's synthesis: auto = bf16 on a CPU with native bf16, else fp32 (default auto)")
    p.add_argument("--no-reference", action="store_true", help="skip the paper-sized UNet (slow at large sizes)")
    p.add_argument("--train", action="store_true", help="time the training step instead of the codec")
    p.add_argument("--train-steps", type=int, default=5, help="timed training steps (default 5)")
    p.add_argument("--train-warmup", type=int, default=2, help="untimed training steps first (default 2)")
    p.add_argument("--train-batch", type=int, default=32, help="crops per step (default 32, the recipe's)")
    p.add_argument("--train-crop", type=int, default=256, help="crop side (default 256, the recipe's)")
    p.add_argument("--train-stage", choices=("compressor", "denoiser", "joint"), default="joint",
                   help="app.train's --stage of the timed step (default joint)")
    p.add_argument("--mixed-precision", choices=("auto", "no", "bf16"), default="auto",
                   help="app.train's flag of that name (bf16 autocast; on a CPU with AVX512-BF16 about 1.7x faster)")
    p.add_argument("--fused-adam", action="store_true", help="app.train's speed flag of that name")
    p.add_argument("--channels-last", action="store_true", help="app.train's speed flag of that name")
    p.add_argument("--compile", action="store_true", help="app.train's speed flag of that name")
    args = p.parse_args(argv)
    if min(args.train_steps, args.train_batch) < 1 or args.train_warmup < 0 or args.train_crop < 64 or args.train_crop % 64:
        p.error("--train-steps and --train-batch must be ≥ 1, --train-warmup ≥ 0, --train-crop a multiple of 64")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    if not 0 <= args.rho <= 1:
        p.error("--rho must lie in [0, 1]")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    from app.pipeline import CheckpointError

    try:
        result = train_throughput(args) if args.train else run(args)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(result) if args.json else (train_report if args.train else report)(result))
    return result


if __name__ == "__main__":
    main()
