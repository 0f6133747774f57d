"""Full-reference image metrics on 8-bit RGB images: PSNR, MS-SSIM and LPIPS.

Images are PIL images (converted to RGB) or HxWx3 uint8 arrays; both of a pair must have the
same size (else ValueError). LPIPS uses the `lpips` package's linear layers on an ImageNet
backbone converted by scripts/convert_lpips_weights.py into checkpoints/lpips/; without that
file LPIPS is unavailable (never computed with random weights).
"""
from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path

import numpy as np
import torch

LPIPS_DIR = Path(__file__).resolve().parent.parent / "checkpoints" / "lpips"
LPIPS_WEIGHTS = {"alex": LPIPS_DIR / "alexnet.safetensors", "vgg": LPIPS_DIR / "vgg16.safetensors"}
MS_SSIM_MIN_SIDE = 161  # pytorch_msssim's 5 scales with an 11-px window need min side > 160
LPIPS_MIN_SIDE = 31  # AlexNet's 11×11/4 convolution and two 3×3/2 max-pools need a side ≥ 31


class LPIPSUnavailable(RuntimeError):
    """The LPIPS backbone weights are missing or unusable."""


def _rgb(img) -> np.ndarray:
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 uint8 array, got {img.dtype} {img.shape}")
        return img
    return np.asarray(img.convert("RGB"))


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    x, y = _rgb(a), _rgb(b)
    if x.shape != y.shape:
        raise ValueError(f"image sizes differ: {x.shape[1]}x{x.shape[0]} vs {y.shape[1]}x{y.shape[0]}")
    return x, y


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1)[None]


def psnr(a, b) -> float:
    """PSNR in dB with peak 255; inf for identical images."""
    x, y = _pair(a, b)
    mse = np.mean((x.astype(np.float64) - y) ** 2)
    return math.inf if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ms_ssim(a, b) -> float | None:
    """MS-SSIM (pytorch_msssim, data_range 255, 5 scales); None if a side is < MS_SSIM_MIN_SIDE."""
    from pytorch_msssim import ms_ssim as _ms_ssim

    x, y = _pair(a, b)
    if min(x.shape[:2]) < MS_SSIM_MIN_SIDE:
        return None
    return float(_ms_ssim(_nchw(x), _nchw(y), data_range=255, size_average=True))


class _PerSample(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x, y).flatten()


def load_lpips(net: str = "alex", device="cpu", weights=None) -> torch.nn.Module:
    """LPIPS v0.1 model (`net` "alex" or "vgg"): model(x, y) -> (N,) distances.

    x, y: NCHW in [-1, 1]. Eval mode with frozen parameters, differentiable w.r.t. the inputs.
    `weights` overrides the backbone file (default LPIPS_WEIGHTS[net]); raises LPIPSUnavailable
    if it is missing or does not hold the complete backbone.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if net not in LPIPS_WEIGHTS:
        raise ValueError(f"unknown LPIPS net {net!r}; expected one of {sorted(LPIPS_WEIGHTS)}")
    path = Path(weights) if weights is not None else LPIPS_WEIGHTS[net]
    if not path.is_file():
        raise LPIPSUnavailable(f"LPIPS-{net} backbone weights not found at {path}; "
                               f"create them with scripts/convert_lpips_weights.py --net {net}")
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise LPIPSUnavailable(f"cannot read LPIPS weights {path}: {e}") from e

    import lpips

    with warnings.catch_warnings():  # torchvision's "pretrained is deprecated" (we pass pnet_rand)
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    expected = {k for k in model.state_dict() if k.startswith("net.")}
    if set(state) != expected:
        raise LPIPSUnavailable(f"{path} is not an LPIPS-{net} backbone (keys differ)")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise LPIPSUnavailable(f"{path} is not an LPIPS-{net} backbone: {e}") from e
    model.requires_grad_(False)
    return _PerSample(model).eval().to(device)


@functools.lru_cache(maxsize=1)
def _default_lpips() -> torch.nn.Module:
    return load_lpips()


def lpips_distance(a, b) -> float | None:
    """LPIPS-alex distance (CPU); None if the backbone weights are unavailable or a side is < LPIPS_MIN_SIDE."""
    x, y = _pair(a, b)
    if min(x.shape[:2]) < LPIPS_MIN_SIDE:
        return None
    try:
        model = _default_lpips()
    except LPIPSUnavailable:
        return None
    with torch.no_grad():
        return float(model(_nchw(x) / 127.5 - 1, _nchw(y) / 127.5 - 1))


def image_metrics(a, b) -> dict:
    """{"psnr": float, "ms_ssim": float | None, "lpips": float | None} for reference a, image b."""
    x, y = _pair(a, b)
    return {"psnr": psnr(x, y), "ms_ssim": ms_ssim(x, y), "lpips": lpips_distance(x, y)}
