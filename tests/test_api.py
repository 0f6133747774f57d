"""The served page through the Gradio API client, as API users drive it: named endpoints, one session's state
across calls (compress, then the ρ strip), and plain-text error messages."""

import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import screenshot  # noqa: E402


def test_api_client(tiny_pipeline_dir, tmp_path):
    from gradio_client import Client, handle_file

    image = tmp_path / "cat.png"
    Image.open(ROOT / "assets" / "chelsea.png").resize((128, 96)).save(image)
    bad = tmp_path / "it's not an image.png"
    bad.write_bytes(b"not an image")

    with screenshot.serve(tiny_pipeline_dir) as url:
        client = Client(url, verbose=False)
        endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        assert sorted(endpoints) == ["/compress", "/decompress", "/rd_plot", "/rho_strip"]

        slider, readout, cdc, png = client.predict(handle_file(image), 1, 0.9, 1, 0.5, 0, 0, "none", "AVIF", "CDC",
                                                   api_name="/compress")
        assert "128×96" in readout and Path(cdc).suffix == ".cdc" and Image.open(png).size == (128, 96)
        assert slider["label"].endswith("| CDC") and len(slider["value"]) == 2

        strip, info = client.predict(0.7, 1, 0.5, 0, api_name="/rho_strip")  # the session's compressed file
        assert [item["caption"].split(":")[0] for item in strip] == ["ρ = 0", "ρ = 0.5", "ρ = 0.7", "ρ = 0.9"]
        assert "4 reconstructions" in info

        with pytest.raises(Exception) as error:
            client.predict(handle_file(bad), 1, 0.9, 1, 0.5, 0, 0, "none", "AVIF", "CDC", api_name="/compress")
        message = str(error.value)
        assert "Cannot use this image" in message and "it's not an image.png" in message
        assert "&#" not in message and "&lt;" not in message
