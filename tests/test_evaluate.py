import json

import numpy as np
import pytest
from PIL import Image

from app import evaluate

RATES = np.array([0.1, 0.2, 0.4, 0.8, 1.6])
PSNR = np.array([25.0, 28.0, 31.5, 34.0, 37.0])


def test_bd_rate_identical_curves_is_zero():
    assert evaluate.bd_rate(RATES, PSNR, RATES, PSNR) == pytest.approx(0.0, abs=1e-9)


def test_bd_rate_half_the_rate():
    assert evaluate.bd_rate(RATES, PSNR, RATES / 2, PSNR) == pytest.approx(-50.0)
    assert evaluate.bd_rate(RATES / 2, PSNR, RATES, PSNR) == pytest.approx(100.0)


def test_bd_rate_lpips_sign():
    lpips = np.array([0.5, 0.4, 0.3, 0.2, 0.1])
    # Scored as -LPIPS: the curve reaching the same LPIPS at half the rate wins.
    assert evaluate.bd_rate(RATES, -lpips, RATES / 2, -lpips) == pytest.approx(-50.0)
    # A codec with worse LPIPS at every rate needs more bits.
    assert evaluate.bd_rate(RATES, -lpips, RATES, -(lpips + 0.05)) > 0


def test_bd_rate_without_overlap_or_points():
    assert evaluate.bd_rate(RATES, PSNR, RATES, PSNR + 20) is None
    assert evaluate.bd_rate(RATES, PSNR, [0.3], [30.0]) is None


def test_bd_rate_ignores_dominated_points():
    rates, psnr = np.append(RATES, 1.0), np.append(PSNR, 20.0)  # a bad point off the curve
    assert evaluate.bd_rate(RATES, PSNR, rates, psnr) == pytest.approx(0.0, abs=1e-9)


def test_value_at_rate():
    assert evaluate.value_at_rate(RATES, PSNR, 0.4) == pytest.approx(31.5)
    assert 28.0 < evaluate.value_at_rate(RATES, PSNR, 0.3) < 31.5
    assert evaluate.value_at_rate(RATES, PSNR, 0.05) is None
    assert evaluate.value_at_rate(RATES, PSNR, 2.0) is None


def _rows():
    """Synthetic rows: 'ours' is JPEG's curve at half the rate on two images."""
    rows = []
    for image in ("a.png", "b.png"):
        for q, (r, p) in enumerate(zip(RATES, PSNR)):
            rows.append({"codec": "jpeg", "image": image, "quality": q, "bytes": 1, "bpp": float(r), "psnr": float(p),
                         "ms_ssim": None, "lpips": 1 / p, "encode_s": 0.0, "decode_s": 0.0})
        for level, (r, p) in enumerate(zip(RATES[1:4] / 2, PSNR[1:4])):
            rows.append({"codec": "cdc", "image": image, "level": level, "rho": 0.0, "bytes": 1, "bpp": float(r),
                         "psnr": float(p), "ms_ssim": 0.9, "lpips": 1 / p, "encode_s": 1.0, "decode_s": 2.0})
    return rows


def test_summaries_and_comparisons():
    rows = _rows()
    means = evaluate.summarise(rows)
    assert len(means) == 5 + 3
    cdc = [m for m in means if m["codec"] == "cdc"]
    assert all(m["n"] == 2 and m["ms_ssim"] == 0.9 for m in cdc)
    assert all(m["ms_ssim"] is None for m in means if m["codec"] == "jpeg")

    eq = evaluate.equal_rate(rows, ["jpeg"])
    assert [e["level"] for e in eq] == [0, 1, 2]
    for e in eq:
        assert e["jpeg"]["n"] == 2
        assert e["jpeg"]["psnr"] < e["psnr"] and e["jpeg"]["lpips"] > e["lpips"]
    assert eq[1]["jpeg"]["psnr"] == pytest.approx(28.0)  # 0.2 bpp is a sample of JPEG's curve

    (bd,) = evaluate.bd_rates(means, ["jpeg"])
    # Not exactly -50%: our curve has fewer points, so its interpolant differs slightly.
    assert bd["psnr"] == pytest.approx(-50.0, abs=2) and bd["lpips"] == pytest.approx(-50.0, abs=2)

    result = {"config": {"codecs": ["jpeg"], "data_name": "x", "num_images": 2,
                          "decode": [{"rho": 0.0, "steps": 3, "noise_scale": 1.0}]},
              "means": means, "equal_rate": eq, "bd_rate": [bd]}
    table = evaluate.markdown(result)
    assert "| 0 | 0 | 0.100 | 28.00 |" in table
    assert "| 0 | -5" in table and "BD-rate vs JPEG" in table


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    rows = _rows()
    result = {"config": {"codecs": ["jpeg"], "data_name": "x", "num_images": 2,
                          "decode": [{"rho": 0.0, "steps": 3, "noise_scale": 1.0}]},
              "means": evaluate.summarise(rows)}
    evaluate.plot(result, tmp_path / "rd.png")
    assert Image.open(tmp_path / "rd.png").size[0] > 500


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit):
        evaluate.main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit):
        evaluate.main(["--data", str(tmp_path), "--out", str(tmp_path / "r.json"), "--rhos", "2"])


