"""One VSD step apart from the loop: the student's and the fake score's losses from a ``predict`` callable.

:class:`VSDStep` knows the noise schedule, the guidance scale and the null prompt, and asks
``predict(role, x, t, cond)`` for the raw prediction of ``role`` in {"teacher", "student", "fake"}; it holds no
models, optimizers or random generators. The loop (:mod:`wadi_distill.vsd.trainer`) draws the timesteps, noise
and null-prompt masks (:mod:`wadi_distill.vsd.losses`), passes them in, and steps the optimizers on the losses
returned, so that a change of the VSD loss is a change here (and in the math of ``losses``), and a test can run a
step with an analytic ``predict`` and no trainer.

Student step: ``x̂0 = G(z)`` at the terminal timestep, ``x_t = α_t·sg(x̂0) + σ_t·ε`` with ``t`` from the
student range, ε of the teacher and of the fake score with the same guidance scale,
``g = w_t·(ε_real − ε_fake)`` with the schedule's weight (VP: ``1 − ᾱ_t``; flow: ``σ²/(α² + σ²)``) — or, with
``dmd_normalization``, DMD's ``g = (x̂0_fake − x̂0_real) / mean|x̂0 − x̂0_real|`` per sample — and the loss
``½·mean((x̂0 − sg(x̂0 − g))²)``. Fake step: ``x_t′`` from the detached sample, the prompt replaced by the null
prompt where the mask says, the schedule's denoising loss (VP: ``mean(ᾱ_t′·(ε_fake − ε′)²)``; flow: the
flow-matching loss ``mean((v_fake − (ε′ − x̂0))²)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from wadi_distill.schedules import NoiseSchedule, add_noise, classifier_free_guidance, one_step_sample
from wadi_distill.teachers.conditioning import Conditioning
from wadi_distill.vsd import losses

#: ``predict(role, x_t, t, cond)``: the raw (ε, v or x0, as the schedule says) fp32 prediction of ``role``.
Predict = Callable[[str, torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]

ROLES = ("teacher", "student", "fake")


@dataclass
class VSDStep:
    """The losses of one VSD step, given the roles' predictions (see the module docstring)."""

    schedule: NoiseSchedule
    predict: Predict
    null: Conditioning  # the null prompt's conditioning (batch 1) on the compute device
    cfg: float = 1.0
    fake_cfg: float | None = None  # the fake score's guidance scale; None: ``cfg``, the same as the real score's
    # Guided passes: the conditional and the null-prompt halves in one doubled batch (False: fewer, larger kernel
    # calls) or one after the other (True: the pass's activations are half as large at the step's peak).
    sequential_cfg: bool = False
    # DMD's per-sample normalisation of the update (losses.dmd_normalized_gradient) in place of the schedule's w_t
    dmd_normalization: bool = False

    def sample(self, z: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The student's one-step sample x̂0 from noise ``z`` (with the graph, for the student's loss)."""
        return one_step_sample(lambda x, t: self.predict("student", x, t, cond), z, self.schedule)

    def eps(self, role: str, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, alpha: torch.Tensor,
            sigma: torch.Tensor) -> torch.Tensor:
        """``role``'s prediction at (x_t, t) converted to ε."""
        return self.schedule.to_epsilon(self.predict(role, x_t, t, cond), x_t, alpha, sigma)

    def guided_eps(self, role: str, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, alpha: torch.Tensor,
                   sigma: torch.Tensor) -> torch.Tensor:
        """ε with classifier-free guidance at :attr:`cfg`: conditional and null prompt in one batch, or one after
        the other with :attr:`sequential_cfg` (the same values up to the kernels' batch-size rounding)."""
        b = x_t.shape[0]
        scale = self.fake_cfg if role == "fake" and self.fake_cfg is not None else self.cfg
        if scale == 1.0:
            return self.eps(role, x_t, t, cond, alpha, sigma)
        null = self.null.expand(b)
        if self.sequential_cfg:
            conditional = self.eps(role, x_t, t, cond, alpha, sigma)
            return classifier_free_guidance(conditional, self.eps(role, x_t, t, null, alpha, sigma), scale)
        both = self.eps(role, torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([cond, null]),
                        torch.cat([alpha, alpha]), torch.cat([sigma, sigma]))
        return classifier_free_guidance(both[:b], both[b:], scale)

    def student_loss(self, z: torch.Tensor, cond: Conditioning, t: torch.Tensor,
                     noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, x̂0): the student's VSD loss on its sample from ``z``, noised at ``t`` with ``noise``."""
        x0 = self.sample(z, cond)
        alpha, sigma = self.schedule.alpha_sigma(t, x0)
        with torch.no_grad():
            x_t = add_noise(x0.detach(), noise, alpha, sigma)
            eps_real = self.guided_eps("teacher", x_t, t, cond, alpha, sigma)
            eps_fake = self.guided_eps("fake", x_t, t, cond, alpha, sigma)
            if self.dmd_normalization:  # x̂0 = (x_t − σ·ε)/α for VP and flow schedules alike
                grad = losses.dmd_normalized_gradient(x0.detach(), (x_t - sigma * eps_real) / alpha,
                                                      (x_t - sigma * eps_fake) / alpha)
            else:
                grad = losses.vsd_gradient(eps_real, eps_fake, self.schedule.vsd_weight(alpha, sigma))
        return losses.student_loss(x0, grad), x0

    def fake_loss(self, sample: torch.Tensor, cond: Conditioning, t: torch.Tensor, noise: torch.Tensor,
                  use_null: torch.Tensor) -> torch.Tensor:
        """The fake score's denoising loss on the (detached) student ``sample``; ``use_null`` (B,) bool picks the
        rows that see the null prompt."""
        alpha, sigma = self.schedule.alpha_sigma(t, sample)
        x_t = add_noise(sample, noise, alpha, sigma)
        cond = cond.where(use_null, self.null)
        terms = self.schedule.denoising_terms(self.predict("fake", x_t, t, cond), x_t, sample, noise, alpha, sigma)
        return losses.fake_score_loss(*terms)
