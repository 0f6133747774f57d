"""Rate-distortion evaluation of CDC against JPEG, WebP and AVIF.

    python -m app.evaluate --data DIR --out results/kodak.json [--plot results/kodak.png]

For every quality level and ρ, each image is compressed to a real ``.cdc`` file and decoded
(seeded, so reruns give the same numbers); the rate is 8 · file bytes / pixels. The classical
codecs are swept over ``app.classical.SWEEP_QUALITIES``. Comparisons:

* equal rate: each classical codec's per-image curve is interpolated (PCHIP in log-bpp, no
  extrapolation) at our per-image bpp, then averaged over the images where it reaches that rate;
* BD-rate (Bjøntegaard) of ours vs each codec on the mean curves, PCHIP of log-rate over the
  metric, for PSNR and for LPIPS (scored as −LPIPS so that higher is better); negative = we
  need fewer bits for the same quality.

Realism (issue #28; off with ``--no-realism``): DISTS and LPIPS-VGG of every CDC decode, and of
JPEG, WebP and AVIF at our size (per image and level, the largest file not above ours:
``matched``), with their BD-rates on those points; FID and KID per level over the 256² patches of
all images plus a grid shifted by half a patch (FID/256), for CDC at each ρ and for each codec at
our size, and the same between the patches of the odd and even originals (``realism_floor``: what
two halves of the same set score). ``--gallery DIR`` writes crops beside each other:
original | CDC per ρ | AVIF and JPEG at our size, at 2× zoom.

The JSON holds the config, machine, per-image rows, means and comparisons; stdout gets a
markdown table, progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from scipy.interpolate import PchipInterpolator

from app import classical
from app.images import image_files

METRICS = ("psnr", "ms_ssim", "lpips")
REALISM = ("dists", "lpips_vgg")  # per image, with the VGG16; FID and KID are per set
DEFAULT_RHOS = (0.0, 0.9)
GALLERY_IMAGES = ("kodim14.png", "kodim04.png", "kodim19.png")
# Published Kodak points (bpp, LPIPS-alex, DISTS), drawn on the plot as references.
ANCHORS = {
    "MS-ILLM (NeuralCompression results.csv)": [(0.081, 0.110, 0.109), (0.153, 0.073, 0.081), (0.296, 0.045, 0.062)],
    "HiFiC (DiffEIC results.xlsx)": [(0.079, 0.179, 0.153), (0.149, 0.093, 0.104)],
    "RDEIC, 2 steps (DiffEIC results.xlsx)": [(0.066, 0.123, 0.088), (0.121, 0.086, 0.061)],
}


# -- curve maths ---------------------------------------------------------------------------
def _increasing(rates, qualities) -> tuple[np.ndarray, np.ndarray]:
    """Points sorted by rate, keeping only those better than every cheaper one (the RD hull)."""
    pairs = sorted((r, q) for r, q in zip(rates, qualities) if r is not None and q is not None and r > 0)
    kept = []
    for r, q in pairs:
        if not kept or q > kept[-1][1]:
            kept.append((r, q))
    return np.array([p[0] for p in kept]), np.array([p[1] for p in kept])


def bd_rate(rate_ref, quality_ref, rate_test, quality_test) -> float | None:
    """Bjøntegaard delta rate of test vs ref in percent (negative: test needs fewer bits).

    ``quality`` must be higher-is-better (pass −LPIPS for LPIPS). PCHIP of log-rate over
    quality, averaged over the overlapping quality interval. None without 2 points per curve
    or without overlap.
    """
    r1, q1 = _increasing(rate_ref, quality_ref)
    r2, q2 = _increasing(rate_test, quality_test)
    if len(q1) < 2 or len(q2) < 2:
        return None
    lo, hi = max(q1[0], q2[0]), min(q1[-1], q2[-1])
    if hi <= lo:
        return None
    mean_diff = (PchipInterpolator(q2, np.log(r2)).integrate(lo, hi)
                 - PchipInterpolator(q1, np.log(r1)).integrate(lo, hi)) / (hi - lo)
    return 100.0 * math.expm1(mean_diff)


def value_at_rate(bpps, values, bpp: float) -> float | None:
    """PCHIP of ``values`` over log-bpp at ``bpp``; None outside the curve's rate range."""
    points = sorted({b: v for b, v in zip(bpps, values) if v is not None and b > 0}.items())
    if len(points) < 2 or not points[0][0] <= bpp <= points[-1][0]:
        return None
    b, v = zip(*points)
    return float(PchipInterpolator(np.log(b), v)(np.log(bpp)))


