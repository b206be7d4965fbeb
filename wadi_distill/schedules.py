"""Noise schedules: the forward process, prediction conversions, guidance and the one-step sample, written once.

Pure tensor math (no models, no files), below teachers and the VSD loop. Every schedule writes the forward
process as ``x_t = α_t·x0 + σ_t·ε``; a :class:`NoiseSchedule` says what α_t and σ_t are, which timesteps exist,
and how the denoiser's raw prediction (its ``prediction_type``) converts to ε and to x0. Training (the VSD
losses, the digits teacher), sampling and evaluation all go through these functions.

- :class:`VPSchedule`: variance-preserving (DDPM-style) schedules, ``α_t² = ᾱ_t`` and ``σ_t² = 1 − ᾱ_t`` with ᾱ
  read from a diffusers scheduler's ``alphas_cumprod``; ε, v or x0 prediction.

A new family (e.g. rectified flow, ``x_t = (1 − t)·x0 + t·ε`` with velocity prediction) is one subclass that
implements :meth:`NoiseSchedule.alpha_sigma`, the two conversions, :meth:`NoiseSchedule.draw_timesteps` and
:meth:`NoiseSchedule.from_scheduler`, plus its name in :data:`SCHEDULE_FAMILIES`. A scheduler no family claims
is refused with one sentence (:func:`schedule_from_scheduler`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from wadi_probe.errors import WadiInputError

__all__ = ["NoiseSchedule", "VPSchedule", "SCHEDULE_FAMILIES", "schedule_from_scheduler", "add_noise",
           "classifier_free_guidance", "one_step_sample", "PREDICTION_TYPES"]

#: The prediction types of variance-preserving teachers (diffusers' ``prediction_type`` values).
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The forward process of every schedule here: x_t = α·x0 + σ·ε (α, σ from :meth:`NoiseSchedule.alpha_sigma`)."""
    return alpha * x0 + sigma * noise


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + scale·(cond − uncond); scale 1 returns the conditional prediction."""
    return uncond + scale * (cond - uncond)


class NoiseSchedule:
    """A noise schedule: α_t and σ_t, its timesteps, and what its denoiser's raw prediction means.

    Subclasses set ``prediction_type`` and ``num_train_timesteps`` and implement the methods that raise here.
    """

    #: The name :func:`schedule_from_scheduler` and messages use.
    family: ClassVar[str] = "base"
    prediction_type: str
    num_train_timesteps: int

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> "NoiseSchedule | None":
        """This family's schedule read from a diffusers scheduler, or None when the scheduler is not of it."""
        raise NotImplementedError

    @property
    def last_timestep(self) -> int:
        """The timestep of pure noise, where a one-step student is evaluated (T − 1 for DDPM-style tables)."""
        return self.num_train_timesteps - 1

    def terminal_timesteps(self, batch: int, device: torch.device | str) -> torch.Tensor:
        """(batch,) copies of :attr:`last_timestep`, in the dtype the denoiser is called with."""
        return torch.full((batch,), self.last_timestep, device=device, dtype=torch.long)

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t) for timesteps ``t`` (B,), shaped (B, 1, ..., 1) to broadcast against ``like``, fp32."""
        raise NotImplementedError

    def to_epsilon(self, model_output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor,
                   sigma: torch.Tensor) -> torch.Tensor:
        """The denoiser's raw output at (x_t, α, σ) as an ε prediction."""
        raise NotImplementedError

    def to_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor,
              sigma: torch.Tensor) -> torch.Tensor:
        """The denoiser's raw output at (x_t, α, σ) as a clean-sample prediction x̂0."""
        raise NotImplementedError

    def draw_timesteps(self, batch: int, generator: torch.Generator,
                       per_mille: tuple[int, int] = (0, 1000)) -> torch.Tensor:
        """Timesteps uniform over the part of the schedule between ``per_mille[0]/1000`` and ``per_mille[1]/1000``
        of its range (the default: all of it), drawn from ``generator`` on its device."""
        raise NotImplementedError

    def one_step_x0(self, model_output: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The one-step sample x̂0 from pure noise ``z`` and the denoiser's output at :attr:`last_timestep`."""
        t = self.terminal_timesteps(z.shape[0], z.device)
        alpha, sigma = self.alpha_sigma(t, z)
        return self.to_x0(model_output, z, alpha, sigma)


def one_step_sample(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z: torch.Tensor,
                    schedule: NoiseSchedule) -> torch.Tensor:
    """The student's one-step sample: ``predict(z, t)`` evaluated once at the terminal timestep, turned into x̂0."""
    t = schedule.terminal_timesteps(z.shape[0], z.device)
    return schedule.one_step_x0(predict(z, t), z)


@dataclass(frozen=True)
class VPSchedule(NoiseSchedule):
    """A variance-preserving schedule: ᾱ_t for every training timestep (from the scheduler) and the prediction type.

    ``x_t = α_t·x0 + σ_t·ε`` with ``α_t² = ᾱ_t``, ``σ_t² = 1 − ᾱ_t``; integer timesteps 0..T−1.
    """

    alphas_cumprod: torch.Tensor  # (T,) float64 on CPU
    prediction_type: str

    family: ClassVar[str] = "variance-preserving (DDPM-style alphas_cumprod)"

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise WadiInputError(
                f"The scheduler's prediction_type {self.prediction_type!r} is not supported; "
                f"expected one of {', '.join(PREDICTION_TYPES)}."
            )
        if self.alphas_cumprod.ndim != 1 or self.alphas_cumprod.numel() < 2:
            raise WadiInputError("The scheduler has no usable alphas_cumprod table.")

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> "VPSchedule | None":
        """ᾱ and the prediction type of a diffusers scheduler with an ``alphas_cumprod`` table; None without one."""
        table = getattr(scheduler, "alphas_cumprod", None)
        if table is None:
            return None
        prediction_type = getattr(scheduler.config, "prediction_type", None) or "epsilon"
        return cls(torch.as_tensor(table, dtype=torch.float64).clone(), str(prediction_type))

    @property
    def num_train_timesteps(self) -> int:  # type: ignore[override]
        return int(self.alphas_cumprod.numel())

    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_t for integer timesteps ``t`` (B,), shaped (B, 1, ..., 1) to broadcast against ``like``, fp32."""
        table = self.alphas_cumprod.to(device=t.device)
        values = table[t.long()].to(torch.float32)
        return values.view(-1, *([1] * (like.ndim - 1))).to(like.device)

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t) = (√ᾱ_t, √(1−ᾱ_t)), broadcastable against ``like``."""
        alpha_bar = self.alpha_bar(t, like)
        return alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()

    def to_epsilon(self, model_output, x_t, alpha, sigma):
        if self.prediction_type == "epsilon":
            return model_output
        if self.prediction_type == "v_prediction":
            return alpha * model_output + sigma * x_t
        return (x_t - alpha * model_output) / sigma  # "sample"

    def to_x0(self, model_output, x_t, alpha, sigma):
        if self.prediction_type == "epsilon":
            return (x_t - sigma * model_output) / alpha
        if self.prediction_type == "v_prediction":
            return alpha * x_t - sigma * model_output
        return model_output  # "sample"

    def draw_timesteps(self, batch, generator, per_mille=(0, 1000)):
        """Integers uniform on the closed range [round(lo·T/1000), min(round(hi·T/1000), T − 1)]."""
        scale = self.num_train_timesteps / 1000.0
        low, high = round(per_mille[0] * scale), min(round(per_mille[1] * scale), self.last_timestep)
        return torch.randint(low, high + 1, (batch,), generator=generator, dtype=torch.long)

    def one_step_x0(self, model_output, z):
        """x̂0 at t = T−1; for ε-prediction (z − σ_T·ε_G)/α_T, refused when ᾱ_{T−1} = 0 (zero terminal SNR)."""
        t = self.terminal_timesteps(z.shape[0], z.device)
        alpha, sigma = self.alpha_sigma(t, z)
        if self.prediction_type == "epsilon" and float(alpha.min()) <= 0.0:
            raise WadiInputError("The teacher's scheduler has ᾱ_{T-1} = 0 (zero terminal SNR) and predicts ε, so "
                                 "x̂0 is undefined at T-1.")
        return self.to_x0(model_output, z, alpha, sigma)


#: Every schedule family, asked in order by :func:`schedule_from_scheduler`; a new family is one entry here.
SCHEDULE_FAMILIES: list[type[NoiseSchedule]] = [VPSchedule]


def schedule_from_scheduler(scheduler: Any) -> NoiseSchedule:
    """The noise schedule of a diffusers scheduler, from the first family that claims it; others are refused."""
    for family in SCHEDULE_FAMILIES:
        schedule = family.from_scheduler(scheduler)
        if schedule is not None:
            return schedule
    raise WadiInputError(
        f"The scheduler {type(scheduler).__name__} is not supported: it has no alphas_cumprod table and is of no "
        f"known schedule family ({', '.join(f.family for f in SCHEDULE_FAMILIES)})."
    )
