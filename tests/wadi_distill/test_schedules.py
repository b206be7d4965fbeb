"""Noise schedules: ᾱ from the scheduler, the one-step formula, prediction conversions, guidance, timestep draws,
the refusal of schedulers no family claims, and a rectified-flow schedule written as one class."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from wadi_distill import schedules
from wadi_distill.schedules import (NoiseSchedule, VPSchedule, add_noise, classifier_free_guidance, one_step_sample,
                                    schedule_from_scheduler)
from wadi_probe.errors import WadiInputError


def _schedule(prediction_type: str = "epsilon", **kwargs) -> VPSchedule:
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type, **kwargs
    )
    return schedule_from_scheduler(scheduler)


def test_schedule_reads_alpha_bar_from_the_scheduler():
    schedule = _schedule()
    assert isinstance(schedule, VPSchedule)
    assert schedule.num_train_timesteps == 1000 and schedule.last_timestep == 999
    # SD's scaled-linear schedule ends at ᾱ_999 ≈ 0.0047; a linear one ends elsewhere: nothing is hard-coded.
    assert schedule.alphas_cumprod[-1].item() == pytest.approx(0.004660, rel=1e-3)
    linear = schedule_from_scheduler(DDPMScheduler(beta_schedule="linear"))
    assert linear.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=2e-2)


def test_one_step_formula_matches_hand_computation():
    schedule = _schedule()
    z = torch.tensor([[[[1.0, -2.0]]]])
    eps = torch.tensor([[[[0.5, 0.25]]]])
    a_bar = 0.00466009508818388
    expected = (z - math.sqrt(1 - a_bar) * eps) / math.sqrt(a_bar)
    torch.testing.assert_close(schedule.one_step_x0(eps, z), expected, rtol=1e-4, atol=1e-4)
    # for z = ε the one-step x̂0 is (1 − σ)/α · z; one_step_sample calls the model once, at t = T − 1
    z2 = torch.randn(2, 4, 3, 3)
    ratio = (1 - math.sqrt(1 - a_bar)) / math.sqrt(a_bar)
    seen = []

    def predict(x, t):
        seen.append(t.tolist())
        return x

    torch.testing.assert_close(one_step_sample(predict, z2, schedule), ratio * z2, rtol=1e-4, atol=1e-5)
    assert seen == [[999, 999]]


def test_v_and_sample_prediction_conversions_round_trip():
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    schedule = _schedule("v_prediction")
    t = torch.tensor([5, 500, 999])
    alpha, sigma = schedule.alpha_sigma(t, x0)
    x_t = add_noise(x0, eps, alpha, sigma)
    v = alpha * eps - sigma * x0
    torch.testing.assert_close(schedule.to_epsilon(v, x_t, alpha, sigma), eps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(schedule.to_x0(v, x_t, alpha, sigma), x0, rtol=1e-4, atol=1e-4)
    sample, epsilon = VPSchedule(schedule.alphas_cumprod, "sample"), VPSchedule(schedule.alphas_cumprod, "epsilon")
    torch.testing.assert_close(sample.to_epsilon(x0, x_t, alpha, sigma), eps, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(epsilon.to_x0(eps, x_t, alpha, sigma), x0, rtol=1e-3, atol=1e-3)
    # one step of a v-prediction student: x̂0 = α_T·z − σ_T·v
    z = torch.randn(1, 2, 4, 4)
    vt = torch.randn(1, 2, 4, 4)
    a_bar = schedule.alphas_cumprod[-1].item()
    expected = math.sqrt(a_bar) * z - math.sqrt(1 - a_bar) * vt
    torch.testing.assert_close(schedule.one_step_x0(vt, z), expected)


def test_add_noise_matches_diffusers():
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    schedule = schedule_from_scheduler(scheduler)
    x0, eps, t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([0, 400, 999])
    alpha, sigma = schedule.alpha_sigma(t, x0)
    torch.testing.assert_close(add_noise(x0, eps, alpha, sigma), scheduler.add_noise(x0, eps, t))


def test_cfg_on_known_values():
    cond, uncond = torch.tensor([3.0]), torch.tensor([1.0])
    assert classifier_free_guidance(cond, uncond, 1.5).item() == pytest.approx(4.0)
    assert classifier_free_guidance(cond, uncond, 1.0).item() == pytest.approx(3.0)


def test_timestep_draws_cover_the_asked_part_of_the_schedule():
    schedule = _schedule()
    gen = torch.Generator().manual_seed(0)
    t = schedule.draw_timesteps(20000, gen, (20, 980))
    assert t.dtype == torch.long and t.min().item() == 20 and t.max().item() == 980
    t2 = schedule.draw_timesteps(20000, gen)
    assert t2.min().item() == 0 and t2.max().item() == 999
    short = VPSchedule(schedule.alphas_cumprod[:100], "epsilon")  # T = 100: the range scales, 2..98
    t3 = short.draw_timesteps(20000, gen, (20, 980))
    assert t3.min().item() == 2 and t3.max().item() == 98


def test_zero_terminal_snr_epsilon_teacher_and_unknown_prediction_type_are_refused():
    schedule = _schedule(rescale_betas_zero_snr=True)
    # diffusers clamps the last ᾱ to 2^-24 in DDPM when rescaling; force an exact zero to test the guard
    table = schedule.alphas_cumprod.clone()
    table[-1] = 0.0
    with pytest.raises(WadiInputError, match="zero terminal SNR"):
        VPSchedule(table, "epsilon").one_step_x0(torch.zeros(1, 1), torch.zeros(1, 1))
    with pytest.raises(WadiInputError, match="prediction_type"):
        VPSchedule(table, "flow")


def test_a_scheduler_no_family_claims_is_refused_in_one_sentence():
    with pytest.raises(WadiInputError) as info:
        schedule_from_scheduler(FlowMatchEulerDiscreteScheduler())
    message = str(info.value)
    assert "FlowMatchEulerDiscreteScheduler is not supported" in message and message.count(". ") == 0


@dataclass(frozen=True)
class RectifiedFlow(NoiseSchedule):
    """x_t = (1 − s)·x0 + s·ε with s = t/(T − 1), the denoiser predicting the velocity v = ε − x0."""

    num_train_timesteps: int = 1000
    prediction_type: str = "flow"
    family = "rectified flow"

    @classmethod
    def from_scheduler(cls, scheduler):
        return cls() if isinstance(scheduler, FlowMatchEulerDiscreteScheduler) else None

    def alpha_sigma(self, t, like):
        s = (t.float() / self.last_timestep).view(-1, *([1] * (like.ndim - 1))).to(like.device)
        return 1.0 - s, s

    def to_x0(self, model_output, x_t, alpha, sigma):
        return x_t - sigma * model_output

    def to_epsilon(self, model_output, x_t, alpha, sigma):
        return x_t + alpha * model_output

    def draw_timesteps(self, batch, generator, per_mille=(0, 1000)):
        low, high = (round(p * self.last_timestep / 1000) for p in per_mille)
        return torch.randint(low, high + 1, (batch,), generator=generator)


def test_a_rectified_flow_schedule_is_one_class(monkeypatch):
    """The interface carries a non-VP family: registered, it is found, and every shared function works with it."""
    monkeypatch.setattr(schedules, "SCHEDULE_FAMILIES", [VPSchedule, RectifiedFlow])
    schedule = schedule_from_scheduler(FlowMatchEulerDiscreteScheduler())
    assert isinstance(schedule, RectifiedFlow)
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 333, 999])
    alpha, sigma = schedule.alpha_sigma(t, x0)
    x_t = add_noise(x0, eps, alpha, sigma)
    torch.testing.assert_close(x_t[2], eps[2])  # pure noise at the last timestep
    v = eps - x0
    torch.testing.assert_close(schedule.to_x0(v, x_t, alpha, sigma), x0)
    torch.testing.assert_close(schedule.to_epsilon(v, x_t, alpha, sigma), eps)
    # the one-step sample of an exact velocity predictor is the clean sample
    torch.testing.assert_close(one_step_sample(lambda z, t: z - x0, eps, schedule), x0)
