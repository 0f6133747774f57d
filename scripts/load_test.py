"""Load test of the served page (issue #27): concurrent ``gradio_client`` sessions mixing valid and hostile calls
against ``app.py`` on the loopback; bounded in calls and time.

    python scripts/load_test.py [--checkpoint DIR] [--clients 8] [--calls 6] [--time-limit 600]

Prints the calls served, the errors returned (by message), the crashes (calls that got no answer, or the server
gone: must be 0) and the server's peak RSS, sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import screenshot  # noqa: E402

from app import bitstream  # noqa: E402


def _files(folder: Path, model_id: bytes) -> dict[str, Path]:
    """The inputs: a photo, a decompression bomb, the issue's 39-byte .cdc, a random .cdc behind a valid CRC."""
    photo = folder / "photo.png"
    Image.open(ROOT / "assets" / "chelsea.png").convert("RGB").resize((256, 192)).save(photo)
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
    bomb = folder / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr)))
    files = {"photo": photo, "bomb": bomb}
    for name, z, y in (("evil", b"", b""), ("random", random.Random(0).randbytes(40), random.Random(1).randbytes(900))):
        body = struct.pack(">4sB8sHHHHH4sII", bitstream.MAGIC, bitstream.FORMAT_VERSION, model_id, 200,
                           2048, 2048, 2048, 2048, bytes(4), len(z), len(y)) + z + y
        files[name] = folder / f"{name}.cdc"
        files[name].write_bytes(body + struct.pack(">I", zlib.crc32(body)))
    return files


def _calls(files):
    """(name, hostile, call(client)) for each kind of call in the mix."""
    from gradio_client import handle_file

    def compress(image="photo", **changes):
        args = {"image": handle_file(files[image]), "quality": 2, "rho": 0.9, "steps": 1, "gamma": 0.8, "seed": 0,
                "target_kb": 0, "match": "none", "left": "AVIF", "right": "CDC"} | changes
        return lambda c: c.predict(*args.values(), api_name="/compress")

    def decompress(file, **changes):
        args = {"rho": 0.9, "steps": 1, "gamma": 0.8, "seed": 0, "samples": 1} | changes
        return lambda c: c.predict(handle_file(file), *args.values(), api_name="/decompress")

    return [
        ("compress", False, compress()),
        ("rho_strip", False, lambda c: c.predict(0.5, 1, 0.8, 0, api_name="/rho_strip")),
        ("decompress own file", False, lambda c: c.predict(
            handle_file(c.last_cdc), 0.0, 1, 0.8, 0, 2, api_name="/decompress") if getattr(c, "last_cdc", None)
            else c.predict(api_name="/rd_plot")),
        ("compress steps=1000", True, compress(steps=1000)),
        ("compress rho=5", True, compress(rho=5)),
        ("compress bomb", True, compress("bomb")),
        ("decompress 39-byte", True, decompress(files["evil"])),
        ("decompress random", True, decompress(files["random"])),
        ("decompress samples=100", True, decompress(files["evil"], samples=100)),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="pipeline folder (default: checkpoints/cdc)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent sessions")
    ap.add_argument("--calls", type=int, default=6, help="calls per session")
    ap.add_argument("--time-limit", type=float, default=600, help="no call starts after this many seconds")
    args = ap.parse_args(argv)
    from gradio_client import Client

    from app.pipeline import load_pipeline

    model_id = load_pipeline(args.checkpoint).model_id
    served, errors, crashes, lock = Counter(), Counter(), [], threading.Lock()
    with tempfile.TemporaryDirectory() as tmp, screenshot.serve(args.checkpoint) as url:
        files = _files(Path(tmp), model_id)
        calls = _calls(files)
        server = next(p for p in psutil.Process().children() if "app.py" in " ".join(p.cmdline()))
        peak, done = [server.memory_info().rss], threading.Event()

        def sample():
            while not done.wait(0.2):
                try:
                    peak.append(sum(p.memory_info().rss for p in [server, *server.children(recursive=True)]))
                except psutil.NoSuchProcess:
                    return

        def session(k: int):
            rng, client = random.Random(k), Client(url, verbose=False)
            deadline = time.monotonic() + args.time_limit
            for i in range(args.calls):
                if time.monotonic() > deadline:
                    return
                name, hostile, call = calls[0] if i == 0 else rng.choice(calls)  # each session compresses first
                try:
                    out = call(client)
                    if name == "compress":
                        client.last_cdc = out[2]
                    with lock:
                        served[name] += 1
                except Exception as e:  # noqa: BLE001 - sorted below: a message is an error returned, none a crash
                    message = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    with lock:
                        if message and server.is_running():
                            errors[f"{name}: {message[:90]}"] += 1
                        else:
                            crashes.append(f"{name}: {type(e).__name__}")

        threading.Thread(target=sample, daemon=True).start()
        t0 = time.monotonic()
        threads = [threading.Thread(target=session, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.monotonic() - t0
        done.set()
        alive = server.is_running() and server.status() != psutil.STATUS_ZOMBIE
    print(f"{args.clients} sessions × {args.calls} calls in {seconds:.0f} s; server alive at the end: {alive}")
    print(f"calls served: {sum(served.values())}  " + ", ".join(f"{k} {v}" for k, v in sorted(served.items())))
    print(f"errors returned: {sum(errors.values())}")
    for message, n in errors.most_common():
        print(f"  {n:3d}  {message}")
    print(f"crashes: {len(crashes) + (not alive)}", *crashes)
    print(f"peak RSS of the server: {max(peak) / 2**20:.0f} MiB (at start {peak[0] / 2**20:.0f} MiB)")
    return 1 if crashes or not alive else 0


if __name__ == "__main__":
    sys.exit(main())
