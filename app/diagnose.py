"""Model health per quality level, the numbers that show a collapsing latent the hour it starts.

    python -m app.diagnose [CHECKPOINT] --data ../shared/datasets/val [--count 8] [--json OUT]

Per level, averaged over the photos (whole images, real ``.cdc`` files):

* ``bpp``: 8 · file bytes / pixels;
* ``psnr_base``: PSNR of the content decoder's x_base from the file's exact ŷ;
* ``psnr_rho0``: PSNR of the decode at ρ = 0 with the checkpoint's decode defaults;
* ``lpips_rho``: LPIPS-alex of the decode at ρ = ``REALISM_RHO`` (the realism the UNet stage moves);
* ``dists_rho``: DISTS of that decode, a metric the model is not trained on (None without the VGG16 weights),
  and ``dists_rho0`` of the decode at ρ = 0: whether the realism the UNet adds is realism by a metric it never saw;
* ``psnr_ceiling``: x_base from the unquantised latent (ŷ = y, unlimited rate): what the transforms can
  represent at this level's gain at all;
* ``active_channels``: latent channels that change x_base when set to their spatial mean (mean PSNR drop
  over the photos ≥ ``ACTIVE_DB``), measured on a centre crop of the latent;
* ``inactive_bit_share``: the share of y's bits (the entropy model's, of the rounded ŷ) spent on the others.

The decodes (``decode=False`` skips them) and the channel ablation (``channels=False``) are the slow parts.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .bitstream import BitstreamError, bits_per_pixel
from .images import image_files, load_image
from .metrics import dists_distance, lpips_distance, psnr
from .models.entropy_exact import to_float
from .pipeline import CheckpointError, image_to_tensor, load_pipeline, tensor_to_image

ACTIVE_DB = 0.02  # a channel is active if setting it to its mean costs x_base this much PSNR (dB)
ABLATION_LATENT = 16  # side of the latent crop for the channel ablation (256² pixels at H/16)
ABLATION_BATCH = 16
REALISM_RHO = 0.9


def _psnr01(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR (dB) of images in [-1, 1]."""
    return 10 * torch.log10(4 / (a.clamp(-1, 1) - b).pow(2).flatten(1).mean(1).clamp_min(1e-10))


@torch.no_grad()
def _latents(compressor, x: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, ŷ = round(y − μ) + μ, bits per channel of ŷ under the entropy model) on the float path."""
    y = compressor.analysis(x, q)
    z_hat = torch.round(compressor.h_a(y) - compressor.entropy_bottleneck._get_medians()) \
        + compressor.entropy_bottleneck._get_medians()
    scales, means = compressor.entropy_parameters(z_hat)
    y_hat = torch.round(y - means) + means
    likelihood = compressor.gaussian_conditional._likelihood(y_hat, scales, means)
    likelihood = compressor.gaussian_conditional.likelihood_lower_bound(likelihood)
    return y, y_hat, -torch.log2(likelihood).sum((0, 2, 3))


@torch.no_grad()
def channel_drops(compressor, y_hat: torch.Tensor, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x_base PSNR drop (dB) per latent channel when it is set to its spatial mean, on a centre crop."""
    h, w = y_hat.shape[2:]
    s = min(ABLATION_LATENT, h, w)
    top, left = (h - s) // 2, (w - s) // 2
    y = y_hat[:, :, top:top + s, left:left + s]
    target = x[:, :, top * 16:(top + s) * 16, left * 16:(left + s) * 16]
    base = _psnr01(compressor.content(y, q)[1], target)
    channels, drops = y.shape[1], []
    for start in range(0, channels, ABLATION_BATCH):
        idx = torch.arange(start, min(start + ABLATION_BATCH, channels))
        batch = y.repeat(len(idx), 1, 1, 1)
        batch[torch.arange(len(idx)), idx] = y[0, idx].mean((1, 2), keepdim=True)
        drops.append(base - _psnr01(compressor.content(batch, q.expand(len(idx)))[1], target.expand(len(idx), -1, -1, -1)))
    return torch.cat(drops)


