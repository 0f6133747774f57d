"""Command line codec.

    python -m app compress INPUT OUTPUT.cdc [--quality Q | --bpp B | --max-bytes N] [--checkpoint DIR] [--device cpu|cuda]
    python -m app decompress INPUT.cdc OUTPUT.png [--rho R] [--steps K] [--noise-scale G] [--seed S] [--precision auto|fp32|bf16] [--checkpoint DIR] [--device cpu|cuda]
    python -m app info INPUT.cdc [--check [--checkpoint DIR]]

Errors print one line on stderr and exit with status 1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .bitstream import BitstreamError, bits_per_pixel, unpack


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None


def _write(path: str, data: bytes) -> None:
    try:
        Path(path).write_bytes(data)
    except OSError as e:
        raise ValueError(f"cannot write {path}: {e.strerror}") from None


def compress(args) -> None:
    from .pipeline import load_pipeline

    import time

    pipe = load_pipeline(args.checkpoint, args.device)
    quality = 2 if args.quality is None and args.bpp is None and args.max_bytes is None else args.quality
    t0 = time.perf_counter()
    data = pipe.compress(args.input, quality, max_bytes=args.max_bytes, bpp=args.bpp)
    seconds = time.perf_counter() - t0
    _write(args.output, data)
    probes = f", {pipe.last_probes} probes in {seconds:.2f} s" if pipe.last_probes > 1 else ""
    print(f"{args.output}: {len(data)} bytes, {bits_per_pixel(data):.4f} bpp, "
          f"quality {unpack(data)[0].quality}{probes}")


def decompress(args) -> None:
    import torch

    from .pipeline import load_pipeline

    data = _read(args.input)
    unpack(data)  # fail on a corrupt file before loading the model
    if not args.output.lower().endswith(".png"):
        raise ValueError("OUTPUT must be a .png file (lossless)")
    pipe = load_pipeline(args.checkpoint, args.device)
    pipe.synthesis_precision = args.precision
    generator = torch.Generator().manual_seed(args.seed)
    image = pipe.decompress(data, args.steps, args.rho, generator, args.noise_scale)
    _save_png(image, args.output)
    print(f"{args.output}: {image.width}x{image.height}")


def _save_png(image, path: str) -> None:
    """PNG straight into a temporary file beside ``path``, renamed over it when complete: no encoded copy in
    memory (a 67 MP PNG is about 100 MB), and no half-written file on failure."""
    import os
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, part = tempfile.mkstemp(prefix=".", suffix=".png.part", dir=folder)
    except OSError as e:
        raise ValueError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
        os.replace(part, path)
    except OSError as e:
        raise ValueError(f"cannot write {path}: {e.strerror}") from None
    finally:
        if os.path.exists(part):
            os.unlink(part)


def info(args) -> int:
    data = _read(args.input)
    header, z, y = unpack(data)
    summary = header.to_dict() | {"file_bytes": len(data), "z_bytes": len(z), "y_bytes": len(y), "bpp": bits_per_pixel(data)}
    if args.check:  # entropy-decode the latent with the model: compare machines by its hash
        from .bitstream import CHECK_BYTES
        from .models.entropy_exact import latent_sha256
        from .pipeline import load_pipeline

        _, y_fx = load_pipeline(args.checkpoint).decode_latent(data, verify=False)
        digest = latent_sha256(y_fx)
        summary |= {"latent_sha256": digest, "check_ok": digest[: 2 * CHECK_BYTES] == header.check.hex()}
    print(json.dumps(summary, indent=2))
    if args.check and not summary["check_ok"]:
        print(f"error: {args.input}: latent check failed: it decodes to a different latent here than where it was written", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m app", description="CDC: lossy image codec with a diffusion decoder")
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compress", help="image → .cdc")
    c.add_argument("input")
    c.add_argument("output")
    target = c.add_mutually_exclusive_group()
    target.add_argument("--quality", type=float, help="quality in [0, Q-1], 0 = smallest files, fractions to 0.01 "
                        "(default 2)")
    target.add_argument("--bpp", type=float, help="the largest file not above this many bits per pixel")
    target.add_argument("--max-bytes", type=int, help="the largest file not above this many bytes")
    d = sub.add_parser("decompress", help=".cdc → PNG")
    d.add_argument("input")
    d.add_argument("output")
    d.add_argument("--rho", type=float, default=0.9, help="perceptual weight ρ in [0, 1] (0 = lowest MSE)")
    d.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's tuned value at ρ)")
    d.add_argument("--noise-scale", type=float, default=None, metavar="G",
                   help="initial noise scale γ in [0, 1] (default: the model's tuned value at ρ)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="the content decoder's and UNet's arithmetic: auto = bf16 on a CPU with native bf16 "
                        "(AVX512-BF16, AMX), else fp32")
    for p in (c, d):
        p.add_argument("--checkpoint", default=None, help="pipeline folder (default: checkpoints/cdc)")
        p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    i = sub.add_parser("info", help="print a .cdc header as JSON")
    i.add_argument("input")
    i.add_argument("--check", action="store_true", help="also entropy-decode the latent with the model and print its SHA-256")
    i.add_argument("--checkpoint", default=None, help="pipeline folder for --check (default: checkpoints/cdc)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        status = {"compress": compress, "decompress": decompress, "info": info}[args.command](args)
    except BitstreamError as e:
        print(f"error: {args.input}: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
