import pytest
import torch
from compressai.losses import RateDistortionLoss as CompressaiLoss

from app.models.compressor import CompressorOutput
from app.objectives import DenoiserLoss, JointLoss, RateDistortionLoss, old_to_compressai_lambdas


class Halves(torch.nn.Module):
    """A stand-in perceptual distance: half the mean absolute difference per sample."""

    def forward(self, a, b):
        return (a - b).abs().flatten(1).mean(1) / 2


def _batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    out = CompressorOutput(content=None, x_base=(x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1),
                           likelihoods={"y": torch.rand(3, 8, 2, 2, generator=g) * 0.9 + 0.05,
                                        "z": torch.rand(3, 4, 1, 1, generator=g) * 0.9 + 0.05})
    return x, out


def test_rate_distortion_loss_is_compressais_at_each_samples_lambda():
    x, out = _batch()
    lambdas = [0.0018, 0.0067, 0.0483]
    ours = RateDistortionLoss(lambdas)(out, x, torch.tensor([0, 1, 2]))
    for i, lam in enumerate(lambdas):
        ref = CompressaiLoss(lmbda=lam)({"x_hat": (out.x_base[i:i + 1] + 1) / 2,
                                         "likelihoods": {k: v[i:i + 1] for k, v in out.likelihoods.items()}},
                                        (x[i:i + 1] + 1) / 2)
        assert ours["bpp"][i] == pytest.approx(ref["bpp_loss"].item(), rel=1e-5)
        assert ours["bpp"][i] + lam * 255**2 * ours["base_mse"][i] == pytest.approx(ref["loss"].item(), rel=1e-5)


def test_joint_loss_is_the_one_stage_loss_divided_by_the_old_lambda():
    x, out = _batch()
    old = [0.5, 0.05, 0.005]
    q, t, rho = torch.tensor([0, 1, 2]), torch.tensor([10, 500, 990]), torch.tensor([0.0, 0.9, 0.4])
    lp = torch.tensor([1, 2])
    x0_hat = (x + 0.05).clamp(-1, 1)
    snr = torch.linspace(5, 1, 1000)
    joint = JointLoss(old_to_compressai_lambdas(old), snr, Halves())(out, x0_hat, x, q, t, rho, lp)
    bpp = -sum(torch.log2(v).flatten(1).sum(1) for v in out.likelihoods.values()) / (32 * 32)
    mse = (x0_hat - x).pow(2).flatten(1).mean(1)
    perceptual = Halves()(x0_hat, x)
    one_stage = (torch.tensor(old) * bpp + (1 - rho) * snr[t] * mse + rho * perceptual
                 + (out.x_base - x).pow(2).flatten(1).mean(1))
    assert joint["loss"].item() == pytest.approx((one_stage / torch.tensor(old)).mean().item(), rel=1e-5)
    balanced = JointLoss(old_to_compressai_lambdas(old), snr, Halves(), balanced=True)(out, x0_hat, x, q, t, rho, lp)
    assert balanced["loss"].item() == pytest.approx(one_stage.mean().item() / 4, rel=1e-5)  # the one-stage weighting


def test_balanced_rate_distortion_loss_weighs_each_level_by_one_over_lambda():
    x, out = _batch()
    lambdas, q = [0.0018, 0.0067, 0.0483], torch.tensor([0, 1, 2])
    plain, balanced = (RateDistortionLoss(lambdas, b)(out, x, q) for b in (False, True))
    lam = torch.tensor(lambdas) * 255**2
    assert balanced["loss"].item() == pytest.approx((plain["bpp"] / lam + plain["base_mse"]).mean().item(), rel=1e-6)


def test_the_denoiser_loss_skips_the_perceptual_term_only_where_rho_is_zero():
    x, _ = _batch()
    x0_hat = (x * 0.9).clamp(-1, 1)
    rho, t = torch.tensor([0.0, 0.9, 0.4]), torch.tensor([0, 0, 0])
    loss = DenoiserLoss(torch.ones(1000), Halves())
    assert loss(x0_hat, x, t, rho, torch.tensor([1, 2]))["loss"].item() == \
        pytest.approx(loss(x0_hat, x, t, rho, torch.tensor([0, 1, 2]))["loss"].item(), rel=1e-6)


def test_the_mse_weight_scales_only_the_mse_term():
    x, _ = _batch()
    x0_hat = (x * 0.9).clamp(-1, 1)
    rho, t, lp = torch.tensor([0.0, 0.9, 0.4]), torch.tensor([0, 5, 999]), torch.tensor([1, 2])
    snr = torch.linspace(1, 5, 1000)
    one, three = (DenoiserLoss(snr, Halves(), k)(x0_hat, x, t, rho, lp) for k in (1.0, 3.0))
    expected = one["per_sample"] + 2 * (1 - rho) * snr[t] * one["mse"]
    assert torch.allclose(three["per_sample"], expected, rtol=1e-6)
    assert three["per_sample"][0].item() == pytest.approx(3 * one["per_sample"][0].item(), rel=1e-6)