@torch.no_grad()
def measure(pipe, images, levels=None, decode: bool = True, channels: bool = True) -> dict:
    """The diagnostics per level (``levels``: default all) over ``images`` (PIL RGB): {"q0": {...}, ...}."""
    compressor = pipe.compressor
    was_training = compressor.training
    compressor.eval()
    levels = range(pipe.num_quality_levels) if levels is None else levels
    rows = {}
    for level in levels:
        q = torch.tensor([level], device=pipe.device)
        acc = {k: [] for k in ("bpp", "psnr_base", "psnr_rho0", "lpips_rho", "dists_rho0", "dists_rho",
                                "psnr_ceiling")}
        drops, bits = [], []
        for img in images:
            data = pipe.compress(img, level)
            header, content, x_base = pipe.decode_content(data)
            acc["bpp"].append(bits_per_pixel(data))
            acc["psnr_base"].append(psnr(img, tensor_to_image(x_base[:, :, : img.height, : img.width].float())))
            if decode:
                recon = pipe.decompress(data, rho=0.0, generator=torch.Generator().manual_seed(0), progress=False)
                acc["psnr_rho0"].append(psnr(img, recon))
                if (dists := dists_distance(img, recon)) is not None:
                    acc["dists_rho0"].append(dists)
                recon = pipe.decompress(data, rho=REALISM_RHO, generator=torch.Generator().manual_seed(0),
                                        progress=False)
                acc["lpips_rho"].append(lpips_distance(img, recon))
                if (dists := dists_distance(img, recon)) is not None:
                    acc["dists_rho"].append(dists)
            x = F.pad(image_to_tensor(img), (0, header.pad_width - img.width, 0, header.pad_height - img.height),
                      mode="replicate").to(pipe.device, compressor.dtype)
            y, y_hat, channel_bits = _latents(compressor, x, q)
            ceiling = compressor.content(y, q)[1][:, :, : img.height, : img.width]
            acc["psnr_ceiling"].append(_psnr01(ceiling, x[:, :, : img.height, : img.width]).item())
            if channels:
                drops.append(channel_drops(compressor, y_hat, x, q))
            bits.append(channel_bits)
        rows[f"q{level}"] = {k: float(np.mean(v)) if v else None for k, v in acc.items()} | {
            "active_channels": None, "channels": compressor.config.latent_channels, "inactive_bit_share": None}
        if channels:
            active = torch.stack(drops).mean(0) >= ACTIVE_DB
            bits = torch.stack(bits).sum(0)
            rows[f"q{level}"] |= {"active_channels": int(active.sum()),
                                  "inactive_bit_share": float(bits[~active].sum() / bits.sum().clamp_min(1e-9))}
    compressor.train(was_training)
    return rows


def table(rows: dict) -> str:
    """The diagnostics as a markdown table."""
    def cell(v, digits):
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"
    lines = [f"| level | bpp | x_base PSNR | PSNR ρ0 | LPIPS ρ{REALISM_RHO:g} | DISTS ρ0 | DISTS ρ{REALISM_RHO:g} "
             "| ceiling (ŷ = y) | active channels | bits on inactive |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        active = "–" if r["active_channels"] is None else f"{r['active_channels']}/{r['channels']}"
        share = "–" if r["inactive_bit_share"] is None else f"{100 * r['inactive_bit_share']:.0f} %"
        lines.append(f"| {name[1:]} | {cell(r['bpp'], 3)} | {cell(r['psnr_base'], 2)} | {cell(r['psnr_rho0'], 2)} | "
                     f"{cell(r['lpips_rho'], 3)} | {cell(r['dists_rho0'], 3)} | {cell(r['dists_rho'], 3)} | "
                     f"{cell(r['psnr_ceiling'], 2)} | {active} | {share} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m app.diagnose", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", nargs="?", help="pipeline folder (default: the shipped checkpoints/cdc)")
    ap.add_argument("--data", type=Path, required=True, help="folder of photos (validation, never Kodak)")
    ap.add_argument("--count", type=int, default=8, help="photos to use (default 8)")
    ap.add_argument("--levels", type=int, nargs="+", help="quality levels (default all)")
    ap.add_argument("--no-decode", action="store_true", help=f"skip the decodes at ρ = 0 and {REALISM_RHO:g} (the UNet)")
    ap.add_argument("--no-channels", action="store_true", help="skip the channel ablation")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    try:
        pipe = load_pipeline(args.checkpoint)
        images = [load_image(p) for p in image_files(args.data)[: args.count]]
        if not images:
            raise ValueError(f"no images in {args.data}")
        rows = measure(pipe, images, args.levels, decode=not args.no_decode, channels=not args.no_channels)
    except (CheckpointError, BitstreamError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
