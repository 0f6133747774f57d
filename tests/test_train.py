import json
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

from app import train, train_data
from app.pipeline import load_pipeline

ROOT = Path(__file__).resolve().parent.parent


def test_pack_then_short_resumed_training_run(tiny_pipeline_dir, tmp_path):
    from PIL import Image
    import numpy as np

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (100 + i, 140, 3), dtype=np.uint8)).save(src / f"{i}.png")
    packed = tmp_path / "packed"
    train.main(["--data", str(src), "--pack-to", str(packed), "--pack-tile", "64"])
    tiles = sorted(packed.iterdir())
    assert len(tiles) == 3 * 3  # every photo gives area // 64² = 3 tiles, at its own resolution
    assert all(Image.open(t).size == (64, 64) for t in tiles)
    small = train_data.pack([src], tmp_path / "small", tile=64, max_mb=2.5 * tiles[0].stat().st_size / 1e6, quality=90)
    assert small["tiles"] == 2 and small["bytes"] <= 2.5 * tiles[0].stat().st_size  # the budget is never exceeded
    assert small["pixels"] == 2 * 64 * 64 and small["photos"] == 3

    out = tmp_path / "run"
    train.main([
        "--data", str(packed), "--val", str(src), "--val-count", "1", "--resume", str(tiny_pipeline_dir),
        "--out", str(out), "--max-minutes", "0.05", "--batch-size", "2", "--crop", "64",
        "--lambdas", "0.1", "0.05", "0.02", "0.01", "--device", "cpu", "--grid-share", "0.5",
    ])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 1 and log[0]["bpp"] > 0 and 0 < log[0]["lpips_x0"] < 2
    state = json.loads((out / "training_state.json").read_text())
    assert "diagnostics" in log[-1] and log[-1]["step"] == state["runs"][-1]["steps"]  # the shipped weights, validated
    assert state["total_steps"] >= 1 and state["runs"][-1]["crops"] == 2 * state["runs"][-1]["steps"]
    assert state["runs"][-1]["crops_per_s"] > 0 and state["runs"][-1]["timesteps"].startswith("0.5 on the")
    resumed = load_pipeline(out)
    assert resumed.num_quality_levels == 4
    assert resumed.decompress(resumed.compress(src / "0.png", 2), progress=False).size == (140, 100)


def test_decode_grid_is_the_trailing_schedules():
    assert train.decode_grid() == [[999], [999, 499], [999, 666, 332], [999, 749, 499, 249]]


def test_timestep_sampler_favours_the_decode_grid_at_the_requested_share():
    import torch

    grid = train.decode_grid()
    points = torch.tensor(sorted({t for ts in grid for t in ts}))

    def near_grid(t, jitter):
        return ((t[:, None] - points[None]).abs() <= jitter).any(1).float().mean().item()

    def draw(share, jitter, seed=0, n=20000):
        return train.sample_timesteps(n, torch.Generator().manual_seed(seed), grid, share, jitter)

    all_grid = draw(1.0, 8)
    assert all_grid.min() >= 0 and all_grid.max() <= 999 and near_grid(all_grid, 8) == 1.0
    assert (draw(1.0, 0) >= 999).float().mean().item() == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4, abs=0.02)
    window = len(points) * 17 / 1000  # chance that a uniform t lands within ±8 of a grid point
    half = draw(0.5, 8)
    assert near_grid(half, 8) == pytest.approx(0.5 + 0.5 * window, abs=0.02)
    uniform = draw(0.0, 8)
    assert near_grid(uniform, 8) == pytest.approx(window, abs=0.02) and uniform.max() <= 999
    assert torch.equal(draw(0.5, 8, seed=3), draw(0.5, 8, seed=3))
    assert not torch.equal(draw(0.5, 8, seed=3), draw(0.5, 8, seed=4))


