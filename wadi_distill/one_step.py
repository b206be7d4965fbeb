"""One-step generation with a distilled student read from files: the teacher plus an adapter or merged weights.

The sampling itself (:func:`~wadi_distill.teachers.sampling.one_step_images`) and the image grids
(:mod:`wadi_distill.image_grid`) live lower down, where the VSD loop uses them too; they are importable from here
as well.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from wadi_distill.image_grid import grid_picture, grid_size, image_grid, paste_into_grid, save_image_grid
from wadi_distill.teachers.pipeline import Teacher, load_teacher
from wadi_distill.teachers.sampling import one_step_generate, one_step_images, seeded_noise
from wadi_probe.device import resolve_device
from wadi_probe.errors import WadiInputError
from wadi_probe.io.atomic import atomic_path
from wadi_probe.text import plural

__all__ = ["sample", "sample_to_files", "sample_output_kind", "one_step_batches", "load_student",
           "load_merged_weights", "one_step_images", "one_step_generate", "seeded_noise", "image_grid",
           "save_image_grid"]


GRID_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def one_step_batches(teacher: Teacher, denoiser: nn.Module, requests: Iterable[tuple[str, int]], *,
                     batch_size: int = 16, device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """Decoded one-step images (B, C, H, W) in [0, 1], one batch of at most ``batch_size`` at a time, for the
    (prompt, seed) pairs of ``requests`` in order.

    ``requests`` is consumed lazily, so a count of any size holds one batch of prompts and images at a time.
    """
    if teacher.encode_prompts is None:
        raise WadiInputError("the teacher has no text encoder to encode prompts with.")
    if batch_size < 1:
        raise WadiInputError(f"the batch size must be at least 1, not {batch_size}.")
    requests = iter(requests)
    while True:
        chunk = list(itertools.islice(requests, batch_size))
        if not chunk:
            return
        prompts, seeds = [p for p, _ in chunk], [s for _, s in chunk]
        yield one_step_images(teacher, denoiser, teacher.encode_prompts(prompts), seeds, device=device)


def _check_request(prompts: list[str], n: int, batch_size: int, adapter: str | Path | None,
                   merged: str | Path | None) -> None:
    """The checks :func:`sample` and :func:`sample_to_files` make before anything is loaded."""
    if (adapter is None) == (merged is None):
        raise WadiInputError("Give exactly one of an adapter file (--adapter) or merged student weights (--merged).")
    if batch_size < 1:
        raise WadiInputError(f"The batch size must be at least 1, not {batch_size}.")
    if not prompts:
        raise WadiInputError("Give at least one prompt (--prompt).")
    if int(n) < 1:
        raise WadiInputError(f"The number of images per prompt must be at least 1, not {n}.")


def _student_batches(teacher: str | Path, prompts: list[str], adapter: str | Path | None,
                     merged: str | Path | None, n: int, seed: int, device: str, batch_size: int) -> Iterator[torch.Tensor]:
    """The student's one-step images for ``n`` seeds (``seed``, ``seed+1``, ...) per prompt, one batch at a time."""
    device = str(resolve_device(getattr(device, "value", device)))
    bundle, denoiser = load_student(teacher, adapter=adapter, merged=merged, device=device)
    if bundle.encode_prompts is None:
        raise WadiInputError(f"The teacher {teacher} has no text encoder to encode prompts with.")
    requests = ((p, seed + i) for p in prompts for i in range(n))
    return one_step_batches(bundle, denoiser, requests, batch_size=batch_size, device=device)


def sample(
    teacher: str | Path,
    prompts: list[str],
    *,
    adapter: str | Path | None = None,
    merged: str | Path | None = None,
    n: int = 4,
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 16,
) -> torch.Tensor:
    """One-step images of a distilled student: the teacher's folder plus either an adapter or merged weights.

    Each prompt gets ``n`` images with seeds ``seed, seed+1, ...``; returns (len(prompts)·n, C, H, W) in [0, 1],
    all in memory (for many images, :func:`sample_to_files` writes them as they come).
    ``adapter`` is an adapter folder (``final/``, the weight average, or ``final/last-step/``) or its
    ``adapter.safetensors``; ``merged`` a merged ``student.safetensors``. ``device`` is cpu, cuda or auto.
    """
    _check_request(prompts, n, batch_size, adapter, merged)
    return torch.cat(list(_student_batches(teacher, prompts, adapter, merged, n, seed, device, batch_size)))


def sample_output_kind(output: str | Path) -> str | None:
    """How ``sample`` writes ``output``: the grid format (PNG, JPEG) for a file, or None for a folder (one PNG per
    image): an existing folder or a path without a suffix. Any other suffix is refused."""
    output = Path(output)
    if output.is_dir() or not output.suffix:
        return None
    kind = GRID_FORMATS.get(output.suffix.lower())
    if kind is None:
        raise WadiInputError(f"{output} has the suffix {output.suffix!r}; name a .png or .jpg grid, or a folder "
                             "(a path without a suffix) for one PNG per image.")
    return kind


