"""Portable files (issue #11): the entropy path is exact, so every machine decodes the same latent."""

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from app.bitstream import BitstreamError, pack, unpack
from app.models.entropy_exact import FRAC, IntegerHyperSynthesis, latent_sha256, to_float
from app.pipeline import DEFAULT_CHECKPOINT, load_pipeline

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "data" / "golden"
HASHES = json.loads((GOLDEN / "hashes.json").read_text())


def _portability_check():
    spec = importlib.util.spec_from_file_location("portability_check", ROOT / "scripts" / "portability_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def golden_pipeline():
    return load_pipeline(GOLDEN / "cdc")


def photo(w=150, h=100) -> PIL.Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, (xx * yy) % 256], -1) + np.random.default_rng(0).integers(0, 40, (h, w, 3))
    return PIL.Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def test_golden_files_decode_to_their_latent_hashes(golden_pipeline):
    for name, digest in HASHES.items():
        header, y_fx = golden_pipeline.decode_latent((GOLDEN / name).read_bytes())
        assert latent_sha256(y_fx) == digest, name
        assert header.check == bytes.fromhex(digest)[:4]
    # the coding tables came from the checkpoint: compressai's float rebuild never ran
    assert golden_pipeline.compressor.entropy_bottleneck._quantized_cdf.numel() == 0
    image = golden_pipeline.decompress((GOLDEN / "noisy_q3.cdc").read_bytes(), num_inference_steps=1, progress=False)
    assert image.size == (96, 80)


def test_same_latent_under_every_kernel_setting(tmp_path):
    """Golden files (tiny model) and a fresh file (shipped model) under SSE4.1, AVX2, mkldnn off, ..."""
    shipped = load_pipeline()
    data = shipped.compress(photo(), 2)
    (tmp_path / "fresh.cdc").write_bytes(data)
    expected = {str(GOLDEN / n): h for n, h in HASHES.items()}
    expected[str(tmp_path / "fresh.cdc")] = latent_sha256(shipped.decode_latent(data)[1])
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({str(GOLDEN / "cdc"): [str(GOLDEN / n) for n in HASHES],
                                    str(DEFAULT_CHECKPOINT): [str(tmp_path / "fresh.cdc")]}))
    results = _portability_check().run_settings(manifest)
    assert len(results) == 7
    for setting, hashes in results.items():
        assert hashes == expected, setting


def test_info_check_prints_the_latent_hash():
    name, digest = next(iter(HASHES.items()))
    r = subprocess.run([sys.executable, "-m", "app", "info", str(GOLDEN / name), "--check", "--checkpoint", str(GOLDEN / "cdc")],
                       cwd=ROOT, capture_output=True, text=True, check=True)
    info = json.loads(r.stdout)
    assert info["latent_sha256"] == digest and info["check_ok"] and info["check"] == digest[:8]


def test_a_different_latent_is_a_clear_error(golden_pipeline):
    data = (GOLDEN / "smooth_q1.cdc").read_bytes()
    assert golden_pipeline.model_id == unpack(data)[0].model_id  # cached before the change below
    coding = golden_pipeline._entropy_coder().coding
    coding.z_median[0] += 1 << FRAC  # as if this machine computed the entropy parameters differently
    try:
        with pytest.raises(BitstreamError, match="latent check failed"):
            golden_pipeline.decompress(data, num_inference_steps=1, progress=False)
    finally:
        coding.z_median[0] -= 1 << FRAC
    golden_pipeline.decode_latent(data)


def test_quality_beyond_the_model_is_refused(tiny_pipeline):
    header, z, y = unpack(tiny_pipeline.compress(photo(), 1))
    assert header.quality == 1 and header.quality_x100 == 100
    top = tiny_pipeline.num_quality_levels - 1
    with pytest.raises(BitstreamError, match="not in this model"):
        tiny_pipeline.decompress(pack(dataclasses.replace(header, quality=top + 0.01), z, y), progress=False)


def test_latent_hash_in_chunks_and_from_symbols_and_mu_is_the_whole_latents(monkeypatch):
    import hashlib

    from app.models import entropy_exact

    gen = torch.Generator().manual_seed(3)
    symbols = torch.randint(-40, 41, (1, 4, 5, 7), generator=gen, dtype=torch.int32)
    mu = torch.randint(-(1 << 24), 1 << 24, symbols.shape, generator=gen, dtype=torch.int32)
    y_fx = (symbols.long() << FRAC) + mu
    whole = hashlib.sha256(y_fx.numpy().astype("<i8").tobytes()).hexdigest()
    monkeypatch.setattr(entropy_exact, "CHUNK", 9)
    assert latent_sha256(y_fx) == latent_sha256(symbols, mu) == whole


def test_integer_hyper_synthesis_matches_the_float_one():
    h_s = load_pipeline().compressor.h_s
    torch.manual_seed(0)
    z = torch.randint(-8, 9, (1, 64, 4, 6))
    sigma, mu = IntegerHyperSynthesis(h_s)(z << FRAC)
    with torch.no_grad():
        ref_sigma, ref_mu = h_s(z.float()).chunk(2, dim=1)
    assert sigma.dtype == mu.dtype == torch.int64
    # Far below ŷ's unit quantisation bin: within 1/50 of it. The rounding to FRAC = 12 bits (2.4e-4) accumulates
    # with the activations' size: round 16's weights reach 0.012 at μ ≈ −26 (real level-5 z give as much).
    for exact, ref in ((sigma, ref_sigma), (mu, ref_mu)):
        error = (to_float(exact) - ref).abs()
        assert error.max() < 2e-2 and error.mean() < 2e-4