# -- running --------------------------------------------------------------------------------
def list_images(data: Path, limit: int | None) -> list[Path]:
    paths = image_files(data)
    return paths[:limit] if limit else paths


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def decode_plan(pipe, rhos, steps: int | None, noise_scale: float | None) -> dict:
    """ρ → (K, γ): the pipeline's tuned values where ``steps`` / ``noise_scale`` are None."""
    plan = {}
    for rho in rhos:
        k, g = pipe.decode_settings(rho)
        plan[rho] = (steps or k, g if noise_scale is None else noise_scale)
    return plan


class Sets:
    """Inception features of the patches of each decoded set, per (codec, level, ρ), for FID/KID."""

    def __init__(self, images: dict, device: str, patch: int):
        from app.metrics import PatchFID

        self.fid = PatchFID([], device=device, patch=patch)
        self.real = {name: self.fid.features([img]) for name, img in images.items()}
        self.fake: dict[tuple, dict] = {}

    def add(self, key: tuple, name: str, image) -> None:
        self.fake.setdefault(key, {})[name] = self.fid.features([image])

    def scores(self, key: tuple, resamples: int = 50) -> dict:
        """FID/KID of one set against the originals of the same images; ``fid_std``: FID's std over
        ``resamples`` bootstrap draws of the images (paired, seeded)."""
        import torch

        from app.metrics import frechet_distance

        names = sorted(self.fake[key])

        def stacked(ns):  # (real, fake) features of the images ns
            return tuple(torch.cat([d[n] for n in ns]) for d in (self.real, self.fake[key]))

        scores = {**self.fid.fid_kid(*reversed(stacked(names))), "n": len(names), "fid_std": None}
        if scores["fid"] is not None and len(names) > 1:
            g = torch.Generator().manual_seed(0)
            draws = [[names[i] for i in torch.randint(len(names), (len(names),), generator=g)] for _ in range(resamples)]
            scores["fid_std"] = float(np.std([frechet_distance(*stacked(ns)) for ns in draws]))
        return scores

    def floor(self) -> dict:
        """FID/KID between the patches of the odd and the even originals: the scores of two halves of one set."""
        import torch

        names = sorted(self.real)
        halves = [torch.cat([self.real[n] for n in names[i::2]] or [self.fid.features([])]) for i in (0, 1)]
        return {**self.fid.fid_kid(halves[0], halves[1]), "n": len(names)}


def evaluate_ours(pipe, images: dict, levels, plan: dict, seed: int, sets: Sets | None = None) -> list[dict]:
    """One row per (image, level, ρ) with the real file's rate, metrics and timings; ``plan``: ρ → (K, γ).

    With ``sets``: DISTS and LPIPS-VGG too, and each decode's patch features for FID/KID."""
    import torch

    from app.bitstream import bits_per_pixel
    from app.metrics import image_metrics

    realism = sets is not None
    rows = []
    for i, (name, img) in enumerate(images.items()):
        for level in levels:
            t0 = time.perf_counter()
            data = pipe.compress(img, quality=level)
            encode_s = time.perf_counter() - t0
            for rho, (steps, noise_scale) in plan.items():
                generator = torch.Generator().manual_seed(seed)  # CPU noise: same on any device
                t0 = time.perf_counter()
                out = pipe.decompress(data, steps, rho, generator, noise_scale, progress=False)
                decode_s = time.perf_counter() - t0
                rows.append({
                    "codec": "cdc", "image": name, "level": level, "rho": rho, "bytes": len(data),
                    "bpp": bits_per_pixel(data), **image_metrics(img, out, dists=realism, lpips_vgg=realism),
                    "encode_s": encode_s, "decode_s": decode_s,
                })
                if realism:
                    sets.add(("cdc", level, rho), name, out)
            _log(f"[cdc] {i + 1}/{len(images)} {name} level {level}: {rows[-1]['bpp']:.3f} bpp")
    return rows


def evaluate_classical(images: dict, codecs) -> list[dict]:
    """One row per (codec, image, quality) of ``classical.sweep``."""
    from app.metrics import image_metrics

    rows = []
    for codec in codecs:
        for i, (name, img) in enumerate(images.items()):
            for r in classical.sweep(img, codec):
                rows.append({
                    "codec": codec, "image": name, "quality": r.quality, "bytes": len(r.data), "bpp": r.bpp,
                    **image_metrics(img, r.image), "encode_s": r.encode_s, "decode_s": r.decode_s,
                })
            _log(f"[{codec}] {i + 1}/{len(images)} {name}")
    return rows


