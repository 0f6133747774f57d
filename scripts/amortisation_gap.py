"""The encoder's share of the unquantised ceiling: x_base from g_a(x) against x_base from a latent fitted to the crop.

    python scripts/amortisation_gap.py [--checkpoint DIR] [--data ../shared/datasets/val] [--count 3]
                                       [--levels 2 5] [--steps 300]

For each of ``--count`` photos (a ``--crop``² centre crop) and level, the content decoder is frozen and y itself is
fitted by Adam to MSE(x_base, x), starting from g_a(x), with ŷ = y (no quantiser, no rate). The ceiling is what
the trained g_a gives; what the fitted latent adds is what a better analysis transform could still find for
this synthesis (the amortisation gap), at no cost to decoding. A gap near zero points at the synthesis instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.evaluate import list_images  # noqa: E402
from app.images import load_image  # noqa: E402
from app.pipeline import image_to_tensor, load_pipeline  # noqa: E402


def psnr(x_base: torch.Tensor, x: torch.Tensor) -> float:
    """PSNR (dB) of images in [-1, 1]."""
    return (10 * torch.log10(4 / (x_base - x).pow(2).mean())).item()


def fitted_latent_psnr(compressor, x: torch.Tensor, quality: torch.Tensor, steps: int, lr: float) -> float:
    """x_base PSNR from the latent y fitted to ``x`` (content decoder frozen), starting at g_a(x)."""
    with torch.no_grad():
        y = compressor.analysis(x, quality)
    y.requires_grad_(True)
    opt = torch.optim.Adam([y], lr=lr)
    for _ in range(steps):
        loss = (compressor.content(y, quality)[1] - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return psnr(compressor.content(y, quality)[1], x)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--data", type=Path, default=Path("../shared/datasets/val"))
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--levels", type=int, nargs="+", default=[2, 5])
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.02)
    args = ap.parse_args(argv)
    compressor = load_pipeline(args.checkpoint).compressor.float().eval().requires_grad_(False)
    for path in list_images(args.data, args.count):
        img = load_image(path)
        left, top = (img.width - args.crop) // 2, (img.height - args.crop) // 2
        x = image_to_tensor(img.crop((left, top, left + args.crop, top + args.crop)))
        for level in args.levels:
            q = torch.tensor([level])
            with torch.no_grad():
                ceiling = psnr(compressor.content(compressor.analysis(x, q), q)[1], x)
            fitted = fitted_latent_psnr(compressor, x, q, args.steps, args.lr)
            print(json.dumps({"image": path.name, "level": level, "ceiling": round(ceiling, 2),
                              "fitted_latent": round(fitted, 2), "gap": round(fitted - ceiling, 2)}), flush=True)


if __name__ == "__main__":
    main()
