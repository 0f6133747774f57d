import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def cli(*args):
    return subprocess.run([sys.executable, "-m", "app", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(path)
    return path


def assert_one_line_error(result):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr


def test_round_trip_with_a_pipeline_folder(tiny_pipeline_dir, photo_file, tmp_path):
    cdc, png = tmp_path / "a.cdc", tmp_path / "a.png"
    r = cli("compress", photo_file, cdc, "--quality", 1.25, "--checkpoint", tiny_pipeline_dir)
    assert r.returncode == 0, r.stderr
    assert json.loads(cli("info", cdc).stdout)["quality"] == 1.25
    r = cli("compress", photo_file, cdc, "--max-bytes", cdc.stat().st_size, "--checkpoint", tiny_pipeline_dir)
    assert r.returncode == 0 and "probes in" in r.stdout, r.stderr
    r = cli("compress", photo_file, cdc, "--quality", 1, "--checkpoint", tiny_pipeline_dir)
    assert r.returncode == 0, r.stderr
    r = cli("decompress", cdc, png, "--steps", 2, "--noise-scale", 0.8, "--rho", 0.5, "--seed", 3,
            "--checkpoint", tiny_pipeline_dir)
    assert r.returncode == 0, r.stderr
    assert Image.open(png).size == (90, 70)
    info = json.loads(cli("info", cdc).stdout)
    assert info["quality"] == 1 and info["width"] == 90 and info["file_bytes"] == cdc.stat().st_size
    assert info["bpp"] == pytest.approx(8 * cdc.stat().st_size / (90 * 70))


def test_kodak_round_trip(tiny_pipeline_dir, kodak_dir, tmp_path):
    cdc, png = tmp_path / "k.cdc", tmp_path / "k.png"
    assert cli("compress", kodak_dir / "kodim23.png", cdc, "--quality", 0, "--checkpoint", tiny_pipeline_dir).returncode == 0
    assert cli("decompress", cdc, png, "--checkpoint", tiny_pipeline_dir).returncode == 0
    assert Image.open(png).size == Image.open(kodak_dir / "kodim23.png").size


def test_corrupt_truncated_and_foreign_files(tiny_pipeline_dir, photo_file, tmp_path):
    cdc = tmp_path / "a.cdc"
    cli("compress", photo_file, cdc, "--checkpoint", tiny_pipeline_dir)
    data = cdc.read_bytes()
    cases = {"trunc.cdc": data[:-7], "flip.cdc": data[:30] + bytes([data[30] ^ 4]) + data[31:], "png.cdc": photo_file.read_bytes()}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        assert_one_line_error(cli("decompress", tmp_path / name, tmp_path / "out.png", "--checkpoint", tiny_pipeline_dir))
        assert_one_line_error(cli("info", tmp_path / name))
    assert not (tmp_path / "out.png").exists()


def test_bad_inputs_are_one_line_errors(tiny_pipeline_dir, photo_file, tmp_path):
    (tmp_path / "text.jpg").write_text("hello")
    assert_one_line_error(cli("compress", tmp_path / "text.jpg", tmp_path / "x.cdc", "--checkpoint", tiny_pipeline_dir))
    assert_one_line_error(cli("compress", tmp_path / "missing.png", tmp_path / "x.cdc", "--checkpoint", tiny_pipeline_dir))
    assert_one_line_error(cli("compress", photo_file, tmp_path / "x.cdc", "--quality", 99, "--checkpoint", tiny_pipeline_dir))
    assert_one_line_error(cli("compress", photo_file, tmp_path / "x.cdc", "--checkpoint", tmp_path / "nowhere"))
    assert_one_line_error(cli("info", tmp_path / "missing.cdc"))
    cdc = tmp_path / "ok.cdc"
    assert cli("compress", photo_file, cdc, "--checkpoint", tiny_pipeline_dir).returncode == 0
    for flags in (["--quality", -1], ["--quality", "nan"], ["--quality", 99], ["--max-bytes", 10], ["--bpp", 0]):
        assert_one_line_error(cli("compress", photo_file, tmp_path / "x.cdc", *flags, "--checkpoint", tiny_pipeline_dir))
    assert not (tmp_path / "x.cdc").exists()
    r = cli("compress", photo_file, tmp_path / "x.cdc", "--max-bytes", 10)
    assert "the smallest this model writes for this image is" in r.stderr
    for flags in (["--noise-scale", -0.5], ["--noise-scale", "nan"], ["--steps", 0]):
        r = cli("decompress", cdc, tmp_path / "out.png", *flags, "--checkpoint", tiny_pipeline_dir)
        assert_one_line_error(r)
    assert "noise_scale must be in [0, 1]" in r.stderr or "num_inference_steps" in r.stderr
    assert not (tmp_path / "out.png").exists()