def test_two_process_data_parallel_run_on_cpu(tiny_pipeline_dir, tmp_path):
    """accelerate under torch.distributed (gloo on the CPU): two processes, one checkpoint."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(src / f"{i}.png")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "app.train",
           "--data", str(src), "--resume", str(tiny_pipeline_dir), "--out", str(out), "--max-steps", "2",
           "--batch-size", "2", "--crop", "64", "--lambdas", "0.1", "0.05", "0.02", "0.01", "--device", "cpu"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    run = json.loads((out / "training_state.json").read_text())["runs"][-1]
    assert run["processes"] == 2 and run["steps"] == 2 and run["crops"] == 2 * 2 * 2
    assert load_pipeline(out).num_quality_levels == 4


def test_crop_sampler_cuts_flipped_crops_of_every_image_size_deterministically():
    import numpy as np
    import torch
    from PIL import Image

    def as_uint8(x):
        return ((x + 1) * 127.5).round().to(torch.uint8)

    def match(crops, image):  # (crops, windows) where crop = window, and where crop = mirrored window
        windows = image.permute(2, 0, 1).unfold(1, 16, 1).unfold(2, 16, 1).permute(1, 2, 0, 3, 4).reshape(1, -1, 3, 16, 16)
        return ((crops[:, None] == windows).all((2, 3, 4)), (crops.flip(-1)[:, None] == windows).all((2, 3, 4)))

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((24, 24), (24, 24), (30, 41), (12, 20))]
    images = [Image.fromarray(a) for a in arrays]
    sampler = train_data.CropSampler(images, 16, "cpu", seed=5)
    assert len(sampler) == 4 and len(sampler.stacks) == 3  # the 12×20 image is upscaled to a short side of 16
    x = sampler.batch(64)
    assert x.shape == (64, 3, 16, 16) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    planes = [torch.from_numpy(np.array(images[3].resize((27, 16), Image.BICUBIC) if k == 3 else a))
              for k, a in enumerate(arrays)]
    hits = [match(as_uint8(x), p) for p in planes]
    plain = torch.stack([h[0].any(1) for h in hits], 1)
    mirrored = torch.stack([h[1].any(1) for h in hits], 1)
    assert (plain | mirrored).any(1).all()  # every crop is a window of an image, possibly mirrored
    assert (plain | mirrored).any(0).all() and 16 < int((~plain.any(1)).sum()) < 48  # all images, about half mirrored

    one = torch.from_numpy(rng.integers(0, 256, (18, 21, 3), dtype=np.uint8))
    plain, mirrored = match(as_uint8(train_data.CropSampler([Image.fromarray(one.numpy())], 16, "cpu", 0).batch(400)), one)
    assert plain.any(0).sum() == mirrored.any(0).sum() == 3 * 6  # every position, plain and mirrored

    assert torch.equal(train_data.CropSampler(images, 16, "cpu", seed=5).batch(64), x)
    assert not torch.equal(train_data.CropSampler(images, 16, "cpu", seed=6).batch(64), x)


def test_lpips_only_where_rho_weighs_it_leaves_the_loss_unchanged(tiny_pipeline, monkeypatch):
    import copy

    import torch

    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 32, 128):
        rho = train.sample_rho(n, g)
        picked = train.perceptual_indices(rho)
        assert set((rho > 0).nonzero().flatten().tolist()) <= set(picked.tolist())
        assert len(set(picked.tolist())) == len(picked) and (len(picked) % 8 == 0 or len(picked) == n)

    args = train.parse_args(["--data", "x", "--device", "cpu", "--lambdas", "0.1", "0.05", "0.02", "0.01"])
    x = torch.rand(8, 3, 64, 64) * 2 - 1

    def first_loss():
        torch.manual_seed(0)  # compressai's quantisation noise
        return train.Trainer(copy.deepcopy(tiny_pipeline), args).step(x, 1e-4)["loss"].item()

    only = train.perceptual_indices
    monkeypatch.setattr(train, "perceptual_indices", lambda rho, multiple: only(rho, multiple=1))  # 5 of these 8 have ρ > 0
    subset = first_loss()
    monkeypatch.setattr(train, "perceptual_indices", lambda rho, multiple: torch.arange(len(rho)))
    assert subset == pytest.approx(first_loss(), rel=1e-6)


def test_speed_flags_and_scaled_lr_train_validate_and_save_on_cpu(tiny_pipeline_dir, tmp_path):
    import numpy as np
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(src / "0.png")
    out = tmp_path / "run"
    train.main(["--data", str(src), "--val", str(src), "--val-count", "1", "--val-every-minutes", "0",
                "--resume", str(tiny_pipeline_dir), "--out", str(out), "--max-steps", "2", "--batch-size", "2",
                "--crop", "64", "--lambdas", "0.1", "0.05", "0.02", "0.01", "--device", "cpu",
                "--fused-adam", "--channels-last", "--lr-scaling", "sqrt", "--warmup-crops", "4"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert "diagnostics" in log[-1] and log[-1]["step"] == 2  # validation on the channels-last weights
    assert sum("diagnostics" in row for row in log) == 1  # the end does not validate the same weights again
    assert log[-1]["diagnostics"]["q0"]["psnr_rho0"] > 0 and log[-1]["diagnostics"]["q3"]["bpp"] > 0
    run = json.loads((out / "training_state.json").read_text())["runs"][-1]
    assert run["speed"] == ["--fused-adam", "--channels-last"] and run["steps"] == 2
    assert run["lr"] == pytest.approx(3e-4 * (2 / 32) ** 0.5) and run["lr_scaling"] == "sqrt" and run["warmup_steps"] == 2
    assert log[0]["lr"] == pytest.approx(run["lr"] / 2, rel=0.01)  # step 1 of a 2-step warm-up
    resumed = load_pipeline(out)  # saved contiguous, as safetensors needs
    assert resumed.decompress(resumed.compress(src / "0.png", 1), progress=False).size == (100, 80)


def test_bf16_autocast_as_on_cuda_trains_and_saves_on_cpu(tiny_pipeline_dir, tmp_path):
    """The CUDA path: accelerate casts the bf16 outputs back to fp32 by rebuilding the output dataclasses."""
    import numpy as np
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(src / "0.png")
    out = tmp_path / "run"
    AcceleratorState._reset_state(reset_partial_state=True)  # the process-wide state other tests set to "no"
    try:
        train.main(["--data", str(src), "--resume", str(tiny_pipeline_dir), "--out", str(out), "--max-steps", "2",
                    "--batch-size", "2", "--crop", "64", "--lambdas", "0.1", "0.05", "0.02", "0.01", "--device", "cpu",
                    "--mixed-precision", "bf16"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 1 and all(np.isfinite(log[0][k]) for k in ("loss", "bpp", "psnr_x0"))
    assert json.loads((out / "training_state.json").read_text())["runs"][-1]["steps"] == 2


def test_a_resumed_run_keeps_the_checkpoints_lambdas_unless_given(tiny_pipeline_dir, tmp_path):
    import numpy as np
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(src / "0.png")
    common = ["--data", str(src), "--max-steps", "1", "--batch-size", "1", "--crop", "64", "--device", "cpu"]
    train.main([*common, "--resume", str(tiny_pipeline_dir), "--out", str(tmp_path / "a"), "--lambdas", "0.3", "0.2", "0.1", "0.05"])
    train.main([*common, "--resume", str(tmp_path / "a"), "--out", str(tmp_path / "b")])
    state = json.loads((tmp_path / "b" / "training_state.json").read_text())
    assert state["lambdas"] == [0.3, 0.2, 0.1, 0.05] and len(state["runs"]) == 2
    with pytest.raises(SystemExit, match="6 lambdas for a model with 4"):  # no state: the 6 defaults
        train.main([*common, "--resume", str(tiny_pipeline_dir), "--out", str(tmp_path / "c")])


def test_lr_scaling_with_the_batch_and_warm_up_in_crops():
    def schedule(*flags, processes=1):
        return train.lr_schedule(train.parse_args(["--data", "x", *flags]), processes)

    assert schedule() == (3e-4, 300)  # the recipe, unchanged by default
    assert schedule("--batch-size", "128") == (3e-4, 300)
    assert schedule("--batch-size", "128", "--lr-scaling", "sqrt", "--warmup-crops", "9600") == (pytest.approx(6e-4), 75)
    assert schedule("--batch-size", "64", "--lr-scaling", "linear", processes=2) == (pytest.approx(1.2e-3), 300)
    assert schedule("--batch-size", "32", "--lr-scaling", "sqrt", "--warmup-crops", "9600") == (pytest.approx(3e-4), 300)
    with pytest.raises(SystemExit):
        train.parse_args(["--data", "x", "--warmup-crops", "0"])


def test_a_diverging_run_stops_with_an_error_and_keeps_the_last_complete_save(tiny_pipeline_dir, tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(src / "0.png")
    out = tmp_path / "run"
    common = ["--data", str(src), "--resume", str(tiny_pipeline_dir), "--out", str(out), "--batch-size", "2",
              "--crop", "64", "--lambdas", "0.1", "0.05", "0.02", "0.01", "--device", "cpu", "--warmup-steps", "1"]
    train.main([*common, "--max-steps", "2"])
    saved = (out / "training_state.json").read_text()
    with pytest.raises(SystemExit, match="EMA weights are not finite"):
        train.main([*common, "--max-steps", "60", "--lr", "1e30"])
    assert (out / "training_state.json").read_text() == saved
    assert load_pipeline(out).num_quality_levels == 4
    monkeypatch.setattr(train, "save", lambda *a: None)  # without saves, the log step's loss check stops it
    with pytest.raises(SystemExit, match="non-finite loss at step 50"):
        train.main([*common, "--max-steps", "60", "--lr", "1e30"])


def _noise_photo(folder: Path, seed: int = 0) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (72, 96, 3), dtype=np.uint8)).save(folder / "0.png")
    return folder


@pytest.mark.parametrize("stage", train.STAGES)
def test_each_stage_trains_only_its_own_parameters(tiny_pipeline, stage):
    import copy

    import torch

    pipe = copy.deepcopy(tiny_pipeline)
    before = {name: copy.deepcopy(module.state_dict()) for name, module in (("compressor", pipe.compressor), ("unet", pipe.unet))}
    args = train.parse_args(["--data", "x", "--device", "cpu", "--stage", stage, "--lambdas", "0.01", "0.02", "0.04", "0.08"])
    trainer = train.Trainer(pipe, args)
    out = trainer.step(torch.rand(4, 3, 64, 64) * 2 - 1, 1e-3)
    assert torch.isfinite(out["loss"]) and (out["x0_hat"] is None) == (stage == "compressor")

    def changed(name):
        after = getattr(pipe, name).state_dict()
        return any(not torch.equal(after[k], v) for k, v in before[name].items() if v.is_floating_point())

    assert changed("compressor") == (stage != "denoiser")
    assert changed("unet") == (stage != "compressor")


def test_a_run_continues_from_its_state_with_adam_ema_and_step(tiny_pipeline_dir, tmp_path):
    import torch

    src = _noise_photo(tmp_path / "src")
    out, state = tmp_path / "run", tmp_path / "state"
    common = ["--data", str(src), "--resume", str(tiny_pipeline_dir), "--out", str(out), "--state", str(state),
              "--stage", "compressor", "--batch-size", "2", "--crop", "64", "--lambdas", "0.01", "0.02", "0.04", "0.08",
              "--device", "cpu", "--max-steps", "3"]
    train.main(common)
    assert json.loads((state / "run.json").read_text())["steps"] == 3
    train.main(common)  # continues: three more steps on the fp32 weights, Adam's moments and the EMA
    assert json.loads((state / "run.json").read_text())["steps"] == 6
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log if "loss" in row] == [1, 4]
    adam = torch.load(state / "optimizer.bin", weights_only=False)["state"]
    assert {int(s["step"]) for s in adam.values()} == {6}
    assert torch.load(state / "custom_checkpoint_0.pkl", weights_only=False)["optimization_step"] == 6
    runs = json.loads((out / "training_state.json").read_text())["runs"]
    assert [r["steps"] for r in runs[-2:]] == [3, 3] and all(r["stage"] == "compressor" for r in runs[-2:])
    train.main([*common, "--stage", "denoiser", "--max-steps", "1"])  # another stage starts afresh
    assert json.loads((state / "run.json").read_text()) | {"architecture": None} == \
        {"stage": "denoiser", "steps": 1, "crops": 2, "minutes": pytest.approx(0, abs=1), "architecture": None}


def test_a_grown_compressor_trains_and_ships_its_base_synthesis_and_wider_encoder(tiny_pipeline_dir, tmp_path):
    src = _noise_photo(tmp_path / "src", 3)
    out = tmp_path / "run"
    train.main(["--data", str(src), "--resume", str(tiny_pipeline_dir), "--out", str(out), "--stage", "compressor",
                "--base-channels", "8", "4", "--encoder-channels", "8", "12", "16", "--batch-size", "2", "--crop", "64",
                "--device", "cpu", "--max-steps", "2", "--lambdas", "0.01", "0.02", "0.04", "0.08"])
    pipe = load_pipeline(out)
    assert tuple(pipe.compressor.config.base_channels) == (8, 4)
    assert tuple(pipe.compressor.config.encoder_channels) == (8, 12, 16)
    assert pipe.decompress(pipe.compress(src / "0.png", 3), progress=False).size == (96, 72)


def test_the_first_checkpoints_lambdas_read_in_compressais_convention():
    state = {"lambdas": [4 / 255**2, 0.5]}
    assert train.prior_lambdas(state) == pytest.approx([1.0, 8 / 255**2])
    assert train.prior_lambdas({**state, "lambda_convention": "compressai"}) == state["lambdas"]
    assert train.prior_lambdas({}) is None


def test_content_grad_scales_only_the_denoisers_gradient_into_the_compressor(tiny_pipeline):
    """--content-grad 0: the joint stage's compressor gradient is the compressor stage's (rate + x_base);
    1: Eq. 7 as it is, the denoiser's gradient added; the UNet's gradient does not depend on it."""
    import copy

    import torch

    x = torch.rand(4, 3, 64, 64) * 2 - 1

    def gradients(stage, alpha):
        pipe = copy.deepcopy(tiny_pipeline)
        args = train.parse_args(["--data", "x", "--device", "cpu", "--stage", stage, "--content-grad", str(alpha),
                                 "--balance-levels", "--lambdas", "0.01", "0.02", "0.04", "0.08"])
        trainer = train.Trainer(pipe, args)
        torch.manual_seed(0)  # the entropy bottleneck's training noise
        trainer.step(x, 0.0)  # lr 0: gradients (clipped as a whole), weights unchanged
        flat = lambda module: torch.cat([p.grad.flatten() for n, p in module.named_parameters()
                                         if p.grad is not None and not n.endswith("quantiles")])
        return flat(pipe.compressor), (flat(pipe.unet) if stage == "joint" else None)

    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    rd, _ = gradients("compressor", 1.0)
    detached, unet0 = gradients("joint", 0.0)
    joint, unet1 = gradients("joint", 1.0)
    assert cos(detached, rd) > 0.9999
    assert cos(joint, rd) < 0.99
    assert cos(unet0, unet1) > 0.9999


def test_scale_grad_keeps_the_value_and_scales_the_gradient():
    import torch

    x = torch.randn(5, requires_grad=True)
    y = train.scale_grad(x, 0.25)
    y.sum().backward()
    assert torch.equal(y, x) and torch.allclose(x.grad, torch.full((5,), 0.25))
    assert train.scale_grad(x, 1.0) is x


def test_the_perceptual_distance_of_several_backbones_is_their_mean():
    import torch

    from app.metrics import load_lpips

    g = torch.Generator().manual_seed(0)
    a, b = (torch.rand(2, 3, 64, 64, generator=g) * 2 - 1 for _ in range(2))
    both = train.perceptual_distance(["alex", "vgg"], "cpu")
    alex, vgg = load_lpips("alex")(a, b).flatten(), load_lpips("vgg")(a, b).flatten()
    assert not torch.allclose(alex, vgg, rtol=0.1)  # the mean is not either one
    assert torch.allclose(both(a, b), (alex + vgg) / 2, rtol=1e-5)
    assert train.perceptual_distance(["alex"], "cpu")(a, b).flatten().allclose(alex)

    args = train.parse_args(["--data", "x", "--lambdas", "0.1", "--lpips-net", "alex", "vgg", "--mse-weight", "10"])
    runs = [train.training_state(args, {}, 1, 8, 0.1, "cpu")["runs"][-1]]
    args.stage = "compressor"
    runs.append(train.training_state(args, {}, 1, 8, 0.1, "cpu")["runs"][-1])
    assert [r["perceptual"] for r in runs] == ["LPIPS-alex + LPIPS-vgg", "none"]
    assert runs[0]["mse_weight"] == 10
    with pytest.raises(SystemExit):
        train.parse_args(["--data", "x", "--mse-weight", "0"])
