"""Train CDC in stages (Yang & Mandt 2023, Eq. 7, split as :mod:`app.objectives` describes), on a time budget.

    --stage compressor   g_a, hyperprior, content decoder: bpp + λ_q·255²·MSE(x_base, x); the UNet is idle
    --stage denoiser     the UNet, compressor frozen: (1 − ρ)·w(t)·‖x̂0 − x‖² + ρ·LPIPS(x̂0, x)
    --stage joint        everything: bpp + λ_q·255²·(MSE(x_base, x) + denoiser / 4); ``--content-grad A`` scales
                         the denoiser term's gradient into the compressor by A (its forward unchanged)

Per sample a quality level q (λ_q, compressai's convention), a perceptual weight ρ and a timestep t are
drawn. x̂0 is the one-step x0 prediction at t, w(t) = clip(SNR_t, 1, 5) (min-SNR weighting floored at 1,
so the high-noise steps that few-step decoding starts from count). t is drawn where decoding goes
(:func:`sample_timesteps`): a share ``--grid-share`` of each batch on the timesteps of the K-step
trailing schedules, K = 1…4, the rest uniform. compressai's auxiliary loss trains the entropy
bottleneck's quantiles. Adam with warm-up and a cosine decay over the time budget, EMA weights (what
is exported), gradient clipping, bf16 autocast on CUDA, fp32 likelihoods. The run's full state
(fp32 weights, Adam, EMA, generators, step) is kept outside git (``--state``) and continued when the
same stage runs again; the pipeline folder (``--out``, fp16) is the export, and the fallback
(``--resume``) where no state is there. During training ``app.diagnose``'s numbers are logged.

For GPU throughput a step never waits for the device (crops cut on the device, noise drawn there,
the few per-crop draws sent asynchronously) and LPIPS runs only on the crops with ρ > 0. Optional,
off by default: ``--fused-adam``, ``--channels-last``, ``--compile``, and larger batches with
``--lr-scaling sqrt --warmup-crops 9600`` (the recipe's LR and warm-up at batch 32, √-scaled LR above).

    python -m app.train --stage compressor --data ../shared/datasets/train --resume checkpoints/cdc \
        --base-channels 48 24 --crop 128 --batch-size 16 --out runs/a --max-minutes 60
    python -m app.train --stage denoiser --data ../shared/datasets/train --resume runs/a --out runs/b --crop 128
    python -m app.train --pack-to .data/train --data ../shared/datasets/train   # native-resolution tiles for the GPU machine
    python -m app.train --data .data/train --resume checkpoints/cdc --batch-size 128 --lr-scaling sqrt --warmup-crops 9600 \
        --fused-adam --channels-last   # the GPU round's fast configuration (scripts/device_train.sh)
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import broadcast
from diffusers.training_utils import EMAModel

from . import diagnose, revive
from .images import image_files, load_image
from .metrics import load_lpips
from .models import CDCCompressor, CDCUNet
from .objectives import DenoiserLoss, JointLoss, MeanDistance, RateDistortionLoss, mse01, old_to_compressai_lambdas
from .pipeline import CDCPipeline, load_pipeline, make_scheduler
from .train_data import CropSampler, image_files_in, pack, to_device

# compressai's convention (λ·255²·MSE + bpp, images in [0, 1]), geometric for about 0.05–0.6 bpp
DEFAULT_LAMBDAS = (0.0006, 0.0012, 0.0024, 0.0048, 0.0096, 0.0192)
STAGES = ("compressor", "denoiser", "joint")
GENERATORS = ("gen", "t_gen", "noise_gen")
STATE_ROOT = Path.home() / ".cache" / "cdc-train"  # or $CDC_STATE_ROOT
GRID_SHARE, GRID_JITTER = 0.5, 8
RECIPE_BATCH = 32  # the batch --lr is meant for (with --lr-scaling)
LR_SCALING = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}
SPEED_FLAGS = ("fused_adam", "channels_last", "compile")


def sample_rho(n: int, generator: torch.Generator) -> torch.Tensor:
    """ρ ∈ [0, 1]: 30% at 0, 30% at 0.9 (the paper's operating points), the rest uniform."""
    u = torch.rand(n, generator=generator)
    rho = torch.rand(n, generator=generator)
    return torch.where(u < 0.3, 0.0, torch.where(u < 0.6, 0.9, rho))


def perceptual_indices(rho: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """The samples whose loss uses LPIPS: every one with ρ > 0 (ρ = 0 weighs LPIPS by exactly 0), topped
    up with ρ = 0 samples to a multiple of ``multiple``, so that LPIPS sees few batch shapes (cudnn autotuning;
    the CPU takes ``multiple`` = 1: there LPIPS-VGG is most of a step and every shape runs as fast)."""
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


def scale_grad(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """``x`` in the forward pass, ``alpha`` times its gradient in the backward pass."""
    return x if alpha == 1 else torch.lerp(x.detach(), x, alpha)


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


def prior_lambdas(prior: dict) -> list | None:
    """The λ set of a training state in compressai's convention (the first checkpoints stored the old one)."""
    if not prior.get("lambdas"):
        return None
    if prior.get("lambda_convention") == "compressai":
        return list(prior["lambdas"])
    return old_to_compressai_lambdas(prior["lambdas"])


def default_state_dir(out: Path) -> Path:
    """The run state's folder for ``out``: outside git, one per output folder."""
    out = Path(out).resolve()
    root = Path(os.environ.get("CDC_STATE_ROOT") or STATE_ROOT)
    return root / f"{out.name}-{hashlib.sha256(str(out).encode()).hexdigest()[:8]}"


def build_pipeline(args) -> CDCPipeline:
    """The pipeline to train, in fp32: ``--resume``'s (grown by ``--encoder-channels`` / ``--base-channels``) or a
    new one."""
    if not args.resume:
        grown = {k: tuple(v) for k, v in (("encoder_channels", args.encoder_channels),
                                          ("base_channels", args.base_channels)) if v}
        compressor = CDCCompressor(num_quality_levels=len(args.lambdas), **grown)
        return CDCPipeline(compressor, CDCUNet(), make_scheduler())
    pipe = load_pipeline(args.resume).to(torch.float32)
    compressor = pipe.compressor
    if args.encoder_channels and tuple(args.encoder_channels) != tuple(compressor.config.encoder_channels):
        compressor = compressor.with_encoder_channels(args.encoder_channels)
    if args.base_channels and tuple(args.base_channels) != tuple(compressor.config.base_channels):
        compressor = compressor.with_base_synthesis(args.base_channels)
    if compressor is not pipe.compressor:
        pipe = CDCPipeline(compressor, pipe.unet, pipe.scheduler, pipe.config.decode_defaults)
    return pipe


def revive_dead(compressor: CDCCompressor, sampler: CropSampler, ratio: float, offset: float, seed: int,
                crops: int = 32) -> int:
    """:func:`app.revive.revive` on the channels dead on ``crops`` of ``sampler`` (the same on every process); their count."""
    x = sampler.batch(crops).to(compressor.device, compressor.dtype)
    dead = revive.dead_channels(revive.channel_spread(compressor, x), ratio)
    revive.revive(compressor, x, dead, offset, torch.Generator().manual_seed(seed))
    return len(dead)


class Trainer:
    """One stage of the recipe on a pipeline's compressor and UNet: Adam, compressai's aux loss, grad
    clipping, EMA, and the run's full state (:meth:`save_state` / :meth:`load_state`).

    Stages (:data:`STAGES`): ``compressor`` trains g_a, the hyperprior and the content decoder on rate +
    x_base distortion (the UNet neither runs nor trains); ``denoiser`` trains the UNet with the
    compressor frozen (its forward under no_grad); ``joint`` trains everything. The losses are
    :mod:`app.objectives`'.

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
        self.pipe, self.args, self.stage = pipe.to(device), args, args.stage
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.main_params, aux_params = stage_parameters(pipe.compressor, pipe.unet, self.stage)
        trained = {id(p) for p in self.main_params + aux_params}
        for p in [*pipe.compressor.parameters(), *pipe.unet.parameters()]:
            p.requires_grad_(id(p) in trained)
        pipe.compressor.train(self.stage != "denoiser")
        pipe.unet.train(self.stage != "compressor")
        alphas = pipe.scheduler.alphas_cumprod.to(device)
        snr_weight = (alphas / (1 - alphas)).clamp(1.0, 5.0)
        if self.stage == "compressor":
            self.lpips = None
            self.objective = RateDistortionLoss(args.lambdas, args.balance_levels)
        else:
            self.lpips = perceptual_distance(args.lpips_net, device).to(memory_format=self.memory_format)
            self.objective = (DenoiserLoss(snr_weight, self.lpips, args.mse_weight) if self.stage == "denoiser"
                              else JointLoss(args.lambdas, snr_weight, self.lpips, args.balance_levels, args.mse_weight))
        self.objective.to(device)
        for module in (pipe.compressor, pipe.unet):
            module.to(memory_format=self.memory_format)
        self.params = self.main_params + aux_params
        opt = torch.optim.Adam(self.main_params, lr=args.lr, fused=args.fused_adam or None)
        models = (pipe.compressor,) if self.stage == "compressor" else (pipe.compressor, pipe.unet)
        optimisers = (opt, torch.optim.Adam(aux_params, lr=3e-3)) if aux_params else (opt,)  # aux: the quantiles
        prepared = self.accelerator.prepare(*models, *optimisers)
        self.compressor, self.unet = prepared[0], prepared[1] if len(models) == 2 else None
        self.opt, self.aux_opt = prepared[len(models)], prepared[len(models) + 1] if aux_params else None
        if args.compile and self.unet is not None:
            self.unet = torch.compile(self.unet)
        self.ema = EMAModel(self.params, decay=args.ema_decay, use_ema_warmup=True, power=3 / 4, foreach=True)
        self.accelerator.register_for_checkpointing(self.ema)
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
        """One step on crops ``x`` (N, 3, H, W) in [-1, 1]; returns the objective's terms (tensors), the
        auxiliary loss, the gradient norm, x_base and x̂0 (None in the compressor stage). Nothing in it
        waits for the device."""
        compressor, unet, scheduler, args, device = self.compressor, self.unet, self.pipe.scheduler, self.args, self.device
        for g in self.opt.param_groups:
            g["lr"] = lr
        x = x.contiguous(memory_format=self.memory_format)
        n = x.shape[0]
        q = torch.randint(len(args.lambdas), (n,), generator=self.gen)
        rho = sample_rho(n, self.gen)
        t = sample_timesteps(n, self.t_gen, self.grid, args.grid_share, args.grid_jitter,
                             scheduler.config.num_train_timesteps)
        lp = perceptual_indices(rho, 8 if device.type == "cuda" else 1)
        q, rho, t, lp = (to_device(v, device) for v in (q, rho, t, lp))

        x0_hat = None
        with self.accelerator.autocast():
            with torch.set_grad_enabled(self.stage != "denoiser"):
                out = compressor(x, q)
            if self.stage == "compressor":
                terms = self.objective(out, x, q)
            else:
                noise = torch.empty_like(x).normal_(generator=self.noise_gen)
                alpha = args.content_grad if self.stage == "joint" else 1.0
                content, x_base = [scale_grad(c, alpha) for c in out.content], scale_grad(out.x_base, alpha)
                x0_hat = unet(scheduler.add_noise(x, noise, t), t, rho, content, x_base).sample.float()
                terms = (self.objective(x0_hat, x, t, rho, lp) if self.stage == "denoiser"
                         else self.objective(out, x0_hat, x, q, t, rho, lp))

        self.opt.zero_grad(set_to_none=True)
        self.accelerator.backward(terms["loss"])
        grad_norm = self.accelerator.clip_grad_norm_(self.main_params, 1.0)
        self.opt.step()
        aux_loss = torch.zeros(())
        if self.aux_opt is not None:
            aux_loss = self.pipe.compressor.aux_loss()
            self.aux_opt.zero_grad(set_to_none=True)
            aux_loss.backward()
            self.aux_opt.step()
        self.ema.step(self.params)
        return {**terms, "aux": aux_loss, "grad_norm": grad_norm, "x_base": out.x_base, "x0_hat": x0_hat}

    # -- the run's state: fp32 weights, Adam, EMA, generators and counts, outside git ----------
    def save_state(self, folder: Path, counts: dict) -> None:
        """accelerate's ``save_state`` (models, optimisers, EMA, global RNG) plus this trainer's generators
        and ``counts``; ``run.json`` is written last and marks a complete state."""
        folder = Path(folder)
        (folder / "run.json").unlink(missing_ok=True)
        self.accelerator.save_state(str(folder), safe_serialization=False)  # safetensors drops the empty coding tables
        torch.save({name: getattr(self, name).get_state() for name in GENERATORS}, folder / "generators.pt")
        (folder / "run.json").write_text(json.dumps({"stage": self.stage, "architecture": self.architecture(), **counts}))

    def load_state(self, folder: Path) -> dict | None:
        """Continue from ``folder`` if it holds a complete state of this stage and architecture: the counts, else None."""
        folder = Path(folder)
        info = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else None
        if not info or info.get("stage") != self.stage or info.get("architecture") != self.architecture():
            return None
        self.accelerator.load_state(str(folder))
        for name, state in torch.load(folder / "generators.pt").items():
            getattr(self, name).set_state(state)
        return info

    def architecture(self) -> dict:
        return {name: {k: v for k, v in module.config.items() if not k.startswith("_")}
                for name, module in (("compressor", self.pipe.compressor), ("unet", self.pipe.unet))}


def perceptual_distance(nets, device) -> torch.nn.Module:
    """The denoiser's P: LPIPS with one backbone, or the mean of several (:class:`MeanDistance`)."""
    models = [load_lpips(net, device=device) for net in nets]
    return models[0] if len(models) == 1 else MeanDistance(models)


def stage_parameters(compressor: CDCCompressor, unet: CDCUNet, stage: str = "joint") -> tuple[list, list]:
    """(main, aux) trained in ``stage``: the entropy bottleneck's quantiles (aux) by the auxiliary loss only,
    and only in the stages that train the compressor."""
    aux = [p for n, p in compressor.named_parameters() if n.endswith("quantiles")] if stage != "denoiser" else []
    main = [p for n, p in compressor.named_parameters() if not n.endswith("quantiles")] if stage != "denoiser" else []
    return main + (list(unet.parameters()) if stage != "compressor" else []), aux


def save(pipe: CDCPipeline, ema: EMAModel, out: Path, state: dict, stage: str = "joint") -> None:
    """Write the EMA weights as a pipeline folder: parameters in fp16, buffers (bounds, constants) in fp32.

    Non-finite weights are refused (SystemExit) rather than written. ``training_state.json`` is removed
    first and written last, so its presence marks a complete save (a round's fallback resumes from it)."""
    if not torch.isfinite(torch.nn.utils.get_total_norm(ema.shadow_params)):
        raise SystemExit(f"error: the EMA weights are not finite; {out} keeps its last complete save")
    (out / "training_state.json").unlink(missing_ok=True)
    compressor, unet = copy.deepcopy(pipe.compressor).cpu(), copy.deepcopy(pipe.unet).cpu()
    main, aux = stage_parameters(compressor, unet, stage)
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
    run = {"stage": args.stage, "steps": step, "crops": crops, "minutes": round(minutes, 2), "device": str(device), "processes": processes,
           "crops_per_s": round(crops / max(minutes * 60, 1e-9), 1), "speed": speed_flags(args),
           "batch_size": args.batch_size, "crop": args.crop, "lr": peak_lr, "lr_scaling": args.lr_scaling,
           "warmup_steps": warmup, "balance_levels": args.balance_levels, "content_grad": args.content_grad,
           "mixed_precision": args.mixed_precision,
           "perceptual": "none" if args.stage == "compressor" else " + ".join(f"LPIPS-{n}" for n in args.lpips_net),
           "mse_weight": args.mse_weight,
           "timesteps": f"{args.grid_share:g} on the 1-4-step decode grid (±{args.grid_jitter}), rest uniform"
           if args.grid_share else "uniform"}
    return {
        "lambdas": list(args.lambdas),
        "lambda_convention": "compressai",
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
    ap.add_argument("--stage", choices=STAGES, default="joint",
                    help="compressor: rate + x_base only; denoiser: the UNet, compressor frozen; joint: everything")
    ap.add_argument("--state", type=Path,
                    help="the run's full state (fp32 weights, Adam, EMA, generators), continued if it holds this stage "
                         f"(default: a folder per --out under $CDC_STATE_ROOT or {STATE_ROOT})")
    ap.add_argument("--encoder-channels", type=int, nargs=3, metavar=("H2", "H4", "H8"),
                    help="widen the compressor's g_a at H/2, H/4, H/8 to these widths (y unchanged at first)")
    ap.add_argument("--base-channels", type=int, nargs=2, metavar=("H2", "H1"),
                    help="grow the compressor's x_base synthesis at H/2 and H to these widths")
    ap.add_argument("--revive-channels", type=float, metavar="RATIO",
                    help="first re-initialise the latent channels whose g_a spread is below RATIO × the live ones' "
                         "(app.revive; e.g. 0.2)")
    ap.add_argument("--revive-offset", type=float, default=3.0,
                    help="octaves below the live channels' gains at which revived channels start (default 3)")
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
                    help="λ per quality level, compressai's convention λ·255²·MSE + bpp (default: the resumed "
                         "checkpoint's, else DEFAULT_LAMBDAS)")
    ap.add_argument("--content-grad", type=float, default=1.0,
                    help="joint stage: scale of the denoiser loss's gradient into the compressor (1 = Eq. 7 as it is; "
                         "0.1 keeps x_base's rate-distortion term from being outweighed)")
    ap.add_argument("--balance-levels", action="store_true",
                    help="weigh every level's distortion the same (each sample's loss / λ_q·255²; see app.objectives)")
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--grid-share", type=float, default=GRID_SHARE,
                    help="share of t drawn on the 1–4-step decode timesteps (0 = uniform t)")
    ap.add_argument("--grid-jitter", type=int, default=GRID_JITTER, help="± timesteps around the decode grid")
    ap.add_argument("--lpips-net", nargs="+", default=["alex"], choices=["alex", "vgg"],
                    help="the perceptual loss P: LPIPS with this backbone, or the mean over several (alex vgg)")
    ap.add_argument("--mse-weight", type=float, default=1.0,
                    help="k in the denoiser loss (1 − ρ)·k·w(t)·MSE + ρ·P (default 1, Eq. 7): the ρ = 0 end's share "
                         "of the UNet's gradient (app.objectives)")
    ap.add_argument("--val", type=Path, help="folder of whole images: app.diagnose's numbers, logged during training")
    ap.add_argument("--val-count", type=int, default=4)
    ap.add_argument("--val-every-minutes", type=float, default=10.0)
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
    if not 0 <= args.content_grad <= 1:
        ap.error("--content-grad must lie in [0, 1]")
    if args.mse_weight <= 0:
        ap.error("--mse-weight must be positive")
    if not 0 <= args.grid_share <= 1 or args.grid_jitter < 0:
        ap.error("--grid-share must lie in [0, 1] and --grid-jitter be ≥ 0")
    if args.warmup_crops is not None and args.warmup_crops < 1:
        ap.error("--warmup-crops must be at least 1")
    return args


def log_row(trainer: Trainer, out: dict, x: torch.Tensor, step: int, minutes: float, crops: int, lr: float) -> dict:
    """The logged numbers of a step: the objective's terms, x_base's PSNR and, where the UNet ran, x̂0's PSNR and LPIPS."""
    row = {"step": step, "minutes": round(minutes, 3), "crops": crops, "lr": lr, "loss": out["loss"].item(),
           "psnr_base": (-10 * torch.log10(mse01(out["x_base"], x))).mean().item(),
           "aux": out["aux"].item(), "grad_norm": out["grad_norm"].item()}
    if "bpp" in out:
        row["bpp"] = out["bpp"].mean().item()
    if out["x0_hat"] is not None:
        with torch.no_grad(), trainer.accelerator.autocast():  # the whole batch: the step skips the crops with ρ = 0
            row["lpips_x0"] = trainer.lpips(out["x0_hat"], x).float().mean().item()
        row["psnr_x0"] = (-10 * torch.log10(mse01(out["x0_hat"].clamp(-1, 1), x))).mean().item()
    return row


def validate(trainer: Trainer, images) -> dict:
    """app.diagnose's numbers with the EMA weights (all levels; the decodes where the UNet trains, the channel
    ablation where the compressor does)."""
    pipe = trainer.pipe
    trainer.ema.store(trainer.params)
    trainer.ema.copy_to(trainer.params)
    pipe.weights_changed()
    modes = pipe.compressor.training, pipe.unet.training
    pipe.compressor.eval()
    pipe.unet.eval()
    try:
        return diagnose.measure(pipe, images, decode=trainer.stage != "compressor",
                                channels=trainer.stage != "denoiser")
    finally:
        pipe.compressor.train(modes[0])
        pipe.unet.train(modes[1])
        trainer.ema.restore(trainer.params)
        pipe.weights_changed()


def main(argv=None) -> None:
    args = parse_args(argv)

    if args.pack_to:
        pack(args.data, args.pack_to, args.pack_tile, args.pack_max_mb, args.pack_quality, args.seed)
        return

    start = time.monotonic()
    budget = args.max_minutes * 60
    torch.manual_seed(args.seed)

    prior = prior_state(args.resume)
    args.lambdas = args.lambdas or prior_lambdas(prior) or list(DEFAULT_LAMBDAS)
    pipe = build_pipeline(args)
    if pipe.num_quality_levels != len(args.lambdas):
        raise SystemExit(f"error: {len(args.lambdas)} lambdas for a model with {pipe.num_quality_levels} quality levels")
    images = [load_image(p) for p in image_files_in(args.data)]
    if args.revive_channels:
        revived = revive_dead(pipe.compressor, CropSampler(images, args.crop, torch.device("cpu"), args.seed),
                              args.revive_channels, args.revive_offset, args.seed)
        print(f"revived {revived} of {pipe.compressor.config.latent_channels} latent channels", flush=True)
    trainer = Trainer(pipe, args)
    accelerator, device = trainer.accelerator, trainer.device
    main_process, processes = accelerator.is_main_process, accelerator.num_processes
    peak_lr, warmup = lr_schedule(args, processes)
    sampler = CropSampler(images, args.crop, device, args.seed + accelerator.process_index)
    state_dir = args.state or default_state_dir(args.out)
    resumed = trainer.load_state(state_dir) or {}
    if resumed:
        sampler.gen.set_state(torch.load(state_dir / "sampler.pt"))
        prior = prior_state(args.out) if (args.out / "training_state.json").is_file() else prior
    val_images = [load_image(p) for p in image_files(args.val)[: args.val_count]] if args.val and main_process else []
    log = None
    if main_process:
        print(f"stage {args.stage}: {len(sampler)} training images, {len(val_images)} validation images, "
              f"{processes} process(es) on {device}; "
              + (f"continuing the run state in {state_dir} at step {resumed['steps']}" if resumed
                 else f"run state in {state_dir}"), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        log = open(args.log or args.out / "log.jsonl", "a")

    def write_log(row: dict) -> None:
        print(json.dumps(row), flush=True)
        log.write(json.dumps(row) + "\n")
        log.flush()

    def write_validation(minutes: float) -> None:
        nonlocal validated
        validated = step
        write_log({"step": step, "minutes": round(minutes, 3), "stage": args.stage,
                   "diagnostics": validate(trainer, val_images)})

    def save_all(minutes: float) -> None:
        """The fp16 export first (it refuses non-finite weights), then the run state."""
        save(pipe, trainer.ema, args.out, training_state(args, prior, step - base_step, crops - base_crops,
                                                         minutes - base_minutes, device, processes), args.stage)
        trainer.save_state(state_dir, {"steps": step, "crops": crops, "minutes": round(minutes, 2)})
        torch.save(sampler.gen.get_state(), state_dir / "sampler.pt")

    base_step, base_crops, base_minutes = resumed.get("steps", 0), resumed.get("crops", 0), resumed.get("minutes", 0.0)
    step, crops = base_step, base_crops
    next_val = next_save = 0.0
    validated = None  # the step of the last validation
    while True:
        elapsed = trainer.main_clock(time.monotonic() - start)
        if elapsed >= budget or (args.max_steps and step - base_step >= args.max_steps):
            break
        frac = max(elapsed / budget, (step - base_step) / args.max_steps if args.max_steps else 0.0)
        lr = peak_lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        x = sampler.batch(args.batch_size)
        out = trainer.step(x, lr)
        step += 1
        crops += x.shape[0] * processes
        if not main_process:
            continue

        if step % 50 == 0 or step == base_step + 1:
            row = log_row(trainer, out, x, step, base_minutes + elapsed / 60, crops, lr)
            write_log(row)
            if not math.isfinite(row["loss"]):
                raise SystemExit(f"error: non-finite loss at step {step}")
        if val_images and elapsed >= next_val:
            next_val = elapsed + args.val_every_minutes * 60
            if step > base_step + 1:
                write_validation(base_minutes + elapsed / 60)
        if elapsed >= next_save and step > base_step + 1:
            next_save = elapsed + args.save_every_minutes * 60
            save_all(base_minutes + elapsed / 60)

    accelerator.wait_for_everyone()
    if main_process:
        minutes = base_minutes + (time.monotonic() - start) / 60
        if val_images and validated != step:  # the numbers of the weights this stage ships
            write_validation(minutes)
        save_all(minutes)
        print(f"saved {args.out} after {step - base_step} steps, {crops - base_crops} crops, "
              f"{minutes - base_minutes:.1f} min (stage {args.stage})", flush=True)
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1:])
