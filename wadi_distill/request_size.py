"""What a generation request costs in disk space and time, and the refusal of requests that cannot be met.

``sample`` and ``evaluate`` generate in batches and write each batch before the next one is drawn, so their memory
is bounded by one batch whatever the count. What a count can still exhaust is the disk and the user's patience,
so after the first batch (drawn but not yet written) :func:`check_request` estimates both:

- disk: the first batch's images encoded as they will be written (PNG or JPEG), averaged per image; for one file per
  image each file is rounded up to the file system's block size, and the files must also fit the free inodes;
- time: the first batch's wall time per image, times the count (the first batch includes one-time start-up costs,
  so this errs on the long side).

The rule: a request is refused, before anything is written, when its estimated bytes exceed the free space of the
output's file system, when one file per image would exceed the free inodes, or when it would take longer than
``max_hours`` (24 by default: neither command can resume, so a longer job is better split, e.g. by ``--seed``).
A grid (one picture of all images) is also refused when it would have more pixels than PIL's decompression-bomb
limit (``PIL.Image.MAX_IMAGE_PIXELS``), which image readers, this project's included, refuse to open.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from wadi_probe.errors import WadiInputError
from wadi_probe.io.outputs import nearest_existing

__all__ = ["MAX_HOURS", "RequestEstimate", "encoded_sizes", "free_space", "check_request", "check_grid_pixels",
           "checked_batches", "format_bytes", "format_seconds"]

MAX_HOURS = 24.0


@dataclass(frozen=True)
class RequestEstimate:
    """The estimated cost of writing ``images`` images: ``bytes`` on disk, ``files`` files, ``seconds`` of wall time."""

    images: int
    bytes: int
    files: int
    seconds: float


def format_bytes(count: float) -> str:
    """``count`` bytes in the largest binary unit that keeps the number at least 1 (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def format_seconds(seconds: float) -> str:
    """A duration in s, min, h or days, whichever reads best."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def encoded_sizes(images: torch.Tensor, image_format: str = "PNG") -> list[int]:
    """Bytes of each image (B, C, H, W) in [0, 1] once encoded as ``image_format``, as the writers write it."""
    from PIL import Image

    array = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    sizes = []
    for picture in array:
        buffer = io.BytesIO()
        Image.fromarray(picture[:, :, 0] if picture.shape[2] == 1 else picture).save(buffer, format=image_format)
        sizes.append(buffer.tell())
    return sizes


def free_space(path: str | Path) -> tuple[int, int | None, int]:
    """(free bytes, free inodes or None where the file system does not count them, block size) where ``path``
    is or would be created."""
    where = nearest_existing(path)
    free = shutil.disk_usage(where).free
    try:
        stats = os.statvfs(where)
    except (AttributeError, OSError):  # no statvfs (Windows): bytes only, 4 KiB blocks assumed
        return free, None, 4096
    inodes = stats.f_favail if stats.f_files > 0 else None
    return free, inodes, max(int(stats.f_frsize or stats.f_bsize or 4096), 1)


def check_request(count: int, first_batch: torch.Tensor, seconds: float, target: str | Path, *, one_file_each: bool,
                  image_format: str = "PNG", max_hours: float = MAX_HOURS, what: str = "this request") -> RequestEstimate:
    """Estimate the cost of ``count`` images from ``first_batch`` (drawn in ``seconds``) and refuse it when it cannot
    be met (see the module's rule); returns the estimate.

    ``target`` is the output file or folder; ``one_file_each`` says whether every image becomes its own file.
    """
    sizes = encoded_sizes(first_batch, image_format)
    free, inodes, block = free_space(target)
    if one_file_each:
        per_image = sum(math.ceil(size / block) * block for size in sizes) / len(sizes)
    else:
        per_image = sum(sizes) / len(sizes)
    estimate = RequestEstimate(images=count, bytes=int(math.ceil(per_image * count)), files=count if one_file_each else 1,
                               seconds=seconds / len(sizes) * count)
    reasons = []
    if estimate.bytes > free:
        reasons.append(f"only {format_bytes(free)} are free there")
    if one_file_each and inodes is not None and count > inodes:
        reasons.append(f"the file system has room for {inodes:,} more files")
    if estimate.seconds > max_hours * 3600:
        reasons.append(f"the time limit is {max_hours:g} h")
    if reasons:
        listed = reasons[0] if len(reasons) == 1 else ", ".join(reasons[:-1]) + " and " + reasons[-1]
        rate = len(sizes) / seconds if seconds > 0 else float("inf")
        raise WadiInputError(
            f"{what} asks for {count:,} images, which would take about {format_bytes(estimate.bytes)} on disk "
            f"(about {format_bytes(per_image)} per image as {image_format}) and {format_seconds(estimate.seconds)} "
            f"(at the first batch's {rate:,.1f} images/s), but {listed}; ask for fewer images or split "
            f"the request (for example by --seed), or raise --max-hours if only the time is too long.")
    return estimate


def check_grid_pixels(width: int, height: int, count: int, target: str | Path) -> None:
    """Refuse a grid picture of ``width``×``height`` pixels (``count`` images) that image readers would refuse."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and height * width > limit:
        raise WadiInputError(
            f"a grid of {count:,} images would be {width:,}×{height:,} pixels, more than PIL's decompression-bomb "
            f"limit of {limit:,} beyond which image readers warn or refuse, so {target} would be unreadable; write one "
            "file per image instead by giving -o a folder (a path without a suffix).")


def checked_batches(batches: Iterable[torch.Tensor], check: Callable[[torch.Tensor, float], None]) -> Iterator[torch.Tensor]:
    """``batches`` handed on one at a time, with ``check(first batch, seconds it took)`` called before the first is
    handed on, so that a request can be refused before anything is written. No batch is held once the next one is
    asked for (a plain ``itertools.chain([first], rest)`` would keep the first alive to the end)."""
    started = time.perf_counter()
    first = True
    for images in batches:
        if first:
            check(images, time.perf_counter() - started)
            first = False
        yield images
        del images
