"""Variational Score Distillation (VSD) math: the update direction, the two losses and the step's random draws.

Pure tensor functions (no models, no files). Every noise-schedule constant comes from the teacher's own
scheduler through a :class:`~wadi_distill.schedules.NoiseSchedule` (the forward process, the conversion of ε, v
or x0 predictions to ε, guidance and the one-step sample live there); :mod:`wadi_distill.vsd.step` puts these
pieces together into one VSD step.

Notation: ``x_t = α_t·x0 + σ_t·ε``; on a VP schedule ``α_t² = ᾱ_t`` and ``σ_t² = 1 − ᾱ_t``, on a flow schedule
``α = 1 − σ``. The weights are the schedule's (:meth:`~wadi_distill.schedules.NoiseSchedule.vsd_weight`,
:meth:`~wadi_distill.schedules.NoiseSchedule.denoising_terms`); docs/design.md and docs/flow.md give them.
"""

from __future__ import annotations

import torch

from wadi_distill.schedules import NoiseSchedule

#: Student-step timesteps are drawn uniformly from this part of the schedule, in thousandths (docs/design.md,
#: "VSD"): t ~ U{20..980} for T = 1000, scaled proportionally for other T.
STUDENT_T_RANGE = (20, 980)
#: Probability that the fake-score step sees the null prompt instead of its prompt.
FAKE_NULL_PROMPT_PROB = 0.1


def vsd_gradient(eps_real: torch.Tensor, eps_fake: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The VSD update direction on x̂0: g = w·(ε_real − ε_fake), w from the schedule (VP: 1 − ᾱ_t)."""
    return weight * (eps_real - eps_fake)


def dmd_normalized_gradient(x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD's update direction on x̂0: g = (x̂0_fake − x̂0_real) / mean|x̂0 − x̂0_real|, the mean taken per sample.

    The same direction as :func:`vsd_gradient` (VP: x̂0_fake − x̂0_real = (σ_t/α_t)·(ε_real − ε_fake)) with an
    adaptive weight in place of the schedule's: each sample's step is measured in units of how far the real score
    would move it, so no timestep dominates. Computed in fp32; a sample the real score leaves exactly where it is
    (normaliser 0) gets no update rather than a division by zero.
    """
    reduce = tuple(range(1, x0.ndim))
    normalizer = (x0.float() - x0_real.float()).abs().mean(dim=reduce, keepdim=True)
    diff = x0_fake.float() - x0_real.float()
    return torch.where(normalizer > 0, diff / normalizer.clamp_min(torch.finfo(torch.float32).tiny), 0.0)


def student_loss(x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """½·mean((x̂0 − stopgrad(x̂0 − g))²): its gradient with respect to x̂0 is g / numel."""
    target = (x0 - grad).detach()
    return 0.5 * torch.mean((x0.float() - target.float()) ** 2)


def fake_score_loss(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
    """Denoising loss of the fake score on student samples: mean(w·(prediction − target)²) with the schedule's
    terms (VP: ε_fake, ε′ and ᾱ_t′; flow: v_fake, ε′ − x̂0 and 1)."""
    return torch.mean(weight * (prediction.float() - target.float()) ** 2)


def student_timesteps(batch: int, schedule: NoiseSchedule, generator: torch.Generator) -> torch.Tensor:
    """The student step's timesteps: :data:`STUDENT_T_RANGE` of the schedule (flow: of u, before the shift)."""
    return schedule.draw_timesteps(batch, generator, STUDENT_T_RANGE)


def fake_timesteps(batch: int, schedule: NoiseSchedule, generator: torch.Generator) -> torch.Tensor:
    """The fake-score step's timesteps: the whole schedule (VP: t′ ~ U{0..T−1}; flow: the family's training draw)."""
    return schedule.draw_timesteps(batch, generator)


def null_prompt_mask(batch: int, generator: torch.Generator, prob: float = FAKE_NULL_PROMPT_PROB) -> torch.Tensor:
    """A (B,) bool mask: True where the fake-score step should use the null prompt."""
    return torch.rand((batch,), generator=generator) < prob
