"""The Gradio page: compress an image (metrics, classical codecs at the same size) and decompress a ``.cdc`` file.

Handlers are module-level functions taking the pipeline as first argument, so tests can call
them without a browser; :func:`build_demo` binds them to one loaded pipeline.
"""

from __future__ import annotations

import functools
import html
import json
import math
import tempfile
import time
from pathlib import Path

import gradio as gr
import numpy as np
import torch

from app import classical, metrics
from app.bitstream import BitstreamError, bits_per_pixel, unpack
from app.images import ImageError, load_image

MAX_SIDE = 2048
MAX_PIXELS = MAX_SIDE * MAX_SIDE  # lower than the CLI's limit: the Space decodes on a CPU
MAX_STEPS = 20
MAX_SAMPLES = 4
QUEUE_SIZE = 8
START_RHO = 0.9
ASSETS = Path(__file__).resolve().parent.parent / "assets"
EXAMPLES = sorted(p for p in ASSETS.iterdir() if p.suffix in (".jpg", ".png"))
CODEC_NAMES = {"jpeg": "JPEG", "webp": "WebP", "avif": "AVIF"}


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


def _error(message: str) -> gr.Error:
    return gr.Error(html.escape(message), print_exception=False)


def _generator(seed) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(int(seed or 0))


def _steps(steps) -> str:
    return "1 step" if int(steps) == 1 else f"{int(steps)} steps"


def _fmt(value, digits: int) -> str:
    return "unavailable" if value is None else f"{value:.{digits}f}"


def _row(name: str, setting: str, data: bytes, bpp: float, m: dict) -> str:
    return (f"| {name} | {setting} | {len(data):,} | {bpp:.3f} | {_fmt(m['psnr'], 2)} "
            f"| {_fmt(m['ms_ssim'], 4)} | {_fmt(m['lpips'], 4)} |")


def tuned_settings(pipe, rho):
    """The checkpoint's tuned (steps, γ) at ρ: the decoding controls follow the ρ slider."""
    return pipe.decode_settings(float(rho))


