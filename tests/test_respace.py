"""scripts/respace_levels.py: levels moved along the continuous-rate curve, with matching λ."""

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from app.pipeline import image_to_tensor, load_pipeline

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def respace():
    spec = importlib.util.spec_from_file_location("respace_levels", ROOT / "scripts" / "respace_levels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lambdas_interpolate_log_log_and_extrapolate_the_end_slopes(respace):
    rates, lambdas = [0.1, 0.2, 0.4], [1.0, 0.25, 0.125]
    assert respace.interpolate_lambdas(rates, lambdas, rates) == lambdas
    low, mid, high = respace.interpolate_lambdas(rates, lambdas, [0.05, 0.2 * 2 ** 0.5, 0.8])
    assert low == pytest.approx(4.0, rel=1e-3)  # slope −2 below the first pair
    assert mid == pytest.approx(0.25 / 2 ** 0.5, rel=3e-3)  # 3 significant digits
    assert high == pytest.approx(0.0625, rel=1e-3)  # slope −1 above the last pair


def test_respaced_levels_land_on_the_target_rates(respace, tiny_pipeline, tmp_path):
    ckpt = tmp_path / "cdc"
    pipe = copy.deepcopy(tiny_pipeline)
    with torch.no_grad():  # untrained, the tiny model codes nothing below these gains
        pipe.compressor.log2_gain += 4.5
        pipe.compressor.log2_inverse_gain -= 4.5
    pipe.save_pretrained(ckpt)
    (ckpt / "training_state.json").write_text(json.dumps({"lambdas": [0.4, 0.2, 0.1, 0.05], "runs": []}))
    data = tmp_path / "photos"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        smooth = rng.normal(size=(8, 8, 3)).cumsum(0).cumsum(1)
        img = (255 * (smooth - smooth.min()) / np.ptp(smooth)).astype(np.uint8)
        PIL.Image.fromarray(img).resize((128, 128), PIL.Image.BICUBIC).save(data / f"{i}.png")

    old = load_pipeline(ckpt).compressor.float().eval()
    images = [image_to_tensor(PIL.Image.open(p).convert("RGB")) for p in sorted(data.iterdir())]
    low, high = respace.mean_bpp(old, images, 0.5), respace.mean_bpp(old, images, 4.0)  # 4.0: past the top level
    out = tmp_path / "respaced"
    respace.main(["--checkpoint", str(ckpt), "--data", str(data), "--bpp", str(low), str(high), "--out", str(out)])

    new = load_pipeline(out)
    rates = [respace.mean_bpp(new.compressor.float().eval(), images, q) for q in range(4)]
    assert rates == pytest.approx(np.geomspace(low, high, 4).tolist(), rel=0.02)
    state = json.loads((out / "training_state.json").read_text())
    assert state["runs"][-1]["respaced"]["quality"][0] == pytest.approx(0.5, abs=0.01)
    assert all(a > b for a, b in zip(state["lambdas"], state["lambdas"][1:]))
    assert new.model_id != load_pipeline(ckpt).model_id
    with torch.no_grad():
        assert new.decompress(new.compress(data / "0.png", 3), progress=False).size == (128, 128)