@pytest.fixture
def tiny_images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    y, x = np.mgrid[0:64, 0:64]
    for i in range(3):
        base = np.stack([128 + 90 * np.sin(x / (5 + i)), 128 + 90 * np.cos(y / 6), (x + y) * 1.8], axis=-1)
        img = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img{i}.png")
    return folder


def test_evaluate_end_to_end(tiny_pipeline_dir, tiny_images, tmp_path, capsys):
    out, png = tmp_path / "res" / "r.json", tmp_path / "res" / "r.png"
    args = ["--data", str(tiny_images), "--out", str(out), "--plot", str(png), "--checkpoint", str(tiny_pipeline_dir),
            "--levels", "0", "1", "--limit", "2", "--steps", "2", "--codecs", "jpeg", "webp"]
    evaluate.main(args)
    table = capsys.readouterr().out
    assert table.startswith("| level | ρ | bpp |")
    saved = json.loads(out.read_text())
    assert png.exists()
    assert saved["config"]["num_images"] == 2 and saved["config"]["levels"] == [0, 1]
    cdc = [r for r in saved["rows"] if r["codec"] == "cdc"]
    assert len(cdc) == 2 * 2 * 2  # images x levels x rhos
    assert all(r["bpp"] > 0 and r["psnr"] is not None and r["decode_s"] > 0 for r in cdc)
    assert {r["codec"] for r in saved["rows"]} == {"cdc", "jpeg", "webp"}
    assert len(saved["equal_rate"]) == 4 and len(saved["bd_rate"]) == 4
    assert {"machine", "timestamp", "means"} <= saved.keys()
    # Seeded decoding: a rerun gives the same numbers.
    again = evaluate.main([*args, "--codecs"])
    assert [r["psnr"] for r in again["rows"]] == [r["psnr"] for r in cdc]
    assert again["bd_rate"] == [] and "PSNR JPEG" not in capsys.readouterr().out


def test_fractional_sweep_and_continuity(tiny_pipeline_dir, tiny_images, tmp_path):
    out = tmp_path / "c.json"
    result = evaluate.main(["--data", str(tiny_images), "--out", str(out), "--checkpoint", str(tiny_pipeline_dir),
                            "--sweep", "5", "--rhos", "0", "--limit", "1", "--steps", "1", "--codecs"])
    assert result["config"]["levels"] == [0, 0.75, 1.5, 2.25, 3]
    (entry,) = result["continuous"]
    assert entry["rho"] == 0 and {"bpp_monotone", "psnr_monotone", "bd_rate_fractional_vs_levels_psnr"} <= entry.keys()
    with pytest.raises(SystemExit):
        evaluate.main(["--data", str(tiny_images), "--out", str(out), "--sweep", "1"])


def test_continuity_on_a_straight_curve():
    means = [{"codec": "cdc", "rho": 0.0, "level": q, "bpp": 0.1 * 2 ** q, "psnr": 24 + q, "lpips": 0.4 - 0.05 * q}
             for q in (0, 0.5, 1, 1.5, 2)]
    (entry,) = evaluate.continuity(means)
    assert entry["bpp_monotone"] and entry["psnr_monotone"]
    assert entry["bd_rate_fractional_vs_levels_psnr"] == pytest.approx(0.0, abs=1e-6)
