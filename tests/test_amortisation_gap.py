"""scripts/amortisation_gap.py: a latent fitted to the crop beats g_a's, the content decoder untouched."""

import importlib.util
from pathlib import Path

import torch

from conftest import make_tiny_pipeline

ROOT = Path(__file__).resolve().parent.parent


def test_the_fitted_latent_beats_the_encoders_and_leaves_the_decoder_as_it_was():
    spec = importlib.util.spec_from_file_location("amortisation_gap", ROOT / "scripts" / "amortisation_gap.py")
    gap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gap)
    c = make_tiny_pipeline().compressor.requires_grad_(False)
    torch.nn.init.normal_(c.to_base.weight, std=0.3)  # x_base depends on y
    before = {k: v.clone() for k, v in c.state_dict().items()}
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    x, q = torch.stack([0.6 * xx, 0.6 * yy, 0.3 * xx * yy])[None], torch.tensor([2])
    with torch.no_grad():
        ceiling = gap.psnr(c.content(c.analysis(x, q), q)[1], x)
    assert gap.fitted_latent_psnr(c, x, q, steps=30, lr=0.2) > ceiling + 0.05
    assert all(torch.equal(v, before[k]) for k, v in c.state_dict().items())
