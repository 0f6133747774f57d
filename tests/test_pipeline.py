import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from PIL import Image

from app.bitstream import BitstreamError, Header, bits_per_pixel, pack, unpack
from app.pipeline import CDCPipeline, CheckpointError, load_pipeline, make_scheduler
from conftest import ROOT, make_tiny_pipeline

ASSETS = ROOT / "assets"


def photo(w=96, h=80, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    return Image.fromarray(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))


def decode(pipe, data, seed=0, **kw):
    return pipe.decompress(data, generator=torch.Generator().manual_seed(seed), progress=False, **kw)


@pytest.mark.parametrize("size", [(1, 1), (65, 33), (17, 1000), (96, 80)])
def test_round_trip_any_size(tiny_pipeline, size):
    img = photo(*size)
    data = tiny_pipeline.compress(img, 1)
    header, _, _ = unpack(data)
    assert (header.width, header.height) == size
    assert header.pad_width % 64 == 0 and header.pad_height % 64 == 0
    assert decode(tiny_pipeline, data).size == size


def test_same_seed_same_image_and_seed_changes_texture(tiny_pipeline):
    data = tiny_pipeline.compress(photo(), 2)
    a, b, c = (np.asarray(decode(tiny_pipeline, data, seed=s)) for s in (0, 0, 1))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_quality_levels_are_stored_and_validated(tiny_pipeline):
    for q in range(tiny_pipeline.num_quality_levels):
        assert unpack(tiny_pipeline.compress(photo(), q))[0].quality == q
    for bad in (-1, tiny_pipeline.num_quality_levels - 0.99, float("nan"), "2", True):
        with pytest.raises(ValueError, match="quality must be a number"):
            tiny_pipeline.compress(photo(), bad)
    with pytest.raises(ValueError, match="exactly one"):
        tiny_pipeline.compress(photo())
    with pytest.raises(ValueError, match="exactly one"):
        tiny_pipeline.compress(photo(), 1, max_bytes=1000)
    for kw in ({"max_bytes": 0}, {"max_bytes": 2.5}, {"bpp": -1.0}, {"bpp": float("inf")}):
        with pytest.raises(ValueError, match="max_bytes|bpp"):
            tiny_pipeline.compress(photo(), **kw)


def test_fractional_quality_round_trip(tiny_pipeline):
    data = tiny_pipeline.compress(photo(), 1.375)  # stored to 1/100 of a level
    header = unpack(data)[0]
    assert header.quality == 1.38 and header.quality_x100 == 138
    assert decode(tiny_pipeline, data).size == (96, 80)
    assert unpack(tiny_pipeline.compress(photo(), 2.0))[0].quality == 2  # whole levels stay whole
    assert tiny_pipeline.compress(photo(), 2.0) == tiny_pipeline.compress(photo(), 2)


def test_continuous_rate_and_size_targets_with_the_shipped_model():
    pipe = load_pipeline()
    img = Image.open(ASSETS / "chelsea.png")
    sizes = [len(pipe.compress(img, q / 5)) for q in range(26)]  # 0, 0.2, …, 5
    assert sizes == sorted(sizes) and sizes[-1] > 2 * sizes[0]
    for target in (sizes[0] + 50, (sizes[0] + sizes[-1]) // 2, sizes[-1] - 50):
        data = pipe.compress(img, max_bytes=target)
        assert target * 0.97 <= len(data) <= target and pipe.last_probes <= 12
    assert len(pipe.compress(img, max_bytes=10 * sizes[-1])) == sizes[-1]
    assert bits_per_pixel(pipe.compress(img, bpp=0.3)) <= 0.3
    with pytest.raises(ValueError, match=f"smallest this model writes for this image is {sizes[0]} bytes"):
        pipe.compress(img, max_bytes=sizes[0] - 1)


def test_decoding_arguments_are_validated(tiny_pipeline):
    data = tiny_pipeline.compress(photo(), 0)
    with pytest.raises(ValueError, match="rho"):
        decode(tiny_pipeline, data, rho=1.5)
    with pytest.raises(ValueError, match="num_inference_steps"):
        decode(tiny_pipeline, data, num_inference_steps=0)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="noise_scale"):
            decode(tiny_pipeline, data, noise_scale=bad)


TUNED = [{"rho": 0.0, "num_inference_steps": 1, "noise_scale": 0.0},
         {"rho": 0.6, "num_inference_steps": 3, "noise_scale": 0.8},
         {"rho": 1.0, "num_inference_steps": 2, "noise_scale": 1.0}]


def tuned_pipeline(table=TUNED) -> CDCPipeline:
    p = make_tiny_pipeline()
    return CDCPipeline(p.compressor, p.unet, p.scheduler, decode_defaults=table)


