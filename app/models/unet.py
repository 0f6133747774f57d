"""The conditional denoiser of CDC (Yang & Mandt 2023, Sec. 3.2), built from diffusers blocks.

It predicts x0 from (x_t, t) given the content pyramid decoded from the latent ŷ, which is
added to the down path at every resolution as in the paper, and the perceptual weight ρ,
whose embedding is added to the time embedding so one bitstream decodes at any ρ.

For CPU speed the image is folded into channels first (``pixel_unshuffle`` by ``unshuffle``),
and there is no attention. The paper's own size is the config
``unshuffle=1, block_out_channels=(64, 128, 192, 256, 320, 384)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from diffusers.utils import BaseOutput
from torch import nn


@dataclass
class CDCUNetOutput(BaseOutput):
    """``sample``: the prediction (x0 for ``prediction_type="sample"``), shape of the input."""

    sample: torch.Tensor = None


class CDCUNet(ModelMixin, ConfigMixin):
    """x̂0 = f(x_t, t, ρ, pyramid[, x_base]).

    Args:
        unshuffle: pixel-unshuffle factor applied to the input (1 = full resolution).
        block_out_channels: width per resolution level; level i runs at H / (unshuffle · 2^i).
        cond_channels: channels of the content feature injected at each level.
        layers_per_block: ResNet blocks per level on the down path (and on the up path).
        cond_image: if True the content decoder's base image x_base is concatenated to the
            input and the network predicts x0 − x_base (a residual; our addition for fast training).
        prediction_type: "sample" (X-parameterisation, the default) or "epsilon".
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        unshuffle: int = 4,
        block_out_channels: tuple[int, ...] = (64, 96, 128),
        cond_channels: tuple[int, ...] = (64, 96, 128),
        layers_per_block: int = 2,
        time_embed_dim: int = 256,
        norm_num_groups: int = 32,
        cond_image: bool = True,
        prediction_type: str = "sample",
    ):
        super().__init__()
        if len(cond_channels) != len(block_out_channels):
            raise ValueError("cond_channels needs one entry per level of block_out_channels")
        if prediction_type not in ("sample", "epsilon"):
            raise ValueError(f"unknown prediction_type {prediction_type!r}")
        folded = in_channels * unshuffle**2
        widths = list(block_out_channels)

        base = widths[0]
        self.time_proj = Timesteps(base, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(base, time_embed_dim)
        self.rho_proj = Timesteps(base, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.rho_embedding = TimestepEmbedding(base, time_embed_dim)

        self.conv_in = nn.Conv2d(folded * (2 if cond_image else 1), base, 3, padding=1)
        self.cond_in = nn.ModuleList(nn.Conv2d(c, w, 1) for c, w in zip(cond_channels, widths))

        def resnet(cin, cout):
            return ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=time_embed_dim, groups=norm_num_groups)

        self.down = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        cin = base
        for i, w in enumerate(widths):
            self.down.append(nn.ModuleList(resnet(cin if j == 0 else w, w) for j in range(layers_per_block)))
            cin = w
            if i < len(widths) - 1:
                self.downsamplers.append(Downsample2D(w, use_conv=True, out_channels=widths[i + 1], padding=1, name="op"))
                cin = widths[i + 1]
        self.mid = resnet(widths[-1], widths[-1])

        self.up = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        cur = widths[-1]
        for i in reversed(range(len(widths))):
            w = widths[i]
            self.up.append(nn.ModuleList(resnet((cur if j == 0 else w) + w, w) for j in range(layers_per_block)))
            cur = w
            if i > 0:
                self.upsamplers.append(Upsample2D(w, use_conv=True, out_channels=widths[i - 1]))
                cur = widths[i - 1]

        self.norm_out = nn.GroupNorm(norm_num_groups, base, eps=1e-6)
        self.conv_out = nn.Conv2d(base, folded, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def downscale_factor(self) -> int:
        """Input sizes must be multiples of this."""
        return self.config.unshuffle * 2 ** (len(self.config.block_out_channels) - 1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        rho: torch.Tensor | float,
        content: list[torch.Tensor],
        x_base: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> CDCUNetOutput | tuple:
        """``content[i]`` is the conditioning feature of level i; ``x_base`` is needed iff ``cond_image``."""
        cfg = self.config
        n = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(n)
        r = torch.as_tensor(rho, device=sample.device, dtype=torch.float32).reshape(-1).expand(n)
        dtype = self.conv_in.weight.dtype
        temb = self.time_embedding(self.time_proj(t).to(dtype)) + self.rho_embedding(self.rho_proj(r * 1000).to(dtype))

        h = F.pixel_unshuffle(sample, cfg.unshuffle)
        if cfg.cond_image:
            if x_base is None:
                raise ValueError("this UNet is configured with cond_image=True and needs x_base")
            h = torch.cat([h, F.pixel_unshuffle(x_base, cfg.unshuffle)], dim=1)
        h = self.conv_in(h)

        skips = []
        for i, blocks in enumerate(self.down):
            h = h + self.cond_in[i](content[i])
            for block in blocks:
                h = block(h, temb)
                skips.append(h)
            if i < len(self.downsamplers):
                h = self.downsamplers[i](h)
        h = self.mid(h, temb)
        for i, blocks in enumerate(self.up):
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), temb)
            if i < len(self.upsamplers):
                h = self.upsamplers[i](h)

        out = F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), cfg.unshuffle)
        if cfg.cond_image and cfg.prediction_type == "sample":
            out = out + x_base
        if not return_dict:
            return (out,)
        return CDCUNetOutput(sample=out)
