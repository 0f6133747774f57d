"""Hostile inputs (issue #27): crafted and mutated ``.cdc`` files and images, each decoded in a worker subprocess with
a time limit. Every one must end in a clear error (``BitstreamError`` / ``ImageError``) or a decoded image: no
signal, no hang, no other exception. ``CDC_FUZZ_FILES`` sets the number of mutated ``.cdc`` files (default 2000).

The worker (this file run as a script) reads ``KIND<TAB>PATH`` lines and answers one line each; the parent restarts
it after a signal or a hang and goes on with the next file.
"""

from __future__ import annotations

import dataclasses
import io
import os
import random
import re
import select
import struct
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app import bitstream
from app.models.entropy_exact import SYMBOL_BOUND, decode_checked

TIME_LIMIT_S = 20  # per file, generous for a loaded CI machine; a decode here takes milliseconds
FILES = int(os.environ.get("CDC_FUZZ_FILES", "2000"))


# -- worker -------------------------------------------------------------------------------------------------------
def _worker(checkpoint: str) -> None:
    from app.bitstream import BitstreamError
    from app.images import ImageError, load_image
    from app.pipeline import load_pipeline

    pipe = load_pipeline(checkpoint)
    print("ready", flush=True)
    for line in sys.stdin:
        kind, path = line.rstrip("\n").split("\t")
        try:
            if kind == "cdc":
                image = pipe.decompress(Path(path).read_bytes(), 1, 0.0, progress=False)
            else:
                image = load_image(path)
                pipe.compress(image, 1) if image.width * image.height <= 256 * 256 else None
            print(f"ok {image.mode} {image.width}x{image.height}", flush=True)
        except (BitstreamError, ImageError) as e:
            print(f"error {type(e).__name__} {str(e).splitlines()[0] if str(e) else ''}", flush=True)
        except Exception as e:  # noqa: BLE001 - what the test must not see
            print(f"unexpected {type(e).__name__} {e!r}"[:300].replace("\n", " "), flush=True)


class _Runner:
    """Decode files in a worker subprocess; restart it after a signal or a hang."""

    def __init__(self, checkpoint):
        self.checkpoint, self.proc, self.counts, self.bad = str(checkpoint), None, Counter(), []

    def _start(self):
        root = Path(__file__).resolve().parent.parent
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=str(root))
        self.proc = subprocess.Popen([sys.executable, __file__, self.checkpoint], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=root)
        assert self._readline(120) == "ready"

    def _readline(self, timeout):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().strip() if ready else None

    def run(self, kind: str, path: Path) -> str:
        if self.proc is None:
            self._start()
        self.proc.stdin.write(f"{kind}\t{path}\n")
        self.proc.stdin.flush()
        answer = self._readline(TIME_LIMIT_S)
        if answer is None:
            self.proc.kill()
            self.proc.wait()
            answer = "hang"
        elif answer == "":
            answer = f"signal {-self.proc.wait()}"
        if answer in ("hang",) or answer.startswith(("signal", "unexpected")):
            self.bad.append(f"{path.name}: {answer}")
            if not answer.startswith("unexpected"):
                self.proc = None
        self.counts[answer.split()[0] if answer.startswith("ok") else re.sub(r"\d+", "N", answer.split(" (")[0])] += 1
        return answer

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


# -- crafted .cdc files -------------------------------------------------------------------------------------------
def _pack(header: bitstream.Header, z: bytes, y: bytes, version: int = bitstream.FORMAT_VERSION) -> bytes:
    """Any header values (also ones ``bitstream.pack`` refuses), with a correct CRC32."""
    body = struct.pack(">4sB8sHHHHH4sII", bitstream.MAGIC, version, header.model_id, header.quality_x100 & 0xFFFF,
                       header.width, header.height, header.pad_width, header.pad_height, header.check,
                       len(z), len(y)) + z + y
    return body + struct.pack(">I", zlib.crc32(body))


