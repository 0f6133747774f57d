import json

import numpy as np
import pytest
import torch

from app import bench


def test_synthetic_image_is_deterministic():
    a, b = bench.synthetic_image(96, 64), bench.synthetic_image(96, 64)
    assert a.size == (96, 64) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(a).std() > 20  # not a flat card


def test_timed_takes_the_median():
    calls = []
    seconds, out = bench.timed(lambda: calls.append(1) or len(calls), torch.device("cpu"), 3)
    assert len(calls) == 4 and out == 4 and seconds >= 0  # warm-up + 3


def test_gflops_of_a_conv():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    x = torch.zeros(1, 3, 16, 16)
    assert bench.gflops(conv, (x,), {}) == pytest.approx(2 * 16 * 16 * 8 * 3 * 9 / 1e9)


def test_bad_size():
    with pytest.raises(SystemExit):
        bench.main(["--size", "64by64"])


def test_bench_json(tiny_pipeline_dir, capsys):
    result = bench.main(["--json", "--checkpoint", str(tiny_pipeline_dir), "--size", "64x64", "--steps", "2",
                         "--repeats", "1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(result))
    assert result["weights"] == "checkpoint" and result["image"] == "64x64" and result["steps"] == 2
    assert result["encode_s"] > 0 and result["decode_s"] > 0
    assert result["decode_per_step_s"] == pytest.approx(result["decode_s"] / 2)
    assert result["unet_params"] > 0 and result["unet_gflops"] > 0
    assert result["memory"]["peak_mib"] > 0
    ref = result["paper_unet"]
    assert ref["config"]["block_out_channels"] == [64, 128, 192, 256, 320, 384]
    assert ref["params"] > result["unet_params"] and ref["gflops"] > 0 and ref["forward_s"] > 0


def test_bench_text_with_random_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("app.pipeline.DEFAULT_CHECKPOINT", tmp_path / "none")
    bench.main(["--size", "64x64", "--steps", "1", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "random" in out and "paper UNet" in out


def test_train_throughput_tiny(tiny_pipeline_dir, capsys):
    result = bench.main(["--train", "--json", "--checkpoint", str(tiny_pipeline_dir), "--train-steps", "2",
                         "--train-warmup", "1", "--train-batch", "2", "--train-crop", "64"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(result))
    assert result["device"] == "cpu" and result["train_batch_size"] == 2 and result["train_crop"] == 64
    assert result["train_crops_per_s"] == pytest.approx(2 * result["train_steps_per_s"]) and result["train_crops_per_s"] > 0
    assert result["train_stage"] == "joint"
    bench.main(["--train", "--checkpoint", str(tiny_pipeline_dir), "--train-steps", "1", "--train-warmup", "0",
                "--train-batch", "1", "--train-crop", "64", "--train-stage", "compressor"])
    report = capsys.readouterr().out
    assert "crops/s" in report and "compressor training step" in report
    with pytest.raises(SystemExit):
        bench.main(["--train", "--train-crop", "100"])


def test_train_throughput_with_the_speed_flags(tiny_pipeline_dir):
    """fused Adam, channels-last and torch.compile of the UNet (inductor: about 30 s the first time on a 2-core CPU)."""
    result = bench.main(["--train", "--json", "--checkpoint", str(tiny_pipeline_dir), "--train-steps", "1",
                         "--train-warmup", "1", "--train-batch", "2", "--train-crop", "64",
                         "--fused-adam", "--channels-last", "--compile"])
    assert result["train_speed"] == ["--fused-adam", "--channels-last", "--compile"]
    assert result["train_crops_per_s"] > 0 and result["train_warmup_s"] > 0 and result["train_warmup_steps"] == 1


def test_bench_tiled_without_reference(tiny_pipeline_dir, capsys):
    result = bench.main(["--checkpoint", str(tiny_pipeline_dir), "--size", "1100x130", "--steps", "1", "--repeats", "1",
                         "--no-reference"])
    out = capsys.readouterr().out
    assert result["paper_unet"] is None and "paper UNet" not in out and "windows of 1024 px" in out
    assert result["tiled"] and result["band_rows"] == 896 and "bands of 896 rows" in out  # 2**20 px / 1152 px wide
    assert result["unet_forward_s"] is None and result["decode_s_per_mpx"] > 0
