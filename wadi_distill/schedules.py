"""Noise schedules: the forward process, prediction conversions, guidance and the one-step sample, written once.

Pure tensor math (no models, no files), below teachers and the VSD loop. Every schedule writes the forward
process as ``x_t = α_t·x0 + σ_t·ε``; a :class:`NoiseSchedule` says what α_t and σ_t are, which timesteps exist,
and how the denoiser's raw prediction (its ``prediction_type``) converts to ε and to x0. Training (the VSD
losses, the digits teacher), sampling and evaluation all go through these functions.

- :class:`VPSchedule`: variance-preserving (DDPM-style) schedules, ``α_t² = ᾱ_t`` and ``σ_t² = 1 − ᾱ_t`` with ᾱ
  read from a diffusers scheduler's ``alphas_cumprod``; ε, v or x0 prediction.
- :class:`FlowMatchSchedule`: rectified flow (SD3, Flux, SANA), ``x_t = (1 − σ)·x0 + σ·ε`` with continuous
  σ ∈ [0, 1] and velocity prediction ``v = ε − x0``; shifted σ, optionally logit-normal draws (docs/flow.md).

A new family is one subclass that implements :meth:`NoiseSchedule.alpha_sigma`, the two conversions,
:meth:`NoiseSchedule.draw_timesteps`, the VSD weighting (:meth:`NoiseSchedule.vsd_weight`,
:meth:`NoiseSchedule.denoising_terms`) and :meth:`NoiseSchedule.from_scheduler`, plus its name in
:data:`SCHEDULE_FAMILIES`. A scheduler no family claims
is refused with one sentence (:func:`schedule_from_scheduler`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar

import torch

from wadi_probe.errors import WadiInputError

__all__ = ["NoiseSchedule", "VPSchedule", "FlowMatchSchedule", "SCHEDULE_FAMILIES", "schedule_from_scheduler", "add_noise",
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
    def last_timestep(self) -> int | float:
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

    def vsd_weight(self, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The weight w of the student's VSD direction ``g = w·(ε_real − ε_fake)`` at (α, σ) (docs/design.md)."""
        raise NotImplementedError

    def denoising_terms(self, model_output: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                        alpha: torch.Tensor,
                        sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | float]:
        """(prediction, target, weight) of the fake score's denoising loss ``mean(weight·(prediction − target)²)``
        for its raw output at ``x_t = α·x0 + σ·noise``: the loss this family's denoisers are trained with."""
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

    def vsd_weight(self, alpha, sigma):
        """1 − ᾱ_t with ᾱ_t = α_t·α_t (= σ_t²): g = (1 − ᾱ_t)·(ε_real − ε_fake) = α_t·σ_t·(x̂0_fake − x̂0_real)."""
        return 1.0 - alpha * alpha

    def denoising_terms(self, model_output, x_t, x0, noise, alpha, sigma):
        """ε-matching weighted by ᾱ_t: (ε_fake, ε, α_t·α_t)."""
        return self.to_epsilon(model_output, x_t, alpha, sigma), noise, alpha * alpha

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


#: The scheduler options :class:`FlowMatchSchedule` refuses: each changes the σ grid away from the shifted linear one
#: (or, ``invert_sigmas``, what σ means), so the draws, the one-step student and the sampler would not match.
_FLOW_UNSUPPORTED_OPTIONS = ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                             "use_beta_sigmas", "use_lu_lambdas", "stochastic_sampling")
_TIME_SHIFT_TYPES = ("exponential", "linear")


