import json

import numpy as np
import pytest
from PIL import Image

from app import tune
from app.pipeline import load_pipeline


def row(sched, spacing, k, g, rho, psnr, lpips):
    return {"scheduler": sched, "spacing": spacing, "steps": k, "noise_scale": g, "rho": rho, "psnr": psnr,
            "lpips": lpips, "seconds_per_crop": 0.1 * k}


def test_grid_measures_one_step_once_and_slow_settings_in_one_family():
    settings = tune.grid([1, 2, 4, 8], [0.0, 1.0], ["ddim", "dpmpp"], ["trailing", "linspace"], max_steps=4)
    assert [s for s in settings if s.steps == 1] == [tune.Setting("any", "trailing", 1, 0.0),
                                                     tune.Setting("any", "trailing", 1, 1.0)]
    assert {(s.scheduler, s.spacing) for s in settings if s.steps == 8} == {("ddim", "trailing")}
    assert len(settings) == 2 + 2 * 2 * 2 * 2 + 2
    assert tune.Setting("any", "trailing", 1, 0.0).in_family("dpmpp", "linspace")


def test_choose_respects_the_step_budget_and_the_metric_per_rho():
    summary = [
        row("any", "trailing", 1, 0.0, 0.0, 25.0, 0.30), row("any", "trailing", 1, 1.0, 0.0, 24.0, 0.28),
        row("ddim", "trailing", 8, 0.8, 0.0, 30.0, 0.10),  # best, but slower than the budget
        row("ddim", "trailing", 2, 0.5, 0.0, 24.5, 0.20),
        row("any", "trailing", 1, 0.0, 0.9, 25.0, 0.30), row("any", "trailing", 1, 1.0, 0.9, 23.0, 0.25),
        row("ddim", "trailing", 2, 0.5, 0.9, 26.0, 0.27),
        row("dpmpp", "trailing", 3, 0.8, 0.9, 20.0, 0.21),
    ]
    choice = tune.choose(summary, max_steps=4, current_family=("ddim", "trailing"))
    assert (choice["scheduler"], choice["timestep_spacing"]) == ("dpmpp", "trailing")  # wins ρ = 0.9, ties ρ = 0
    assert choice["decode_defaults"] == [{"rho": 0.0, "num_inference_steps": 1, "noise_scale": 0.0},
                                         {"rho": 0.9, "num_inference_steps": 3, "noise_scale": 0.8}]
    table = tune.markdown(summary, choice, top=2)
    assert "| ddim | trailing | 8 | 0.8 | 30.00 |" in table and table.count("**picked**") == 2


def test_fewer_steps_win_when_the_metric_is_within_reach():
    summary = [row("any", "trailing", 1, 0.0, 0.0, 24.111, 0.34), row("ddim", "trailing", 3, 0.0, 0.0, 24.114, 0.335),
               row("ddim", "trailing", 4, 0.0, 0.3, 23.59, 0.22), row("ddim", "trailing", 3, 0.0, 0.3, 23.54, 0.22),
               row("any", "trailing", 1, 0.5, 0.9, 23.0, 0.2015), row("ddim", "trailing", 2, 0.5, 0.9, 23.1, 0.2000)]
    steps = [d["num_inference_steps"] for d in tune.choose(summary, 4, ("ddim", "trailing"))["decode_defaults"]]
    assert steps == [1, 4, 1]  # 0.003 dB is not worth 3 steps; 0.05 dB is worth one more


def test_ties_keep_the_current_family():
    summary = [row("any", "trailing", 1, 0.0, 0.0, 25.0, 0.3), row("ddim", "linspace", 2, 0.0, 0.0, 20.0, 0.3),
               row("ddim", "trailing", 2, 0.0, 0.0, 20.0, 0.3)]
    assert tune.choose(summary, 4, ("ddim", "trailing"))["timestep_spacing"] == "trailing"


@pytest.fixture
def val_images(tmp_path):
    folder = tmp_path / "val"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (70, 80 + i, 3), dtype=np.uint8)).save(folder / f"v{i}.png")
    Image.new("RGB", (40, 40)).save(folder / "small.png")  # below the crop: skipped
    return folder


def test_tune_end_to_end_applies_the_choice(tiny_pipeline, tmp_path, val_images, capsys):
    ckpt = tmp_path / "cdc"
    tiny_pipeline.save_pretrained(ckpt)
    out = tmp_path / "tune.json"
    result = tune.main(["--data", str(val_images), "--checkpoint", str(ckpt), "--out", str(out), "--apply",
                        "--crop", "64", "--levels", "0", "--rhos", "0", "0.9", "--steps", "1", "2", "6",
                        "--noise-scales", "0", "1", "--spacings", "trailing", "--max-steps", "4"])
    assert result["config"]["images"] == ["v0.png", "v1.png"]
    assert len(result["rows"]) == (2 + 2 * 2 + 2 * 1) * 2  # settings × ρ, one level; K = 6 only for ddim
    assert json.loads(out.read_text())["choice"] == result["choice"]
    printed = capsys.readouterr().out
    assert "picked by PSNR" in printed and "| LPIPS | DISTS |" in printed
    assert all(r["dists"] is None or 0 < r["dists"] < 1 for r in result["rows"])  # reported, not chosen by
    loaded = load_pipeline(ckpt)
    assert loaded.config.decode_defaults == result["choice"]["decode_defaults"]
    assert all(d["num_inference_steps"] <= 4 for d in loaded.config.decode_defaults)
    assert "_name_or_path" not in json.loads((ckpt / "model_index.json").read_text())
    quick = tune.main(["--data", str(val_images), "--checkpoint", str(ckpt), "--crop", "64", "--levels", "0",
                       "--rhos", "0.9", "--steps", "1", "--noise-scales", "0", "--no-dists"])
    assert [r["dists"] for r in quick["rows"]] == [None] and "| – |" in capsys.readouterr().out
    again = tune.main(["--checkpoint", str(ckpt), "--rows-from", str(out)])
    assert again["rows"] == result["rows"] and again["choice"] == result["choice"]  # chosen again, not measured
    other = tmp_path / "other.json"
    other.write_text(json.dumps(json.loads(out.read_text()) | {"config": {"model_id": "0" * 16}}))
    with pytest.raises(SystemExit, match="not this checkpoint"):
        tune.main(["--checkpoint", str(ckpt), "--rows-from", str(other)])


def test_tune_rejects_bad_arguments(tmp_path):
    for bad in (["--crop", "100"], ["--noise-scales", "-1"], ["--steps", "8", "--max-steps", "4"], ["--rhos", "2"]):
        with pytest.raises(SystemExit):
            tune.main(["--data", str(tmp_path), *bad])
    with pytest.raises(SystemExit):
        tune.main(["--data", str(tmp_path), "--schedulers", "euler"])
    with pytest.raises(SystemExit):
        tune.main([])  # neither --data nor --rows-from
