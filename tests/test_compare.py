import json

import pytest

from app import compare


def result(psnr_shift=0.0, lpips_scale=1.0, images=("a.png", "b.png")):
    means = []
    for level, bpp in enumerate((0.1, 0.2, 0.4)):
        means.append({"codec": "cdc", "level": level, "rho": 0.0, "bpp": bpp, "psnr": 24 + 2 * level + psnr_shift,
                      "lpips": 0.4})
        means.append({"codec": "cdc", "level": level, "rho": 0.9, "bpp": bpp, "psnr": 22.0,
                      "lpips": (0.3 - 0.05 * level) * lpips_scale})
    means.append({"codec": "jpeg", "quality": 50, "bpp": 0.3, "psnr": 30.0, "lpips": 0.2})
    return {"images": [{"name": n} for n in images], "means": means}


def test_better_on_one_metric_and_no_worse_on_the_other_beyond_the_margin_ships():
    verdict = compare.compare(result(), result(psnr_shift=0.5, lpips_scale=1.002))
    assert verdict["bd_rate"]["psnr@0"] < 0 and 0 < verdict["bd_rate"]["lpips@0.9"] < compare.MARGIN_BD_RATE
    assert verdict["verdicts"] == {"psnr@0": "better", "lpips@0.9": "same"} and verdict["ship"]


def test_better_on_one_metric_but_worse_on_the_other_is_not_shipped():
    verdict = compare.compare(result(), result(psnr_shift=0.5, lpips_scale=1.05))  # the PSNR gain, realism lost
    assert verdict["bd_rate"]["lpips@0.9"] > compare.MARGIN_BD_RATE
    assert verdict["verdicts"] == {"psnr@0": "better", "lpips@0.9": "worse"} and not verdict["ship"]


def test_worse_on_both_is_not_shipped(tmp_path, capsys):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(result()))
    new.write_text(json.dumps(result(psnr_shift=-0.5, lpips_scale=1.1)))
    assert compare.main([str(old), str(new)]) == 1
    assert "keep the shipped checkpoint" in capsys.readouterr().out
    assert compare.main([str(old), str(old)]) == 1  # equal is not better


def test_different_images_or_missing_files_are_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="same images"):
        compare.compare(result(), result(images=("a.png",)))
    assert compare.main([str(tmp_path / "missing.json"), str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_uniformly_better_curves_ship_by_the_delta_at_equal_rate():
    verdict = compare.compare(result(), result(psnr_shift=5.0, lpips_scale=0.5))  # no overlap in quality
    assert verdict["bd_rate"] == {"psnr@0": None, "lpips@0.9": None} and verdict["ship"]
    assert verdict["delta_at_equal_rate"]["psnr@0"] == pytest.approx(5.0)
    assert verdict["delta_at_equal_rate"]["lpips@0.9"] < 0