@dataclass(frozen=True)
class FlowMatchSchedule(NoiseSchedule):
    """Rectified flow: ``x_t = (1 − σ)·x0 + σ·ε``, the denoiser predicting the velocity ``v = ε − x0``.

    Timesteps are continuous σ ∈ [0, 1] (float32 tensors (B,)); σ = 1 is pure noise, where the one-step student
    is evaluated: ``x̂0 = z − v(z, 1)``. Training σ are shifted, ``σ = s·u / (1 + (s − 1)·u)`` with u uniform or
    (``logit_normal = (mean, std)``, SD3's training) logit-normal; ``s`` is :attr:`shift`, or, with
    :attr:`use_dynamic_shifting` (Flux), resolved from the image's token count by :meth:`with_image_tokens`.

    The σ here is the schedule's timestep everywhere in wadi (``predict(role, x, t, cond)`` gets it); each teacher
    family converts it to its denoiser's own convention in its ``__call__``: SD3 and SANA take ``σ·1000``
    (:attr:`num_train_timesteps`), Flux takes σ itself, as their diffusers pipelines do.
    """

    shift: float = 1.0
    logit_normal: tuple[float, float] | None = None
    num_train_timesteps: int = 1000
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    prediction_type: str = "flow"

    family: ClassVar[str] = "rectified flow (FlowMatchEulerDiscreteScheduler, or use_flow_sigmas)"

    def __post_init__(self) -> None:
        if not self.shift > 0:
            raise WadiInputError(f"The scheduler's shift must be positive, got {self.shift}.")
        if self.time_shift_type not in _TIME_SHIFT_TYPES:
            raise WadiInputError(f"The scheduler's time_shift_type {self.time_shift_type!r} is not supported; "
                                 f"expected one of {', '.join(_TIME_SHIFT_TYPES)}.")
        if self.use_dynamic_shifting and self.max_image_seq_len == self.base_image_seq_len:
            raise WadiInputError("The scheduler's dynamic shifting needs max_image_seq_len different from "
                                 "base_image_seq_len.")
        if self.logit_normal is not None and not self.logit_normal[1] > 0:
            raise WadiInputError(f"The logit-normal timestep draw needs a positive std, got {self.logit_normal[1]}.")

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> "FlowMatchSchedule | None":
        """The schedule of a ``FlowMatch*`` scheduler (``shift``, dynamic shifting) or of a multistep scheduler with
        ``use_flow_sigmas`` and ``prediction_type="flow_prediction"`` (SANA's DPM-Solver, ``flow_shift``); None
        for any other. Options that change the σ grid are refused in one sentence."""
        config = getattr(scheduler, "config", None) or {}
        flow_sigmas = bool(config.get("use_flow_sigmas", False))
        if not (type(scheduler).__name__.startswith("FlowMatch") or flow_sigmas):
            return None
        if flow_sigmas and config.get("prediction_type") != "flow_prediction":
            raise WadiInputError(f"The scheduler {type(scheduler).__name__} uses flow sigmas with prediction_type "
                                 f"{config.get('prediction_type')!r}; only 'flow_prediction' is supported.")
        used = [name for name in _FLOW_UNSUPPORTED_OPTIONS if config.get(name)]
        if used:
            raise WadiInputError(f"The scheduler option(s) {', '.join(used)} of {type(scheduler).__name__} are not "
                                 "supported: wadi's flow schedule uses the shifted linear σ grid only.")
        defaults = cls()

        def read(name: str, default: Any) -> Any:  # a missing or null option is diffusers' default
            value = config.get(name)
            return default if value is None else value

        return cls(
            shift=float(read("flow_shift" if flow_sigmas else "shift", 1.0)),
            num_train_timesteps=int(read("num_train_timesteps", 1000)),
            use_dynamic_shifting=bool(read("use_dynamic_shifting", False)),
            base_shift=float(read("base_shift", defaults.base_shift)),
            max_shift=float(read("max_shift", defaults.max_shift)),
            base_image_seq_len=int(read("base_image_seq_len", defaults.base_image_seq_len)),
            max_image_seq_len=int(read("max_image_seq_len", defaults.max_image_seq_len)),
            time_shift_type=str(read("time_shift_type", defaults.time_shift_type)),
        )

    @property
    def weighting(self) -> str:
        """How u is drawn before the shift: "logit_normal" (with :attr:`logit_normal`'s mean, std) or "uniform"."""
        return "uniform" if self.logit_normal is None else "logit_normal"

    def with_logit_normal(self, mean: float = 0.0, std: float = 1.0) -> "FlowMatchSchedule":
        """This schedule with u drawn logit-normal(mean, std), as SD3 was trained (mean 0, std 1)."""
        return replace(self, logit_normal=(float(mean), float(std)))

    def image_token_shift(self, image_seq_len: int) -> float:
        """The σ-shift for ``image_seq_len`` tokens: μ linear in the length between (base_image_seq_len, base_shift)
        and (max_image_seq_len, max_shift) as Flux's pipeline computes it; the shift is e^μ ("exponential") or μ
        ("linear" time_shift_type)."""
        slope = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        mu = image_seq_len * slope + (self.base_shift - slope * self.base_image_seq_len)
        return math.exp(mu) if self.time_shift_type == "exponential" else mu

    def with_image_tokens(self, image_seq_len: int) -> "FlowMatchSchedule":
        """The schedule with the dynamic shift resolved for ``image_seq_len`` latent tokens; itself without
        dynamic shifting (its fixed shift does not depend on the image size)."""
        if not self.use_dynamic_shifting:
            return self
        return replace(self, shift=self.image_token_shift(image_seq_len), use_dynamic_shifting=False)

    def shift_sigmas(self, u: torch.Tensor) -> torch.Tensor:
        """σ = s·u / (1 + (s − 1)·u): the scheduler's shift of the unshifted u ∈ [0, 1]."""
        if self.use_dynamic_shifting:
            raise ValueError("This flow schedule shifts with the image size: call with_image_tokens(n) first.")
        return self.shift * u / (1 + (self.shift - 1) * u)

    @property
    def last_timestep(self) -> float:  # type: ignore[override]
        """σ = 1: pure noise."""
        return 1.0

    def terminal_timesteps(self, batch: int, device: torch.device | str) -> torch.Tensor:
        """(batch,) σ = 1.0, float32."""
        return torch.full((batch,), self.last_timestep, device=device, dtype=torch.float32)

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 − σ, σ) for σ = ``t``, broadcastable against ``like``; fp32 (fp64 when ``t`` is fp64)."""
        sigma = t.to(torch.promote_types(t.dtype, torch.float32)).view(-1, *([1] * (like.ndim - 1))).to(like.device)
        return 1.0 - sigma, sigma

    def to_epsilon(self, model_output, x_t, alpha, sigma):
        """ε = x_t + (1 − σ)·v."""
        return x_t + alpha * model_output

    def to_x0(self, model_output, x_t, alpha, sigma):
        """x̂0 = x_t − σ·v."""
        return x_t - sigma * model_output

    def vsd_weight(self, alpha, sigma):
        """σ²/(α² + σ²): VP's 1 − ᾱ at the same signal-to-noise ratio α²/σ², so that
        ``g = α·σ/(α² + σ²)·(x̂0_fake − x̂0_real)`` weighs each noise level as a VP teacher's step does (docs/flow.md)."""
        return sigma * sigma / (alpha * alpha + sigma * sigma)

    def denoising_terms(self, model_output, x_t, x0, noise, alpha, sigma):
        """The flow-matching loss, as SD3, Flux and SANA were trained: (v_fake, ε − x0, 1), unweighted."""
        return model_output, noise - x0, 1.0

    def draw_timesteps(self, batch, generator, per_mille=(0, 1000)):
        """σ = shift(u), u drawn uniform or logit-normal restricted to [per_mille[0]/1000, per_mille[1]/1000]
        (by the inverse CDF, so the draw is the distribution conditioned on that range); float32 (B,)."""
        low, high = per_mille[0] / 1000.0, per_mille[1] / 1000.0
        p = torch.rand((batch,), generator=generator, dtype=torch.float64, device=generator.device)
        if self.logit_normal is None:
            u = low + (high - low) * p
        else:
            mean, std = self.logit_normal

            def cdf(x: float) -> float:  # Φ((logit x − mean)/std), 0 and 1 at the ends
                if x <= 0.0 or x >= 1.0:
                    return float(x >= 1.0)
                return 0.5 * (1.0 + math.erf((math.log(x / (1.0 - x)) - mean) / (std * math.sqrt(2.0))))

            q = cdf(low) + (cdf(high) - cdf(low)) * p
            u = torch.sigmoid(mean + std * math.sqrt(2.0) * torch.erfinv(2.0 * q - 1.0))
        return self.shift_sigmas(u).to(torch.float32)


#: Every schedule family, asked in order by :func:`schedule_from_scheduler`; a new family is one entry here. Flow
#: comes first: SANA's DPM-Solver with ``use_flow_sigmas`` also carries an (unused) ``alphas_cumprod`` table.
SCHEDULE_FAMILIES: list[type[NoiseSchedule]] = [FlowMatchSchedule, VPSchedule]


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