def evaluate_matched(images: dict, ours: list[dict], codecs, sets: Sets) -> list[dict]:
    """Per (codec, image, level): the codec's largest file not above ours, with every metric (none
    where the codec cannot go that small); its patch features go to ``sets``."""
    from app.metrics import image_metrics

    budgets = {(r["image"], r["level"]): r["bytes"] for r in ours}
    rows = []
    for codec in codecs:
        for (name, level), max_bytes in budgets.items():
            r = classical.encode_at_most(images[name], codec, max_bytes)
            if r is None:
                continue
            rows.append({"codec": codec, "image": name, "level": level, "quality": r.quality, "bytes": len(r.data),
                         "bpp": r.bpp, **image_metrics(images[name], r.image, dists=True, lpips_vgg=True)})
            sets.add((codec, level, None), name, r.image)
        _log(f"[{codec}] at our size: {sum(r['codec'] == codec for r in rows)} of {len(budgets)} files")
    return rows


# -- summaries ------------------------------------------------------------------------------
def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _setting(row: dict) -> tuple:
    return (row["codec"], row.get("level"), row.get("rho"), row.get("quality"))


def summarise(rows: list[dict]) -> list[dict]:
    """Mean of every numeric field per codec setting (level and ρ, or quality)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(_setting(row), []).append(row)
    means = []
    for (codec, level, rho, quality), group in groups.items():
        setting = {"codec": codec, **({"level": level, "rho": rho} if codec == "cdc" else {"quality": quality})}
        fields = ("bytes", "bpp", *METRICS, *(f for f in REALISM if f in group[0]), "encode_s", "decode_s")
        means.append({**setting, "n": len(group), **{f: _mean(r[f] for r in group) for f in fields}})
    return means


def summarise_matched(rows: list[dict]) -> list[dict]:
    """Means per (codec, level) of the files at our size; ``n``: the images the codec could go that small on."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["codec"], row["level"]), []).append(row)
    return [{"codec": c, "level": lv, "n": len(g), **{f: _mean(r[f] for r in g) for f in ("bpp", *METRICS, *REALISM)}}
            for (c, lv), g in groups.items()]


def realism_scores(sets: Sets) -> list[dict]:
    """FID/KID per (codec, level, ρ) set, against the originals of the same images."""
    out = []
    for key in sets.fake:
        codec, level, rho = key
        out.append({"codec": codec, "level": level, "rho": rho, **sets.scores(key)})
        _log(f"[fid] {codec} level {level}" + ("" if rho is None else f" ρ {rho:g}") + f": FID {_fmt(out[-1]['fid'], 1)}")
    return out


def bd_rates_realism(means: list[dict], matched: list[dict], codecs) -> list[dict]:
    """BD-rate (%) of ours per ρ vs each codec's files at our size, for DISTS and LPIPS-VGG (both scored as −value)."""
    out = []
    for rho in sorted({m["rho"] for m in means if m["codec"] == "cdc"}):
        ours = [m for m in means if m["codec"] == "cdc" and m["rho"] == rho]
        for codec in codecs:
            ref = [m for m in matched if m["codec"] == codec]
            entry = {"rho": rho, "codec": codec}
            for metric in REALISM:
                entry[metric] = bd_rate([m["bpp"] for m in ref], [None if m[metric] is None else -m[metric] for m in ref],
                                        [m["bpp"] for m in ours], [None if m.get(metric) is None else -m[metric] for m in ours])
            out.append(entry)
    return out


def equal_rate(rows: list[dict], codecs) -> list[dict]:
    """Per (level, ρ): our means and each codec's PSNR/LPIPS interpolated at our per-image bpp.

    A codec's ``n`` counts the images where it reaches our rate; ``ours_*`` are our means over
    those same images, so each pair is compared on equal footing.
    """
    curves: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["codec"] != "cdc":
            curves.setdefault((row["codec"], row["image"]), []).append(row)
    out = []
    for mean in (m for m in summarise(rows) if m["codec"] == "cdc"):
        ours = [r for r in rows if _setting(r) == _setting(mean)]
        entry = {k: mean[k] for k in ("level", "rho", "n", "bpp", *METRICS)}
        for codec in codecs:
            cmp = {"n": 0}
            for metric in ("psnr", "lpips"):
                pairs = []
                for r in ours:
                    curve = curves.get((codec, r["image"]), [])
                    theirs = value_at_rate([c["bpp"] for c in curve], [c[metric] for c in curve], r["bpp"])
                    if theirs is not None and r[metric] is not None:
                        pairs.append((r[metric], theirs))
                cmp["n"] = max(cmp["n"], len(pairs))
                cmp[metric] = _mean(p[1] for p in pairs)
                cmp[f"ours_{metric}"] = _mean(p[0] for p in pairs)
            entry[codec] = cmp
        out.append(entry)
    return out


