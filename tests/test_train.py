import json

from app import train
from app.pipeline import load_pipeline


def test_pack_then_short_resumed_training_run(tiny_pipeline_dir, tmp_path):
    from PIL import Image
    import numpy as np

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (100 + i, 140, 3), dtype=np.uint8)).save(src / f"{i}.png")
    packed = tmp_path / "packed"
    train.main(["--data", str(src), "--pack-to", str(packed), "--pack-short-side", "80"])
    assert sorted(p.name for p in packed.iterdir()) == ["00000.jpg", "00001.jpg", "00002.jpg"]
    assert min(Image.open(packed / "00000.jpg").size) == 80

    out = tmp_path / "run"
    train.main([
        "--data", str(packed), "--val", str(src), "--val-count", "1", "--resume", str(tiny_pipeline_dir),
        "--out", str(out), "--max-minutes", "0.05", "--batch-size", "2", "--crop", "64",
        "--lambdas", "0.1", "0.05", "0.02", "0.01", "--device", "cpu",
    ])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 1 and log[0]["bpp"] > 0 and 0 < log[0]["lpips_x0"] < 2
    state = json.loads((out / "training_state.json").read_text())
    assert state["total_steps"] >= 1 and state["runs"][-1]["crops"] == 2 * state["runs"][-1]["steps"]
    resumed = load_pipeline(out)
    assert resumed.num_quality_levels == 4
    assert resumed.decompress(resumed.compress(src / "0.png", 2), progress=False).size == (140, 100)