def test_decode_defaults_interpolate_between_tuned_rhos():
    pipe = tuned_pipeline()
    assert pipe.decode_settings(0.0) == (1, 0.0) and pipe.decode_settings(0.6) == (3, pytest.approx(0.8))
    assert pipe.decode_settings(0.3) == (2, pytest.approx(0.4))  # K = 2.0, γ halfway
    assert pipe.decode_settings(0.8) == (3, pytest.approx(0.9))  # K = 2.5 rounds up
    assert pipe.decode_settings(1.0) == (2, 1.0)
    assert tuned_pipeline(TUNED[1:2]).decode_settings(0.0) == (3, pytest.approx(0.8))  # constant beyond the table


def test_decode_defaults_are_used_unless_given_and_survive_save_load(tmp_path):
    pipe = tuned_pipeline()
    pipe.save_pretrained(tmp_path / "cdc")
    loaded = load_pipeline(tmp_path / "cdc")
    assert loaded.config.decode_defaults == TUNED
    data = loaded.compress(photo(), 1)
    for rho in (0.0, 0.3, 0.9):
        k, g = loaded.decode_settings(rho)
        assert np.array_equal(np.asarray(decode(loaded, data, rho=rho)),
                              np.asarray(decode(loaded, data, rho=rho, num_inference_steps=k, noise_scale=g)))
    explicit = decode(loaded, data, rho=0.0, num_inference_steps=3, noise_scale=1.0)  # explicit arguments win
    assert not np.array_equal(np.asarray(explicit), np.asarray(decode(loaded, data, rho=0.0)))


@pytest.mark.parametrize("bad", [[], [{"rho": 0.0}], [{"rho": 0.5, "num_inference_steps": 1, "noise_scale": -1}],
                                 [{"rho": 0.9, "num_inference_steps": 1, "noise_scale": 0},
                                  {"rho": 0.1, "num_inference_steps": 1, "noise_scale": 0}]])
def test_bad_decode_defaults_are_rejected(bad):
    with pytest.raises(ValueError, match="decode_defaults"):
        tuned_pipeline(bad)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp"])
@pytest.mark.parametrize("steps", [1, 3])
def test_zero_noise_scale_decodes_identically_for_any_seed(tiny_pipeline, scheduler, steps):
    pipe = CDCPipeline(tiny_pipeline.compressor, tiny_pipeline.unet, make_scheduler(scheduler))
    data = pipe.compress(photo(), 2)
    a, b = (np.asarray(decode(pipe, data, seed=s, num_inference_steps=steps, noise_scale=0.0)) for s in (0, 1))
    assert np.array_equal(a, b)
    c, d = (np.asarray(decode(pipe, data, seed=s, num_inference_steps=steps, noise_scale=0.5)) for s in (0, 1))
    assert not np.array_equal(c, d)


def test_unknown_scheduler_or_spacing_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown scheduler 'euler'; choose one of ddim, dpmpp"):
        make_scheduler("euler")
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        make_scheduler("ddim", "leading")


def test_file_from_another_model_is_rejected(tiny_pipeline):
    other = make_tiny_pipeline(seed=1)
    with pytest.raises(BitstreamError, match="another model"):
        decode(tiny_pipeline, other.compress(photo(), 0))


def test_forged_headers_are_rejected(tiny_pipeline):
    header, z, y = unpack(tiny_pipeline.compress(photo(), 0))
    forged = [
        Header(header.model_id, 99, header.width, header.height, header.pad_width, header.pad_height),
        Header(header.model_id, 0, header.width, header.height, header.pad_width + 64, header.pad_height),
        Header(header.model_id, 0, 5000, 5000, 5056, 5056),
    ]
    for h in forged:
        with pytest.raises(BitstreamError):
            decode(tiny_pipeline, pack(h, z, y))


def test_save_load_round_trip_is_bit_exact(tiny_pipeline, tiny_pipeline_dir):
    loaded = load_pipeline(tiny_pipeline_dir)
    assert loaded.model_id == tiny_pipeline.model_id
    loaded.synthesis_precision = tiny_pipeline.synthesis_precision  # a runtime choice, not saved
    data = tiny_pipeline.compress(photo(), 3)
    assert loaded.compress(photo(), 3) == data
    assert np.array_equal(np.asarray(decode(loaded, data)), np.asarray(decode(tiny_pipeline, data)))


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    with pytest.raises(CheckpointError, match="no CDC checkpoint"):
        load_pipeline(tmp_path)


def test_other_diffusers_schedulers_work(tiny_pipeline_dir):
    pipe = load_pipeline(tiny_pipeline_dir)
    data = pipe.compress(photo(), 1)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.prediction_type == "sample"
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    assert decode(pipe, data, num_inference_steps=3).size == (96, 80)


def test_round_trip_call_reports_bpp_from_bytes(tiny_pipeline):
    out = tiny_pipeline(photo(), 2, generator=torch.Generator().manual_seed(0))
    assert out.bpp[0] == 8 * len(out.bitstreams[0]) / (96 * 80)
    assert isinstance(out.images[0], Image.Image)


def test_pipeline_class_is_a_diffusers_pipeline():
    from diffusers import DiffusionPipeline

    assert issubclass(CDCPipeline, DiffusionPipeline)
