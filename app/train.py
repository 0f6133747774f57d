"""Train CDC end to end (Yang & Mandt 2023, Eq. 7), on a time budget.

Per sample, with a quality level q (rate weight λ_q) and a perceptual weight ρ drawn at random:

    L = λ_q · bpp + (1 − ρ) · w(t) · ‖x̂0 − x0‖² + ρ · LPIPS(x̂0, x0) + ‖x_base − x0‖²

x̂0 is the one-step x0 prediction at a drawn t, w(t) = clip(SNR_t, 1, 5) (min-SNR weighting
floored at 1, so the high-noise steps that few-step decoding starts from count), and the last term
trains the content decoder's deterministic base image directly (fast convergence). t is drawn where
decoding goes (:func:`sample_timesteps`): a share ``--grid-share`` of each batch on the timesteps of
the K-step trailing schedules, K = 1…4, the rest uniform.
compressai's auxiliary loss trains the entropy bottleneck's quantiles. Adam with warm-up and a
cosine decay over the time budget, EMA weights (what is saved), gradient clipping, bf16 autocast
on CUDA, fp32 likelihoods.

For GPU throughput a step never waits for the device (crops cut on the device, noise drawn there,
the few per-crop draws sent asynchronously) and LPIPS runs only on the crops with ρ > 0. Optional,
off by default: ``--fused-adam``, ``--channels-last``, ``--compile``, and larger batches with
``--lr-scaling sqrt --warmup-crops 9600`` (the recipe's LR and warm-up at batch 32, √-scaled LR above).

    python -m app.train --data ../shared/datasets/train --out runs/cdc --max-minutes 60
    python -m app.train --pack-to .data/train --data ../shared/datasets/train   # native-resolution tiles for the GPU machine
    python -m app.train --data .data/train --resume checkpoints/cdc --batch-size 128 --lr-scaling sqrt --warmup-crops 9600 \
        --fused-adam --channels-last   # the GPU round's fast configuration (scripts/device_train.sh)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import broadcast
from diffusers.training_utils import EMAModel
from PIL import Image

from .bitstream import bits_per_pixel
from .images import image_files, load_image
from .metrics import load_lpips, psnr
from .models import CDCCompressor, CDCUNet
from .pipeline import CDCPipeline, load_pipeline, make_scheduler

DEFAULT_LAMBDAS = (0.2, 0.1, 0.05, 0.025, 0.0125, 0.006)
GRID_SHARE, GRID_JITTER = 0.5, 8
RECIPE_BATCH = 32  # the batch --lr is meant for (with --lr-scaling)
LR_SCALING = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}
SPEED_FLAGS = ("fused_adam", "channels_last", "compile")


def image_files_in(folders) -> list[Path]:
    return [p for d in folders for p in image_files(d, recursive=True)]


def pack(folders, out: Path, tile: int, max_mb: float, quality: int, seed: int = 0) -> dict:
    """Random ``tile``² tiles of the photos at their own resolution, as JPEG, until ``max_mb`` (for the GPU machine).

    No downscaling, so the statistics stay those of the photos. Round-robin over the photos in a
    seeded order: every photo gives one tile before any gives a second, and a photo gives at most
    area / tile² tiles; photos smaller than a tile are stored whole."""
    rng = random.Random(seed)
    photos = [load_image(p) for p in image_files_in(folders)]
    rng.shuffle(photos)
    out.mkdir(parents=True, exist_ok=True)
    budget, total, pixels, count = max_mb * 1e6, 0, 0, 0
    for round_ in range(max(1, max(p.width * p.height for p in photos) // tile**2)):
        for img in photos:
            if round_ >= max(1, img.width * img.height // tile**2):
                continue
            left, top = rng.randint(0, max(0, img.width - tile)), rng.randint(0, max(0, img.height - tile))
            piece = img.crop((left, top, min(img.width, left + tile), min(img.height, top + tile)))
            target = out / f"{count:05d}.jpg"
            piece.save(target, quality=quality)
            size = target.stat().st_size
            if total + size > budget:
                target.unlink()
                return _packed(out, count, pixels, total, len(photos))
            total, pixels, count = total + size, pixels + piece.width * piece.height, count + 1
    return _packed(out, count, pixels, total, len(photos))


def _packed(out: Path, count: int, pixels: int, total: int, photos: int) -> dict:
    print(f"packed {count} tiles ({pixels / 1e6:.1f} Mpx) from {photos} photos into {out} ({total / 1e6:.1f} MB)")
    return {"tiles": count, "pixels": pixels, "bytes": total, "photos": photos}


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device``: on CUDA an asynchronous copy from pinned memory (the host does not wait)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


class CropSampler:
    """Random ``crop``² crops with horizontal flips, from RGB images held on the device as uint8.

    Images of one size are stacked into one tensor and a batch is cut from each stack it draws from
    by index_select and one gather of pixel offsets (a flip reverses the columns), no per-crop loop. The
    crops come grouped by image size, an order without meaning. Image, position and flip are drawn
    by a seeded CPU generator and reach the device as small index tensors, without a host sync."""

    def __init__(self, images, crop: int, device, seed: int):
        self.crop, self.device = crop, torch.device(device)
        by_size: dict[tuple, list] = {}
        for img in images:
            if min(img.size) < crop:
                scale = crop / min(img.size)
                img = img.resize((math.ceil(img.width * scale), math.ceil(img.height * scale)), Image.BICUBIC)
            by_size.setdefault(img.size, []).append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
        self.stacks = [torch.stack(group).to(self.device) for group in by_size.values()]
        self.group = torch.cat([torch.full((len(g),), k) for k, g in enumerate(by_size.values())])
        self.local = torch.cat([torch.arange(len(g)) for g in by_size.values()])
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.group)

    def batch(self, n: int) -> torch.Tensor:
        """``n`` crops (n, 3, crop, crop) in [-1, 1]."""
        c = self.crop
        i = torch.randint(len(self), (n,), generator=self.gen)
        pos = torch.rand(n, 2, generator=self.gen, dtype=torch.float64)
        flip = torch.rand(n, generator=self.gen) < 0.5
        span = torch.arange(c)
        group, parts = self.group[i], []
        for k in group.unique().tolist():
            mask = group == k
            stack = self.stacks[k]
            h, w = stack.shape[2:]
            rows = (pos[mask, :1] * (h - c + 1)).long() + span
            cols = (pos[mask, 1:] * (w - c + 1)).long() + torch.where(flip[mask, None], span.flip(0), span)
            pixels = (rows[:, :, None] * w + cols[:, None, :]).flatten(1)  # crop pixel → offset in the image plane
            j, pixels = to_device(self.local[i[mask]], self.device), to_device(pixels, self.device)
            x = stack.index_select(0, j).flatten(2).gather(2, pixels[:, None].expand(len(j), 3, c * c))
            parts.append(x.view(len(j), 3, c, c))
        return torch.cat(parts).float().mul_(1 / 127.5).sub_(1.0)


def sample_rho(n: int, generator: torch.Generator) -> torch.Tensor:
    """ρ ∈ [0, 1]: 30% at 0, 30% at 0.9 (the paper's operating points), the rest uniform."""
    u = torch.rand(n, generator=generator)
    rho = torch.rand(n, generator=generator)
    return torch.where(u < 0.3, 0.0, torch.where(u < 0.6, 0.9, rho))


def perceptual_indices(rho: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """The samples whose loss uses LPIPS: every one with ρ > 0 (ρ = 0 weighs LPIPS by exactly 0), topped
    up with ρ = 0 samples to a multiple of ``multiple``, so that LPIPS sees few batch shapes (cudnn autotuning)."""
    order = torch.argsort((rho == 0).to(torch.uint8), stable=True)
    count = -(-int((rho > 0).sum()) // multiple) * multiple
    return order[: min(count, len(rho))]


def decode_grid(max_steps: int = 4) -> list[list[int]]:
    """The timesteps of the trailing K-step decodes, K = 1…max_steps: [999], [999, 499], [999, 666, 332], …"""
    scheduler, grid = make_scheduler(), []
    for k in range(1, max_steps + 1):
        scheduler.set_timesteps(k)
        grid.append(scheduler.timesteps.tolist())
    return grid


def sample_timesteps(n: int, generator: torch.Generator, grid, share: float, jitter: int,
                     num_train_timesteps: int = 1000) -> torch.Tensor:
    """t for a batch: with probability ``share`` a step of a few-step decode (K uniform, then one of its
    K steps, ± ``jitter``), otherwise uniform on [0, T), so that other K and schedulers still work.

    Vectorised over the batch, with ``grid`` padded to a tensor (CPU generator)."""
    lengths = torch.tensor([len(steps) for steps in grid])
    padded = torch.tensor([steps + steps[-1:] * (int(lengths.max()) - len(steps)) for steps in grid])
    k = torch.randint(len(grid), (n,), generator=generator)
    step = torch.rand(n, generator=generator)
    on_grid = padded[k, (step.double() * lengths[k]).long()]
    on_grid = (on_grid + torch.randint(-jitter, jitter + 1, (n,), generator=generator)).clamp(0, num_train_timesteps - 1)
    uniform = torch.randint(num_train_timesteps, (n,), generator=generator)
    return torch.where(torch.rand(n, generator=generator) < share, on_grid, uniform)


def speed_flags(args) -> list[str]:
    """The speed options that are on, as command-line flags."""
    return ["--" + name.replace("_", "-") for name in SPEED_FLAGS if getattr(args, name)]


def lr_schedule(args, processes: int = 1) -> tuple[float, int]:
    """(peak LR, warm-up steps) for the global batch ``batch_size × processes``: ``--lr`` scaled from the
    recipe's batch of 32 by ``--lr-scaling``, the warm-up ``--warmup-crops`` long if given."""
    batch = args.batch_size * processes
    peak = args.lr * (batch / RECIPE_BATCH) ** LR_SCALING[args.lr_scaling]
    return peak, max(1, math.ceil(args.warmup_crops / batch) if args.warmup_crops else args.warmup_steps)


def prior_state(folder) -> dict:
    """A pipeline folder's ``training_state.json`` (totals, runs, λ set); {} if it has none."""
    path = Path(folder) / "training_state.json" if folder else None
    return json.loads(path.read_text()) if path and path.is_file() else {}


def build_pipeline(args) -> CDCPipeline:
    if args.resume:
        pipe = load_pipeline(args.resume)
        return pipe.to(torch.float32)
    return CDCPipeline(CDCCompressor(num_quality_levels=len(args.lambdas)), CDCUNet(), make_scheduler())


class Trainer:
    """Eq. 7 on a pipeline's compressor and UNet: Adam, compressai's aux loss, grad clipping, EMA.

    Runs through Hugging Face accelerate: ``python -m app.train`` trains in one process (GPU or CPU),
    ``accelerate launch -m app.train`` data-parallel (DDP: gradients are averaged, every process
    draws its own crops). bf16 autocast on CUDA, likelihoods in fp32. :meth:`step` is one
    optimisation step; training and ``app.bench --train`` both run it, with the same optional speed
    settings: ``fused_adam`` (one fused Adam kernel), ``channels_last`` (NHWC convolutions for the
    compressor, UNet and LPIPS) and ``compile`` (``torch.compile`` of the UNet)."""

    def __init__(self, pipe: CDCPipeline, args):
        cuda = args.device.startswith("cuda")
        if cuda:
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        precision = args.mixed_precision if args.mixed_precision != "auto" else "bf16" if cuda else "no"
        self.accelerator = Accelerator(cpu=not cuda, mixed_precision=precision,
                                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        self.device = device = self.accelerator.device
        self.pipe, self.args = pipe.to(device), args
        pipe.compressor.train()
        pipe.unet.train()
        self.lpips = load_lpips(args.lpips_net, device=device)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        for module in (pipe.compressor, pipe.unet, self.lpips):
            module.to(memory_format=self.memory_format)
        self.main_params, aux_params = split_parameters(pipe.compressor, pipe.unet)
        self.params = self.main_params + aux_params
        opt = torch.optim.Adam(self.main_params, lr=args.lr, fused=args.fused_adam or None)
        aux_opt = torch.optim.Adam(aux_params, lr=3e-3)  # the quantiles: local to each process, refit at save
        self.compressor, self.unet, self.opt, self.aux_opt = self.accelerator.prepare(
            pipe.compressor, pipe.unet, opt, aux_opt)
        if args.compile:
            self.unet = torch.compile(self.unet)
        self.ema = EMAModel(self.params, decay=args.ema_decay, use_ema_warmup=True, power=3 / 4, foreach=True)
        self.lambdas = torch.tensor(args.lambdas, device=device)
        alphas = pipe.scheduler.alphas_cumprod.to(device)
        self.snr_weight = (alphas / (1 - alphas)).clamp(1.0, 5.0)
        rank = 1000 * self.accelerator.process_index  # process 0 keeps the seeds of a single-process run
        self.gen = torch.Generator().manual_seed(args.seed + rank)
        self.t_gen = torch.Generator().manual_seed(args.seed + 1 + rank)  # own stream: samplers differ only in t
        self.noise_gen = torch.Generator(device).manual_seed(args.seed + 2 + rank)  # drawn where it is used
        self.grid = decode_grid()

    def main_clock(self, seconds: float) -> float:
        """Process 0's elapsed seconds on every process, so all stop and schedule the LR alike."""
        if self.accelerator.num_processes == 1:
            return seconds
        return broadcast(torch.tensor([seconds], device=self.device)).item()

    def step(self, x: torch.Tensor, lr: float) -> dict:
        """One step on crops ``x`` (N, 3, H, W) in [-1, 1]; returns the loss terms (tensors; ``perceptual``:
        LPIPS of the samples :func:`perceptual_indices` picks) and x̂0. Nothing in it waits for the device."""
        compressor, unet, scheduler, args, device = self.compressor, self.unet, self.pipe.scheduler, self.args, self.device
        for g in self.opt.param_groups:
            g["lr"] = lr
        x = x.contiguous(memory_format=self.memory_format)
        n, _, h, w = x.shape
        q = torch.randint(len(args.lambdas), (n,), generator=self.gen)
        rho = sample_rho(n, self.gen)
        t = sample_timesteps(n, self.t_gen, self.grid, args.grid_share, args.grid_jitter,
                             scheduler.config.num_train_timesteps)
        lp = perceptual_indices(rho)
        q, rho, t, lp = (to_device(v, device) for v in (q, rho, t, lp))
        noise = torch.empty_like(x).normal_(generator=self.noise_gen)

        with self.accelerator.autocast():
            out = compressor(x, q)
            x_t = scheduler.add_noise(x, noise, t)
            x0_hat = unet(x_t, t, rho, out.content, out.x_base).sample.float()
            perceptual = self.lpips(x0_hat.index_select(0, lp), x.index_select(0, lp)).float()
        bits = sum(torch.log2(lik).flatten(1).sum(1) for lik in out.likelihoods.values())
        bpp = -bits / (h * w)
        mse = (x0_hat - x).pow(2).flatten(1).mean(1)
        base_mse = (out.x_base.float() - x).pow(2).flatten(1).mean(1)
        loss = ((self.lambdas[q] * bpp + (1 - rho) * self.snr_weight[t] * mse + base_mse).sum()
                + (rho.index_select(0, lp) * perceptual).sum()) / n

        self.opt.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        grad_norm = self.accelerator.clip_grad_norm_(self.main_params, 1.0)
        self.opt.step()
        aux_loss = self.pipe.compressor.aux_loss()
        self.aux_opt.zero_grad(set_to_none=True)
        aux_loss.backward()
        self.aux_opt.step()
        self.ema.step(self.params)
        return {"loss": loss, "bpp": bpp, "mse": mse, "perceptual": perceptual, "base_mse": base_mse,
                "aux": aux_loss, "grad_norm": grad_norm, "x0_hat": x0_hat}


@torch.no_grad()
def validate(pipe: CDCPipeline, images, levels) -> dict:
    """Real bitstreams on whole images: bpp from the bytes, PSNR at ρ = 0 with the pipeline's decode defaults."""
    pipe.weights_changed()
    rows = {}
    for q in levels:
        bpps, psnrs = [], []
        for img in images:
            data = pipe.compress(img, q)
            recon = pipe.decompress(data, rho=0.0, generator=torch.Generator().manual_seed(0), progress=False)
            bpps.append(bits_per_pixel(data))
            psnrs.append(psnr(img, recon))
        rows[f"q{q}"] = {"bpp": float(np.mean(bpps)), "psnr": float(np.mean(psnrs))}
    pipe.weights_changed()
    return rows


def split_parameters(compressor: CDCCompressor, unet: CDCUNet) -> tuple[list, list]:
    """(main, aux): the entropy bottleneck's quantiles are trained by the auxiliary loss only."""
    aux = [p for n, p in compressor.named_parameters() if n.endswith("quantiles")]
    main = [p for n, p in compressor.named_parameters() if not n.endswith("quantiles")] + list(unet.parameters())
    return main, aux


def save(pipe: CDCPipeline, ema: EMAModel, out: Path, state: dict) -> None:
    """Write the EMA weights as a pipeline folder: parameters in fp16, buffers (bounds, constants) in fp32.

    Non-finite weights are refused (SystemExit) rather than written. ``training_state.json`` is removed
    first and written last, so its presence marks a complete save (a round's fallback resumes from it)."""
    if not torch.isfinite(torch.nn.utils.get_total_norm(ema.shadow_params)):
        raise SystemExit(f"error: the EMA weights are not finite; {out} keeps its last complete save")
    (out / "training_state.json").unlink(missing_ok=True)
    compressor, unet = copy.deepcopy(pipe.compressor).cpu(), copy.deepcopy(pipe.unet).cpu()
    main, aux = split_parameters(compressor, unet)
    ema.copy_to(main + aux)
    compressor.update(force=True, update_quantiles=True)  # fit the quantiles the CDF tables span
    write_checkpoint(compressor, unet, pipe, out, state)


def write_checkpoint(compressor, unet, pipe: CDCPipeline, out: Path, state: dict) -> None:
    """``compressor`` and ``unet`` (converted in place) with ``pipe``'s scheduler and decode defaults as a
    pipeline folder in 9 MB shards, parameters in fp16, buffers as they are; then ``training_state.json``."""
    for p in [*compressor.parameters(), *unet.parameters()]:
        p.data = p.data.to(torch.float16, memory_format=torch.contiguous_format)  # safetensors wants contiguous
    CDCPipeline(compressor, unet, pipe.scheduler, pipe.config.decode_defaults).save_pretrained(
        out, max_shard_size="9MB"
    )
    (Path(out) / "training_state.json").write_text(json.dumps(state, indent=2))


def training_state(args, prior: dict, step: int, crops: int, minutes: float, device, processes: int = 1) -> dict:
    """This run's counts plus the totals of the checkpoint it resumed from."""
    peak_lr, warmup = lr_schedule(args, processes)
    run = {"steps": step, "crops": crops, "minutes": round(minutes, 2), "device": str(device), "processes": processes,
           "crops_per_s": round(crops / max(minutes * 60, 1e-9), 1), "speed": speed_flags(args),
           "batch_size": args.batch_size, "crop": args.crop, "lr": peak_lr, "lr_scaling": args.lr_scaling,
           "warmup_steps": warmup,
           "timesteps": f"{args.grid_share:g} on the 1-4-step decode grid (±{args.grid_jitter}), rest uniform"
           if args.grid_share else "uniform"}
    return {
        "lambdas": list(args.lambdas),
        "total_steps": prior.get("total_steps", 0) + step,
        "total_crops": prior.get("total_crops", 0) + crops,
        "total_minutes": round(prior.get("total_minutes", 0) + minutes, 2),
        "runs": prior.get("runs", []) + [run],
    }


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m app.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", required=True, help="image folders (never Kodak)")
    ap.add_argument("--pack-to", type=Path, help="only write native-resolution tiles of --data here, then exit")
    ap.add_argument("--pack-tile", type=int, default=256, help="tile side in pixels (default 256, the crop)")
    ap.add_argument("--pack-max-mb", type=float, default=28.0,
                    help="size of the packed set in MB (default 28: it travels with the repo and the wheels, 64 MiB)")
    ap.add_argument("--pack-quality", type=int, default=85, help="JPEG quality of the packed tiles")
    ap.add_argument("--out", type=Path, default=Path("runs/cdc"))
    ap.add_argument("--resume", type=Path, help="pipeline folder to continue from (e.g. checkpoints/cdc)")
    ap.add_argument("--max-minutes", type=float, default=30.0)
    ap.add_argument("--max-steps", type=int, help="also stop after this many steps (equal-budget comparisons)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--lr-scaling", choices=tuple(LR_SCALING), default="none",
                    help="scale --lr with the global batch B against 32: sqrt = lr·√(B/32) (Adam's rule), linear = lr·B/32")
    ap.add_argument("--warmup-steps", type=int, default=300)
    ap.add_argument("--warmup-crops", type=int,
                    help="warm-up length in crops instead of steps (9600 = the recipe's 300 steps × 32)")
    ap.add_argument("--lambdas", type=float, nargs="+",
                    help="rate weight per quality level (default: the resumed checkpoint's, else DEFAULT_LAMBDAS)")
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--grid-share", type=float, default=GRID_SHARE,
                    help="share of t drawn on the 1–4-step decode timesteps (0 = uniform t)")
    ap.add_argument("--grid-jitter", type=int, default=GRID_JITTER, help="± timesteps around the decode grid")
    ap.add_argument("--lpips-net", default="alex", choices=["alex", "vgg"])
    ap.add_argument("--val", type=Path, help="folder of whole images checked with real bitstreams during training")
    ap.add_argument("--val-count", type=int, default=4)
    ap.add_argument("--val-every-minutes", type=float, default=3.0)
    ap.add_argument("--save-every-minutes", type=float, default=5.0)
    ap.add_argument("--log", type=Path, help="JSON-lines log (default OUT/log.jsonl)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mixed-precision", choices=["auto", "no", "bf16"], default="auto",
                    help="bf16 autocast (likelihoods stay fp32); auto: bf16 on CUDA, none on the CPU")
    speed = ap.add_argument_group("speed (same results up to rounding; off by default)")
    speed.add_argument("--fused-adam", action="store_true", help="fused Adam (one kernel for all parameters)")
    speed.add_argument("--channels-last", action="store_true", help="channels-last (NHWC) memory format for the convolutions")
    speed.add_argument("--compile", action="store_true", help="torch.compile the UNet (compile time counts in --max-minutes)")
    args = ap.parse_args(argv)
    if not 0 <= args.grid_share <= 1 or args.grid_jitter < 0:
        ap.error("--grid-share must lie in [0, 1] and --grid-jitter be ≥ 0")
    if args.warmup_crops is not None and args.warmup_crops < 1:
        ap.error("--warmup-crops must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)

    if args.pack_to:
        pack(args.data, args.pack_to, args.pack_tile, args.pack_max_mb, args.pack_quality, args.seed)
        return

    start = time.monotonic()
    budget = args.max_minutes * 60
    torch.manual_seed(args.seed)

    prior = prior_state(args.resume)
    args.lambdas = args.lambdas or prior.get("lambdas") or list(DEFAULT_LAMBDAS)
    pipe = build_pipeline(args)
    if pipe.num_quality_levels != len(args.lambdas):
        raise SystemExit(f"error: {len(args.lambdas)} lambdas for a model with {pipe.num_quality_levels} quality levels")
    trainer = Trainer(pipe, args)
    accelerator, device = trainer.accelerator, trainer.device
    main_process, processes = accelerator.is_main_process, accelerator.num_processes
    peak_lr, warmup = lr_schedule(args, processes)
    sampler = CropSampler([load_image(p) for p in image_files_in(args.data)], args.crop, device,
                          args.seed + accelerator.process_index)
    val_images = [load_image(p) for p in image_files(args.val)[: args.val_count]] if args.val and main_process else []
    log = None
    if main_process:
        print(f"{len(sampler)} training images, {len(val_images)} validation images, "
              f"{processes} process(es) on {device}", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        log = open(args.log or args.out / "log.jsonl", "a")

    step = crops = 0
    next_val = next_save = 0.0
    while True:
        elapsed = trainer.main_clock(time.monotonic() - start)
        if elapsed >= budget or step == args.max_steps:
            break
        frac = max(elapsed / budget, step / args.max_steps if args.max_steps else 0.0)
        lr = peak_lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        x = sampler.batch(args.batch_size)
        out = trainer.step(x, lr)
        step += 1
        crops += x.shape[0] * processes
        if not main_process:
            continue

        if step % 50 == 0 or step == 1:
            with torch.no_grad():
                x0_psnr = (10 * torch.log10(4 / (out["x0_hat"].clamp(-1, 1) - x).pow(2).flatten(1).mean(1))).mean()
                base_psnr = (10 * torch.log10(4 / out["base_mse"])).mean()
                with accelerator.autocast():  # LPIPS of the whole batch: the step skips the crops with ρ = 0
                    x0_lpips = trainer.lpips(out["x0_hat"], x).float().mean()
            row = {
                "step": step, "minutes": round(elapsed / 60, 3), "crops": crops, "lr": lr, "loss": out["loss"].item(),
                "bpp": out["bpp"].mean().item(), "mse_x0": out["mse"].mean().item(),
                "lpips_x0": x0_lpips.item(), "psnr_x0": x0_psnr.item(), "psnr_base": base_psnr.item(),
                "aux": out["aux"].item(), "grad_norm": out["grad_norm"].item(),
            }
            print(json.dumps(row), flush=True)
            log.write(json.dumps(row) + "\n")
            log.flush()
            if not math.isfinite(row["loss"]):
                raise SystemExit(f"error: non-finite loss at step {step}")
        if val_images and elapsed >= next_val:
            next_val = elapsed + args.val_every_minutes * 60
            if step > 1:
                trainer.ema.store(trainer.params)
                trainer.ema.copy_to(trainer.params)
                pipe.compressor.eval()
                pipe.unet.eval()
                row = {"step": step, "minutes": round(elapsed / 60, 3),
                       "val": validate(pipe, val_images, range(0, pipe.num_quality_levels, 2))}
                pipe.compressor.train()
                pipe.unet.train()
                trainer.ema.restore(trainer.params)
                print(json.dumps(row), flush=True)
                log.write(json.dumps(row) + "\n")
        if elapsed >= next_save and step > 1:
            next_save = elapsed + args.save_every_minutes * 60
            save(pipe, trainer.ema, args.out, training_state(args, prior, step, crops, elapsed / 60, device, processes))

    accelerator.wait_for_everyone()
    if main_process:
        minutes = (time.monotonic() - start) / 60
        save(pipe, trainer.ema, args.out, training_state(args, prior, step, crops, minutes, device, processes))
        print(f"saved {args.out} after {step} steps, {crops} crops, {minutes:.1f} min", flush=True)
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1:])
