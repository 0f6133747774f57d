"""Regenerate the golden ``.cdc`` files of ``tests/data/golden`` (issue #11).

    python scripts/make_golden.py

Writes a tiny, seeded, randomly initialised (untrained) pipeline (``tests/data/golden/cdc``, coding tables
fitted and stored), three synthetic images encoded at two levels (``*.cdc``) and their latent
hashes (``hashes.json``). ``tests/test_portability.py`` checks that these files still decode to
these hashes on every kernel setting, so any change to the format or the exact entropy path fails
CI. Rerun this only for an intended, versioned format change, and commit the result.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.models import CDCCompressor, CDCUNet  # noqa: E402
from app.models.entropy_exact import latent_sha256  # noqa: E402
from app.pipeline import CDCPipeline, load_pipeline, make_scheduler  # noqa: E402

OUT = ROOT / "tests" / "data" / "golden"
LEVELS = (1, 3)


def tiny_pipeline() -> CDCPipeline:
    torch.manual_seed(11)
    compressor = CDCCompressor(latent_channels=16, hyper_channels=8, encoder_channels=(8, 8, 16),
                               content_channels=(16, 16, 16), num_quality_levels=4, gain_spread=3.0)
    unet = CDCUNet(block_out_channels=(16, 16, 16), cond_channels=(16, 16, 16), layers_per_block=1,
                   time_embed_dim=32, norm_num_groups=8)
    with torch.no_grad():  # seeded random weights give z = 0: scale up so z, σ and μ span a useful range
        compressor.g_a[-1].weight *= 8
        compressor.h_a[-1].weight *= 60
        for conv in compressor.h_s[::2]:
            conv.weight *= 3
    compressor.update(force=True)
    return CDCPipeline(compressor, unet, make_scheduler())


def images() -> dict:
    """Small synthetic photos-to-be: gradients, a disc, texture (seeded)."""
    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[0:80, 0:96]
    disc = ((yy - 40) ** 2 + (xx - 50) ** 2 < 600)[..., None]
    smooth = np.stack([xx * 2.5, yy * 3.0, 255 - xx * 2.0], -1) * ~disc + disc * [230, 40, 60]
    noisy = np.clip(smooth + rng.normal(0, 40, smooth.shape), 0, 255)
    sy, sx = np.mgrid[0:70, 0:130]
    stripes = np.repeat((((sx // 4 + sy // 6) % 2) * 200 + 30)[..., None], 3, -1)
    return {"smooth": smooth, "noisy": noisy, "stripes": stripes}


def main() -> None:
    shutil.rmtree(OUT / "cdc", ignore_errors=True)
    for old in OUT.glob("*.cdc"):
        old.unlink()
    tiny_pipeline().save_pretrained(OUT / "cdc")
    pipe = load_pipeline(OUT / "cdc")  # encode with the loaded copy: what the tests load
    hashes = {}
    for name, arr in images().items():
        img = PIL.Image.fromarray(np.asarray(arr, dtype=np.uint8), "RGB")
        for level in LEVELS:
            data = pipe.compress(img, level)
            (OUT / f"{name}_q{level}.cdc").write_bytes(data)
            hashes[f"{name}_q{level}.cdc"] = latent_sha256(pipe.decode_latent(data)[1])
    (OUT / "hashes.json").write_text(json.dumps(hashes, indent=1) + "\n")
    print(f"wrote {len(hashes)} files to {OUT}")


if __name__ == "__main__":
    main()
