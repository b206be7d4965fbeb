"""Image grids: tiling a batch of images into one picture and writing it as a PNG (atomically)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from wadi_probe.io.atomic import atomic_path

__all__ = ["image_grid", "save_image_grid"]


def image_grid(images: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """Tile (B, C, H, W) images in [0, 1] into one (C, H', W') grid with a 2-pixel border."""
    b, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    ncol = math.ceil(b / nrow)
    pad = 2
    grid = torch.ones(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(b):
        r, k = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = images[i]
    return grid


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, *, scale: int = 1) -> Path:
    """Write ``images`` (B, C, H, W) in [0, 1] as one PNG grid, atomically; ``scale`` upscales the whole grid
    (nearest neighbour) so that tiny images stay visible."""
    from PIL import Image

    grid = image_grid(images.float().cpu(), nrow)
    array = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        array = array[:, :, 0]
    picture = Image.fromarray(array)
    if scale != 1:
        picture = picture.resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST)
    path = Path(path)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return path
