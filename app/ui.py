"""The Gradio page: compress an image and compare it, side by side, with the original or a classical codec at
the same size; decode the one file at several ρ; plot this image's rate–distortion curves; decompress a ``.cdc``.

Handlers are module-level functions taking the pipeline as first argument, so tests can call them without a
browser; :func:`build_demo` binds them to one loaded pipeline (under ``@spaces.GPU`` on a ZeroGPU Space).
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import shutil
import tempfile
import time
from collections import deque
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from matplotlib.figure import Figure

from app import classical, metrics
from app.bitstream import BitstreamError, bits_per_pixel, unpack
from app.images import ImageError, load_image

MAX_SIDE = 1792  # the page's compress takes about 30 s at 1792² on a 2-core CPU, 38 s at 2048² (README, demo_timings)
MAX_PIXELS = MAX_SIDE * MAX_SIDE  # lower than the CLI's limit: the Space decodes on a CPU
MAX_STEPS = 20
MAX_SAMPLES = 4
MAX_SEED = 2**32 - 1
MAX_TARGET_KB = 50_000  # the upload limit is 50 MB
QUEUE_SIZE = 8
MAX_SESSIONS = 16  # visitors whose state the server keeps (the oldest goes first): at most 5 images each
STATE_TTL_S = 900  # a visitor's compress() result expires after this
START_RHO = 0.9
ASSETS = Path(__file__).resolve().parent.parent / "assets"
EXAMPLES = sorted(p for p in ASSETS.iterdir() if p.suffix in (".jpg", ".png"))
CODEC_NAMES = {"jpeg": "JPEG", "webp": "WebP", "avif": "AVIF"}
SIDES = ("Original", "CDC", *CODEC_NAMES.values())  # what each side of the comparison slider can show
START_PAIR = ("AVIF", "CDC")  # the visitor's question: better than AVIF at the same size?
STRIP_RHOS = (0.0, 0.5, 0.9)  # the ρ strip: one file, several reconstructions
PLOT_RHOS = (0.0, 0.9)  # the CDC curves of the rate–distortion plot
DISTS_MAX_PIXELS = 768 * 512  # DISTS (a VGG16 pass per image) on larger uploads: both downscaled to Kodak's size


MATCHES = {"JPEG q75": ("jpeg", 75), "WebP q75": ("webp", 75), "AVIF q50": ("avif", 50)}  # our file at their size


def kodak_bpp(checkpoint=None) -> list[float]:
    """The mean Kodak bpp of each level from the checkpoint's ``quality_levels.json`` ([] without it)."""
    path = Path(checkpoint) / "quality_levels.json" if checkpoint is not None else None
    return json.loads(path.read_text())["bpp"] if path is not None and path.is_file() else []


def quality_label(levels_bpp: list[float], quality) -> str:
    """What a quality gives on Kodak, log-linear between the levels' bpp; "" without them."""
    if len(levels_bpp) < 2:
        return ""
    bpp = math.exp(np.interp(float(quality), range(len(levels_bpp)), np.log(levels_bpp)))
    return f"quality {float(quality):.2f} ≈ **{bpp:.3f} bpp** on Kodak ({bpp * 768 * 512 / 8 / 1000:.1f} KB at 768×512)"


_PLAIN = str.maketrans({"<": "‹", ">": "›", "&": "＆"})


def _error(message: str) -> gr.Error:
    """A plain-text error: the browser's toast renders HTML and API clients get the raw text, so the message
    holds no HTML-special characters (escaping them would show entities to API clients)."""
    return gr.Error(message.translate(_PLAIN), print_exception=False)


def on_gpu(fn):
    """``spaces.GPU(fn)`` on a ZeroGPU Space (``SPACES_ZERO_GPU`` set and the ``spaces`` package present), else ``fn``."""
    if not os.environ.get("SPACES_ZERO_GPU"):
        return fn
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


def _bind(handler, pipe):
    """``handler`` with the pipeline bound, as a plain function with the partial's signature (Gradio reads it)."""
    def bound(*args, **kwargs):
        return handler(pipe, *args, **kwargs)
    bound.__name__, bound.__doc__ = handler.__name__, handler.__doc__
    bound.__signature__ = inspect.signature(functools.partial(handler, pipe))
    return on_gpu(bound)


def _generator(seed) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(int(seed or 0))


