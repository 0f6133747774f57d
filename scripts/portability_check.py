"""Do ``.cdc`` files decode to the same latent under other CPU kernels and on other machines? (issue #11)

Encodes every image at every level, records each file's latent SHA-256 as decoded in this process
(``latents.json``), then entropy-decodes all files in one subprocess per setting (oneDNN ISA capped
at SSE4.1 or AVX2, mkldnn off, ATen's scalar kernels, 1 or 2 threads, and a CUDA pipeline where a
GPU is present) and counts the files whose latent differs::

    python scripts/portability_check.py --data ../shared/datasets/kodak [--checkpoint DIR] [--json OUT]

Across machines: ``--export DIR`` keeps the files and ``latents.json`` in DIR; on the other machine
``--verify DIR`` decodes them under every setting there and compares with the hashes from where they
were written (exit status 1 if any differ). ``--device cuda`` encodes with the pipeline on the GPU.
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
CUDA_SETTING = {"CUDA pipeline": ({"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}, ["--device", "cuda"])}


def worker(manifest: Path, threads: int | None, mkldnn: bool, device: str = "cpu") -> dict:
    """{file: latent_sha256} for every file of every checkpoint in the manifest, in this process."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = mkldnn
    from app.models.entropy_exact import latent_sha256
    from app.pipeline import load_pipeline

    out = {}
    for checkpoint, files in json.loads(manifest.read_text()).items():
        pipe = load_pipeline(checkpoint, device)
        for f in files:
            out[f] = latent_sha256(pipe.decode_latent(Path(f).read_bytes(), verify=False)[1])
    return out


def run_settings(manifest: Path, settings: dict = SETTINGS, script: Path = Path(__file__)) -> dict:
    """{setting: {file: latent_sha256}}, one subprocess per setting (as many at a time as cores, at least two)."""

    def one(item):
        env_extra, flags = item
        env = os.environ | {"PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""} | env_extra
        r = subprocess.run([sys.executable, str(script), "--worker", str(manifest), *flags],
                           env=env, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"worker failed ({env_extra} {flags}): {r.stderr.strip().splitlines()[-1:]}")
        return json.loads(r.stdout)

    with concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as pool:
        return dict(zip(settings, pool.map(one, settings.values())))


def export(pipe, images: list, folder: Path) -> None:
    """Every image at every level as ``folder/STEM_qL.cdc``, and ``latents.json`` {name: latent_sha256} decoded here."""
    from app.models.entropy_exact import latent_sha256

    folder.mkdir(parents=True, exist_ok=True)
    latents = {}
    for image in images:
        for level in range(pipe.num_quality_levels):
            data = pipe.compress(image, level)
            name = f"{Path(image).stem}_q{level}.cdc"
            (folder / name).write_bytes(data)
            latents[name] = latent_sha256(pipe.decode_latent(data)[1])
    (folder / "latents.json").write_text(json.dumps(latents, indent=1))


def verify(folder: Path, checkpoint: str, settings: dict) -> dict:
    """{setting: {name: latent_sha256}} for the files of ``folder`` decoded under each setting here."""
    names = json.loads((folder / "latents.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "manifest.json"
        manifest.write_text(json.dumps({checkpoint: [str(folder / n) for n in names]}))
        hashes = run_settings(manifest, settings)
    return {setting: {Path(f).name: h for f, h in found.items()} for setting, found in hashes.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="folder of images to encode")
    ap.add_argument("--export", type=Path, help="keep the encoded files and latents.json in this folder")
    ap.add_argument("--verify", type=Path, help="only decode the files of a folder written by --export")
    ap.add_argument("--checkpoint", default=None, help="pipeline folder (default: checkpoints/cdc)")
    ap.add_argument("--device", default="cpu", help="the pipeline's device when encoding (cpu or cuda)")
    ap.add_argument("--json", type=Path, help="write the counts and per-file hashes here")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--no-mkldnn", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads, not args.no_mkldnn, args.device)))
        return
    if not (args.data or args.verify):
        ap.error("give --data (encode, then check) or --verify DIR")

    import torch

    from app.images import image_files
    from app.pipeline import DEFAULT_CHECKPOINT, load_pipeline

    checkpoint = str(args.checkpoint or DEFAULT_CHECKPOINT)
    settings = SETTINGS | (CUDA_SETTING if torch.cuda.is_available() else {})
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.verify or args.export or Path(tmp)
        if not args.verify:
            export(load_pipeline(checkpoint, args.device), image_files(args.data), folder)
        expected = json.loads((folder / "latents.json").read_text())
        hashes = verify(folder, checkpoint, settings)
    counts = {name: sum(h[f] != expected[f] for f in expected) for name, h in hashes.items()}
    print(f"{len(expected)} files; files whose latent differs from where they were written:")
    for name, n in counts.items():
        print(f"  {name:14s} {n}")
    if args.json:
        args.json.write_text(json.dumps({"files": len(expected), "differ": counts, "written": expected,
                                         "latent_sha256": hashes}, indent=1))
    sys.exit(1 if any(counts.values()) else 0)


if __name__ == "__main__":
    main()
