"""VSD math: the one-step formula, prediction-type conversions and loss values on known inputs."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from wadi_distill.vsd import losses as vsd
from wadi_probe.errors import WadiInputError


def _schedule(prediction_type: str = "epsilon", **kwargs) -> vsd.NoiseSchedule:
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type, **kwargs
    )
    return vsd.NoiseSchedule.from_scheduler(scheduler)


def test_schedule_reads_alpha_bar_from_the_scheduler():
    schedule = _schedule()
    assert schedule.num_train_timesteps == 1000 and schedule.last_timestep == 999
    # SD's scaled-linear schedule ends at ᾱ_999 ≈ 0.0047; a linear one ends elsewhere: nothing is hard-coded.
    assert schedule.alphas_cumprod[-1].item() == pytest.approx(0.004660, rel=1e-3)
    linear = vsd.NoiseSchedule.from_scheduler(DDPMScheduler(beta_schedule="linear"))
    assert linear.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=2e-2)


def test_one_step_formula_matches_hand_computation():
    schedule = _schedule()
    z = torch.tensor([[[[1.0, -2.0]]]])
    eps = torch.tensor([[[[0.5, 0.25]]]])
    a_bar = 0.00466009508818388
    expected = (z - math.sqrt(1 - a_bar) * eps) / math.sqrt(a_bar)
    got = vsd.one_step_x0(eps, z, schedule)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # for z = ε the one-step x̂0 is (1 − σ)/α · z
    z2 = torch.randn(2, 4, 3, 3)
    ratio = (1 - math.sqrt(1 - a_bar)) / math.sqrt(a_bar)
    torch.testing.assert_close(vsd.one_step_x0(z2, z2, schedule), ratio * z2, rtol=1e-4, atol=1e-5)


def test_v_and_sample_prediction_conversions_round_trip():
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    schedule = _schedule("v_prediction")
    t = torch.tensor([5, 500, 999])
    alpha, sigma = schedule.alpha_sigma(t, x0)
    x_t = vsd.add_noise(x0, eps, alpha, sigma)
    v = alpha * eps - sigma * x0
    torch.testing.assert_close(vsd.to_epsilon(v, x_t, alpha, sigma, "v_prediction"), eps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(vsd.to_x0(v, x_t, alpha, sigma, "v_prediction"), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(vsd.to_epsilon(x0, x_t, alpha, sigma, "sample"), eps, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(vsd.to_x0(eps, x_t, alpha, sigma, "epsilon"), x0, rtol=1e-3, atol=1e-3)
    # one step of a v-prediction student: x̂0 = α_T·z − σ_T·v
    z = torch.randn(1, 2, 4, 4)
    vt = torch.randn(1, 2, 4, 4)
    a_bar = schedule.alphas_cumprod[-1].item()
    expected = math.sqrt(a_bar) * z - math.sqrt(1 - a_bar) * vt
    torch.testing.assert_close(vsd.one_step_x0(vt, z, schedule), expected)


def test_cfg_and_vsd_gradient_on_known_values():
    cond, uncond = torch.tensor([3.0]), torch.tensor([1.0])
    assert vsd.classifier_free_guidance(cond, uncond, 1.5).item() == pytest.approx(4.0)
    assert vsd.classifier_free_guidance(cond, uncond, 1.0).item() == pytest.approx(3.0)
    g = vsd.vsd_gradient(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.75, 0.5]))
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


def test_zero_terminal_snr_epsilon_teacher_is_refused():
    schedule = _schedule(rescale_betas_zero_snr=True)
    # diffusers clamps the last ᾱ to 2^-24 in DDPM when rescaling; force an exact zero to test the guard
    table = schedule.alphas_cumprod.clone()
    table[-1] = 0.0
    with pytest.raises(WadiInputError, match="zero terminal SNR"):
        vsd.one_step_x0(torch.zeros(1, 1), torch.zeros(1, 1), vsd.NoiseSchedule(table, "epsilon"))
    with pytest.raises(WadiInputError, match="prediction_type"):
        vsd.NoiseSchedule(table, "flow")
