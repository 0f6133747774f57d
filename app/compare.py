"""Keep only what is better: BD-rate of a new checkpoint's evaluation against the shipped one's.

    python -m app.compare results/kodak.json runs/new-kodak.json

Both files come from ``python -m app.evaluate`` on the same images. The new checkpoint is compared on
its mean curves (levels as points) by BD-rate on PSNR at ρ = 0 and on LPIPS at ρ = 0.9 (negative =
it needs fewer bits for the same quality). Where the quality ranges do not overlap (one curve is
above the other everywhere), the Bjøntegaard delta of quality at equal rate decides instead.
Verdict: ship if it is better on at least one of the two and not worse on the other beyond the noise
margin: a BD-rate above +{bd}% or, without one, a loss at equal rate of more than {psnr} dB PSNR or
{lpips} LPIPS. (A compressor that gains PSNR while a UNet trained on its old content loses realism is
not shipped.) Exit status 0 = ship, 1 = keep the shipped checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.interpolate import PchipInterpolator

from app.evaluate import bd_rate

CRITERIA = (("psnr", 0.0, 1), ("lpips", 0.9, -1))  # metric, ρ, sign that makes it higher-is-better
MARGIN_BD_RATE = 2.0  # %, the noise margin of "not worse"
MARGIN_DELTA = {"psnr": 0.05, "lpips": 0.003}  # the same at equal rate, where the BD-rate is undefined
__doc__ = __doc__.format(bd=MARGIN_BD_RATE, psnr=MARGIN_DELTA["psnr"], lpips=MARGIN_DELTA["lpips"])


def curve(result: dict, rho: float, metric: str, sign: int) -> tuple[list, list]:
    """(bpp, quality) of our mean points at ρ, by level; quality is higher-is-better."""
    means = sorted((m for m in result["means"] if m["codec"] == "cdc" and m["rho"] == rho), key=lambda m: m["level"])
    if not means:
        raise ValueError(f"no CDC results at ρ = {rho:g}")
    return [m["bpp"] for m in means], [None if m[metric] is None else sign * m[metric] for m in means]


def bd_quality(rate_ref, quality_ref, rate_test, quality_test) -> float | None:
    """Mean quality difference test − ref over the common log-rate interval (PCHIP); None without overlap."""
    curves = []
    for rates, qualities in ((rate_ref, quality_ref), (rate_test, quality_test)):
        points = sorted((r, q) for r, q in zip(rates, qualities) if r and q is not None)
        if len(points) < 2:
            return None
        curves.append((np.log([r for r, _ in points]), np.array([q for _, q in points])))
    lo, hi = max(c[0][0] for c in curves), min(c[0][-1] for c in curves)
    if hi <= lo:
        return None
    ref, test = (PchipInterpolator(x, y).integrate(lo, hi) for x, y in curves)
    return float(test - ref) / (hi - lo)


def judge(rate: float | None, delta: float | None, metric: str) -> str:
    """"better", "worse" (beyond the noise margin), "same" (within it) or "unknown" (no overlap at all);
    ``delta`` is higher-is-better."""
    if rate is not None:
        return "better" if rate < 0 else "worse" if rate > MARGIN_BD_RATE else "same"
    if delta is None:
        return "unknown"
    return "better" if delta > 0 else "worse" if delta < -MARGIN_DELTA[metric] else "same"


def compare(old: dict, new: dict) -> dict:
    """BD-rate (%) of new vs old per criterion, the verdict per criterion, and whether to ship the new checkpoint."""
    if sorted(i["name"] for i in old["images"]) != sorted(i["name"] for i in new["images"]):
        raise ValueError("the two evaluations are not on the same images")
    rates, deltas, verdicts = {}, {}, {}
    for metric, rho, sign in CRITERIA:
        key, curves = f"{metric}@{rho:g}", (*curve(old, rho, metric, sign), *curve(new, rho, metric, sign))
        rates[key], delta = bd_rate(*curves), bd_quality(*curves)
        deltas[key] = None if delta is None else sign * delta  # in the metric's own units
        verdicts[key] = judge(rates[key], delta, metric)
    ship = "better" in verdicts.values() and all(v in ("better", "same") for v in verdicts.values())
    return {"bd_rate": rates, "delta_at_equal_rate": deltas, "verdicts": verdicts, "ship": ship}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("old", type=Path, help="evaluation JSON of the shipped checkpoint")
    p.add_argument("new", type=Path, help="evaluation JSON of the candidate")
    args = p.parse_args(argv)
    try:
        old, new = (json.loads(path.read_text()) for path in (args.old, args.new))
        verdict = compare(old, new)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, rate in verdict["bd_rate"].items():
        delta = verdict["delta_at_equal_rate"][name]
        print(f"{name}: BD-rate " + ("– (qualities do not overlap)" if rate is None else f"{rate:+.1f}%")
              + f", Δ{name.split('@')[0].upper()} at equal rate " + ("–" if delta is None else f"{delta:+.4f}")
              + f": {verdict['verdicts'][name]}")
    print("ship the new checkpoint" if verdict["ship"] else
          "keep the shipped checkpoint (not better on one of the two without being worse on the other)")
    return 0 if verdict["ship"] else 1


if __name__ == "__main__":
    sys.exit(main())
