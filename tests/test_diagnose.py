import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from app import diagnose


def _photos(n=2, seed=0):
    rng = np.random.default_rng(seed)
    smooth = [np.kron(rng.integers(0, 255, (9, 12, 3)), np.ones((8, 8, 1))).astype(np.uint8) for _ in range(n)]
    return [Image.fromarray(a[:70, :90]) for a in smooth]


def test_channels_that_carry_nothing_are_counted_inactive(tiny_pipeline):
    pipe = copy.deepcopy(tiny_pipeline)
    rows = diagnose.measure(pipe, _photos(), levels=[0, 3])
    assert set(rows) == {"q0", "q3"}
    for r in rows.values():
        assert r["bpp"] > 0 and np.isfinite([r["psnr_base"], r["psnr_rho0"], r["psnr_ceiling"]]).all()
        assert 0 <= r["active_channels"] <= r["channels"] == 16 and 0 <= r["inactive_bit_share"] <= 1
        assert r["lpips_rho"] > 0  # a random tiny model: LPIPS may exceed 1
        assert r["dists_rho"] is None or 0 < r["dists_rho"] < 1  # None where the VGG16 weights are not installed
        assert (r["dists_rho0"] is None) == (r["dists_rho"] is None)
        assert r["dists_rho0"] is None or 0 < r["dists_rho0"] < 1 and r["dists_rho0"] != r["dists_rho"]  # two decodes
    with torch.no_grad():  # channels 0-9 of y become constant: nothing to lose when set to their mean
        pipe.compressor.g_a[-1].weight[:10] = 0
    pipe.weights_changed()
    dead = diagnose.measure(pipe, _photos(), levels=[3], decode=False)["q3"]
    assert dead["active_channels"] <= 6 and dead["psnr_rho0"] is None and dead["lpips_rho"] is dead["dists_rho"] is dead["dists_rho0"] is None
    unablated = diagnose.measure(pipe, _photos(), levels=[3], channels=False)["q3"]  # the UNet stage's validation
    assert unablated["active_channels"] is None and unablated["inactive_bit_share"] is None
    assert unablated["psnr_base"] == pytest.approx(dead["psnr_base"]) and unablated["lpips_rho"] > 0
    assert "| – | – |" in diagnose.table({"q3": unablated})


def test_channel_drops_see_the_channel_that_holds_the_image(tiny_pipeline):
    compressor = copy.deepcopy(tiny_pipeline.compressor).eval()
    q = torch.tensor([2])
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    _, y_hat, bits = diagnose._latents(compressor, x, q)
    drops = diagnose.channel_drops(compressor, y_hat, x, q)
    assert drops.shape == (16,) and bits.shape == (16,) and (bits >= 0).all()
    flat = y_hat.clone()
    flat[:, 5] = flat[:, 5].mean()  # channel 5 already at its mean: ablating it changes nothing
    assert diagnose.channel_drops(compressor, flat, x, q)[5].abs().item() < 1e-4


def test_the_command_prints_the_table_and_writes_json(tiny_pipeline_dir, tmp_path, capsys):
    data = tmp_path / "photos"
    data.mkdir()
    for i, img in enumerate(_photos()):
        img.save(data / f"{i}.png")
    assert diagnose.main([str(tiny_pipeline_dir), "--data", str(data), "--levels", "1", "--json", str(tmp_path / "d.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| level | bpp | x_base PSNR") and "/16 |" in out
    assert json.loads((tmp_path / "d.json").read_text())["q1"]["channels"] == 16
    assert diagnose.main([str(tmp_path / "nope"), "--data", str(data)]) == 1
    assert capsys.readouterr().err.startswith("error:")
