"""The page's handlers, called directly (no browser), with the tiny random pipeline."""

import dataclasses
import json
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

from app import classical, metrics, ui
from app.bitstream import Header, bits_per_pixel, pack, unpack
from app.images import load_image


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "cat.png"
    Image.open(ui.ASSETS / "chelsea.png").resize((96, 64), Image.LANCZOS).save(path)
    return path


@pytest.fixture(scope="module")
def compressed(tiny_pipeline, photo):
    return ui.compress(tiny_pipeline, str(photo), 0, 0.9, 2, 1.0, 0)


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
    _, readout, _, path = ui.compress(tiny_pipeline, str(photo), 1, 0.9, 1, 1.0, 0, target_kb=0.5)
    assert Path(path).stat().st_size <= 500 and "target ≤ 500 bytes" in readout
    _, readout, _, path = ui.compress(tiny_pipeline, str(photo), 1, 0.9, 1, 1.0, 0, match="JPEG q75")
    jpeg = len(classical.encode(load_image(str(photo)), "jpeg", 75))
    assert Path(path).stat().st_size <= jpeg and f"matched to JPEG q75 ({jpeg:,} bytes)" in readout
    message = _error(ui.compress, tiny_pipeline, str(photo), 1, 0.9, 1, 1.0, 0, 0.001)
    assert "smallest this model writes" in message


def test_compress(compressed, photo):
    (original, recon), readout, _, path = compressed
    assert original.size == recon.size == (96, 64)
    assert original.tobytes() == load_image(photo).tobytes()
    data = Path(path).read_bytes()
    assert Path(path).name == "cat.cdc" and unpack(data)[0].width == 96
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


def test_compress_classical_at_most_our_size(photo):
    _, readout, gallery, _ = ui.compress(_FixedSizePipe(3000), str(photo), 0, 0.9, 1, 1.0, 0)
    assert [caption.split(" ")[0] for _, caption in gallery] == ["JPEG", "WebP", "AVIF"]
    for image, caption in gallery:
        assert image.size == (96, 64) and int(caption.split(": ")[1].split(" bytes")[0].replace(",", "")) <= 3000
    assert "| **CDC** | quality 0 | 3,000 | 3.906 | inf |" in readout
    _, readout, gallery, _ = ui.compress(_FixedSizePipe(100), str(photo), 0, 0.9, 1, 1.0, 0)
    assert gallery == [] and readout.count("no file ≤ 100 bytes") == len(classical.CODECS)


def test_compress_metrics_unavailable(tiny_pipeline, photo, monkeypatch):
    monkeypatch.setattr(metrics, "image_metrics", lambda a, b: {"psnr": 30.0, "ms_ssim": None, "lpips": None})
    upload = {"path": str(photo), "orig_name": "cat.png"}  # what the page sends (its event skips preprocessing)
    _, readout, _, _ = ui.compress(tiny_pipeline, upload, 0, 0.9, 1, 1.0, 0)
    assert "| 30.00 | unavailable | unavailable |" in readout


def test_compress_errors(tiny_pipeline, tmp_path):
    assert "Upload an image" in _error(ui.compress, tiny_pipeline, None, 0, 0.9, 1, 1.0, 0)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    message = _error(ui.compress, tiny_pipeline, str(garbage), 0, 0.9, 1, 1.0, 0)
    assert "not a readable image" in message and str(tmp_path) not in message
    big = tmp_path / "big.png"
    Image.new("L", (2049, 2048)).save(big)
    assert f"the limit is {2048 * 2048} pixels" in _error(ui.compress, tiny_pipeline, str(big), 0, 0.9, 1, 1.0, 0)
    ok = tmp_path / "ok.png"
    Image.new("RGB", (32, 32)).save(ok)
    assert "rho must be in [0, 1]" in _error(ui.compress, tiny_pipeline, str(ok), 0, 7, 1, 1.0, 0)  # an API call


def test_decompress(tiny_pipeline, compressed, tmp_path):
    path = compressed[3]
    images, info = ui.decompress(tiny_pipeline, path, 0.9, 2, 1.0, 7, 1)
    assert [caption for _, caption in images] == ["seed 7"] and images[0][0].size == (96, 64)
    assert f"{bits_per_pixel(Path(path).read_bytes()):.3f} bpp" in info and "96×64" in info
    again, _ = ui.decompress(tiny_pipeline, path, 0.9, 2, 1.0, 7, 1)
    assert again[0][0].tobytes() == images[0][0].tobytes()


def test_decompress_several_seeds(tiny_pipeline, compressed):
    images, _ = ui.decompress(tiny_pipeline, compressed[3], 1.0, 2, 1.0, 3, 3)
    assert [caption for _, caption in images] == ["seed 3", "seed 4", "seed 5"]
    assert len({img.tobytes() for img, _ in images}) == 3  # the decoder samples texture from the seed


def test_decompress_errors(tiny_pipeline, compressed, photo, tmp_path):
    assert "Upload a .cdc file" in _error(ui.decompress, tiny_pipeline, None, 0.9, 2, 1.0, 0, 1)
    data = Path(compressed[3]).read_bytes()
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
    assert "2048×2048" in _error(ui.decompress, tiny_pipeline, str(huge), 0.9, 2, 1.0, 0, 1)
    message = _error(ui.decompress, tiny_pipeline, compressed[3], 0.9, 2, -1.0, 0, 1)  # an API call's bad γ
    assert "noise_scale must be in [0, 1]" in message


def test_build_demo(tiny_pipeline):
    demo = ui.build_demo(tiny_pipeline)
    shown = [b for b in demo.blocks.values() if isinstance(b, (gr.Image, gr.ImageSlider, gr.Gallery))]
    assert sorted(type(b).__name__ for b in shown) == ["Gallery", "Gallery", "Image", "ImageSlider"]
    assert all(b.format == "png" for b in shown)  # exact pixels, never Gradio's default WebP
    assert demo._queue.max_size == ui.QUEUE_SIZE and demo._queue.default_concurrency_limit == 1
    assert all(fn.tracks_progress for fn in demo.fns.values() if fn.name not in ("load_example", "follow_rho")
               and fn.fn.func is not ui.quality_label)


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