def max_steps(pipe) -> int:
    """The steps slider's top: MAX_STEPS, or the tuned steps at the starting ρ if more."""
    return max(MAX_STEPS, tuned_settings(pipe, START_RHO)[0])


def _number(name: str, value, low: float, high: float, integer: bool = False):
    """``value`` within the page's bounds [low, high] (a whole number with ``integer``): API calls bypass the sliders."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if isinstance(value, bool) or not low <= number <= high or (integer and not number.is_integer()):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise _error(f"{name} must be {'a whole number' if integer else 'a number'} from {low} to {high}, "
                     f"got {shown}.")
    return int(number) if integer else number


def _decoding(pipe, rho, steps, noise_scale, seed) -> tuple[float, int, float, int]:
    """(ρ, steps, γ, seed) checked against the decoding controls' bounds; an empty seed is 0."""
    return (_number("ρ", rho, 0, 1), _number("Steps", steps, 1, max_steps(pipe), integer=True),
            _number("γ", noise_scale, 0, 1), _number("Seed", 0 if seed is None else seed, 0, MAX_SEED, integer=True))


_outputs: deque = deque()  # compress()'s folders, oldest first


def _output_folder() -> Path:
    """A new folder for one compress() call's files; only the newest QUEUE_SIZE are kept (Gradio copies the
    files into its own cache when the call returns)."""
    _outputs.append(Path(tempfile.mkdtemp(prefix="cdc-")))
    while len(_outputs) > QUEUE_SIZE:
        shutil.rmtree(_outputs.popleft(), ignore_errors=True)
    return _outputs[-1]


def _steps(steps) -> str:
    return "1 step" if int(steps) == 1 else f"{int(steps)} steps"


