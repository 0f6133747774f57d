"""Seam check of tiled decoding (issue #30): tiled against untiled decodes of the same files.

    python scripts/seam_check.py --data ../shared/datasets/kodak [--checkpoint DIR] [--quality 2] [--limit N]
        [--tile 320] [--bands 64 128] [--rhos 0 0.9] [--precision auto|fp32|bf16] [--out results/seams.json]

Each image is compressed once, then decoded untiled and tiled: with ``--tile`` forced small (so that a Kodak
image takes the tiled path and its encoder windows), decoded in row bands of each ``--bands`` height.
Reported per setting, over the images: mean and largest |ΔPSNR| (tiled − untiled, against the original),
the largest pixel difference, and the mean pixel difference on the band edges' rows against elsewhere.
Tiled encoding is checked too: the share of latent elements that differ from the untiled encode's.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.images import image_files, load_image  # noqa: E402
from app.pipeline import PRECISIONS, load_pipeline  # noqa: E402


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return float(10 * np.log10(255**2 / mse))


def seam_mask(height: int, width: int, pad_h: int, band: int) -> np.ndarray:
    """True on the two pixel rows either side of every band edge."""
    mask = np.zeros((height, width), bool)
    for r0 in range(band, pad_h, band):
        mask[[i for i in (r0 - 1, r0) if i < height]] = True
    return mask


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--checkpoint")
    p.add_argument("--quality", type=float, default=2)
    p.add_argument("--limit", type=int, help="first N images only")
    p.add_argument("--tile", type=int, default=320)
    p.add_argument("--bands", type=int, nargs="+", default=[64, 128], help="rows per decoder band (multiples of 16)")
    p.add_argument("--rhos", type=float, nargs="+", default=[0.0, 0.9])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="the decoder's synthesis (both decodes)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    pipe = load_pipeline(args.checkpoint)
    pipe.synthesis_precision = args.precision
    paths = image_files(args.data)[: args.limit]
    rows: dict[tuple, list] = {}
    latent_diff = []
    for path in paths:
        img = load_image(path)
        original = np.asarray(img)
        data = pipe.compress(img, quality=args.quality)
        tiled = copy.copy(pipe)
        tiled.tile_size = args.tile
        _, y_untiled = pipe.decode_latent(data)
        _, y_tiled = pipe.decode_latent(tiled.compress(img, quality=args.quality))
        latent_diff.append(float((y_untiled != y_tiled).float().mean()))
        header = pipe.decode_latent(data)[0]
        for rho in args.rhos:
            untiled = np.asarray(pipe.decompress(data, rho=rho, generator=torch.Generator().manual_seed(args.seed),
                                                 progress=False), dtype=np.int16)
            for band in args.bands:
                tiled.band_pixels = band * header.pad_width
                mask = seam_mask(header.height, header.width, header.pad_height, band)
                out = np.asarray(tiled.decompress(data, rho=rho, generator=torch.Generator().manual_seed(args.seed)),
                                 dtype=np.int16)
                diff = np.abs(out - untiled).max(axis=2)
                rows.setdefault((rho, band), []).append({
                    "image": path.name, "psnr_untiled": psnr(original, untiled), "psnr_tiled": psnr(original, out),
                    "max_diff": int(diff.max()), "seam_mean_diff": float(diff[mask].mean()),
                    "other_mean_diff": float(diff[~mask].mean())})
            print(f"{path.name} ρ={rho:g} done", file=sys.stderr)
    summary = []
    for (rho, band), items in sorted(rows.items()):
        d = [r["psnr_tiled"] - r["psnr_untiled"] for r in items]
        summary.append({"rho": rho, "band": band, "images": len(items),
                        "mean_abs_dpsnr": float(np.mean(np.abs(d))), "max_abs_dpsnr": float(np.max(np.abs(d))),
                        "max_diff": max(r["max_diff"] for r in items),
                        "seam_mean_diff": float(np.mean([r["seam_mean_diff"] for r in items])),
                        "other_mean_diff": float(np.mean([r["other_mean_diff"] for r in items]))})
    synthesis = pipe.synthesis_name()
    print(f"model {pipe.model_id.hex()}, {synthesis} synthesis, tile {args.tile}, quality {args.quality}, {len(paths)} images; tiled encode: "
          f"{100 * np.mean(latent_diff):.4f} % of latent elements differ (largest {100 * max(latent_diff):.4f} %)")
    print("| ρ | band rows | mean |ΔPSNR| dB | max |ΔPSNR| dB | max pixel diff | seam / other mean diff |")
    print("|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['rho']:g} | {s['band']} | {s['mean_abs_dpsnr']:.4f} | {s['max_abs_dpsnr']:.4f} | "
              f"{s['max_diff']} | {s['seam_mean_diff']:.3f} / {s['other_mean_diff']:.3f} |")
    result = {"model_id": pipe.model_id.hex(), "synthesis": synthesis, "tile": args.tile, "quality": args.quality, "latent_diff_share": latent_diff, "summary": summary,
              "rows": {f"{k[0]}/{k[1]}": v for k, v in rows.items()}}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