def bd_rates(means: list[dict], codecs) -> list[dict]:
    """BD-rate (%) of ours per ρ vs each codec, on mean curves, for PSNR and LPIPS."""
    out = []
    for rho in sorted({m["rho"] for m in means if m["codec"] == "cdc"}):
        ours = sorted((m for m in means if m["codec"] == "cdc" and m["rho"] == rho), key=lambda m: m["level"])
        for codec in codecs:
            ref = [m for m in means if m["codec"] == codec]
            entry = {"rho": rho, "codec": codec}
            for metric, sign in (("psnr", 1), ("lpips", -1)):
                ref_q, ours_q = ([None if m[metric] is None else sign * m[metric] for m in ms] for ms in (ref, ours))
                entry[metric] = bd_rate([m["bpp"] for m in ref], ref_q, [m["bpp"] for m in ours], ours_q)
            out.append(entry)
    return out


def _quality(value: float) -> int | float:
    """A quality as the file stores it: whole levels as int, else to 1/100 of a level."""
    value = round(float(value), 2)
    return int(value) if value.is_integer() else value


def continuity(means: list[dict]) -> list[dict]:
    """Per ρ: are bpp and PSNR monotone in the quality, and the BD-rate (PSNR, LPIPS) of the fractional
    qualities' curve against the whole levels' (≈ 0 when interpolated points lie on the levels' curve)."""
    out = []
    for rho in sorted({m["rho"] for m in means if m["codec"] == "cdc"}):
        ms = sorted((m for m in means if m["codec"] == "cdc" and m["rho"] == rho), key=lambda m: m["level"])
        whole = [m for m in ms if float(m["level"]).is_integer()]
        fractional = [m for m in ms if not float(m["level"]).is_integer()]
        entry = {"rho": rho, "bpp_monotone": all(a["bpp"] < b["bpp"] for a, b in zip(ms, ms[1:])),
                 "psnr_monotone": all(a["psnr"] <= b["psnr"] for a, b in zip(ms, ms[1:]))}
        for metric, sign in (("psnr", 1), ("lpips", -1)):
            entry[f"bd_rate_fractional_vs_levels_{metric}"] = bd_rate(
                [m["bpp"] for m in whole], [None if m[metric] is None else sign * m[metric] for m in whole],
                [m["bpp"] for m in fractional], [None if m[metric] is None else sign * m[metric] for m in fractional])
        out.append(entry)
    return out