def _fmt(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _row(name: str, setting: str, data: bytes, bpp: float, m: dict) -> str:
    return (f"| {name} | {setting} | {len(data):,} | {bpp:.3f} | {_fmt(m['psnr'], 2)} "
            f"| {_fmt(m['ms_ssim'], 4)} | {_fmt(m['lpips'], 4)} | {_fmt(m['dists'], 4)} |")


def tuned_settings(pipe, rho):
    """The checkpoint's tuned (steps, γ) at ρ: the decoding controls follow the ρ slider."""
    return pipe.decode_settings(float(rho))


def _load(image):
    if isinstance(image, dict):  # the page's event skips preprocessing: Gradio would open the upload itself
        image = image["path"]
    if image is None:
        raise _error("Upload an image or pick an example first.")
    try:
        return Path(image), load_image(image, max_pixels=MAX_PIXELS)
    except ImageError as e:  # name the upload, not the server's copy of it
        raise _error(f"Cannot use this image: {str(e).replace(str(image), Path(image).name)}.") from None


def _decode(pipe, data: bytes, steps, rho, seed, noise_scale):
    try:
        return pipe.decompress(data, int(steps), float(rho), _generator(seed), float(noise_scale), progress=False)
    except ValueError as e:  # out-of-range settings from an API call (the sliders keep them in range)
        raise _error(f"Cannot decode with these settings: {e}.") from None


def compress(pipe, image, quality, rho, steps, noise_scale, seed, target_kb=0, match="none",
             left=START_PAIR[0], right=START_PAIR[1], progress=gr.Progress()):
    """Encode the image at path ``image`` at ``quality``, or at most ``target_kb`` KB, or at the size of the
    classical file ``match`` (a :data:`MATCHES` key); decode; encode JPEG, WebP and AVIF at the largest file
    not above ours; measure all.

    Returns (slider showing ``left`` | ``right``, readout markdown, .cdc path, reconstruction PNG path, result):
    the result (a dict) holds every image, so :func:`compare`, :func:`rho_strip` and :func:`rd_plot` recompute nothing."""
    quality = _number("Quality", quality, 0, pipe.num_quality_levels - 1)
    target_kb = _number("Target size (KB)", target_kb or 0, 0, MAX_TARGET_KB)
    if match != "none" and match not in MATCHES:
        raise _error(f"Cannot match {str(match)[:40]!r}: choose none or one of {', '.join(MATCHES)}.")
    rho, steps, noise_scale, seed = _decoding(pipe, rho, steps, noise_scale, seed)
    source, original = _load(image)
    progress(0, desc="Encoding")
    budget, target = None, ""
    if match in MATCHES:
        budget = len(classical.encode(original, *MATCHES[match]))
        target = f", matched to {match} ({budget:,} bytes)"
    elif target_kb and float(target_kb) > 0:
        budget = int(float(target_kb) * 1000)
        target = f", target ≤ {budget:,} bytes"
    t0 = time.perf_counter()
    try:
        data = pipe.compress(original, float(quality)) if budget is None else pipe.compress(original, max_bytes=budget)
    except ValueError as e:  # a target below the smallest file, or an API call's bad quality
        raise _error(f"Cannot compress: {e}.") from None
    encode_s = time.perf_counter() - t0
    level = unpack(data)[0].quality
    progress(0.3, desc="Decoding")
    t0 = time.perf_counter()
    recon = _decode(pipe, data, steps, rho, seed, noise_scale)
    decode_s = time.perf_counter() - t0
    bpp = bits_per_pixel(data)

    progress(0.6, desc="Metrics and classical codecs")
    m = _metrics(original, recon)
    rows = [_row("**CDC**", f"quality {level:g}", data, bpp, m)]
    images, missing = {"Original": original, "CDC": recon}, {}
    for codec in classical.CODECS:
        name = CODEC_NAMES[codec]
        found = classical.encode_at_most(original, codec, len(data))
        if found is None:
            missing[name] = f"no {name} file ≤ {len(data):,} bytes"
            rows.append(f"| {name} | {missing[name]} | | | | | | |")
            continue
        images[name] = found.image
        rows.append(_row(name, f"quality {found.quality}", found.data, found.bpp,
                         _metrics(original, found.image)))

    readout = "\n".join([
        f"**{len(data):,} bytes · {bpp:.3f} bpp** ({original.width}×{original.height}) — "
        f"encoded in {encode_s:.2f} s{target}, decoded in {decode_s:.2f} s "
        f"({_steps(steps)}, γ = {float(noise_scale):.2f}, ρ = {float(rho):.2f}, seed {int(seed or 0)})",
        "",
        "| codec | setting | bytes | bpp | PSNR (dB) ↑ | MS-SSIM ↑ | LPIPS ↓ | DISTS ↓ |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "JPEG, WebP and AVIF: the largest file of each not above ours. Pick any two to compare above the table."
        + ("" if original.width * original.height <= DISTS_MAX_PIXELS else
           f" DISTS: both images downscaled to {DISTS_MAX_PIXELS:,} pixels."),
    ])
    folder = _output_folder()
    cdc_path, png_path = folder / f"{source.stem}.cdc", folder / f"{source.stem}-cdc.png"
    cdc_path.write_bytes(data)
    recon.save(png_path)
    result = {"data": data, "images": images, "missing": missing,
              "point": {"rho": float(rho), "bpp": bpp, "psnr": m["psnr"], "lpips": m["lpips"]}}
    return compare(result, left, right), readout, str(cdc_path), str(png_path), result


def compare(result, left, right) -> dict:
    """The slider's update to ``left`` | ``right`` (names in :data:`SIDES`) from a :func:`compress` result; no recompute.
    A classical codec that has no file at our size shows the original, and the label says so."""
    if not result:
        return gr.update(label=f"{left} | {right}")
    shown, labels = [], []
    for side in (left, right):
        if side not in SIDES:
            raise _error(f"Cannot show {side!r}: choose from {', '.join(SIDES)}.")
        image = result["images"].get(side)
        shown.append(image if image is not None else result["images"]["Original"])
        labels.append(side if image is not None else f"{side} ({result['missing'][side]}: the original shown)")
    return gr.update(value=tuple(shown), label=" | ".join(labels))


def _metrics(original, image) -> dict:
    """The table's metrics: PSNR, MS-SSIM, LPIPS and DISTS (at most DISTS_MAX_PIXELS)."""
    m = metrics.image_metrics(original, image)
    return {**m, "dists": metrics.dists_distance(original, image, max_pixels=DISTS_MAX_PIXELS)}


def _psnr_lpips(original, image) -> tuple:
    """(PSNR, LPIPS or None) of ``image`` against ``original``: the two figures the strip and the plot show."""
    x, y = np.asarray(original), np.asarray(image)
    return metrics.psnr(x, y), metrics.lpips_distance(x, y)


def _need(result):
    if not result:
        raise _error(f"Compress an image first (a result is kept for {STATE_TTL_S // 60} minutes).")


def rho_strip(pipe, result, rho, steps, noise_scale, seed, progress=gr.Progress()):
    """The one file of ``result`` decoded at ρ = 0, 0.5, 0.9 (the checkpoint's tuned steps and γ) and at the chosen
    ρ with the chosen settings. Returns (gallery of (image, caption), markdown table with the times)."""
    _need(result)
    rho, steps, noise_scale, seed = _decoding(pipe, rho, steps, noise_scale, seed)
    settings = [(r, *pipe.decode_settings(r)) for r in STRIP_RHOS if abs(r - float(rho)) > 1e-6]
    settings = sorted(settings + [(float(rho), int(steps), float(noise_scale))])
    original, data = result["images"]["Original"], result["data"]
    gallery = []
    rows = ["| ρ | steps | γ | PSNR (dB) ↑ | LPIPS ↓ | DISTS ↓ | decode (s) |", "|---|---|---|---|---|---|---|"]
    t_all = time.perf_counter()
    for i, (r, k, gamma) in enumerate(settings):
        progress(i / len(settings), desc=f"Decoding at ρ = {r:g}")
        t0 = time.perf_counter()
        image = _decode(pipe, data, k, r, seed, gamma)
        seconds = time.perf_counter() - t0
        psnr, lpips = _psnr_lpips(original, image)
        dists = metrics.dists_distance(original, image, max_pixels=DISTS_MAX_PIXELS)
        gallery.append((image, f"ρ = {r:g}: PSNR {_fmt(psnr, 2)} dB, LPIPS {_fmt(lpips, 3)}, DISTS {_fmt(dists, 3)} "
                               f"({_steps(k)}, γ = {gamma:.2f})"))
        rows.append(f"| {r:g} | {k} | {gamma:.2f} | {_fmt(psnr, 2)} | {_fmt(lpips, 4)} | {_fmt(dists, 4)} | {seconds:.2f} |")
    total = time.perf_counter() - t_all
    info = (f"One file ({len(data):,} bytes, {bits_per_pixel(data):.3f} bpp), {len(settings)} reconstructions "
            f"(seed {int(seed or 0)}) in {total:.2f} s with their metrics.")
    return gallery, "\n".join([info, "", *rows])


def rd_plot(pipe, result, progress=gr.Progress()):
    """This image's rate–distortion curves: CDC at every level (ρ = 0 and 0.9, tuned settings) and JPEG, WebP, AVIF
    at their sweep qualities; PSNR and LPIPS against bpp, with the current file marked. Returns (figure, markdown)."""
    _need(result)
    original = result["images"]["Original"]
    levels = range(pipe.num_quality_levels)
    jobs = len(levels) + len(classical.CODECS)
    t0 = time.perf_counter()
    curves = {}  # name -> [(bpp, psnr, lpips)]
    for q in levels:
        progress(q / jobs, desc=f"CDC quality {q}")
        data = pipe.compress(original, q)
        for r in PLOT_RHOS:
            k, gamma = pipe.decode_settings(r)
            image = _decode(pipe, data, k, r, 0, gamma)
            curves.setdefault(f"CDC ρ = {r:g}", []).append((bits_per_pixel(data), *_psnr_lpips(original, image)))
    for i, codec in enumerate(classical.CODECS):
        progress((len(levels) + i) / jobs, desc=CODEC_NAMES[codec])
        curves[CODEC_NAMES[codec]] = [(r.bpp, *_psnr_lpips(original, r.image)) for r in classical.sweep(original, codec)]
    seconds = time.perf_counter() - t0
    # x up to 1.5× CDC's largest rate, wide enough for each classical curve's two smallest files
    top = max([1.5 * max(b for name, points in curves.items() if name.startswith("CDC") for b, _, _ in points)]
              + [sorted(b for b, _, _ in curves[CODEC_NAMES[codec]])[1] for codec in classical.CODECS])
    point = result["point"]
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    for column, (axis, label) in enumerate([(figure.add_subplot(1, 2, 1), "PSNR (dB) ↑"),
                                            (figure.add_subplot(1, 2, 2), "LPIPS ↓")]):
        for name, points in curves.items():
            shown = [(b, p[column]) for b, *p in points if b <= top and p[column] is not None and math.isfinite(p[column])]
            if shown:
                axis.plot(*zip(*shown), "o-" if name.startswith("CDC") else ".--", label=name, ms=5)
        value = point["psnr" if column == 0 else "lpips"]
        if value is not None and math.isfinite(value):
            axis.plot(point["bpp"], value, "*", color="black", ms=16, label=f"this file (ρ = {point['rho']:g})")
        axis.set(xlabel="bits per pixel", ylabel=label, xlim=(0, 1.02 * top))
        axis.grid(alpha=0.3)
        if column == 1 and point["lpips"] is None:
            axis.set_title("LPIPS: n/a (image side under 31 pixels)")
    figure.axes[0].legend(fontsize=8)
    info = (f"Computed in {seconds:.1f} s: CDC at {len(levels)} levels × ρ {', '.join(f'{r:g}' for r in PLOT_RHOS)} "
            f"(seed 0, tuned steps and γ); JPEG, WebP and AVIF at {len(classical.SWEEP_QUALITIES['jpeg'])} qualities each.")
    return figure, info


def decompress(pipe, file, rho, steps, noise_scale, seed, samples, progress=gr.Progress(track_tqdm=True)):
    """Decode a ``.cdc`` file with ``samples`` consecutive seeds. Returns (gallery, info markdown)."""
    if file is None:
        raise _error("Upload a .cdc file first.")
    rho, steps, noise_scale, seed = _decoding(pipe, rho, steps, noise_scale, seed)
    samples = _number("Samples", samples, 1, MAX_SAMPLES, integer=True)
    data = Path(file).read_bytes()
    try:
        header, _, _ = unpack(data)
    except BitstreamError as e:
        raise _error(f"Cannot decode this file: {e}.") from None
    if header.width * header.height > MAX_PIXELS:
        raise _error(f"The file holds a {header.width}×{header.height} image; this demo decodes up to "
                     f"{MAX_PIXELS:,} pixels ({MAX_SIDE}×{MAX_SIDE}).")
    seeds = [int(seed or 0) + k for k in range(int(samples))]
    images = []
    t0 = time.perf_counter()
    for s in seeds:
        try:
            img = pipe.decompress(data, int(steps), float(rho), _generator(s), float(noise_scale))
        except BitstreamError as e:
            raise _error(f"Cannot decode this file: {e}.") from None
        except ValueError as e:
            raise _error(f"Cannot decode with these settings: {e}.") from None
        images.append((img, f"seed {s}"))
    seconds = (time.perf_counter() - t0) / len(seeds)
    info = (f"{header.width}×{header.height}, quality level {header.quality}, {len(data):,} bytes = "
            f"**{bits_per_pixel(data):.3f} bpp** — {seconds:.2f} s per decode "
            f"({_steps(steps)}, γ = {float(noise_scale):.2f}, ρ = {float(rho):.2f})")
    return images, info


def build_demo(pipe, checkpoint=None) -> gr.Blocks:
    """The page for one loaded pipeline (``checkpoint``: its folder, for the bitrate labels)."""
    start_steps, start_gamma = tuned_settings(pipe, START_RHO)
    steps_max = max_steps(pipe)

    def follow_rho(rho):
        return tuned_settings(pipe, rho)

    def decoding_controls():
        """ρ, then steps and γ that start at the checkpoint's tuned values and follow ρ."""
        rho = gr.Slider(0, 1, value=START_RHO, step=0.05, label="ρ (0 = low distortion, 1 = realism)")
        steps = gr.Slider(1, steps_max, value=start_steps, step=1, label="Decoding steps (tuned per ρ)")
        gamma = gr.Slider(0, 1, value=start_gamma, step=0.05, label="Initial noise scale γ (tuned per ρ)")
        rho.change(follow_rho, rho, [steps, gamma], show_progress="hidden", api_name=False,
                   concurrency_limit=None)
        return rho, steps, gamma
    with gr.Blocks(title="CDC — lossy compression with a conditional diffusion decoder",
                   analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# CDC: lossy image compression with conditional diffusion models\n"
            "An encoder and hyperprior write a real `.cdc` file; a conditional diffusion model decodes it in a few "
            "steps (Yang & Mandt, NeurIPS 2023). ρ trades distortion for realism: 0 gives the highest PSNR "
            "(smoother), 1 the most realistic texture, synthesised by the decoder."
        )
        result = gr.State(None, time_to_live=STATE_TTL_S)  # compress()'s images, per visitor (MAX_SESSIONS at most)
        with gr.Tab("Compress"):
            with gr.Row():
                with gr.Column(scale=1):
                    image = gr.Image(label="Image", type="filepath", image_mode=None, format="png",
                                     sources=["upload", "clipboard"], elem_id="input-image")
                    gr.Examples([[str(p)] for p in EXAMPLES], inputs=[image], cache_examples=False)
                    levels_bpp, top = kodak_bpp(checkpoint), pipe.num_quality_levels - 1
                    quality = gr.Slider(0, top, value=round(top / 2, 2), step=0.01,
                                        label=f"Quality (0 = smallest file … {top}; any value in between)")
                    expected = gr.Markdown(quality_label(levels_bpp, round(top / 2, 2)), elem_id="expected-bpp")
                    quality.change(functools.partial(quality_label, levels_bpp), quality, expected,
                                   show_progress="hidden", api_name=False, concurrency_limit=None)
                    with gr.Row():
                        target_kb = gr.Number(0, minimum=0, maximum=MAX_TARGET_KB,
                                              label="…or a target size in KB (0: use the quality)")
                        match = gr.Dropdown(["none", *MATCHES], value="none",
                                            label="…or the size of a classical file of this image")
                    rho, steps, gamma = decoding_controls()
                    seed = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                    run = gr.Button("Compress", variant="primary", elem_id="compress-button")
                with gr.Column(scale=2):
                    with gr.Row():
                        left = gr.Radio(list(SIDES), value=START_PAIR[0], label="Left side", elem_id="left-side")
                        right = gr.Radio(list(SIDES), value=START_PAIR[1], label="Right side", elem_id="right-side")
                    slider = gr.ImageSlider(label=" | ".join(START_PAIR), type="pil", format="png", max_height=720,
                                            elem_id="compare")
                    readout = gr.Markdown(elem_id="readout")
                    with gr.Row():
                        cdc_file = gr.File(label="The .cdc file", elem_id="cdc-download")
                        png_file = gr.File(label="The reconstruction (PNG)", elem_id="png-download")
            with gr.Accordion("One file, several ρ", open=True):
                strip_run = gr.Button(f"Decode this file at ρ = {', '.join(f'{r:g}' for r in STRIP_RHOS)} "
                                      "and the chosen ρ", elem_id="strip-button")
                strip = gr.Gallery(label="ρ strip", format="png", columns=4, height="auto", object_fit="contain",
                                   elem_id="rho-strip")
                strip_info = gr.Markdown(elem_id="strip-info")
            with gr.Accordion("Rate–distortion curves of this image", open=True):
                plot_run = gr.Button("Plot CDC at every quality against JPEG, WebP and AVIF", elem_id="plot-button")
                plot = gr.Plot(label="PSNR and LPIPS against bpp", format="png", elem_id="rd-plot")
                plot_info = gr.Markdown(elem_id="plot-info")
            run.click(_bind(compress, pipe), [image, quality, rho, steps, gamma, seed, target_kb, match, left, right],
                      [slider, readout, cdc_file, png_file, result], api_name="compress", preprocess=False)
            for side in (left, right):
                side.change(compare, [result, left, right], slider, show_progress="hidden", api_name=False,
                            concurrency_limit=None)  # instant: never queued behind a model job
            strip_run.click(_bind(rho_strip, pipe), [result, rho, steps, gamma, seed], [strip, strip_info],
                            api_name="rho_strip")
            plot_run.click(_bind(rd_plot, pipe), result, [plot, plot_info], api_name="rd_plot")

        with gr.Tab("Decompress"):
            with gr.Row():
                with gr.Column(scale=1):
                    upload = gr.File(label=".cdc file", file_types=[".cdc"], type="filepath", elem_id="cdc-upload")
                    d_rho, d_steps, d_gamma = decoding_controls()
                    d_seed = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="First seed")
                    samples = gr.Slider(1, MAX_SAMPLES, value=1, step=1,
                                        label="Samples (consecutive seeds: the texture the decoder synthesises)")
                    d_run = gr.Button("Decompress", variant="primary", elem_id="decompress-button")
                with gr.Column(scale=2):
                    d_gallery = gr.Gallery(label="Decoded", format="png", columns=2, height="auto",
                                           object_fit="contain")
                    d_info = gr.Markdown(elem_id="decode-info")
            d_run.click(_bind(decompress, pipe), [upload, d_rho, d_steps, d_gamma, d_seed, samples],
                        [d_gallery, d_info], api_name="decompress")
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    return demo