def compress(pipe, image, quality, rho, steps, noise_scale, seed, target_kb=0, match="none",
             progress=gr.Progress(track_tqdm=True)):
    """Encode the image at path ``image`` at ``quality``, or at most ``target_kb`` KB, or at the size of the
    classical file ``match`` (a :data:`MATCHES` key); decode, compare.

    Returns (slider pair, readout markdown, classical gallery, .cdc path)."""
    if isinstance(image, dict):  # the page's event skips preprocessing: Gradio would open the upload itself
        image = image["path"]
    if image is None:
        raise _error("Upload an image or pick an example first.")
    try:
        original = load_image(image, max_pixels=MAX_PIXELS)
    except ImageError as e:  # name the upload, not the server's copy of it
        raise _error(f"Cannot use this image: {str(e).replace(str(image), Path(image).name)}.") from None
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
    t0 = time.perf_counter()
    try:
        recon = pipe.decompress(data, int(steps), float(rho), _generator(seed), float(noise_scale))
    except ValueError as e:  # out-of-range settings from an API call (the sliders keep them in range)
        raise _error(f"Cannot decode with these settings: {e}.") from None
    decode_s = time.perf_counter() - t0
    bpp = bits_per_pixel(data)

    progress(1, desc="Metrics and classical codecs")
    rows = [_row("**CDC**", f"quality {level:g}", data, bpp, metrics.image_metrics(original, recon))]
    gallery = []
    for codec in classical.CODECS:
        name = CODEC_NAMES[codec]
        result = classical.encode_at_most(original, codec, len(data))
        if result is None:
            rows.append(f"| {name} | no file ≤ {len(data):,} bytes | | | | | |")
            continue
        rows.append(_row(name, f"quality {result.quality}", result.data, result.bpp,
                         metrics.image_metrics(original, result.image)))
        gallery.append((result.image, f"{name} q={result.quality}: {len(result.data):,} bytes, {result.bpp:.3f} bpp"))

    readout = "\n".join([
        f"**{len(data):,} bytes · {bpp:.3f} bpp** ({original.width}×{original.height}) — "
        f"encoded in {encode_s:.2f} s{target}, decoded in {decode_s:.2f} s "
        f"({_steps(steps)}, γ = {float(noise_scale):.2f}, ρ = {float(rho):.2f}, seed {int(seed or 0)})",
        "",
        "| codec | setting | bytes | bpp | PSNR (dB) ↑ | MS-SSIM ↑ | LPIPS ↓ |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])
    path = Path(tempfile.mkdtemp(prefix="cdc-")) / f"{Path(image).stem}.cdc"
    path.write_bytes(data)
    return (original, recon), readout, gallery, str(path)


def decompress(pipe, file, rho, steps, noise_scale, seed, samples, progress=gr.Progress(track_tqdm=True)):
    """Decode a ``.cdc`` file with ``samples`` consecutive seeds. Returns (gallery, info markdown)."""
    if file is None:
        raise _error("Upload a .cdc file first.")
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
    steps_max = max(MAX_STEPS, start_steps)

    def follow_rho(rho):
        return tuned_settings(pipe, rho)

    def decoding_controls():
        """ρ, then steps and γ that start at the checkpoint's tuned values and follow ρ."""
        rho = gr.Slider(0, 1, value=START_RHO, step=0.05, label="ρ (0 = low distortion, 1 = realism)")
        steps = gr.Slider(1, steps_max, value=start_steps, step=1, label="Decoding steps (tuned per ρ)")
        gamma = gr.Slider(0, 1, value=start_gamma, step=0.05, label="Initial noise scale γ (tuned per ρ)")
        rho.change(follow_rho, rho, [steps, gamma], show_progress="hidden", api_name=False)
        return rho, steps, gamma
    with gr.Blocks(title="CDC — lossy compression with a conditional diffusion decoder",
                   analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# CDC: lossy image compression with conditional diffusion models\n"
            "An encoder and hyperprior write a real `.cdc` file; a conditional diffusion model decodes it in a few "
            "steps (Yang & Mandt, NeurIPS 2023). ρ trades distortion for realism: 0 gives the highest PSNR "
            "(smoother), 1 the most realistic texture, synthesised by the decoder."
        )
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
                                   show_progress="hidden", api_name=False)
                    with gr.Row():
                        target_kb = gr.Number(0, minimum=0, label="…or a target size in KB (0: use the quality)")
                        match = gr.Dropdown(["none", *MATCHES], value="none",
                                            label="…or the size of a classical file of this image")
                    rho, steps, gamma = decoding_controls()
                    seed = gr.Number(0, precision=0, minimum=0, label="Seed")
                    run = gr.Button("Compress", variant="primary", elem_id="compress-button")
                with gr.Column(scale=2):
                    slider = gr.ImageSlider(label="Original | CDC reconstruction", type="pil", format="png",
                                            max_height=720)
                    readout = gr.Markdown(elem_id="readout")
                    cdc_file = gr.File(label="The .cdc file", elem_id="cdc-download")
            gr.Markdown("### The same image with classical codecs, at the largest file not exceeding ours")
            classical_gallery = gr.Gallery(label="JPEG, WebP, AVIF", format="png", columns=3, height="auto",
                                           object_fit="contain")
            run.click(functools.partial(compress, pipe), [image, quality, rho, steps, gamma, seed, target_kb, match],
                      [slider, readout, classical_gallery, cdc_file], api_name="compress", preprocess=False)

        with gr.Tab("Decompress"):
            with gr.Row():
                with gr.Column(scale=1):
                    upload = gr.File(label=".cdc file", file_types=[".cdc"], type="filepath", elem_id="cdc-upload")
                    d_rho, d_steps, d_gamma = decoding_controls()
                    d_seed = gr.Number(0, precision=0, minimum=0, label="First seed")
                    samples = gr.Slider(1, MAX_SAMPLES, value=1, step=1,
                                        label="Samples (consecutive seeds: the texture the decoder synthesises)")
                    d_run = gr.Button("Decompress", variant="primary", elem_id="decompress-button")
                with gr.Column(scale=2):
                    d_gallery = gr.Gallery(label="Decoded", format="png", columns=2, height="auto",
                                           object_fit="contain")
                    d_info = gr.Markdown(elem_id="decode-info")
            d_run.click(functools.partial(decompress, pipe), [upload, d_rho, d_steps, d_gamma, d_seed, samples],
                        [d_gallery, d_info], api_name="decompress")
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    return demo
