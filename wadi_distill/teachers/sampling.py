"""One-step images of a denoiser on a teacher (the teacher itself, or a student on its base).

The denoiser is called once at the schedule's terminal timestep on seeded noise; the schedule's
:func:`~wadi_distill.schedules.one_step_sample` turns the raw prediction (ε, v or x0) into the sample, and the
teacher's decoder (its VAE, or the pixel mapping of the built-in world) into images. The VSD loop draws its
validation images with this, evaluation and the demo their samples.
"""

from __future__ import annotations

import torch
from torch import nn

from wadi_distill.schedules import NoiseSchedule, one_step_sample
from wadi_distill.teachers.conditioning import Conditioning
from wadi_distill.teachers.teacher import Teacher, TeacherFamily

__all__ = ["one_step_generate", "one_step_images", "seeded_noise"]


@torch.no_grad()
def one_step_generate(denoiser: nn.Module, call: TeacherFamily, schedule: NoiseSchedule, cond: Conditioning,
                      noise: torch.Tensor) -> torch.Tensor:
    """x̂0 (latents or pixels) from ``noise`` (B, C, H, W) in one denoiser evaluation at the terminal timestep
    (T − 1 on a VP schedule, σ = 1 on a flow one)."""
    return one_step_sample(lambda x, t: call(denoiser, x, t, cond).float(), noise.float(), schedule)


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
