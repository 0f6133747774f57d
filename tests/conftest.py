"""Shared fixtures: tiny randomly initialised pipelines (fast on CPU) and the Kodak folder."""

from pathlib import Path

import pytest
import torch

from app.models import CDCCompressor, CDCUNet
from app.pipeline import CDCPipeline, make_scheduler

ROOT = Path(__file__).resolve().parent.parent
KODAK = ROOT.parent / "shared" / "datasets" / "kodak"


def make_tiny_pipeline(seed: int = 0) -> CDCPipeline:
    torch.manual_seed(seed)
    compressor = CDCCompressor(
        latent_channels=16, hyper_channels=8, encoder_channels=(8, 8, 16), content_channels=(16, 16, 16),
        num_quality_levels=4,
    )
    unet = CDCUNet(
        block_out_channels=(16, 16, 16), cond_channels=(16, 16, 16), layers_per_block=1, time_embed_dim=32,
        norm_num_groups=8,
    )
    # conv_out starts at zero (x̂0 = x_base); give it weights so the diffusion path is exercised.
    torch.nn.init.normal_(unet.conv_out.weight, std=0.02)
    pipe = CDCPipeline(compressor, unet, make_scheduler(), decode_defaults=[{"rho": 0.0, "num_inference_steps": 2, "noise_scale": 1.0}])
    # fp32 synthesis on every CPU: random weights amplify bf16's rounding far beyond a trained model's (the bf16 path
    # is tested on the shipped checkpoint, tests/test_precision.py)
    pipe.synthesis_precision = "fp32"
    return pipe


@pytest.fixture(autouse=True)
def _run_state_in_tmp(tmp_path_factory, monkeypatch):
    """Training runs keep their state under a temporary folder, not the user's cache."""
    monkeypatch.setenv("CDC_STATE_ROOT", str(tmp_path_factory.getbasetemp() / "run-states"))


@pytest.fixture(scope="session")
def tiny_pipeline() -> CDCPipeline:
    return make_tiny_pipeline()


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory, tiny_pipeline) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "cdc"
    tiny_pipeline.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def kodak_dir() -> Path:
    if not KODAK.is_dir():
        pytest.skip(f"Kodak images not found at {KODAK}")
    return KODAK
