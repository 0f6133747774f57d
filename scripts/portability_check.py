"""Do ``.cdc`` files decode to the same latent under other CPU kernels? (issue #11)

Encodes every image at every level once, in this process's default setting, then entropy-decodes
all files in one subprocess per setting (oneDNN ISA capped at SSE4.1 or AVX2, mkldnn off, ATen's
scalar kernels, 1 or 2 threads) and counts the files whose latent SHA-256 differs from the
default setting's::

    python scripts/portability_check.py --data ../shared/datasets/kodak [--checkpoint DIR] [--json OUT]

Only the entropy path runs (no UNet), so all of Kodak at six levels takes a few minutes.
``--worker MANIFEST`` is the subprocess side: it prints ``{file: latent_sha256}`` as JSON for the
files of each checkpoint in ``MANIFEST`` ({checkpoint: [files]}); the tests use it too.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SETTINGS = {  # name: (environment, worker flags)
    "default": ({}, []),
    "oneDNN SSE4.1": ({"ONEDNN_MAX_CPU_ISA": "SSE41"}, []),
    "oneDNN AVX2": ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, []),
    "mkldnn off": ({}, ["--no-mkldnn"]),
    "ATen default": ({"ATEN_CPU_CAPABILITY": "default"}, []),
    "1 thread": ({}, ["--threads", "1"]),
    "2 threads": ({}, ["--threads", "2"]),
}


def worker(manifest: Path, threads: int | None, mkldnn: bool) -> dict:
    """{file: latent_sha256} for every file of every checkpoint in the manifest, in this process."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = mkldnn
    from app.models.entropy_exact import latent_sha256
    from app.pipeline import load_pipeline

    out = {}
    for checkpoint, files in json.loads(manifest.read_text()).items():
        pipe = load_pipeline(checkpoint)
        for f in files:
            out[f] = latent_sha256(pipe.decode_latent(Path(f).read_bytes(), verify=False)[1])
    return out


def run_settings(manifest: Path, settings: dict = SETTINGS, script: Path = Path(__file__)) -> dict:
    """{setting: {file: latent_sha256}}, one subprocess per setting (two at a time)."""

    def one(item):
        env_extra, flags = item
        env = os.environ | {"PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""} | env_extra
        r = subprocess.run([sys.executable, str(script), "--worker", str(manifest), *flags],
                           env=env, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"worker failed ({env_extra} {flags}): {r.stderr.strip().splitlines()[-1:]}")
        return json.loads(r.stdout)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(zip(settings, pool.map(one, settings.values())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="folder of images to encode")
    ap.add_argument("--checkpoint", default=None, help="pipeline folder (default: checkpoints/cdc)")
    ap.add_argument("--json", type=Path, help="write the counts and per-file hashes here")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--no-mkldnn", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads, not args.no_mkldnn)))
        return

    from app.images import image_files
    from app.pipeline import DEFAULT_CHECKPOINT, load_pipeline

    pipe = load_pipeline(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for image in image_files(args.data):
            for level in range(pipe.num_quality_levels):
                files.append(Path(tmp) / f"{Path(image).stem}_q{level}.cdc")
                files[-1].write_bytes(pipe.compress(image, level))
        manifest = Path(tmp) / "manifest.json"
        manifest.write_text(json.dumps({str(args.checkpoint or DEFAULT_CHECKPOINT): [str(f) for f in files]}))
        hashes = run_settings(manifest)
    base = hashes["default"]
    counts = {name: sum(h[f] != base[f] for f in base) for name, h in hashes.items()}
    print(f"{len(base)} files; files whose latent differs from the default setting:")
    for name, n in counts.items():
        print(f"  {name:14s} {n}")
    if args.json:
        names = {str(f): f.name for f in files}
        args.json.write_text(json.dumps({"files": len(base), "differ": counts,
                                         "latent_sha256": {s: {names[f]: v for f, v in h.items()} for s, h in hashes.items()}},
                                        indent=1))


if __name__ == "__main__":
    main()
