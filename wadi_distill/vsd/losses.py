"""Variational Score Distillation (VSD) math: the one-step parametrisation and the two losses.

Pure tensor functions (no models, no files). Every noise-schedule constant comes from the teacher's own
scheduler through :class:`NoiseSchedule`; the prediction type (ε, v or x0) of the teacher is converted to ε
before any loss is formed, for the teacher ("real" score) and for the fake score alike.

Notation: ``x_t = α_t·x0 + σ_t·ε`` with ``α_t² = ᾱ_t`` and ``σ_t² = 1 − ᾱ_t``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from wadi_probe.errors import WadiInputError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

#: Student-step timesteps are drawn uniformly from this closed range (docs/design.md, "VSD").
STUDENT_T_RANGE = (20, 980)
#: Probability that the fake-score step sees the null prompt instead of its prompt.
FAKE_NULL_PROMPT_PROB = 0.1


@dataclass(frozen=True)
class NoiseSchedule:
    """ᾱ_t for every training timestep and the teacher's prediction type, read from its scheduler."""

    alphas_cumprod: torch.Tensor  # (T,) float64 on CPU
    prediction_type: str

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise WadiInputError(
                f"The scheduler's prediction_type {self.prediction_type!r} is not supported; "
                f"expected one of {', '.join(PREDICTION_TYPES)}."
            )
        if self.alphas_cumprod.ndim != 1 or self.alphas_cumprod.numel() < 2:
            raise WadiInputError("The scheduler has no usable alphas_cumprod table.")

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> "NoiseSchedule":
        """Read ᾱ and the prediction type from a diffusers scheduler (any class with DDPM-style betas)."""
        table = getattr(scheduler, "alphas_cumprod", None)
        if table is None:
            from diffusers import DDPMScheduler

            table = DDPMScheduler.from_config(scheduler.config).alphas_cumprod
        prediction_type = getattr(scheduler.config, "prediction_type", None) or "epsilon"
        return cls(torch.as_tensor(table, dtype=torch.float64).clone(), str(prediction_type))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.numel())

    @property
    def last_timestep(self) -> int:
        """T − 1: the timestep the one-step student is evaluated at."""
        return self.num_train_timesteps - 1

    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_t for integer timesteps ``t`` (B,), shaped (B, 1, ..., 1) to broadcast against ``like``, fp32."""
        table = self.alphas_cumprod.to(device=t.device)
        values = table[t.long()].to(torch.float32)
        return values.view(-1, *([1] * (like.ndim - 1))).to(like.device)

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t) = (√ᾱ_t, √(1−ᾱ_t)), broadcastable against ``like``."""
        alpha_bar = self.alpha_bar(t, like)
        return alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The forward process: x_t = α·x0 + σ·ε."""
    return alpha * x0 + sigma * noise


def to_epsilon(
    model_output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Convert a denoiser output (ε, v or x0 prediction) to an ε prediction."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha * model_output + sigma * x_t
    if prediction_type == "sample":
        return (x_t - alpha * model_output) / sigma
    raise WadiInputError(f"Unknown prediction type {prediction_type!r}.")


def to_x0(
    model_output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Convert a denoiser output (ε, v or x0 prediction) to a clean-sample prediction x̂0."""
    if prediction_type == "epsilon":
        return (x_t - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * model_output
    if prediction_type == "sample":
        return model_output
    raise WadiInputError(f"Unknown prediction type {prediction_type!r}.")


def one_step_x0(model_output: torch.Tensor, z: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """The student's one-step sample from pure noise ``z`` evaluated at t = T−1.

    For ε-prediction this is x̂0 = (z − σ_T·ε_G)/α_T with α_T² = ᾱ_{T−1} taken from the schedule.
    """
    t = torch.full((z.shape[0],), schedule.last_timestep, device=z.device, dtype=torch.long)
    alpha, sigma = schedule.alpha_sigma(t, z)
    if schedule.prediction_type == "epsilon" and float(alpha.min()) <= 0.0:
        raise WadiInputError(
            "The teacher's scheduler has ᾱ_{T-1} = 0 (zero terminal SNR) and predicts ε, so x̂0 is undefined at T-1."
        )
    return to_x0(model_output, z, alpha, sigma, schedule.prediction_type)


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + scale·(cond − uncond); scale 1 returns the conditional prediction."""
    return uncond + scale * (cond - uncond)


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


def sample_timesteps(batch: int, low: int, high: int, generator: torch.Generator) -> torch.Tensor:
    """Integer timesteps uniform on the closed range [low, high], drawn on the generator's device (CPU)."""
    return torch.randint(low, high + 1, (batch,), generator=generator, dtype=torch.long)


def student_timesteps(batch: int, schedule: NoiseSchedule, generator: torch.Generator) -> torch.Tensor:
    """t ~ U{20..980} for T = 1000, scaled proportionally for other T."""
    scale = schedule.num_train_timesteps / 1000.0
    low, high = round(STUDENT_T_RANGE[0] * scale), round(STUDENT_T_RANGE[1] * scale)
    return sample_timesteps(batch, low, min(high, schedule.last_timestep), generator)


def fake_timesteps(batch: int, schedule: NoiseSchedule, generator: torch.Generator) -> torch.Tensor:
    """t′ ~ U{0..T−1}."""
    return sample_timesteps(batch, 0, schedule.last_timestep, generator)


def null_prompt_mask(batch: int, generator: torch.Generator, prob: float = FAKE_NULL_PROMPT_PROB) -> torch.Tensor:
    """A (B,) bool mask: True where the fake-score step should use the null prompt."""
    return torch.rand((batch,), generator=generator) < prob
