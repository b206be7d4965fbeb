"""One-step generation with a distilled student, and image grids.

The student evaluates once at t = T−1 on pure noise; :func:`wadi_distill.vsd.losses.one_step_x0` turns its raw
prediction (ε, v or x0, as the teacher's scheduler says) into the sample.
"""

from __future__ import annotations

import math
from pathlib import Path
import torch
from torch import nn

from wadi_distill.teachers.pipeline import Conditioning, DenoiserCall, Teacher, load_teacher
from wadi_distill.vsd.losses import NoiseSchedule, one_step_x0
from wadi_probe.device import resolve_device
from wadi_probe.io.atomic import atomic_path
from wadi_probe.errors import WadiInputError


@torch.no_grad()
def one_step_generate(denoiser: nn.Module, call: DenoiserCall, schedule: NoiseSchedule, cond: Conditioning,
                      noise: torch.Tensor) -> torch.Tensor:
    """x̂0 (latents or pixels) from ``noise`` (B, C, H, W) in one denoiser evaluation at t = T−1."""
    t = torch.full((noise.shape[0],), schedule.last_timestep, device=noise.device, dtype=torch.long)
    out = call(denoiser, noise, t, cond)
    return one_step_x0(out.float(), noise.float(), schedule)


def seeded_noise(shape: tuple[int, int, int], seeds: list[int]) -> torch.Tensor:
    """One (C, H, W) Gaussian per seed, drawn on the CPU so that every device gets the same images."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def one_step_images(teacher: Teacher, denoiser: nn.Module, cond: Conditioning, seeds: list[int], *,
                    device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decoded one-step images (B, 3|C, H, W) in [0, 1] for conditioning ``cond`` (B rows) and ``seeds``."""
    noise = seeded_noise(teacher.latent_shape, seeds).to(device)
    param_dtype = dtype or next(denoiser.parameters()).dtype
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=param_dtype,
                              enabled=param_dtype in (torch.float16, torch.bfloat16))
    with autocast:
        latents = one_step_generate(denoiser, teacher.call, teacher.schedule, cond.to(device), noise)
    if teacher.decode is None:
        return ((latents.float() + 1) / 2).clamp(0, 1).cpu()
    return teacher.decode(latents).cpu()


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
    denoiser.to(device).eval()
    if bundle.encode_prompts is None:
        raise WadiInputError(f"The teacher {teacher} has no text encoder to encode prompts with.")
    cond = bundle.encode_prompts([p for p in prompts for _ in range(n)])
    seeds = [seed + i for _ in prompts for i in range(n)]
    return one_step_images(bundle, denoiser, cond, seeds, device=device)


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