def sample_to_files(
    teacher: str | Path,
    prompts: list[str],
    output: str | Path,
    *,
    adapter: str | Path | None = None,
    merged: str | Path | None = None,
    n: int = 4,
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 16,
    max_hours: float | None = None,
) -> dict:
    """:func:`sample` written to ``output`` one batch at a time: a grid picture (``.png``/``.jpg``, one line per
    prompt) or a folder of ``000000.png`` … in prompt order, seeds counting up per prompt.

    Memory holds one batch of images (and, for a grid, the grid's 8-bit pixels, which PIL's image-size limit caps).
    After the first batch the whole request's disk space and time are estimated and a request that cannot be met
    is refused before anything is written (:func:`wadi_distill.request_size.check_request`). Returns
    ``{"images", "output", "kind", "estimate"}``.
    """
    from wadi_distill.request_size import MAX_HOURS, check_grid_pixels, check_request, checked_batches

    _check_request(prompts, n, batch_size, adapter, merged)
    output = Path(output)
    kind = sample_output_kind(output)
    if kind is None:
        from wadi_distill.evaluation.images import list_images

        if output.is_dir() and list_images(output):
            raise WadiInputError(f"{output} already holds images; give an empty or new folder.")
    count = len(prompts) * int(n)
    found: dict = {}

    def check(first: torch.Tensor, seconds: float) -> None:
        found["geometry"] = grid_size(count, first.shape[2], first.shape[3], int(n))
        if kind is not None:
            check_grid_pixels(found["geometry"][2], found["geometry"][1], count, output)
        found["estimate"] = check_request(
            count, first, seconds, output, one_file_each=kind is None, image_format=kind or "PNG",
            max_hours=MAX_HOURS if max_hours is None else max_hours,
            what=f"sampling {plural(len(prompts), 'prompt')} × {int(n):,}")

    batches = checked_batches(_student_batches(teacher, prompts, adapter, merged, n, seed, device, batch_size), check)
    if kind is None:
        from wadi_distill.evaluation.images import save_pngs

        write = save_pngs
    else:
        grid: list[torch.Tensor] = []

        def write(images: torch.Tensor, _: Path, start: int) -> None:
            nrow, height, width = found["geometry"]
            if not grid:
                grid.append(torch.full((images.shape[1], height, width), 255, dtype=torch.uint8))
            paste_into_grid(grid[0], (images.float().clamp(0, 1) * 255).round().to(torch.uint8), start, nrow)

    start = 0
    for images in batches:
        write(images, output, start)
        start += len(images)
        del images  # hold no batch while the next is drawn
    if kind is not None:
        picture = grid_picture(grid[0])
        with atomic_path(output) as tmp:
            picture.save(tmp, format=kind)
    return {"images": count, "output": output, "kind": kind or "folder", "estimate": found["estimate"]}


def load_student(teacher: str | Path, *, adapter: str | Path | None = None, merged: str | Path | None = None,
                 device: str = "cpu") -> tuple[Teacher, nn.Module]:
    """The teacher bundle and its denoiser turned into the student (an adapter, or merged weights), in eval mode."""
    if (adapter is None) == (merged is None):
        raise WadiInputError("Give exactly one of an adapter file (--adapter) or merged student weights (--merged).")
    device = str(resolve_device(getattr(device, "value", device)))
    for given in (adapter, merged):
        if given is not None and not Path(given).exists():
            raise WadiInputError(f"The student file or folder {given} does not exist.")
    bundle = load_teacher(teacher)
    denoiser = bundle.denoiser
    if adapter is not None:
        from wadi_distill.lorad.serialization import load_adapter
        from wadi_distill.lorad.model import set_active_adapter

        load_adapter(denoiser, adapter, adapter_name="student")
        set_active_adapter(denoiser, "student")
    else:
        load_merged_weights(denoiser, merged)
    return bundle, denoiser.to(device).eval()


def load_merged_weights(denoiser: nn.Module, path: str | Path) -> None:
    """Load a merged student (``student.safetensors``) into the teacher's denoiser, refusing a mismatch."""
    from safetensors.torch import load_file

    from wadi_probe.io.formats.safetensors_io import utf8_path

    path = Path(path)
    if not path.is_file():
        raise WadiInputError(f"The merged student file {path} does not exist.")
    try:
        state = load_file(utf8_path(path))
    except WadiInputError:
        raise
    except Exception as exc:
        raise WadiInputError(f"{path} is not a readable safetensors file.") from exc
    own = denoiser.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        raise WadiInputError(f"{path} does not fit this teacher ({len(missing)} tensors missing, "
                             f"{len(wrong)} with other shapes); was it exported from another model?")
    denoiser.load_state_dict({k: state[k] for k in own}, strict=True)