def test_exported_files_verify_elsewhere_against_the_hashes_from_where_they_were_written(golden_pipeline, tmp_path):
    """--export on one machine, --verify on another: here two kernel settings stand in for the other machine."""
    check = _portability_check()
    src = tmp_path / "src"
    src.mkdir()
    photo().save(src / "photo.png")
    folder = tmp_path / "export"
    check.export(golden_pipeline, [src / "photo.png"], folder)
    written = json.loads((folder / "latents.json").read_text())
    assert sorted(written) == [f"photo_q{level}.cdc" for level in range(golden_pipeline.num_quality_levels)]
    settings = {name: check.SETTINGS[name] for name in ("default", "oneDNN AVX2")}
    found = check.verify(folder, str(GOLDEN / "cdc"), settings)
    assert found == {name: written for name in settings}


@pytest.mark.parametrize("tile", [1, 2, 3])
def test_tiled_integer_hyper_synthesis_equals_one_pass(golden_pipeline, tile):
    """h_s over tiles of z with their halo gives the integers of one pass (it reaches less than the halo)."""
    coder = golden_pipeline._entropy_coder()
    z = torch.randint(-6, 7, (1, coder.config.hyper_channels, 9, 5), generator=torch.Generator().manual_seed(tile))
    whole = coder._y_parameters(z, tile=100)
    tiled = coder._y_parameters(z, tile=tile)
    assert whole[0].dtype == torch.uint8 and whole[1].dtype == torch.int32
    assert all(torch.equal(a, b) for a, b in zip(whole, tiled))
    sigma, mu = IntegerHyperSynthesis(coder.h_s)((z << FRAC) + coder.coding.z_median_fx())
    assert torch.equal(whole[1].long(), mu) and torch.equal(whole[0].long(), coder.coding.scale_indexes(sigma).long())


def test_large_latents_take_tiles_bounded_on_both_sides_with_the_same_integers(golden_pipeline, monkeypatch):
    from app.models import compressor

    coder = golden_pipeline._entropy_coder()
    z = torch.randint(-6, 7, (1, coder.config.hyper_channels, 20, 13), generator=torch.Generator().manual_seed(7))
    whole = coder._y_parameters(z, tile=100)
    calls = []
    monkeypatch.setattr(coder, "_integer_h_s", lambda z_fx, f=coder._integer_h_s: calls.append(z_fx.shape[2:]) or f(z_fx))
    tiled = coder._y_parameters(z, tile=4)
    assert len(calls) == 5 * 4 and max(max(shape) for shape in calls) == 4 + 2 * compressor.Z_HALO
    assert all(torch.equal(a, b) for a, b in zip(whole, tiled))


def test_an_encode_that_overwrites_its_latent_writes_the_same_file_and_leaves_the_symbols(tiny_pipeline):
    coder = tiny_pipeline._entropy_coder()
    y = torch.randn(1, coder.config.latent_channels, 8, 12, generator=torch.Generator().manual_seed(5)) * 4
    kept = coder.compress(y.clone())
    spent = y.clone()
    assert coder.compress(spent, overwrite=True) == kept
    z = torch.round(coder.h_a(y) - to_float(coder.coding.z_median_fx())).long()
    indexes, mu = coder._y_parameters(z)
    symbols = coder.coding.clamp("y", torch.round(y - to_float(mu)), indexes)
    assert torch.equal(spent.view(torch.int32), symbols)


def test_the_encoder_writes_no_escapes(tiny_pipeline, monkeypatch):
    """Residuals beyond a table's tail are coded as its last regular symbol: the fast decoder reads every file
    this encoder writes, and the latent the file carries (and its check) is the clamped one."""
    from compressai import ans

    from app.models import entropy_exact

    tables = tiny_pipeline._entropy_coder().coding
    gen = torch.Generator().manual_seed(2)
    indexes = torch.randint(0, len(tables.y_cdf_length), (1, 8, 6, 6), generator=gen).short()
    symbols = torch.randint(-3, 4, indexes.shape, generator=gen).float()
    symbols.view(-1)[::5] = 1e6
    symbols.view(-1)[1::5] = -1e6
    clamped = tables.clamp("y", symbols, indexes)
    low = tables.y_offset[indexes.long()]
    high = low + tables.y_cdf_length[indexes.long()] - 3
    assert clamped.dtype == torch.int32
    assert torch.equal(clamped.view(-1)[::5], high.view(-1)[::5]) and torch.equal(clamped.view(-1)[1::5], low.view(-1)[1::5])
    inside = (symbols >= low) & (symbols <= high)
    assert inside.view(-1)[2::5].any() and torch.equal(clamped[inside], symbols[inside].int())
    string = tables.encode("y", clamped, indexes)
    assert ans.RansDecoder().decode_with_indexes(string, indexes.view(-1).int().tolist(), *tables._coder_args("y")) \
        == clamped.view(-1).tolist()

    def no_fallback(*args):
        raise AssertionError("the bounds-checked decoder ran")

    monkeypatch.setattr(entropy_exact, "decode_checked", no_fallback)
    assert torch.equal(tables.decode("y", string, indexes), clamped)
    data = tiny_pipeline.compress(photo(), 3)
    tiny_pipeline.decode_latent(data)  # verifies the check
