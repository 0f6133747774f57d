"""Move a checkpoint's Q quality levels to new rates along its continuous-rate curve.

The gain vectors (Cui et al. 2021) make the rate a smooth function of the quality q: log2 gain is
linear in q between levels and, past the ends, along the end segments. This script finds, on --data
(never Kodak), the q whose mean rate is each target (Q rates evenly spaced in log between --bpp LOW
HIGH), writes the gain and inverse-gain vectors at those q as the new levels, and gives each level the
rate weight λ that the old levels' (λ, rate) pairs interpolate log-log at its rate (end slopes
extrapolated), so that training resumed from the result (``python -m app.train --resume OUT``) keeps
the levels where they are. Rates are the hyperprior's likelihoods (Eq. 7's rate term) of whole images
cropped to multiples of 64; files add a header of a few bytes.

    python scripts/respace_levels.py --checkpoint checkpoints/cdc --data ../shared/datasets/val \
        --bpp 0.05 0.6 --out runs/respaced
"""
import argparse
import copy
import functools
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.interpolate import interp1d
from scipy.optimize import brentq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.images import image_files, load_image  # noqa: E402
from app.pipeline import image_to_tensor, load_pipeline  # noqa: E402
from app.train import prior_state, write_checkpoint  # noqa: E402


@torch.no_grad()
def mean_bpp(compressor, images: list[torch.Tensor], quality: float) -> float:
    """Σ bits / Σ pixels over ``images`` at ``quality`` (any real number: the gains extrapolate)."""
    bits = pixels = 0.0
    for x in images:
        out = compressor(x, torch.tensor([float(quality)]))
        bits += sum(-torch.log2(lk).sum().item() for lk in out.likelihoods.values())
        pixels += x.shape[-2] * x.shape[-1]
    return bits / pixels


def quality_at(rate, bpp: float, top: int) -> float:
    """The q with ``rate(q) == bpp`` (the rate grows with q; Brent's method, to 1/1000 of a level),
    bracketed from the trained range [0, top] outwards a level at a time, at most ``top`` levels past either end."""
    low, high = 0, top
    while rate(low) > bpp and low > -top:
        low -= 1
    while rate(high) < bpp and high < 2 * top:
        high += 1
    if not rate(low) <= bpp <= rate(high):
        raise SystemExit(f"error: {bpp} bpp lies outside the rates of q ∈ [{low}, {high}]")
    return round(brentq(lambda q: rate(q) - bpp, low, high, xtol=1e-3), 3)


def interpolate_lambdas(rates, lambdas, targets) -> list[float]:
    """λ at ``targets`` from (rate, λ) pairs, piecewise linear in log-log, end slopes extrapolated."""
    log_lambda = interp1d(np.log(rates), np.log(lambdas), fill_value="extrapolate")
    return [float(f"{v:.3g}") for v in np.exp(log_lambda(np.log(targets)))]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="checkpoints/cdc")
    p.add_argument("--data", type=Path, required=True, help="images to measure rates on (never Kodak)")
    p.add_argument("--bpp", type=float, nargs=2, required=True, metavar=("LOW", "HIGH"))
    p.add_argument("--out", type=Path, required=True, help="pipeline folder to write")
    args = p.parse_args(argv)

    pipe = load_pipeline(args.checkpoint)
    compressor = pipe.compressor.float().eval()
    top = pipe.num_quality_levels - 1
    images = [image_to_tensor(load_image(path)) for path in image_files(args.data)]
    images = [x[..., : x.shape[-2] // 64 * 64, : x.shape[-1] // 64 * 64] for x in images]
    rate = functools.cache(functools.partial(mean_bpp, compressor, images))  # the brackets recur across targets

    old_rates = [rate(q) for q in range(top + 1)]
    if any(a >= b for a, b in zip(old_rates, old_rates[1:])):
        raise SystemExit(f"error: the rates of {args.checkpoint}'s levels do not grow with the level: {old_rates}")
    state = prior_state(args.checkpoint)
    old_lambdas = state.get("lambdas")
    if not old_lambdas or len(old_lambdas) != top + 1:
        raise SystemExit(f"error: {args.checkpoint}/training_state.json has no λ per level")
    targets = np.geomspace(*args.bpp, top + 1).tolist()
    qualities = [quality_at(rate, b, top) for b in targets]
    q = torch.tensor(qualities)
    new = copy.deepcopy(compressor)
    new.log2_gain.data = torch.log2(compressor.gain(q))[:, :, 0, 0]
    new.log2_inverse_gain.data = torch.log2(compressor.gain(q, inverse=True))[:, :, 0, 0]
    lambdas = interpolate_lambdas(old_rates, old_lambdas, targets)

    state["lambdas"] = lambdas
    state["runs"] = state.get("runs", []) + [{
        "steps": 0, "crops": 0, "minutes": 0, "respaced": {
            "from": str(args.checkpoint), "data": args.data.name, "old_bpp": [round(r, 4) for r in old_rates],
            "old_lambdas": old_lambdas, "quality": qualities, "bpp": [round(b, 4) for b in targets]}}]
    write_checkpoint(new, copy.deepcopy(pipe.unet), pipe, args.out, state)  # as training saves them
    for i, (qi, b, lam) in enumerate(zip(qualities, targets, lambdas)):
        print(f"level {i}: old q {qi:6.3f}  {b:.4f} bpp on {args.data.name}  λ {lam:g}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