# -- output ---------------------------------------------------------------------------------
def _fmt(value, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _name(codec: str) -> str:
    return {"webp": "WebP"}.get(codec, codec.upper())


def _bd_table(rates: list[dict], codecs, keys, label: str) -> list[str]:
    """Markdown rows: per ρ, the BD-rate of ours vs each codec on ``keys``."""
    heads = " | ".join(f"BD-rate vs {_name(c)} ({label})" for c in codecs)
    lines = ["", f"| ρ | {heads} |", "|---|" + "---|" * len(codecs)]
    for rho in sorted({b["rho"] for b in rates}):
        cells = []
        for c in codecs:
            b = next(b for b in rates if b["rho"] == rho and b["codec"] == c)
            cells.append(" / ".join("–" if b[k] is None else f"{b[k]:+.1f}%" for k in keys))
        lines.append(f"| {rho:g} | " + " | ".join(cells) + " |")
    return lines


def markdown(result: dict) -> str:
    """The README table: our operating points, the codecs at equal rate, and BD-rates."""
    codecs = result["config"]["codecs"]
    names = " / ".join(_name(c) for c in codecs)
    means = {(m["level"], m["rho"]): m for m in result["means"] if m["codec"] == "cdc"}
    head = "| level | ρ | bpp | PSNR | MS-SSIM | LPIPS | enc s | dec s |"
    if codecs:
        head += f" PSNR {names} at our bpp | LPIPS {names} at our bpp |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    partial = False
    for e in result["equal_rate"]:
        m = means[(e["level"], e["rho"])]
        line = (f"| {e['level']} | {e['rho']:g} | {_fmt(e['bpp'], 3)} | {_fmt(e['psnr'], 2)} | {_fmt(e['ms_ssim'], 4)} "
                f"| {_fmt(e['lpips'], 3)} | {_fmt(m['encode_s'], 2)} | {_fmt(m['decode_s'], 2)} |")
        if codecs:
            cells = {}
            for metric, digits in (("psnr", 2), ("lpips", 3)):
                parts = []
                for c in codecs:
                    star = "*" if 0 < e[c]["n"] < e["n"] else ""
                    partial |= bool(star)
                    parts.append(_fmt(e[c][metric], digits) + star)
                cells[metric] = " / ".join(parts)
            line += f" {cells['psnr']} | {cells['lpips']} |"
        lines.append(line)
    if codecs:
        lines.append("\nClassical codecs interpolated at our per-image bpp (– where a codec cannot reach that rate"
                     + ("; \\* only over the images where it can, see `n` in the JSON" if partial else "") + ").")
    if result["bd_rate"]:
        lines += _bd_table(result["bd_rate"], codecs, ("psnr", "lpips"), "PSNR / LPIPS")
        lines.append("\nBD-rate: bits we need vs the codec at equal PSNR or LPIPS on the mean curves (negative = we need"
                     " fewer; – where the curves do not overlap).")
    if result.get("realism") is not None:
        lines += ["", realism_markdown(result)]
    fractional = [c for c in result.get("continuous", []) if c["bd_rate_fractional_vs_levels_psnr"] is not None]
    if fractional:
        lines += ["", "| ρ | bpp monotone in quality | PSNR monotone | BD-rate of fractional qualities vs levels "
                  "(PSNR / LPIPS) |", "|---|---|---|---|"]
        for c in fractional:
            rates = " / ".join("–" if c[f"bd_rate_fractional_vs_levels_{k}"] is None
                               else f"{c[f'bd_rate_fractional_vs_levels_{k}']:+.1f}%" for k in ("psnr", "lpips"))
            lines.append(f"| {c['rho']:g} | {'yes' if c['bpp_monotone'] else 'no'} | "
                         f"{'yes' if c['psnr_monotone'] else 'no'} | {rates} |")
    return "\n".join(lines)


def realism_markdown(result: dict) -> str:
    """The realism table: DISTS, LPIPS-VGG, FID and KID of ours and of the codecs at our size, and their BD-rates."""
    codecs = result["config"]["codecs"]
    names = " / ".join(_name(c) for c in codecs)
    sets = {(r["codec"], r["level"], r["rho"]): r for r in result["realism"]}
    matched = {(m["codec"], m["level"]): m for m in result["matched"]}
    columns = (("dists", "DISTS", 3), ("lpips_vgg", "LPIPS-VGG", 3), ("fid", "FID", 1), ("kid", "KID×10³", 1))
    head = "| level | ρ | bpp | " + " | ".join(c[1] for c in columns) + " |"
    if codecs:
        head += "".join(f" {label} {names} at our size |" for _, label, _ in columns)
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    num = result["config"]["num_images"]
    partial = False

    def value(entry, metric, digits):
        if entry is None or entry.get(metric) is None:
            return "–"
        return _fmt(entry[metric] * (1000 if metric == "kid" else 1), digits)

    for m in sorted((m for m in result["means"] if m["codec"] == "cdc"), key=lambda m: (m["level"], m["rho"])):
        ours = {**m, **{k: sets.get(("cdc", m["level"], m["rho"]), {}).get(k) for k in ("fid", "kid")}}
        line = f"| {m['level']} | {m['rho']:g} | {_fmt(m['bpp'], 3)} | " + " | ".join(
            value(ours, k, d) for k, _, d in columns) + " |"
        for metric, _, digits in columns if codecs else ():
            parts = []
            for c in codecs:
                entry = matched.get((c, m["level"]))
                if metric in ("fid", "kid"):
                    entry = sets.get((c, m["level"], None))
                star = "*" if entry is not None and entry["n"] < num else ""
                partial |= bool(star)
                parts.append(value(entry, metric, digits) + star)
            line += " " + " / ".join(parts) + " |"
        lines.append(line)
    floor = result["realism_floor"]
    patches = next((r["patches"] for r in result["realism"] if r["codec"] == "cdc"), None)
    fid_std = _mean(r.get("fid_std") for r in result["realism"])
    lines.append(f"\nCodecs at our size: per image, the largest file not above ours (– where none is that small"
                 + ("; \\* over the images where one is, see `n` in the JSON" if partial else "")
                 + f"). FID and KID over {patches} patches of {result['config']['fid_patch']}² (a grid and a grid "
                 f"shifted by half a patch) against the same images' originals; FID's bootstrap std over the images "
                 f"is {_fmt(fid_std, 1)} on average. The odd originals against the even ones score FID "
                 f"{_fmt(floor['fid'], 1)}, KID×10³ {value(floor, 'kid', 1)} (± {_fmt((floor['kid_std'] or 0) * 1000, 1)}): "
                 "at this count FID carries a large small-sample bias, KID (unbiased) does not.")
    if result["bd_rate_realism"]:
        lines += _bd_table(result["bd_rate_realism"], codecs, REALISM, "DISTS / LPIPS-VGG")
        lines.append("\nBD-rate against the codecs' files at our size (their mean bpp per level).")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """bpp vs PSNR and LPIPS-alex for every codec's sweep and ours per ρ; with realism also LPIPS-VGG,
    DISTS, FID and KID (codecs at our size), and the published anchors on LPIPS-alex and DISTS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means, codecs = result["means"], result["config"]["codecs"]
    realism = result.get("realism") is not None
    ours_max = max((m["bpp"] for m in means if m["codec"] == "cdc"), default=1.0)
    xmax = max(1.0, 1.25 * ours_max)
    rhos = sorted({m["rho"] for m in means if m["codec"] == "cdc"})
    cdc = {rho: sorted((m for m in means if m["codec"] == "cdc" and m["rho"] == rho), key=lambda m: m["level"])
           for rho in rhos}
    panels = [("psnr", "PSNR (dB) ↑"), ("lpips", "LPIPS-alex ↓")]
    if realism:
        panels += [("lpips_vgg", "LPIPS-VGG ↓"), ("dists", "DISTS ↓"), ("fid", "FID/256 ↓"), ("kid", "KID/256 ↓")]
        sets = {(r["codec"], r["level"], r["rho"]): r for r in result["realism"]}
        bpp = {(m["codec"], m["level"]): m["bpp"] for m in result["matched"]}
        bpp.update({("cdc", m["level"]): m["bpp"] for ms in cdc.values() for m in ms})
    fig, axes = plt.subplots(len(panels) // 2, 2, figsize=(11, 4.2 * len(panels) // 2), squeeze=False)
    for ax, (metric, label) in zip(axes.flat, panels):
        series = []
        for c in codecs:
            if metric in ("psnr", "lpips"):
                ms = [m for m in means if m["codec"] == c]
            elif metric in REALISM:
                ms = [m for m in result["matched"] if m["codec"] == c]
            else:
                ms = [{"bpp": bpp[(c, r["level"])], metric: r[metric]} for k, r in sets.items()
                      if k[0] == c and (c, r["level"]) in bpp]
            series.append((_name(c), ms, "--"))
        for rho in rhos:
            ms = cdc[rho] if metric not in ("fid", "kid") else [
                {"bpp": m["bpp"], metric: sets.get(("cdc", m["level"], rho), {}).get(metric)} for m in cdc[rho]]
            series.append((f"CDC ρ={rho:g}", ms, "-"))
        for name, ms, style in series:
            pts = sorted((m["bpp"], m[metric]) for m in ms if m.get(metric) is not None and m["bpp"] <= xmax)
            if pts:
                ax.plot(*zip(*pts), style, marker="o", ms=3, label=name)
        if metric in ("lpips", "dists"):
            for (source, points), marker in zip(ANCHORS.items(), "s^D"):
                column = 1 if metric == "lpips" else 2
                ax.scatter([p[0] for p in points], [p[column] for p in points], marker=marker, color="k",
                           facecolors="none", zorder=3, label=source)
            ax.legend(fontsize=7)
        ax.set(xlabel="bits per pixel", ylabel=label, xlim=(0, xmax))
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{result['config']['data_name']}: {result['config']['num_images']} images, "
                 + ", ".join(f"ρ={d['rho']:g}: K={d['steps']}, γ={d['noise_scale']:g}" for d in result["config"]["decode"])
                 + ("; codecs at our size in the realism panels" if realism else ""))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- gallery --------------------------------------------------------------------------------
GALLERY_CROPS = {  # (left, top, right, bottom): faces and lettering, a face, a fence and a lighthouse
    "kodim14.png": (440, 250, 640, 430), "kodim04.png": (130, 300, 330, 480), "kodim19.png": (200, 330, 400, 510),
}


def _crop_box(name: str, img, size=(200, 180)) -> tuple:
    if name in GALLERY_CROPS:
        return GALLERY_CROPS[name]
    w, h = min(size[0], img.width), min(size[1], img.height)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    return left, top, left + w, top + h


def gallery(pipe, paths, levels, plan: dict, seed: int, out: Path, zoom: int = 2) -> list[Path]:
    """Per image and level, a PNG strip of the same crop at ``zoom``× (nearest): original | CDC at each ρ |
    AVIF and JPEG at our size (largest file not above ours), each labelled with its bpp, DISTS and LPIPS."""
    import torch
    from PIL import Image, ImageDraw, ImageFont

    from app.bitstream import bits_per_pixel
    from app.images import load_image
    from app.metrics import dists_distance, lpips_distance

    from matplotlib import font_manager

    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), 15)  # has ρ; Pillow's default font does not
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        img = load_image(path)
        box = _crop_box(path.name, img)
        for level in levels:
            data = pipe.compress(img, quality=level)
            panels = [("original", img)]
            for rho, (steps, noise_scale) in plan.items():
                decoded = pipe.decompress(data, steps, rho, torch.Generator().manual_seed(seed), noise_scale, progress=False)
                panels.append((f"CDC ρ={rho:g} {bits_per_pixel(data):.3f} bpp", decoded))
            for codec in ("avif", "jpeg"):
                r = classical.encode_at_most(img, codec, len(data))
                if r is not None:
                    panels.append((f"{_name(codec)} q{r.quality} {r.bpp:.3f} bpp", r.image))
            cw, ch = (box[2] - box[0]) * zoom, (box[3] - box[1]) * zoom
            strip = Image.new("RGB", (cw * len(panels), ch + 40), "white")
            draw = ImageDraw.Draw(strip)
            for i, (label, image) in enumerate(panels):
                strip.paste(image.crop(box).resize((cw, ch), Image.NEAREST), (i * cw, 40))
                if image is not img:
                    label += f"\nDISTS {_fmt(dists_distance(img, image), 3)} · LPIPS {_fmt(lpips_distance(img, image), 3)}"
                draw.multiline_text((i * cw + 6, 2), label, fill="black", font=font, spacing=2)
            target = out / f"{path.stem}-level{_quality(level)}.png"
            strip.save(target)
            written.append(target)
            _log(f"[gallery] {target}")
    return written


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    """Platform, CPU, torch version and threads, and the GPU's name on CUDA."""
    import torch

    info = {
        "platform": platform.platform(), "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _finite(obj):
    """JSON-safe: non-finite floats become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m app.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="folder of images (e.g. Kodak)")
    p.add_argument("--out", type=Path, help="JSON file to write (required unless only --gallery is wanted)")
    p.add_argument("--checkpoint", help="pipeline folder (default: the default checkpoint)")
    p.add_argument("--levels", type=float, nargs="+", help="qualities, fractions allowed (default: the whole levels)")
    p.add_argument("--sweep", type=int, help="instead of --levels: this many qualities evenly over [0, Q-1]")
    p.add_argument("--rhos", type=float, nargs="+", default=list(DEFAULT_RHOS), help="perceptual weights ρ")
    p.add_argument("--steps", type=int, help="decoding steps (default: the pipeline's tuned value per ρ)")
    p.add_argument("--noise-scale", type=float, help="initial noise scale γ (default: the pipeline's tuned value per ρ)")
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--codecs", nargs="*", default=list(classical.CODECS), choices=classical.CODECS,
                   help="classical codecs to compare with (none: skip)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of every decode")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--plot", type=Path, help="PNG file for the rate-distortion plot")
    p.add_argument("--no-realism", action="store_true",
                   help="PSNR, MS-SSIM and LPIPS-alex only: no DISTS, LPIPS-VGG, FID or KID (much faster)")
    p.add_argument("--fid-patch", type=int, default=256, help="patch side for FID/KID (default 256: FID/256)")
    p.add_argument("--gallery", type=Path, help="folder for crops of a few images at two levels, side by side")
    p.add_argument("--gallery-images", nargs="+", default=list(GALLERY_IMAGES), help="file names in --data")
    p.add_argument("--gallery-levels", type=float, nargs="+", default=[1, 3], help="qualities of the gallery")
    args = p.parse_args(argv)
    if args.out is None and args.gallery is None:
        p.error("give --out (evaluation) and/or --gallery")
    if args.fid_patch < 8:
        p.error("--fid-patch must be at least 8")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    if args.sweep is not None and (args.sweep < 2 or args.levels):
        p.error("--sweep needs at least 2 points and replaces --levels")
    if args.noise_scale is not None and not 0 <= args.noise_scale <= 1:
        p.error("--noise-scale must lie in [0, 1]")
    if any(not 0 <= r <= 1 for r in args.rhos):
        p.error("--rhos must lie in [0, 1]")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    paths = list_images(args.data, args.limit)
    from app.images import ImageError, load_image
    from app.pipeline import CheckpointError, load_pipeline

    try:
        pipe = load_pipeline(args.checkpoint, device=args.device)
    except (CheckpointError, ValueError) as e:  # ValueError: --device cuda without CUDA
        raise SystemExit(f"error: {e}") from None
    top = pipe.num_quality_levels - 1
    if args.sweep:
        levels = [_quality(v) for v in np.linspace(0, top, args.sweep)]
    else:
        levels = list(range(top + 1)) if args.levels is None else [_quality(v) for v in args.levels]
    bad = [lv for lv in [*levels, *args.gallery_levels] if not 0 <= lv <= top]
    if bad:
        raise SystemExit(f"error: levels {bad} out of range 0..{top}")
    plan = decode_plan(pipe, args.rhos, args.steps, args.noise_scale)
    result = {}
    if args.out is not None:
        try:
            images = {p.name: load_image(p) for p in paths}
        except ImageError as e:
            raise SystemExit(f"error: {e}") from None
        result = run(args, pipe, images, levels, plan)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
        if args.plot:
            plot(result, args.plot)
        print(markdown(result))
        _log(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else "") + f" in {result['elapsed_s']:.0f} s")
    if args.gallery is not None:
        names = [args.data / n for n in args.gallery_images if (args.data / n).is_file()]
        if not names:
            raise SystemExit(f"error: none of {args.gallery_images} in {args.data}")
        gallery(pipe, names, [_quality(v) for v in args.gallery_levels], plan, args.seed, args.gallery)
    return result


def run(args, pipe, images: dict, levels, plan: dict) -> dict:
    """The evaluation of ``main``: rows, means, comparisons, realism and timings, JSON-safe."""
    from app.pipeline import DEFAULT_CHECKPOINT

    t0 = time.perf_counter()
    phases = {}
    sets = None if args.no_realism else Sets(images, args.device, args.fid_patch)
    rows = evaluate_ours(pipe, images, levels, plan, args.seed, sets)
    phases["cdc_s"] = time.perf_counter() - t0
    rows += evaluate_classical(images, args.codecs)
    phases["classical_sweep_s"] = time.perf_counter() - t0 - sum(phases.values())
    means = summarise(rows)
    result = {
        "config": {
            "data": str(args.data), "data_name": args.data.name, "num_images": len(images),
            "checkpoint": str(args.checkpoint or DEFAULT_CHECKPOINT), "model_id": pipe.model_id.hex(), "levels": levels, "rhos": args.rhos, "seed": args.seed,
            "decode": [{"rho": r, "steps": k, "noise_scale": g} for r, (k, g) in plan.items()],
            "synthesis": pipe.synthesis_name(),
            "codecs": args.codecs, "qualities": {c: list(classical.SWEEP_QUALITIES[c]) for c in args.codecs},
            "fid_patch": args.fid_patch,
        },
        "machine": machine_info(args.device),
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "images": [{"name": n, "width": im.width, "height": im.height} for n, im in images.items()],
        "rows": rows,
        "means": means,
        "equal_rate": equal_rate(rows, args.codecs),
        "bd_rate": bd_rates(means, args.codecs),
        "continuous": continuity(means),
    }
    if sets is not None:
        first = [r for r in rows if r["codec"] == "cdc" and r["rho"] == args.rhos[0]]  # one file per (image, level)
        result["matched_rows"] = evaluate_matched(images, first, args.codecs, sets)
        result["matched"] = summarise_matched(result["matched_rows"])
        phases["matched_s"] = time.perf_counter() - t0 - sum(phases.values())
        result["realism"] = realism_scores(sets)
        result["realism_floor"] = sets.floor()
        result["bd_rate_realism"] = bd_rates_realism(means, result["matched"], args.codecs)
        phases["fid_kid_s"] = time.perf_counter() - t0 - sum(phases.values())
    result["elapsed_s"] = time.perf_counter() - t0
    result["phases_s"] = phases
    return _finite(result)


if __name__ == "__main__":
    main()
