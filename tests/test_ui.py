"""The page's handlers, called directly (no browser), with the tiny random pipeline."""

import dataclasses
import json
import shutil
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from app import classical, metrics, ui
from app.bench import synthetic_image
from app.bitstream import Header, bits_per_pixel, pack, unpack
from app.images import load_image


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "cat.png"
    Image.open(ui.ASSETS / "chelsea.png").resize((96, 64), Image.LANCZOS).save(path)
    return path


@pytest.fixture(scope="module")
def compressed(tiny_pipeline, photo, tmp_path_factory):
    """compress()'s outputs, its .cdc copied out of the page's folder, which later calls prune."""
    out = list(ui.compress(tiny_pipeline, str(photo), 0, 0.9, 2, 1.0, 0))
    kept = tmp_path_factory.mktemp("compressed") / Path(out[2]).name
    shutil.copy(out[2], kept)
    out[2] = str(kept)
    return tuple(out)


def _error(fn, *args) -> str:
    with pytest.raises(gr.Error) as info:
        fn(*args)
    return info.value.message


def test_examples_exist():
    assert len(ui.EXAMPLES) >= 3
    for path in ui.EXAMPLES:
        assert path.stat().st_size <= 300_000 and path.name in (ui.ASSETS / "README.md").read_text()


def test_kodak_bpp_labels(tmp_path):
    assert ui.kodak_bpp(None) == [] and ui.quality_label([], 1.5) == ""
    (tmp_path / "quality_levels.json").write_text(json.dumps({"bpp": [0.1, 0.2, 0.4]}))
    levels = ui.kodak_bpp(tmp_path)
    assert levels == [0.1, 0.2, 0.4]
    assert "**0.200 bpp**" in ui.quality_label(levels, 1) and "**0.141 bpp**" in ui.quality_label(levels, 0.5)


def test_compress_to_a_target_size_or_a_classical_files_size(tiny_pipeline, photo):
    _, readout, path, _, _ = ui.compress(tiny_pipeline, str(photo), 1, 0.9, 1, 1.0, 0, target_kb=0.5)
    assert Path(path).stat().st_size <= 500 and "target ≤ 500 bytes" in readout
    _, readout, path, _, _ = ui.compress(tiny_pipeline, str(photo), 1, 0.9, 1, 1.0, 0, match="JPEG q75")
    jpeg = len(classical.encode(load_image(str(photo)), "jpeg", 75))
    assert Path(path).stat().st_size <= jpeg and f"matched to JPEG q75 ({jpeg:,} bytes)" in readout
    message = _error(ui.compress, tiny_pipeline, str(photo), 1, 0.9, 1, 1.0, 0, 0.001)
    assert "smallest this model writes" in message


def test_compress(compressed, photo):
    slider, readout, path, png, result = compressed
    images = result["images"]  # the tiny model's 63-byte file: no classical file is that small
    assert sorted(images) == ["CDC", "Original"] and all(img.size == (96, 64) for img in images.values())
    assert sorted(result["missing"]) == ["AVIF", "JPEG", "WebP"]
    assert images["Original"].tobytes() == load_image(photo).tobytes()
    assert slider["label"].startswith("AVIF (no AVIF file") and slider["label"].endswith("| CDC")
    data = Path(path).read_bytes()
    assert Path(path).name == "cat.cdc" and unpack(data)[0].width == 96 and result["data"] == data
    assert Path(png).name == "cat-cdc.png" and Image.open(png).tobytes() == images["CDC"].tobytes()
    assert result["point"]["bpp"] == bits_per_pixel(data)
    assert f"{len(data):,} bytes · {bits_per_pixel(data):.3f} bpp" in readout
    assert "encoded in" in readout and "decoded in" in readout
    cdc_row = next(line for line in readout.splitlines() if line.startswith("| **CDC**"))
    assert float(cdc_row.split("|")[5]) > 0  # PSNR
    for name in ("JPEG", "WebP", "AVIF"):
        assert f"| {name} |" in readout


class _FixedSizePipe:
    """Writes a valid container of exactly ``n_bytes`` and decodes it to the original: isolates the comparison."""

    num_quality_levels = 1

    def __init__(self, n_bytes: int):
        self.n_bytes, self.image = n_bytes, None

    def compress(self, image, quality):
        self.image = image
        header = Header(b"\0" * 8, quality, image.width, image.height, image.width, image.height)
        return pack(header, b"", b"\0" * (self.n_bytes - len(pack(header, b"", b""))))

    def decompress(self, data, num_inference_steps=None, rho=0.9, generator=None, noise_scale=None, progress=True):
        return self.image

    def decode_settings(self, rho):
        return 1, 1.0


