"""Waking the latent's dead channels: fresh analysis filters for the channels g_a no longer uses.

A channel is dead when its g_a output spread on a batch of crops is below ``ratio`` times the
spread of the live ones (their 75th percentile). Rate pressure keeps such a channel dead: its
rounded value is always μ, so it buys nothing, and the entropy model predicts a σ too small for
anything else. :func:`revive` restarts it as a live channel would start, without changing what
the model decodes much:

* g_a's output filter: fresh (He-normal), scaled to the live spread on the batch, bias 0;
* gains per level: the live channels' median at that level, ``gain_offset`` octaves lower
  (a new channel should cost fewer bits than a proven one), and the inverse to match;
* the content decoder's and h_a's input weights from it: scaled by old / new spread, so that its
  contribution starts at the size it had (noise at first: the compressor stage trains it);
* h_s's σ output for it: a live channel's, ``gain_offset`` octaves lower like its values; its μ output: 0.

Measured in round 14 (model card): 86 of 128 channels revived, and the compressor stage's rate term
had killed all but a few of them again within 8 minutes.
"""

from __future__ import annotations

import torch

from .models.compressor import CDCCompressor


def _std_per_channel(t: torch.Tensor) -> torch.Tensor:
    return t.float().transpose(0, 1).flatten(1).std(1)


@torch.no_grad()
def channel_spread(compressor: CDCCompressor, x: torch.Tensor) -> torch.Tensor:
    """Standard deviation of each g_a output channel over the crops ``x`` (N, 3, H, W) in [-1, 1]."""
    return _std_per_channel(compressor.g_a(x))


def dead_channels(spread: torch.Tensor, ratio: float = 0.2) -> torch.Tensor:
    """Indexes of the channels whose spread is below ``ratio`` × the 75th percentile of all spreads."""
    return torch.nonzero(spread < ratio * spread.quantile(0.75)).flatten()


@torch.no_grad()
def revive(compressor: CDCCompressor, x: torch.Tensor, dead: torch.Tensor, gain_offset: float = 3.0,
           generator: torch.Generator | None = None) -> None:
    """Re-initialise the latent channels ``dead`` of ``compressor`` in place (see the module's docstring)."""
    if not len(dead):
        return
    m = compressor.config.latent_channels
    live = torch.ones(m, dtype=torch.bool)
    live[dead] = False
    if not live.any():
        raise ValueError("every channel is dead: nothing to take the live scale from")
    features = compressor.g_a[:-1](x)
    last = compressor.g_a[-1]
    old = _std_per_channel(last(features))
    target = old[live].quantile(0.75)

    fresh = torch.randn(len(dead), *last.weight.shape[1:], generator=generator) * (2 / last.weight[0].numel()) ** 0.5
    last.weight[dead] = fresh.to(last.weight)
    last.bias[dead] = 0
    new = _std_per_channel(last(features))
    last.weight[dead] *= (target / new[dead].clamp_min(1e-12))[:, None, None, None].to(last.weight)
    shrink = (old[dead] / target).to(last.weight)

    compressor.content16[0].weight[:, dead] *= shrink[None, :, None, None]
    compressor.h_a[0].weight[:, dead] *= shrink[None, :, None, None]
    compressor.log2_gain[:, dead] = compressor.log2_gain[:, live].median(1).values[:, None] - gain_offset
    compressor.log2_inverse_gain[:, dead] = compressor.log2_inverse_gain[:, live].median(1).values[:, None] + gain_offset

    out = compressor.h_s[-1]  # 2m outputs: σ then μ
    donors = torch.nonzero(live).flatten()
    donors = donors[torch.randint(len(donors), (len(dead),), generator=generator)]
    out.weight[dead] = out.weight[donors] * 2**-gain_offset
    out.bias[dead] = out.bias[donors] * 2**-gain_offset
    out.weight[m + dead] = 0
    out.bias[m + dead] = 0
