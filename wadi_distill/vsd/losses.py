"""Variational Score Distillation (VSD) math: the update direction, the two losses and the step's random draws.

Pure tensor functions (no models, no files). Every noise-schedule constant comes from the teacher's own
scheduler through a :class:`~wadi_distill.schedules.NoiseSchedule` (the forward process, the conversion of ε, v
or x0 predictions to ε, guidance and the one-step sample live there); :mod:`wadi_distill.vsd.step` puts these
pieces together into one VSD step.

Notation: ``x_t = α_t·x0 + σ_t·ε`` with ``α_t² = ᾱ_t`` and ``σ_t² = 1 − ᾱ_t``.
"""

from __future__ import annotations

import torch

from wadi_distill.schedules import NoiseSchedule

#: Student-step timesteps are drawn uniformly from this part of the schedule, in thousandths (docs/design.md,
#: "VSD"): t ~ U{20..980} for T = 1000, scaled proportionally for other T.
STUDENT_T_RANGE = (20, 980)
#: Probability that the fake-score step sees the null prompt instead of its prompt.
FAKE_NULL_PROMPT_PROB = 0.1


def vsd_gradient(eps_real: torch.Tensor, eps_fake: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The VSD update direction on x̂0: g = (1 − ᾱ_t)·(ε_real − ε_fake)."""
    return (1.0 - alpha_bar) * (eps_real - eps_fake)


def student_loss(x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """½·mean((x̂0 − stopgrad(x̂0 − g))²): its gradient with respect to x̂0 is g / numel."""
    target = (x0 - grad).detach()
    return 0.5 * torch.mean((x0.float() - target.float()) ** 2)


def fake_score_loss(eps_fake: torch.Tensor, eps_target: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Denoising loss of the fake score on student samples: mean(ᾱ_t′·(ε_fake − ε′)²)."""
    return torch.mean(alpha_bar * (eps_fake.float() - eps_target.float()) ** 2)


def student_timesteps(batch: int, schedule: NoiseSchedule, generator: torch.Generator) -> torch.Tensor:
    """The student step's timesteps: :data:`STUDENT_T_RANGE` of the schedule."""
    return schedule.draw_timesteps(batch, generator, STUDENT_T_RANGE)


def fake_timesteps(batch: int, schedule: NoiseSchedule, generator: torch.Generator) -> torch.Tensor:
    """The fake-score step's timesteps: the whole schedule (t′ ~ U{0..T−1})."""
    return schedule.draw_timesteps(batch, generator)


def null_prompt_mask(batch: int, generator: torch.Generator, prob: float = FAKE_NULL_PROMPT_PROB) -> torch.Tensor:
    """A (B,) bool mask: True where the fake-score step should use the null prompt."""
    return torch.rand((batch,), generator=generator) < prob