def test_compress_classical_at_most_our_size(photo):
    _, readout, _, _, result = ui.compress(_FixedSizePipe(3000), str(photo), 0, 0.9, 1, 1.0, 0)
    original = load_image(photo)
    for name, codec in (("JPEG", "jpeg"), ("WebP", "webp"), ("AVIF", "avif")):
        row = next(line for line in readout.splitlines() if line.startswith(f"| {name} |")).split("|")
        quality, size = int(row[2].split()[1]), int(row[3].replace(",", ""))
        data = classical.encode(original, codec, quality)
        assert len(data) == size <= 3000 and result["images"][name].tobytes() == classical.decode(data).tobytes()
        assert 0 < float(row[8]) < 1  # DISTS
    assert "| **CDC** | quality 0 | 3,000 | 3.906 | inf |" in readout
    _, readout, _, _, result = ui.compress(_FixedSizePipe(100), str(photo), 0, 0.9, 1, 1.0, 0)
    assert sorted(result["images"]) == ["CDC", "Original"]
    assert readout.count("no JPEG file ≤ 100 bytes") == 1 and "no AVIF file ≤ 100 bytes" in readout
    slider = ui.compare(result, "AVIF", "CDC")
    assert slider["label"] == "AVIF (no AVIF file ≤ 100 bytes: the original shown) | CDC"


def test_compare_switches_sides_without_recompute(photo):
    slider, _, _, _, result = ui.compress(_FixedSizePipe(3000), str(photo), 0, 0.9, 1, 1.0, 0)
    assert slider["label"] == "AVIF | CDC"  # the default pair answers "is it better than AVIF at this size?"
    assert sorted(result["images"]) == sorted(ui.SIDES)
    for left in ui.SIDES:
        for right in ui.SIDES:
            slider = ui.compare(result, left, right)
            assert slider["label"] == f"{left} | {right}"
            assert [im.tobytes() for im in slider["value"]] == [result["images"][left].tobytes(), result["images"][right].tobytes()]
    assert ui.compare(None, "JPEG", "CDC")["label"] == "JPEG | CDC"
    assert "choose from" in _error(ui.compare, result, "HEIC", "CDC")


def test_compress_metrics_unavailable(tiny_pipeline, photo, monkeypatch):
    monkeypatch.setattr(metrics, "image_metrics", lambda a, b: {"psnr": 30.0, "ms_ssim": None, "lpips": None})
    upload = {"path": str(photo), "orig_name": "cat.png"}  # what the page sends (its event skips preprocessing)
    _, readout, _, _, _ = ui.compress(tiny_pipeline, upload, 0, 0.9, 1, 1.0, 0)
    assert "| 30.00 | n/a | n/a |" in readout


def test_compress_errors(tiny_pipeline, tmp_path):
    assert "Upload an image" in _error(ui.compress, tiny_pipeline, None, 0, 0.9, 1, 1.0, 0)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    message = _error(ui.compress, tiny_pipeline, str(garbage), 0, 0.9, 1, 1.0, 0)
    assert "not a readable image" in message and str(tmp_path) not in message
    big = tmp_path / "big.png"
    Image.new("L", (ui.MAX_SIDE + 1, ui.MAX_SIDE)).save(big)
    assert f"the limit is {ui.MAX_PIXELS} pixels" in _error(ui.compress, tiny_pipeline, str(big), 0, 0.9, 1, 1.0, 0)
    ok = tmp_path / "ok.png"
    Image.new("RGB", (32, 32)).save(ok)
    assert "ρ must be a number from 0 to 1, got 7" in _error(ui.compress, tiny_pipeline, str(ok), 0, 7, 1, 1.0, 0)  # an API call


def test_rho_strip_one_file_several_rhos(tiny_pipeline, compressed):
    result = compressed[4]
    gallery, info = ui.rho_strip(tiny_pipeline, result, 0.7, 1, 0.5, 3)
    assert [caption.split(":")[0] for _, caption in gallery] == ["ρ = 0", "ρ = 0.5", "ρ = 0.7", "ρ = 0.9"]
    assert "(1 step, γ = 0.50)" in gallery[2][1]  # the chosen ρ with the chosen settings; the others tuned
    again = tiny_pipeline.decompress(result["data"], 1, 0.7, ui._generator(3), 0.5, progress=False)
    assert gallery[2][0].tobytes() == again.tobytes()  # decoded from the one stored file
    assert len({image.tobytes() for image, _ in gallery}) == 4
    assert "4 reconstructions" in info and info.count("\n| ") == 5  # header, rule, four rows
    gallery, _ = ui.rho_strip(tiny_pipeline, result, 0.5, 1, 0.5, 3)
    assert len(gallery) == 3  # the chosen ρ is one of the strip's
    assert "Compress an image first" in _error(ui.rho_strip, tiny_pipeline, None, 0.5, 1, 0.5, 0)