def _with_crc(data: bytes) -> bytes:
    return data[:-4] + struct.pack(">I", zlib.crc32(data[:-4]))


def _sizes(rng: random.Random) -> tuple[int, int, int, int]:
    """A consistent size (pads a multiple of 64), mostly small, sometimes at or beyond the limits."""
    side = rng.choice([1, 17, 64, 100, 200, 500, 1024, 2048, 4096, 4097, 65535])
    w, h = rng.randint(1, side), rng.randint(1, side)
    pw, ph = -(-w // 64) * 64, -(-h // 64) * 64
    return w, h, min(pw, 65535), min(ph, 65535)


def _mutants(seeds: list[bytes], model_id: bytes, count: int, rng: random.Random):
    """(kind, bytes): mutations of real files and files written to break the decoder."""
    heavy = 0
    for i in range(count):
        data = rng.choice(seeds)
        header, z, y = bitstream.unpack(data)
        kind = ("bitflip", "bitflip+crc", "truncate", "extend", "empty", "random", "sizes", "header", "model",
                "swap")[i % 10]
        if kind == "bitflip":
            out = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
            yield kind, bytes(out)
        elif kind == "bitflip+crc":  # the attacker recomputes the CRC
            out = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                out[rng.randrange(len(out) - 4)] ^= 1 << rng.randrange(8)
            yield kind, _with_crc(bytes(out))
        elif kind == "truncate":
            cut = rng.randrange(len(data))
            yield kind, data[:cut] if rng.random() < 0.5 else _pack(header, z[: rng.randint(0, len(z))],
                                                                    y[: rng.randint(0, len(y))])
        elif kind == "extend":
            extra = lambda: rng.randbytes(rng.randint(1, 1000))  # noqa: E731
            yield kind, _pack(header, z + extra() if rng.random() < 0.5 else z, y + extra())
        elif kind == "empty":
            yield kind, _pack(header, *rng.choice([(b"", y), (z, b""), (b"", b""), (bytes(8), bytes(8))]))
        elif kind in ("random", "sizes"):
            big = kind == "sizes" and heavy < count // 40  # the 4096² headers decode 1M symbols: keep them few
            w, h, pw, ph = (4096, 4096, 4096, 4096) if big else _sizes(rng) if kind == "sizes" else (
                header.width, header.height, header.pad_width, header.pad_height)
            heavy += big
            rand = lambda: rng.randbytes(rng.choice([0, 4, 8, rng.randint(0, 1000)]))  # noqa: E731
            yield kind, _pack(bitstream.Header(model_id, header.quality, w, h, pw, ph, header.check), rand(), rand())
        elif kind == "header":  # inconsistent sizes, qualities, versions
            w, h, pw, ph = (rng.randrange(65536) for _ in range(4))
            q = rng.choice([0, 1, 3, 3.01, 100, 655.35])
            yield kind, _pack(bitstream.Header(model_id, q, w, h, pw, ph, header.check), z, y,
                              version=rng.choice([1, 2, 2, 3, 255]))
        elif kind == "model":
            yield kind, _pack(dataclasses.replace(header, model_id=rng.randbytes(8)), z, y)
        else:  # z and y strings swapped, or one file's strings behind another's header
            other = bitstream.unpack(rng.choice(seeds))
            yield kind, _pack(header, y, z) if rng.random() < 0.5 else _pack(header, other[1], other[2])


# -- crafted images -----------------------------------------------------------------------------------------------
def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` × ``height`` pixels, with one tiny IDAT (a decompression bomb's shape)."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _images(rng: random.Random) -> list[tuple[str, bytes]]:
    """(name, bytes): bombs, truncations, empty files, animations, odd modes, mutations."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    def save(image, fmt, **kw):
        buf = io.BytesIO()
        image.save(buf, fmt, **kw)
        return buf.getvalue()
    files = [("bomb-50000.png", _png_declaring(50_000, 50_000)), ("bomb-10000.png", _png_declaring(10_000, 10_000)),
             ("over-limit.png", _png_declaring(4097, 4096)), ("zero-width.png", _png_declaring(0, 10)),
             ("empty.png", b""), ("empty.jpg", b""), ("text.png", b"not an image at all")]
    png, jpeg = save(rgb, "PNG"), save(rgb, "JPEG", quality=90)
    for name, data in (("png", png), ("jpg", jpeg), ("webp", save(rgb, "WEBP")), ("tiff", save(rgb, "TIFF")),
                       ("bmp", save(rgb, "BMP")), ("gif", save(rgb.convert("P"), "GIF"))):
        files += [(f"truncated-{cut}.{name}", data[:cut]) for cut in (8, 30, len(data) // 2, len(data) - 1)]
        for k in range(12):
            out = bytearray(data)
            for _ in range(rng.randint(1, 16)):
                out[rng.randrange(len(out))] = rng.randrange(256)
            files.append((f"mutated-{k}.{name}", bytes(out)))
    frames = [rgb.convert("P"), rgb.rotate(90).convert("P")]
    files.append(("animated.gif", save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)))
    files.append(("animated.webp", save(rgb, "WEBP", save_all=True, append_images=[rgb.rotate(180)])))
    gray = rgb.convert("L")
    for mode, image, fmt in (("1", rgb.convert("1"), "PNG"), ("L", gray, "PNG"), ("LA", rgb.convert("LA"), "PNG"),
                             ("P", rgb.convert("P"), "PNG"), ("RGBA", rgb.convert("RGBA"), "PNG"),
                             ("I16", Image.fromarray(np.asarray(gray, np.uint16) * 257), "PNG"),
                             ("I", gray.convert("I"), "TIFF"), ("F", gray.convert("F"), "TIFF"),
                             ("CMYK", rgb.convert("CMYK"), "JPEG"), ("YCbCr", rgb.convert("YCbCr"), "JPEG"),
                             ("LAB", rgb.convert("LAB"), "TIFF"), ("1x1", rgb.resize((1, 1)), "PNG")):
        files.append((f"mode-{mode}.{fmt.lower()}", save(image, fmt)))
    return files


# -- tests --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runner(tiny_pipeline_dir):
    r = _Runner(tiny_pipeline_dir)
    yield r
    r.close()


def test_hostile_cdc_files_end_in_clear_errors(tiny_pipeline, runner, tmp_path):
    rng = random.Random(27)
    seeds = [tiny_pipeline.compress(Image.fromarray(np.random.default_rng(s).integers(0, 256, (h, w, 3), np.uint8)), q)
             for s, (w, h, q) in enumerate([(64, 64, 0), (100, 70, 1.5), (130, 64, 3), (64, 200, 2)])]
    crafted = [("39-byte", _pack(bitstream.Header(tiny_pipeline.model_id, 2, 2048, 2048, 2048, 2048), b"", b"")),
               ("4096-empty", _pack(bitstream.Header(tiny_pipeline.model_id, 2, 4096, 4096, 4096, 4096), b"", b""))]
    kinds = Counter()
    for i, (kind, data) in enumerate([*crafted, *_mutants(seeds, tiny_pipeline.model_id, FILES, rng)]):
        path = tmp_path / f"{i:05d}-{kind}.cdc"
        path.write_bytes(data)
        answer = runner.run("cdc", path)
        kinds[kind, answer.split()[0]] += 1
        path.unlink()
    for seed in seeds:  # the real files still decode in the worker
        (tmp_path / "seed.cdc").write_bytes(seed)
        assert runner.run("cdc", tmp_path / "seed.cdc").startswith("ok")
    print(f"\n{FILES + len(crafted)} .cdc files:", *(f"{n:6d}  {label}" for label, n in runner.counts.most_common()), sep="\n")
    assert not runner.bad, runner.bad[:20]
    assert sum(n for label, n in runner.counts.items() if label.startswith("error BitstreamError")) > FILES // 2


def test_hostile_images_end_in_clear_errors(runner, tmp_path):
    runner.counts.clear()
    files = _images(random.Random(7))
    answers = {}
    for name, data in files:
        path = tmp_path / name
        path.write_bytes(data)
        answers[name] = runner.run("image", path)
    print(f"\n{len(files)} images:", *(f"{n:6d}  {label}" for label, n in runner.counts.most_common()), sep="\n")
    assert not runner.bad, runner.bad
    for name in ("bomb-50000.png", "bomb-10000.png", "over-limit.png", "empty.png", "text.png", "truncated-8.png"):
        assert answers[name].startswith("error ImageError"), (name, answers[name])
    assert all(answers[name] == "ok RGB 64x48" for name in answers if name.startswith(("mode-", "animated"))
               and name != "mode-1x1.png"), answers


def test_checked_decoder_matches_compressai_on_escapes(tiny_pipeline):
    """Symbols far outside the tables (escapes, both signs) decode alike by compressai, the fast path and the
    bounds-checked decoder; a string cut short is a ValueError, not a read past its end."""
    from compressai import ans

    tables = tiny_pipeline._entropy_coder().coding
    gen = torch.Generator().manual_seed(0)
    indexes = torch.randint(0, len(tables.y_cdf_length), (1, 16, 12, 12), generator=gen)
    symbols = torch.randint(-3, 4, indexes.shape, generator=gen)
    symbols.view(-1)[::7] = torch.randint(-70000, 70000, (symbols.numel() // 7 + 1,), generator=gen)[: symbols.view(-1)[::7].numel()]
    string = tables.encode("y", symbols, indexes)
    args = tables._coder_args("y")
    native = ans.RansDecoder().decode_with_indexes(string, indexes.view(-1).int().tolist(), *args)
    assert native == symbols.view(-1).tolist()
    assert decode_checked(string, indexes.view(-1).tolist(), *args).tolist() == native
    assert decode_checked(string, indexes.view(-1).short(), *args).tolist() == native
    decoded = tables.decode("y", string, indexes)
    assert decoded.dtype == torch.int32 and torch.equal(decoded, symbols.int())
    with pytest.raises(ValueError, match="ends before"):
        decode_checked(string[: len(string) // 2 // 4 * 4], indexes.view(-1).tolist(), *args)
    # an escape beyond what ŷ · 2^12 holds in int32 is refused, not wrapped around
    symbols.view(-1)[5] = SYMBOL_BOUND
    with pytest.raises(ValueError, match="beyond"):
        tables.decode("y", tables.encode("y", symbols, indexes), indexes)


@pytest.mark.parametrize("escapes", [False, True])
def test_coding_in_chunks_equals_one_call(tiny_pipeline, monkeypatch, escapes):
    """Feeding the rANS coder CHUNK symbols at a time writes the string of one call and decodes the same symbols."""
    from compressai import ans

    from app.models import entropy_exact

    tables = tiny_pipeline._entropy_coder().coding
    gen = torch.Generator().manual_seed(1)
    indexes = torch.randint(0, len(tables.y_cdf_length), (1, 16, 10, 10), generator=gen)
    symbols = torch.randint(-3, 4, indexes.shape, generator=gen)
    if escapes:
        symbols.view(-1)[1234] = 50000
    whole = ans.RansEncoder().encode_with_indexes(symbols.view(-1).int().tolist(), indexes.view(-1).int().tolist(),
                                                  *tables._coder_args("y"))
    monkeypatch.setattr(entropy_exact, "CHUNK", 97)
    assert tables.encode("y", symbols, indexes) == whole
    assert torch.equal(tables.decode("y", whole, indexes), symbols.int())


if __name__ == "__main__":
    _worker(sys.argv[1])
