"""The served page's API enforces the sliders' bounds on every endpoint (issue #27), through ``gradio_client`` as an
API user calls it: out-of-range or malformed settings, hostile files and images end in one plain-text message."""

import struct
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from app import bitstream
from app.ui import MAX_SEED, MAX_STEPS

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import screenshot  # noqa: E402

VALID = {"image": None, "quality": 1, "rho": 0.9, "steps": 1, "gamma": 0.5, "seed": 0, "target_kb": 0, "match": "none",
         "left": "AVIF", "right": "CDC"}


def _message(call) -> str:
    with pytest.raises(Exception) as error:
        call()
    message = str(error.value)
    assert "&#" not in message and "&lt;" not in message and "Traceback" not in message
    return message


def _refused(message: str, name: str) -> bool:
    """The handler's message, or Gradio's own for a preprocessed slider or number ("Value 1000 is greater than
    maximum value 20.")."""
    return f"{name} must be" in message or " than maximum value " in message or " than minimum value " in message


def test_every_endpoint_enforces_the_page_bounds(tiny_pipeline, tiny_pipeline_dir, tmp_path):
    from gradio_client import Client, handle_file

    image = tmp_path / "cat.png"
    Image.open(ROOT / "assets" / "chelsea.png").resize((128, 96)).save(image)
    bomb = tmp_path / "bomb.png"  # declares 50,000 × 50,000 pixels
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr)))
    evil = tmp_path / "evil.cdc"  # the 39-byte file (empty strings, correct CRC) at a size the page decodes
    header = bitstream.Header(tiny_pipeline.model_id, 2, 1024, 1024, 1024, 1024)
    body = struct.pack(">4sB8sHHHHH4sII", bitstream.MAGIC, 2, header.model_id, 200, 1024, 1024, 1024, 1024,
                       header.check, 0, 0)
    evil.write_bytes(body + struct.pack(">I", zlib.crc32(body)))
    good = tmp_path / "good.cdc"
    good.write_bytes(tiny_pipeline.compress(Image.open(image), 1))

    with screenshot.serve(tiny_pipeline_dir) as url:
        client = Client(url, verbose=False)

        def compress(**changes):
            args = VALID | {"image": handle_file(image)} | changes
            return client.predict(*args.values(), api_name="/compress")

        assert "Compress an image first" in _message(lambda: client.predict(api_name="/rd_plot"))
        for changes, expected in [
            ({"steps": 100}, f"Steps must be a whole number from 1 to {MAX_STEPS}, got 100"),
            ({"steps": 1.5}, "Steps must be a whole number"),
            ({"steps": "many"}, "Steps must be a whole number from 1"),
            ({"rho": 1.5}, "ρ must be a number from 0 to 1, got 1.5"),
            ({"rho": "nan"}, "ρ must be a number from 0 to 1"),
            ({"gamma": -0.1}, "γ must be a number from 0 to 1"),
            ({"quality": 99}, "Quality must be a number from 0 to 3, got 99"),
            ({"target_kb": 1e12}, "Target size (KB) must be a number from 0 to 50000"),
            ({"seed": -1}, f"Seed must be a whole number from 0 to {MAX_SEED}, got -1"),
            ({"match": "<script>"}, "Cannot match '‹script›'"),
            ({"image": handle_file(bomb)}, "Cannot use this image"),
        ]:
            assert expected in _message(lambda: compress(**changes)), changes

        compress()  # a valid call: this session now has a result
        strip, _ = client.predict(0.7, 1, 0.5, 0, api_name="/rho_strip")
        assert len(strip) == 4
        assert _refused(_message(lambda: client.predict(0.7, 1000, 0.5, 0, api_name="/rho_strip")), "Steps")
        assert _refused(_message(lambda: client.predict(-1, 1, 0.5, 0, api_name="/rho_strip")), "ρ")
        assert _refused(_message(lambda: client.predict(0.7, 1, 0.5, 2**40, api_name="/rho_strip")), "Seed")
        assert _refused(_message(lambda: client.predict(0.7, 1.5, 0.5, 0, api_name="/rho_strip")), "Steps")

        def decompress(file=good, rho=0.9, steps=1, gamma=0.5, seed=0, samples=1):
            return client.predict(handle_file(file), rho, steps, gamma, seed, samples, api_name="/decompress")

        gallery, info = decompress(samples=2)
        assert len(gallery) == 2 and "128×96" in info
        assert _refused(_message(lambda: decompress(samples=100)), "Samples")
        assert _refused(_message(lambda: decompress(steps=1000)), "Steps")
        assert _refused(_message(lambda: decompress(gamma=2)), "γ")
        assert _refused(_message(lambda: decompress(seed=-3)), "Seed")
        assert "Cannot decode this file: corrupt latent data" in _message(lambda: decompress(file=evil))
