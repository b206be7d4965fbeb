"""One-step generation with a distilled student read from files: the teacher plus an adapter or merged weights.

The sampling itself (:func:`~wadi_distill.teachers.sampling.one_step_images`) and the image grids
(:mod:`wadi_distill.image_grid`) live lower down, where the VSD loop uses them too; they are importable from here
as well.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from wadi_distill.image_grid import image_grid, save_image_grid
from wadi_distill.teachers.pipeline import Teacher, load_teacher
from wadi_distill.teachers.sampling import one_step_generate, one_step_images, seeded_noise
from wadi_probe.device import resolve_device
from wadi_probe.errors import WadiInputError

__all__ = ["sample", "load_student", "load_merged_weights", "one_step_images", "one_step_generate", "seeded_noise",
           "image_grid", "save_image_grid"]


def sample(
    teacher: str | Path,
    prompts: list[str],
    *,
    adapter: str | Path | None = None,
    merged: str | Path | None = None,
    n: int = 4,
    seed: int = 0,
    device: str = "cpu",
) -> torch.Tensor:
    """One-step images of a distilled student: the teacher's folder plus either an adapter or merged weights.

    Each prompt gets ``n`` images with seeds ``seed, seed+1, ...``; returns (len(prompts)·n, C, H, W) in [0, 1].
    ``adapter`` is an adapter folder (``final/`` or, for the EMA weights, ``final/ema/``) or its
    ``adapter.safetensors``; ``merged`` a merged ``student.safetensors``. ``device`` is cpu, cuda or auto.
    """
    if (adapter is None) == (merged is None):
        raise WadiInputError("Give exactly one of an adapter file (--adapter) or merged student weights (--merged).")
    if not prompts:
        raise WadiInputError("Give at least one prompt (--prompt).")
    if int(n) < 1:
        raise WadiInputError(f"The number of images per prompt must be at least 1, not {n}.")
    device = str(resolve_device(getattr(device, "value", device)))
    bundle, denoiser = load_student(teacher, adapter=adapter, merged=merged, device=device)
    if bundle.encode_prompts is None:
        raise WadiInputError(f"The teacher {teacher} has no text encoder to encode prompts with.")
    cond = bundle.encode_prompts([p for p in prompts for _ in range(n)])
    seeds = [seed + i for _ in prompts for i in range(n)]
    return one_step_images(bundle, denoiser, cond, seeds, device=device)


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

    path = Path(path)
    if not path.is_file():
        raise WadiInputError(f"The merged student file {path} does not exist.")
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise WadiInputError(f"{path} is not a readable safetensors file.") from exc
    own = denoiser.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        raise WadiInputError(f"{path} does not fit this teacher ({len(missing)} tensors missing, "
                             f"{len(wrong)} with other shapes); was it exported from another model?")
    denoiser.load_state_dict({k: state[k] for k in own}, strict=True)

