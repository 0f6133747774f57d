"""bf16 synthesis (``CDCPipeline.synthesis_precision``): where "auto" chooses it, and what it costs the shipped model."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.metrics import psnr
from app.pipeline import load_pipeline, native_bf16

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@pytest.fixture(scope="module")
def shipped():
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def cat():
    return Image.open(ASSETS / "chelsea.png").convert("RGB").crop((0, 0, 448, 288))


def decode(pipe, data, rho, precision):
    pipe = copy.copy(pipe)
    pipe.synthesis_precision = precision
    return pipe.decompress(data, rho=rho, generator=torch.Generator().manual_seed(0), progress=False)


def test_native_bf16_follows_the_cpu_the_onednn_isa_limit_and_the_mkldnn_switch(monkeypatch):
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert native_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not native_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_bf16")
    assert native_bf16()
    with torch.backends.mkldnn.flags(enabled=False):
        assert not native_bf16()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not native_bf16()


@pytest.mark.parametrize("precision, native, expected", [
    ("auto", True, True), ("auto", False, False), ("fp32", True, False), ("bf16", False, True)])
def test_auto_takes_bf16_only_where_the_cpu_has_it(tiny_pipeline, monkeypatch, precision, native, expected):
    monkeypatch.setattr("app.pipeline.native_bf16", lambda: native)
    pipe = copy.copy(tiny_pipeline)
    pipe.synthesis_precision = precision
    with pipe.synthesis_autocast():
        assert torch.is_autocast_enabled("cpu") == expected
    assert not torch.is_autocast_enabled("cpu")
    assert pipe.synthesis_name() == ("bfloat16" if expected else "float32")  # as bench and evaluate record it


def test_an_unknown_precision_is_a_clear_error(tiny_pipeline):
    data = tiny_pipeline.compress(Image.new("RGB", (64, 48), (90, 120, 30)), 1)
    with pytest.raises(ValueError, match="synthesis_precision"):
        decode(tiny_pipeline, data, 0.9, "fp16")


@pytest.mark.parametrize("rho", [0.0, 0.9])
def test_bf16_synthesis_costs_the_shipped_model_nothing_visible_untiled_or_tiled(shipped, cat, rho):
    data = shipped.compress(cat, 2)
    fp32 = decode(shipped, data, rho, "fp32")
    bf16 = decode(shipped, data, rho, "bf16")
    tiled = copy.copy(shipped)
    tiled.tile_size, tiled.band_pixels = 256, 448 * 64  # bands of 64 rows through the banded UNet
    assert tiled.tiled(288, 448)
    bf16_tiled = decode(tiled, data, rho, "bf16")
    for out in (bf16, bf16_tiled):
        assert abs(psnr(cat, out) - psnr(cat, fp32)) <= 0.05  # the seam check's bound
        assert psnr(fp32, out) >= 40
