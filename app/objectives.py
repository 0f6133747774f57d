"""The training objectives of the three stages (Yang & Mandt 2023, Eq. 7, split as the recipe trains it).

λ is in compressai's convention (``RateDistortionLoss``: λ·255²·MSE + bpp, images in [0, 1]; its zoo
uses λ = 0.0018 … 0.0932 for q1–q8), so that a λ set reads against everyone else's. Images reach the
objectives in [-1, 1]; ``mse01`` converts. Every loss is per sample, then averaged over the batch.

* :class:`RateDistortionLoss`, the compressor alone: bpp + λ_q·255²·MSE(x_base, x);
* :class:`DenoiserLoss`, the UNet alone: (1 − ρ)·k·w(t)·‖x̂0 − x‖² + ρ·P(x̂0, x), in [-1, 1] as the
  first checkpoints were trained, w(t) = clip(SNR_t, 1, 5), P a perceptual distance (LPIPS, or
  :class:`MeanDistance` of several); k (``mse_weight``, 1 in Eq. 7) sets how much of the UNet's
  gradient the ρ = 0 end gets: at 31 dB ‖x̂0 − x‖² is about 0.003 against LPIPS' 0.05–0.1;
* :class:`JointLoss`: bpp + λ_q·255²·(MSE(x_base, x) + denoiser / 4), which is the earlier one-stage
  loss λ_old·bpp + ‖x_base − x‖² + denoiser divided by λ_old, with λ = 4 / (255²·λ_old).

One model serves every level, so a batch mixes levels and the per-sample form decides how much each
level's distortion weighs in the shared weights: ``balanced=False`` (compressai's form) weighs level q
by λ_q (the top level 32 times the lowest for the default set); ``balanced=True`` divides each sample
by λ_q·255², bpp / (λ_q·255²) + MSE + …, so that every level's distortion weighs the same, as in the
earlier one-stage loss (up to a constant); the optimum of each level is the same in both forms.
"""

from __future__ import annotations

import torch
from torch import nn


def mse01(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE of images given in [-1, 1], measured in [0, 1]."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1) / 4


def bits_per_pixel(likelihoods: dict, pixels: int) -> torch.Tensor:
    """Per-sample bpp of compressai likelihoods (the noise-relaxed rate, Eq. 7's first term)."""
    return -sum(torch.log2(lik).flatten(1).sum(1) for lik in likelihoods.values()) / pixels


def old_to_compressai_lambdas(lambdas) -> list[float]:
    """λ of the first checkpoints (λ_old·bpp + MSE in [-1, 1]) in compressai's convention: 4 / (255²·λ_old)."""
    return [4 / (255**2 * lam) for lam in lambdas]


class MeanDistance(nn.Module):
    """The mean of several perceptual distances (e.g. LPIPS-alex and LPIPS-VGG): model(x, y) -> (N,)."""

    def __init__(self, distances):
        super().__init__()
        self.distances = nn.ModuleList(distances)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sum(d(x, y).float().flatten() for d in self.distances) / len(self.distances)


class RateDistortionLoss(nn.Module):
    """The compressor stage: bpp + λ_q·255²·MSE(x_base, x) (``balanced``: divided by λ_q·255²)."""

    def __init__(self, lambdas, balanced: bool = False):
        super().__init__()
        self.register_buffer("lambdas", torch.as_tensor(lambdas, dtype=torch.float32), persistent=False)
        self.balanced = balanced

    def weigh(self, bpp: torch.Tensor, distortion: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The batch's loss from per-sample bpp and distortion (MSE in [0, 1] units)."""
        lam = self.lambdas[q] * 255**2
        return (bpp / lam + distortion).mean() if self.balanced else (bpp + lam * distortion).mean()

    def forward(self, out, x: torch.Tensor, q: torch.Tensor) -> dict:
        bpp = bits_per_pixel(out.likelihoods, x.shape[2] * x.shape[3])
        base_mse = mse01(out.x_base, x)
        return {"loss": self.weigh(bpp, base_mse, q), "bpp": bpp, "base_mse": base_mse}


class DenoiserLoss(nn.Module):
    """The UNet stage: (1 − ρ)·k·w(t)·‖x̂0 − x‖² + ρ·P(x̂0, x), P computed only on the samples ``lp`` (ρ > 0)."""

    def __init__(self, snr_weight: torch.Tensor, perceptual: nn.Module, mse_weight: float = 1.0):
        super().__init__()
        self.register_buffer("snr_weight", snr_weight, persistent=False)
        self.perceptual, self.mse_weight = perceptual, mse_weight

    def forward(self, x0_hat: torch.Tensor, x: torch.Tensor, t: torch.Tensor, rho: torch.Tensor,
                lp: torch.Tensor) -> dict:
        mse = 4 * mse01(x0_hat, x)  # in [-1, 1]
        perceptual = self.perceptual(x0_hat.index_select(0, lp), x.index_select(0, lp)).float().flatten()
        per_sample = ((1 - rho) * self.mse_weight * self.snr_weight[t] * mse).index_add(0, lp, rho.index_select(0, lp) * perceptual)
        return {"loss": per_sample.mean(), "per_sample": per_sample, "mse": mse, "perceptual": perceptual}


class JointLoss(nn.Module):
    """Everything at once: bpp + λ_q·255²·(MSE(x_base, x) + denoiser / 4)."""

    def __init__(self, lambdas, snr_weight: torch.Tensor, perceptual: nn.Module, balanced: bool = False,
                 mse_weight: float = 1.0):
        super().__init__()
        self.rate_distortion = RateDistortionLoss(lambdas, balanced)
        self.denoiser = DenoiserLoss(snr_weight, perceptual, mse_weight)

    def forward(self, out, x0_hat, x, q, t, rho, lp) -> dict:
        rd = self.rate_distortion(out, x, q)
        dn = self.denoiser(x0_hat, x, t, rho, lp)
        loss = self.rate_distortion.weigh(rd["bpp"], rd["base_mse"] + dn["per_sample"] / 4, q)
        return {**rd, **dn, "loss": loss}