def test_rd_plot(tiny_pipeline, compressed):
    from matplotlib.figure import Figure

    figure, info = ui.rd_plot(tiny_pipeline, compressed[4])
    assert isinstance(figure, Figure) and [a.get_ylabel() for a in figure.axes] == ["PSNR (dB) ↑", "LPIPS ↓"]
    psnr_axis = figure.axes[0]
    names = [line.get_label() for line in psnr_axis.get_lines()]
    assert names == ["CDC ρ = 0", "CDC ρ = 0.9", "JPEG", "WebP", "AVIF", "this file (ρ = 0.9)"]
    cdc = psnr_axis.get_lines()[0]
    assert len(cdc.get_xdata()) == tiny_pipeline.num_quality_levels
    star = psnr_axis.get_lines()[-1]
    point = compressed[4]["point"]
    assert (star.get_xdata()[0], star.get_ydata()[0]) == (point["bpp"], point["psnr"])
    assert "CDC at 4 levels" in info
    assert "Compress an image first" in _error(ui.rd_plot, tiny_pipeline, None)


@pytest.mark.parametrize("size", [(1, 1), (7, 7), (31, 17)])
def test_tiny_images_say_na(tiny_pipeline, tmp_path, size):
    path = tmp_path / "tiny.png"
    Image.effect_noise(size, 60).convert("RGB").save(path)
    slider, readout, cdc, png, result = ui.compress(tiny_pipeline, str(path), 1, 0.9, 1, 0.5, 0)
    assert Image.open(png).size == size and unpack(Path(cdc).read_bytes())[0].width == size[0]
    cdc_row = next(line for line in readout.splitlines() if line.startswith("| **CDC**")).split("|")
    assert cdc_row[6].strip() == cdc_row[7].strip() == "n/a"  # MS-SSIM and LPIPS cannot be computed
    gallery, info = ui.rho_strip(tiny_pipeline, result, 0.9, 1, 0.5, 0)
    assert len(gallery) == 3 and "LPIPS n/a" in gallery[0][1]
    assert (cdc_row[8].strip() == "n/a") == (min(size) < 16) and ("DISTS n/a" in gallery[0][1]) == (min(size) < 16)
    figure, _ = ui.rd_plot(tiny_pipeline, result)
    assert figure.axes[1].get_title().startswith("LPIPS: n/a")


def test_large_and_16_bit_uploads(tiny_pipeline, tmp_path):
    gray16 = tmp_path / "gray16.png"
    Image.fromarray((np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)).save(gray16)
    assert Image.open(gray16).mode.startswith("I;16")
    _, readout, _, png, result = ui.compress(tiny_pipeline, str(gray16), 1, 0.9, 1, 0.5, 0)
    assert Image.open(png).size == (64, 48) and result["images"]["Original"].mode == "RGB" and "64×48" in readout
    big = tmp_path / "big.jpg"
    synthetic_image(ui.MAX_SIDE, ui.MAX_SIDE).save(big, quality=90)  # the largest the page takes: tiled
    _, readout, _, png, _ = ui.compress(tiny_pipeline, str(big), 0, 0.9, 1, 0.5, 0)
    assert Image.open(png).size == (ui.MAX_SIDE,) * 2 and f"{ui.MAX_SIDE}×{ui.MAX_SIDE}" in readout


def test_errors_are_plain_text(tiny_pipeline, tmp_path):
    bad = tmp_path / "it's <b> & not.png"
    bad.write_bytes(b"not an image")
    message = _error(ui.compress, tiny_pipeline, str(bad), 0, 0.9, 1, 1.0, 0)
    assert "it's ‹b› ＆ not.png" in message and "&#" not in message and "&amp;" not in message


def test_on_gpu_only_on_zerogpu(monkeypatch):
    import sys
    import types

    calls = []
    fake = types.SimpleNamespace(GPU=lambda fn: calls.append(fn) or fn)
    monkeypatch.setitem(sys.modules, "spaces", fake)
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)

    def handler():
        pass

    assert ui.on_gpu(handler) is handler and calls == []
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert ui.on_gpu(handler) is handler and calls == [handler]
    monkeypatch.setitem(sys.modules, "spaces", None)  # the package absent: nothing changes
    assert ui.on_gpu(handler) is handler and len(calls) == 1


