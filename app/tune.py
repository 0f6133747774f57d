"""Decode settings chosen by measurement: steps K, initial-noise scale γ, scheduler and timestep spacing.

    python -m app.tune --data ../shared/datasets/val [--out results/tune.json] [--apply]
    python -m app.tune --rows-from results/tune.json [--out ...] [--apply]   # choose again, no decoding

Every validation photo (never Kodak) is centre-cropped to ``--crop``², compressed to a real ``.cdc``
file at each level, and decoded with every setting of the grid at every ρ, with the same noise
seed for all settings. Per ρ the best setting is the one with the highest PSNR (ρ < 0.5) or the
lowest LPIPS (ρ ≥ 0.5; DISTS is reported beside, not chosen by), averaged over images and levels,
among settings no slower than the first checkpoint's default (``--max-steps``, 4: time is
proportional to K); within ``NEAR`` (0.02 dB or 0.002 LPIPS) of the best, the setting with the
fewest steps wins, since decode time is ∝ K. The default sweep (12 crops, 2 levels, 5 ρ, 60
settings) takes about 30 minutes on a 2-core CPU and a few minutes on a GPU.

The scheduler and spacing are one choice for all ρ (a checkpoint holds one scheduler): the family
that is best at the most ρ values, ties going to the checkpoint's current one. One-step decodes
are the same in every family (x̂0 = unet(γε, T)), so they are measured once. ``--apply`` writes the
per-ρ (K, γ) into the pipeline's ``model_index.json`` (``decode_defaults``) and the scheduler into
its ``scheduler/`` folder; the weights are not rewritten.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from app.images import image_files

DEFAULT_RHOS = (0.0, 0.3, 0.6, 0.9, 1.0)
DEFAULT_STEPS = (1, 2, 3, 4, 6, 8)
DEFAULT_NOISE_SCALES = (0.0, 0.5, 0.8, 1.0)
PSNR_BELOW_RHO = 0.5  # ρ below this is tuned for PSNR, from it on for LPIPS
NEAR = {"psnr": 0.02, "lpips": 0.002}  # closer to the best than this is not worth another decode step


@dataclass(frozen=True)
class Setting:
    scheduler: str  # "any" for one step: every family decodes it alike
    spacing: str
    steps: int
    noise_scale: float

    @property
    def label(self) -> str:
        return f"{self.scheduler}/{self.spacing} K={self.steps} γ={self.noise_scale:g}"

    def in_family(self, scheduler: str, spacing: str) -> bool:
        return self.scheduler == "any" or (self.scheduler, self.spacing) == (scheduler, spacing)


def grid(steps, noise_scales, schedulers, spacings, max_steps: int) -> list[Setting]:
    """The sweep. One-step settings once (as ``any``/trailing: linspace puts a lone step at t = 0); K above
    ``max_steps`` cannot be picked, so only the first family measures them, to show the trend."""
    out = [Setting("any", "trailing", 1, g) for g in noise_scales] if 1 in steps else []
    for sched, spacing, k, g in itertools.product(schedulers, spacings, sorted(set(steps) - {1}), noise_scales):
        if k <= max_steps or (sched, spacing) == (schedulers[0], spacings[0]):
            out.append(Setting(sched, spacing, k, g))
    return out


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def centre_crops(paths, size: int) -> dict:
    """name → RGB crop of ``size``² from the centre (photos smaller than that are skipped)."""
    from app.images import load_image

    crops = {}
    for p in paths:
        img = load_image(p)
        if min(img.size) < size:
            _log(f"skipping {p.name}: smaller than {size} px")
            continue
        left, top = (img.width - size) // 2, (img.height - size) // 2
        crops[p.name] = img.crop((left, top, left + size, top + size))
    return crops


def _mean(values):
    """The mean, or None if a value is None (DISTS without the VGG16 weights)."""
    values = list(values)
    return None if any(v is None for v in values) else sum(values) / len(values)


def measure(pipe, crops: dict, levels, rhos, settings, seed: int, dists: bool = True) -> list[dict]:
    """One row per (setting, ρ, level): mean PSNR / LPIPS / DISTS over the crops and seconds per crop. DISTS, which
    the model is not trained on, is reported beside the LPIPS the choice uses, not chosen by (None with
    ``dists=False``, which saves a VGG16 pass per decode)."""
    import torch

    from app.bitstream import bits_per_pixel
    from app.metrics import dists_distance, lpips_distance, psnr
    from app.pipeline import make_scheduler, tensor_to_image

    originals = list(crops.values())
    schedulers = {}
    rows = []
    for level in levels:
        files = [pipe.compress(img, quality=level) for img in originals]
        decoded = [pipe.decode_content(data)[1:] for data in files]
        content = [torch.cat(f) for f in zip(*(c for c, _ in decoded))]
        x_base = torch.cat([b for _, b in decoded])
        bpp = sum(bits_per_pixel(d) for d in files) / len(files)
        for n, s in enumerate(settings):
            family = ("ddim" if s.scheduler == "any" else s.scheduler, s.spacing)
            pipe.scheduler = schedulers.setdefault(family, make_scheduler(*family))
            for rho in rhos:
                generator = torch.Generator().manual_seed(seed)  # the same noise for every setting
                t0 = time.perf_counter()
                x = pipe.denoise(content, x_base, rho, s.steps, s.noise_scale, generator)
                seconds = (time.perf_counter() - t0) / len(originals)
                recons = [tensor_to_image(x[i : i + 1]) for i in range(len(originals))]
                rows.append({
                    **asdict(s), "rho": rho, "level": level, "bpp": bpp, "seconds_per_crop": seconds,
                    "psnr": sum(psnr(a, b) for a, b in zip(originals, recons)) / len(originals),
                    "lpips": sum(lpips_distance(a, b) for a, b in zip(originals, recons)) / len(originals),
                    "dists": _mean(dists_distance(a, b) for a, b in zip(originals, recons)) if dists else None,
                })
            _log(f"level {level}: {n + 1}/{len(settings)} {s.label}")
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean over levels per (setting, ρ)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["scheduler"], r["spacing"], r["steps"], r["noise_scale"], r["rho"]), []).append(r)
    out = []
    for (sched, spacing, k, g, rho), group in groups.items():
        mean = {f: _mean(r.get(f) for r in group) for f in ("psnr", "lpips", "dists", "seconds_per_crop")}
        out.append({"scheduler": sched, "spacing": spacing, "steps": k, "noise_scale": g, "rho": rho, **mean})
    return out


def _setting_fields(row: dict) -> dict:
    return {k: row[k] for k in ("scheduler", "spacing", "steps", "noise_scale")}


def _score(row: dict) -> float:
    """Higher is better: PSNR for ρ < 0.5, −LPIPS from there on."""
    return row["psnr"] if row["rho"] < PSNR_BELOW_RHO else -row["lpips"]


def _near(rho: float) -> float:
    return NEAR["psnr"] if rho < PSNR_BELOW_RHO else NEAR["lpips"]


def choose(summary: list[dict], max_steps: int, current_family: tuple[str, str]) -> dict:
    """The scheduler family and per-ρ (K, γ): see the module docstring."""
    allowed = [r for r in summary if r["steps"] <= max_steps]
    rhos = sorted({r["rho"] for r in allowed})
    families = sorted({(r["scheduler"], r["spacing"]) for r in allowed if r["scheduler"] != "any"}) or [current_family]

    def best(family, rho):
        rows = [r for r in allowed if r["rho"] == rho and Setting(**_setting_fields(r)).in_family(*family)]
        top = max(map(_score, rows))
        return min((r for r in rows if _score(r) >= top - _near(rho)), key=lambda r: (r["steps"], -_score(r)))

    overall = {rho: max(_score(r) for r in allowed if r["rho"] == rho) for rho in rhos}
    wins = {f: sum(_score(best(f, rho)) >= overall[rho] - _near(rho) for rho in rhos) for f in families}
    top = max(wins.values())
    family = current_family if wins.get(current_family) == top else next(f for f in families if wins[f] == top)
    picks = [best(family, rho) for rho in rhos]
    return {
        "scheduler": family[0], "timestep_spacing": family[1], "max_steps": max_steps,
        "decode_defaults": [{"rho": r["rho"], "num_inference_steps": r["steps"], "noise_scale": r["noise_scale"]}
                            for r in picks],
        "picked": picks,
    }


def markdown(summary: list[dict], choice: dict, top: int) -> str:
    """Per ρ: the picked setting, the untuned default and the ``top`` best settings."""
    from app.pipeline import UNTUNED_DECODE

    base = UNTUNED_DECODE[0]
    lines = []
    for rho in sorted({r["rho"] for r in summary}):
        rows = sorted((r for r in summary if r["rho"] == rho), key=_score, reverse=True)
        pick = next(p for p in choice["picked"] if p["rho"] == rho)
        untuned = [r for r in rows if r["scheduler"] in ("ddim", "any") and r["spacing"] == "trailing"
                   and r["steps"] == base["num_inference_steps"] and r["noise_scale"] == base["noise_scale"]]
        shown = rows[:top] + [r for r in [pick, *untuned] if r not in rows[:top]]
        metric = "PSNR" if rho < PSNR_BELOW_RHO else "LPIPS"
        lines += ["", f"ρ = {rho:g} (picked by {metric})", "",
                  "| scheduler | spacing | K | γ | PSNR | LPIPS | DISTS | s/crop | |", "|---|---|---|---|---|---|---|---|---|"]
        for r in shown:
            tag = "**picked**" if r is pick else ("untuned default" if r in untuned else "")
            dists = "–" if r.get("dists") is None else f"{r['dists']:.4f}"
            lines.append(f"| {r['scheduler']} | {r['spacing']} | {r['steps']} | {r['noise_scale']:g} | {r['psnr']:.2f} "
                         f"| {r['lpips']:.4f} | {dists} | {r['seconds_per_crop']:.3f} | {tag} |")
    return "\n".join(lines).lstrip()


def apply(checkpoint: Path, choice: dict) -> None:
    """Write the tuned defaults and scheduler into the pipeline folder (config files only)."""
    from app.pipeline import check_decode_defaults, make_scheduler

    scheduler = make_scheduler(choice["scheduler"], choice["timestep_spacing"])
    index_path = checkpoint / "model_index.json"
    index = json.loads(index_path.read_text())
    index.pop("_name_or_path", None)
    index["decode_defaults"] = check_decode_defaults(choice["decode_defaults"])
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    scheduler.save_pretrained(checkpoint / "scheduler")


def parse_args(argv=None) -> argparse.Namespace:
    from app.pipeline import SCHEDULERS, TIMESTEP_SPACINGS, UNTUNED_DECODE

    p = argparse.ArgumentParser(prog="python -m app.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="validation photos (never Kodak)")
    p.add_argument("--checkpoint", type=Path, help="pipeline folder (default: checkpoints/cdc)")
    p.add_argument("--out", type=Path, help="JSON file for every measurement and the choice")
    p.add_argument("--apply", action="store_true", help="write the chosen defaults into the checkpoint")
    p.add_argument("--rows-from", type=Path,
                   help="instead of --data: choose again from the measurements in an --out JSON of this checkpoint")
    p.add_argument("--limit", type=int, default=12, help="use the first N photos (default 12)")
    p.add_argument("--crop", type=int, default=256, help="centre crop side in pixels, a multiple of 64")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4])
    p.add_argument("--rhos", type=float, nargs="+", default=list(DEFAULT_RHOS))
    p.add_argument("--steps", type=int, nargs="+", default=list(DEFAULT_STEPS))
    p.add_argument("--noise-scales", type=float, nargs="+", default=list(DEFAULT_NOISE_SCALES))
    p.add_argument("--schedulers", nargs="+", default=list(SCHEDULERS), choices=SCHEDULERS)
    p.add_argument("--spacings", nargs="+", default=list(TIMESTEP_SPACINGS), choices=TIMESTEP_SPACINGS)
    p.add_argument("--max-steps", type=int, default=UNTUNED_DECODE[0]["num_inference_steps"],
                   help="only settings with at most this many steps can be picked (default: the untuned K)")
    p.add_argument("--top", type=int, default=5, help="settings shown per ρ")
    p.add_argument("--no-dists", action="store_true", help="skip the DISTS column (a VGG16 pass per decode)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.limit < 1 or args.crop < 64 or args.crop % 64:
        p.error("--limit must be ≥ 1 and --crop a positive multiple of 64")
    if any(k < 1 for k in args.steps) or args.max_steps < 1:
        p.error("--steps and --max-steps must be ≥ 1")
    if not (args.data or args.rows_from):
        p.error("give --data (measure) or --rows-from (choose again)")
    if not min(args.steps) <= args.max_steps:
        p.error("no setting in --steps is within --max-steps")
    if any(not 0 <= g <= 1 for g in args.noise_scales):
        p.error("--noise-scales must lie in [0, 1]")
    if any(not 0 <= r <= 1 for r in args.rhos):
        p.error("--rhos must lie in [0, 1]")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from app.pipeline import DEFAULT_CHECKPOINT, CheckpointError, load_pipeline, scheduler_name

    checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    try:
        pipe = load_pipeline(checkpoint, device=args.device)
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    current = (scheduler_name(pipe.scheduler), pipe.scheduler.config.timestep_spacing)
    t0 = time.perf_counter()
    if args.rows_from:  # the same measurements, e.g. after a change of the choice rule
        saved = json.loads(args.rows_from.read_text())
        if saved["config"]["model_id"] != pipe.model_id.hex():
            raise SystemExit(f"error: {args.rows_from} measured model {saved['config']['model_id']}, not this checkpoint")
        config, rows, elapsed = saved["config"], saved["rows"], saved["elapsed_s"]
    else:
        bad = [lv for lv in args.levels if not 0 <= lv < pipe.num_quality_levels]
        if bad:
            raise SystemExit(f"error: levels {bad} out of range 0..{pipe.num_quality_levels - 1}")
        crops = centre_crops(image_files(args.data)[: args.limit], args.crop)
        if not crops:
            raise SystemExit(f"error: no image of at least {args.crop} px in {args.data}")
        pipe.set_progress_bar_config(disable=True)
        settings = grid(args.steps, args.noise_scales, args.schedulers, args.spacings, args.max_steps)
        _log(f"{len(settings)} settings × {len(args.rhos)} ρ × {len(args.levels)} levels on {len(crops)} crops")
        rows = measure(pipe, crops, args.levels, args.rhos, settings, args.seed, dists=not args.no_dists)
        config = ({k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
                  | {"checkpoint": str(checkpoint), "model_id": pipe.model_id.hex(), "images": list(crops)})
        elapsed = time.perf_counter() - t0
    summary = summarise(rows)
    choice = choose(summary, args.max_steps, current)
    result = {"config": config, "rows": rows, "summary": summary, "choice": choice, "elapsed_s": elapsed}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(markdown(summary, choice, args.top))
    print(f"\nchosen: {choice['scheduler']}/{choice['timestep_spacing']}, "
          + ", ".join(f"ρ={d['rho']:g}: K={d['num_inference_steps']} γ={d['noise_scale']:g}" for d in choice["decode_defaults"]))
    if args.apply:
        apply(Path(checkpoint), choice)
        _log(f"wrote the decode defaults into {checkpoint}")
    return result


if __name__ == "__main__":
    main()
