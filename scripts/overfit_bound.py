"""The architecture's bound: overfit one crop with the unquantised autoencoder (ŷ = y, no rate term).

    python scripts/overfit_bound.py IMAGE [--checkpoint DIR] [--base-channels 48 24] [--steps 600]

Starts from the checkpoint's compressor (grown by ``--base-channels`` if given) and trains g_a and the
content decoder on MSE(x_base, x) of one ``--crop``² centre crop at the top level's gain, printing the
x_base PSNR as it goes. What this reaches is what the synthesis can represent at all; a real
bitstream's x_base can only be lower.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.images import load_image  # noqa: E402
from app.pipeline import image_to_tensor, load_pipeline  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--base-channels", type=int, nargs="*", default=None)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    compressor = load_pipeline(args.checkpoint).compressor.float()
    if args.base_channels is not None:
        compressor = compressor.with_base_synthesis(args.base_channels)
    img = load_image(args.image)
    left, top = (img.width - args.crop) // 2, (img.height - args.crop) // 2
    x = image_to_tensor(img.crop((left, top, left + args.crop, top + args.crop)))
    q = torch.tensor([compressor.config.num_quality_levels - 1])
    params = [p for n, p in compressor.named_parameters() if n.startswith(("g_a", "content", "to_base", "base_refine"))]
    opt = torch.optim.Adam(params, lr=args.lr)
    start = time.monotonic()
    for step in range(1, args.steps + 1):
        _, x_base = compressor.content(compressor.analysis(x, q), q)
        loss = (x_base - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step % 100 == 0:
            psnr = 10 * torch.log10(4 / loss.detach()).item()
            print(json.dumps({"step": step, "psnr_base_unquantised": round(psnr, 2),
                              "seconds": round(time.monotonic() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
