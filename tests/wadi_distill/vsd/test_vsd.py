"""VSD math: the update direction, loss values and timestep ranges on known inputs (the schedule's math:
tests/wadi_distill/test_schedules.py; one whole step: tests/wadi_distill/vsd/test_vsd_step.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from wadi_distill.schedules import VPSchedule
from wadi_distill.vsd import losses as vsd


def _schedule(prediction_type: str = "epsilon", **kwargs) -> VPSchedule:
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type, **kwargs
    )
    return VPSchedule.from_scheduler(scheduler)


def test_vsd_gradient_on_known_values():
    schedule = _schedule()
    alpha = torch.tensor([0.75, 0.5]).sqrt()
    weight = schedule.vsd_weight(alpha, (1 - alpha * alpha).sqrt())  # VP: 1 − ᾱ
    torch.testing.assert_close(weight, torch.tensor([0.25, 0.5]))
    g = vsd.vsd_gradient(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), weight)
    torch.testing.assert_close(g, torch.tensor([0.25, -0.5]))


def test_student_loss_value_and_gradient():
    x0 = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    g = torch.tensor([0.5, -1.0, 2.0, 0.0])
    loss = vsd.student_loss(x0, g)
    assert loss.item() == pytest.approx(0.5 * (0.25 + 1.0 + 4.0 + 0.0) / 4)
    loss.backward()
    torch.testing.assert_close(x0.grad, g / 4)


def test_fake_score_loss_weights_by_alpha_bar():
    eps_fake = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    eps_true = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    alpha_bar = torch.tensor([[0.5], [0.25]])
    # ((0.5*1 + 0.5*0) + (0.25*0 + 0.25*4)) / 4
    assert vsd.fake_score_loss(eps_fake, eps_true, alpha_bar).item() == pytest.approx((0.5 + 1.0) / 4)


def test_timestep_ranges_and_null_mask():
    schedule = _schedule()
    gen = torch.Generator().manual_seed(0)
    t = vsd.student_timesteps(20000, schedule, gen)
    assert t.min().item() == 20 and t.max().item() == 980
    t2 = vsd.fake_timesteps(20000, schedule, gen)
    assert t2.min().item() == 0 and t2.max().item() == 999
    mask = vsd.null_prompt_mask(20000, gen)
    assert 0.08 < mask.float().mean().item() < 0.12


def test_dmd_normalized_gradient_on_known_values():
    x0 = torch.tensor([[[[1.0, 3.0]]], [[[0.0, 0.0]]]])
    x0_real = torch.tensor([[[[0.0, 1.0]]], [[[0.0, 0.0]]]])  # mean|x0 - real|: 1.5, then 0
    x0_fake = torch.tensor([[[[3.0, 1.0]]], [[[1.0, -1.0]]]])
    g = vsd.dmd_normalized_gradient(x0, x0_real, x0_fake)
    torch.testing.assert_close(g[0], torch.tensor([[[2.0, 0.0]]]))
    assert torch.equal(g[1], torch.zeros(1, 1, 2))  # no update, not a division by zero
    assert g.dtype == torch.float32
    half = vsd.dmd_normalized_gradient(x0.half(), x0_real.half(), x0_fake.half())
    assert half.dtype == torch.float32 and torch.equal(half[0], g[0])
