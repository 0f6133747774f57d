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
            "--levels", "0", "1", "--limit", "2", "--steps", "2", "--codecs", "jpeg", "webp", "--no-realism"]
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
    assert "realism" not in saved and all("dists" not in r for r in saved["rows"])
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


def test_realism_end_to_end(tiny_pipeline_dir, tiny_images, tmp_path, capsys, monkeypatch):
    # the tiny model's files (~60 bytes) are below what JPEG/WebP can write: give the codecs room
    budgets = {}
    real_matched = evaluate.evaluate_matched

    def roomy(images, ours, codecs, sets):
        budgets.update({(r["image"], r["level"]): r["bytes"] for r in ours})
        return real_matched(images, [{**r, "bytes": r["bytes"] * 20} for r in ours], codecs, sets)

    monkeypatch.setattr(evaluate, "evaluate_matched", roomy)
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    result = evaluate.main(["--data", str(tiny_images), "--out", str(out), "--plot", str(png), "--checkpoint",
                            str(tiny_pipeline_dir), "--levels", "0", "1", "--rhos", "0.9", "--limit", "2", "--steps", "1",
                            "--codecs", "jpeg", "--fid-patch", "32"])
    table = capsys.readouterr().out
    cdc = [r for r in result["rows"] if r["codec"] == "cdc"]
    assert all(0 <= r["dists"] < 1 and 0 <= r["lpips_vgg"] < 1 for r in cdc)
    assert all("dists" not in r for r in result["rows"] if r["codec"] == "jpeg")  # the sweep: cheap metrics only
    matched = result["matched_rows"]
    assert {(r["image"], r["level"]) for r in matched} == set(budgets)
    assert all(r["bytes"] <= 20 * budgets[(r["image"], r["level"])] and r["dists"] is not None for r in matched)
    sets = {(r["codec"], r["level"], r["rho"]): r for r in result["realism"]}
    assert set(sets) == {("cdc", 0, 0.9), ("cdc", 1, 0.9), ("jpeg", 0, None), ("jpeg", 1, None)}
    assert all(r["n"] == 2 and r["patches"] == 2 * 5 and r["fid"] > 0 and r["fid_std"] > 0 for r in sets.values())
    assert result["realism_floor"]["n"] == 2 and result["realism_floor"]["fid"] > 0
    assert [b["codec"] for b in result["bd_rate_realism"]] == ["jpeg"]
    assert "| level | ρ | bpp | DISTS | LPIPS-VGG | FID | KID×10³ |" in table and "over 10 patches of 32²" in table
    assert json.loads(out.read_text())["phases_s"].keys() == {"cdc_s", "classical_sweep_s", "matched_s", "fid_kid_s"}
    assert Image.open(png).size[1] > Image.open(png).size[0] / 2  # three rows of panels


def test_realism_markdown_and_plot_from_summaries(tmp_path):
    rows = _rows()
    means = evaluate.summarise([{**r, "dists": 0.25 - 0.05 * r["level"], "lpips_vgg": 0.45 - 0.05 * r["level"]}
                                if r["codec"] == "cdc" else r for r in rows])
    matched = [{"codec": "jpeg", "level": lv, "n": 1, "bpp": b, "psnr": 25.0, "ms_ssim": None, "lpips": 0.4,
                "dists": d, "lpips_vgg": d + 0.2} for lv, b, d in ((0, 0.09, 0.3), (1, 0.18, 0.25), (2, 0.36, 0.22))]
    realism = [{"codec": c, "level": lv, "rho": rho, "fid": 10.0 + lv, "kid": 0.004, "kid_std": 0.001, "patches": 16,
                "n": 2} for c, rho in (("cdc", 0.0), ("jpeg", None)) for lv in range(3)]
    result = {"config": {"codecs": ["jpeg"], "data_name": "x", "num_images": 2, "fid_patch": 256,
                         "decode": [{"rho": 0.0, "steps": 3, "noise_scale": 1.0}]},
              "means": means, "matched": matched, "realism": realism,
              "realism_floor": {"fid": 5.0, "kid": 0.001, "kid_std": 0.0005, "patches": 16, "n": 2},
              "bd_rate_realism": evaluate.bd_rates_realism(means, matched, ["jpeg"])}
    text = evaluate.realism_markdown(result)
    assert "| 1 | 0 | 0.200 | 0.200 | 0.400 | 11.0 | 4.0 | 0.250* | 0.450* | 11.0 | 4.0 |" in text
    assert "score FID 5.0, KID×10³ 1.0" in text and "std over the images is –" in text and "BD-rate vs JPEG (DISTS / LPIPS-VGG)" in text
    (bd,) = result["bd_rate_realism"]
    assert bd["dists"] < 0 and bd["lpips_vgg"] < 0  # lower DISTS and LPIPS-VGG at every rate
    evaluate.plot(result, tmp_path / "rd.png")
    assert Image.open(tmp_path / "rd.png").size[0] > 500


def test_gallery(tiny_pipeline_dir, tiny_images, tmp_path):
    out = tmp_path / "gallery"
    assert evaluate.main(["--data", str(tiny_images), "--checkpoint", str(tiny_pipeline_dir), "--steps", "1",
                          "--gallery", str(out), "--gallery-images", "img0.png", "missing.png",
                          "--gallery-levels", "0", "3"]) == {}
    strips = sorted(out.glob("*.png"))
    assert [p.name for p in strips] == ["img0-level0.png", "img0-level3.png"]
    strip = Image.open(strips[0])
    assert strip.size == (3 * 128, 128 + 40)  # original | CDC ρ=0 | ρ=0.9 (no JPEG/AVIF that small), 64² at 2×
    original = Image.open(tiny_images / "img0.png").convert("RGB").resize((128, 128), Image.NEAREST)
    assert strip.crop((0, 40, 128, 168)).tobytes() == original.tobytes()
    with pytest.raises(SystemExit):
        evaluate.main(["--data", str(tiny_images), "--gallery", str(out), "--gallery-images", "none.png"])
    with pytest.raises(SystemExit):
        evaluate.main(["--data", str(tiny_images)])  # neither --out nor --gallery