def test_decompress(tiny_pipeline, compressed, tmp_path):
    path = compressed[2]
    images, info = ui.decompress(tiny_pipeline, path, 0.9, 2, 1.0, 7, 1)
    assert [caption for _, caption in images] == ["seed 7"] and images[0][0].size == (96, 64)
    assert f"{bits_per_pixel(Path(path).read_bytes()):.3f} bpp" in info and "96×64" in info
    again, _ = ui.decompress(tiny_pipeline, path, 0.9, 2, 1.0, 7, 1)
    assert again[0][0].tobytes() == images[0][0].tobytes()


def test_decompress_several_seeds(tiny_pipeline, compressed):
    images, _ = ui.decompress(tiny_pipeline, compressed[2], 1.0, 2, 1.0, 3, 3)
    assert [caption for _, caption in images] == ["seed 3", "seed 4", "seed 5"]
    assert len({img.tobytes() for img, _ in images}) == 3  # the decoder samples texture from the seed


def test_decompress_errors(tiny_pipeline, compressed, photo, tmp_path):
    assert "Upload a .cdc file" in _error(ui.decompress, tiny_pipeline, None, 0.9, 2, 1.0, 0, 1)
    data = Path(compressed[2]).read_bytes()
    corrupt = tmp_path / "corrupt.cdc"
    corrupt.write_bytes(data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:])
    assert "CRC32" in _error(ui.decompress, tiny_pipeline, str(corrupt), 0.9, 2, 1.0, 0, 1)
    header, z, y = unpack(data)
    foreign = tmp_path / "foreign.cdc"
    foreign.write_bytes(pack(dataclasses.replace(header, model_id=b"\0" * 8), z, y))
    assert "another model" in _error(ui.decompress, tiny_pipeline, str(foreign), 0.9, 2, 1.0, 0, 1)
    assert "not a .cdc file" in _error(ui.decompress, tiny_pipeline, str(photo), 0.9, 2, 1.0, 0, 1)
    huge = tmp_path / "huge.cdc"
    huge.write_bytes(pack(Header(b"\0" * 8, 0, 4096, 4096, 4096, 4096), b"z", b"y"))
    assert f"{ui.MAX_SIDE}×{ui.MAX_SIDE}" in _error(ui.decompress, tiny_pipeline, str(huge), 0.9, 2, 1.0, 0, 1)
    message = _error(ui.decompress, tiny_pipeline, compressed[2], 0.9, 2, -1.0, 0, 1)  # an API call's bad γ
    assert "γ must be a number from 0 to 1" in message


def test_build_demo(tiny_pipeline):
    demo = ui.build_demo(tiny_pipeline)
    shown = [b for b in demo.blocks.values() if isinstance(b, (gr.Image, gr.ImageSlider, gr.Gallery, gr.Plot))]
    assert sorted(type(b).__name__ for b in shown) == ["Gallery", "Gallery", "Image", "ImageSlider", "Plot"]
    assert all(b.format == "png" for b in shown)  # exact pixels, never Gradio's default WebP
    assert demo._queue.max_size == ui.QUEUE_SIZE and demo._queue.default_concurrency_limit == 1
    model_handlers = {fn.name: fn for fn in demo.fns.values() if fn.name in ("compress", "rho_strip", "rd_plot", "decompress")}
    assert sorted(model_handlers) == ["compress", "decompress", "rd_plot", "rho_strip"]
    assert all(fn.tracks_progress for fn in model_handlers.values())
    assert [fn.name for fn in demo.fns.values()].count("compare") == 2  # one per side
    light = [fn for fn in demo.fns.values() if fn.name not in model_handlers and fn.name != "load_example"]
    assert len(light) == 5 and all(fn.concurrency_limit is None for fn in light)  # never behind a model job


def test_decoding_controls_start_at_the_tuned_values_and_follow_rho(tiny_pipeline):
    from app.pipeline import CDCPipeline

    table = [{"rho": 0.0, "num_inference_steps": 1, "noise_scale": 0.0},
             {"rho": 1.0, "num_inference_steps": 3, "noise_scale": 0.8}]
    pipe = CDCPipeline(tiny_pipeline.compressor, tiny_pipeline.unet, tiny_pipeline.scheduler, table)
    demo = ui.build_demo(pipe)
    sliders = {b.label: b.value for b in demo.blocks.values() if isinstance(b, gr.Slider)}
    assert sliders["Decoding steps (tuned per ρ)"] == 3
    assert sliders["Initial noise scale γ (tuned per ρ)"] == pytest.approx(0.72)
    follow = [fn for fn in demo.fns.values() if fn.name == "follow_rho"]
    assert len(follow) == 2  # one per tab
    assert ui.tuned_settings(pipe, 0.0) == (1, 0.0) and ui.tuned_settings(pipe, 1.0) == (3, 0.8)
