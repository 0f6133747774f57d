"""app.revive on a tiny compressor: which channels count as dead, and what reviving them changes."""

import copy

import torch

from app import revive


def _with_dead_channels(tiny_pipeline, dead):
    compressor = copy.deepcopy(tiny_pipeline.compressor).float()
    with torch.no_grad():
        compressor.g_a[-1].weight[dead] *= 0.01
        compressor.g_a[-1].bias[dead] = 0
    return compressor


def test_dead_channels_are_those_far_below_the_live_spread():
    spread = torch.tensor([1.0, 0.9, 0.05, 1.1, 0.01, 0.8, 0.3, 1.2])
    assert revive.dead_channels(spread, 0.2).tolist() == [2, 4]
    assert revive.dead_channels(spread, 0.5).tolist() == [2, 4, 6]


def test_revive_wakes_the_dead_channels_and_leaves_the_live_ones(tiny_pipeline):
    dead = torch.tensor([1, 5, 9])
    compressor = _with_dead_channels(tiny_pipeline, dead)
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    before = revive.channel_spread(compressor, x)
    found = revive.dead_channels(before, 0.2)
    assert found.tolist() == dead.tolist()
    live = torch.ones(16, dtype=torch.bool)
    live[dead] = False
    g_a_before = compressor.g_a(x)[:, live]
    content16 = compressor.content16[0].weight.clone()
    gains = compressor.log2_gain.clone()

    revive.revive(compressor, x, found, gain_offset=2.0, generator=torch.Generator().manual_seed(0))

    after = revive.channel_spread(compressor, x)
    target = before[live].quantile(0.75)
    assert torch.allclose(after[dead], target.expand(3), rtol=1e-3)
    assert torch.equal(compressor.g_a(x)[:, live], g_a_before)
    assert torch.equal(compressor.content16[0].weight[:, live], content16[:, live])
    scale = (compressor.content16[0].weight[:, dead] / content16[:, dead]).mean((0, 2, 3))
    assert torch.allclose(scale, before[dead] / target, rtol=1e-3)  # the old contribution keeps its size
    assert torch.allclose(compressor.log2_gain[:, dead],
                          (gains[:, live].median(1).values - 2.0)[:, None].expand(-1, 3))
    mean_rows = compressor.h_s[-1].weight[16 + dead]
    assert not mean_rows.any() and not compressor.h_s[-1].bias[16 + dead].any()
    assert revive.dead_channels(after, 0.2).numel() == 0


def test_nothing_to_revive_changes_nothing(tiny_pipeline):
    compressor = copy.deepcopy(tiny_pipeline.compressor).float()
    state = copy.deepcopy(compressor.state_dict())
    revive.revive(compressor, torch.rand(2, 3, 64, 64), torch.tensor([], dtype=torch.long))
    assert all(torch.equal(v, compressor.state_dict()[k]) for k, v in state.items())


def test_a_training_run_revives_before_its_first_step(tiny_pipeline, tmp_path, capsys):
    from test_train import _noise_photo

    from app import train
    from app.pipeline import CDCPipeline

    dead = torch.tensor([2, 7])
    pipe = CDCPipeline(_with_dead_channels(tiny_pipeline, dead), tiny_pipeline.unet, tiny_pipeline.scheduler,
                       tiny_pipeline.config.decode_defaults)
    pipe.save_pretrained(tmp_path / "dead")
    src = _noise_photo(tmp_path / "src")
    train.main(["--data", str(src), "--resume", str(tmp_path / "dead"), "--out", str(tmp_path / "run"), "--stage",
                "compressor", "--revive-channels", "0.2", "--batch-size", "2", "--crop", "64", "--device", "cpu",
                "--max-steps", "1", "--lambdas", "0.01", "0.02", "0.04", "0.08"])
    assert "revived 2 of 16 latent channels" in capsys.readouterr().out
