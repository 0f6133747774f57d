"""Time the demo page's actions on one image with the shipped model, through the page's own handlers.

    python scripts/demo_timings.py [--image assets/chelsea.png] [--resize 2048x2048] [--checkpoint checkpoints/cdc]

Prints what the page shows (bytes, bpp, the metrics table, the ρ strip, the plot's summary), the seconds of
each action (compress, switching the comparison, the ρ strip, the rate–distortion plot) and the process's
peak memory. ``--resize`` upscales the image first (e.g. the demo's largest upload, 2048x2048).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from app import ui  # noqa: E402
from app.pipeline import DEFAULT_CHECKPOINT, load_pipeline  # noqa: E402


def timed(label: str, fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    print(f"[{label}: {time.perf_counter() - t0:.2f} s]")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", type=Path, default=ROOT / "assets" / "chelsea.png")
    ap.add_argument("--resize", help="WxH to resize to first")
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    ap.add_argument("--quality", type=float, default=2.5)
    ap.add_argument("--rho", type=float, default=ui.START_RHO)
    ap.add_argument("--no-plot", action="store_true", help="skip the rate–distortion plot")
    args = ap.parse_args()

    pipe = load_pipeline(args.checkpoint)
    image = args.image
    if args.resize:
        width, height = map(int, args.resize.lower().split("x"))
        image = Path(tempfile.mkdtemp()) / f"{args.image.stem}-{width}x{height}.png"
        Image.open(args.image).convert("RGB").resize((width, height), Image.BICUBIC).save(image)
    steps, gamma = ui.tuned_settings(pipe, args.rho)
    _, readout, _, _, result = timed("compress", ui.compress, pipe, str(image), args.quality, args.rho, steps, gamma, 0)
    print(readout, "\n")
    for left, right in (("AVIF", "CDC"), ("JPEG", "CDC"), ("Original", "CDC")):
        slider = timed(f"compare {left} | {right}", ui.compare, result, left, right)
        print(slider["label"])
    _, strip = timed("ρ strip", ui.rho_strip, pipe, result, args.rho, steps, gamma, 0)
    print(strip, "\n")
    if not args.no_plot:
        _, info = timed("rate–distortion plot", ui.rd_plot, pipe, result)
        print(info)
    print(f"peak memory (max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
