"""Training data: photos packed as native-resolution tiles, and random crops cut on the device.

    python -m app.train --pack-to .data/train --data ../shared/datasets/train   # tiles for the GPU machine
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .images import image_files, load_image


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
