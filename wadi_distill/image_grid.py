"""Image grids: tiling a batch of images into one picture (all at once, or one batch at a time) and writing it as
a PNG or JPEG (atomically)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from wadi_probe.io.atomic import atomic_path

__all__ = ["grid_size", "paste_into_grid", "image_grid", "grid_picture", "save_image_grid"]


GRID_PAD = 2


def grid_size(count: int, height: int, width: int, nrow: int | None = None) -> tuple[int, int, int]:
    """(rows of images per line ``nrow``, grid height, grid width) of ``count`` images of ``height``×``width``."""
    nrow = nrow or max(1, math.ceil(math.sqrt(count)))
    ncol = math.ceil(count / nrow)
    return nrow, ncol * (height + GRID_PAD) + GRID_PAD, nrow * (width + GRID_PAD) + GRID_PAD


def paste_into_grid(grid: torch.Tensor, images: torch.Tensor, start: int, nrow: int) -> None:
    """Write ``images`` (B, C, H, W) into ``grid`` (C, H', W') as cells ``start, start+1, ...`` (row-major, ``nrow``
    per line), so that a grid can be filled one batch at a time."""
    _, _, h, w = images.shape
    pad = GRID_PAD
    for i, image in enumerate(images):
        r, k = divmod(start + i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = image


def image_grid(images: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """Tile (B, C, H, W) images in [0, 1] into one (C, H', W') grid with a 2-pixel border."""
    b, c, h, w = images.shape
    nrow, height, width = grid_size(b, h, w, nrow)
    grid = torch.ones(c, height, width)
    paste_into_grid(grid, images, 0, nrow)
    return grid


def grid_picture(grid: torch.Tensor, scale: int = 1):
    """A PIL picture of a (C, H, W) grid in [0, 1] (or already 8-bit)."""
    from PIL import Image

    if grid.dtype != torch.uint8:
        grid = (grid.float().clamp(0, 1) * 255).round().to(torch.uint8)
    array = grid.permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        array = array[:, :, 0]
    picture = Image.fromarray(array)
    if scale != 1:
        picture = picture.resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST)
    return picture


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, *, scale: int = 1,
                    image_format: str = "PNG") -> Path:
    """Write ``images`` (B, C, H, W) in [0, 1] as one grid picture (PNG unless ``image_format`` says otherwise),
    atomically; ``scale`` upscales the whole grid (nearest neighbour) so that tiny images stay visible."""
    picture = grid_picture(image_grid(images.float().cpu(), nrow), scale)
    path = Path(path)
    with atomic_path(path) as tmp:
        picture.save(tmp, format=image_format)
    return path
