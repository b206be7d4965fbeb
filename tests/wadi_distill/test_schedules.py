"""Noise schedules: ᾱ from the scheduler, the one-step formula, prediction conversions, guidance, timestep draws,
the refusal of schedulers no family claims, and the rectified-flow schedule against diffusers' own sigmas."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from wadi_distill.schedules import (FlowMatchSchedule, VPSchedule, add_noise, classifier_free_guidance,
                                    one_step_sample, schedule_from_scheduler)
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
        schedule_from_scheduler(EDMEulerScheduler())
    message = str(info.value)
    assert "EDMEulerScheduler is not supported" in message and message.count(". ") == 0


# --- rectified flow -------------------------------------------------------------------------------------------


def test_flow_schedule_reads_the_flow_match_scheduler():
    schedule = schedule_from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert isinstance(schedule, FlowMatchSchedule)
    assert (schedule.shift, schedule.num_train_timesteps, schedule.prediction_type) == (3.0, 1000, "flow")
    assert not schedule.use_dynamic_shifting and schedule.weighting == "uniform"
    flux = schedule_from_scheduler(FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096))
    assert flux.use_dynamic_shifting and (flux.base_shift, flux.max_shift) == (0.5, 1.15)
    # SANA's DPM-Solver with flow sigmas carries an alphas_cumprod table, but is a flow schedule (flow_shift)
    sana = schedule_from_scheduler(DPMSolverMultistepScheduler(prediction_type="flow_prediction",
                                                               use_flow_sigmas=True, flow_shift=3.0))
    assert isinstance(sana, FlowMatchSchedule) and sana.shift == 3.0
    # a DDPM-style multistep scheduler is still variance-preserving
    assert isinstance(schedule_from_scheduler(DPMSolverMultistepScheduler()), VPSchedule)


@pytest.mark.parametrize("options", [{"invert_sigmas": True}, {"shift_terminal": 0.1}, {"use_karras_sigmas": True},
                                     {"stochastic_sampling": True}])
def test_flow_options_that_change_the_sigma_grid_are_refused_in_one_sentence(options):
    with pytest.raises(WadiInputError) as info:
        schedule_from_scheduler(FlowMatchEulerDiscreteScheduler(**options))
    message = str(info.value)
    assert next(iter(options)) in message and message.count(". ") == 0 and message.endswith(".")
    with pytest.raises(WadiInputError, match="flow_prediction"):
        schedule_from_scheduler(DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="epsilon"))


def test_flow_conversions_round_trip_in_float64():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 2, 3, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(5, 2, 3, 3, generator=gen, dtype=torch.float64)
    schedule = FlowMatchSchedule(shift=3.0)
    t = torch.tensor([0.0, 0.125, 0.5, 0.9, 1.0], dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(t, x0)
    assert alpha.dtype == torch.float64 and alpha.shape == (5, 1, 1, 1)
    torch.testing.assert_close(alpha + sigma, torch.ones_like(alpha), rtol=0, atol=0)
    x_t = add_noise(x0, eps, alpha, sigma)
    torch.testing.assert_close(x_t[0], x0[0], rtol=0, atol=0)  # σ = 0: the clean sample
    torch.testing.assert_close(x_t[4], eps[4], rtol=0, atol=0)  # σ = 1: pure noise
    v = eps - x0
    torch.testing.assert_close(schedule.to_x0(v, x_t, alpha, sigma), x0, rtol=0, atol=1e-15)
    torch.testing.assert_close(schedule.to_epsilon(v, x_t, alpha, sigma), eps, rtol=0, atol=1e-15)
    # and back: the v that gives the converted ε and x0 is the v we started from
    eps_hat, x0_hat = schedule.to_epsilon(v, x_t, alpha, sigma), schedule.to_x0(v, x_t, alpha, sigma)
    torch.testing.assert_close(eps_hat - x0_hat, v, rtol=0, atol=1e-15)
    # float32 σ stay float32 (the dtype the denoisers are called with)
    assert schedule.alpha_sigma(t.float(), x0.float())[1].dtype == torch.float32


def test_flow_one_step_is_z_minus_v_at_sigma_one():
    schedule = FlowMatchSchedule(shift=3.0)
    t = schedule.terminal_timesteps(2, "cpu")
    assert schedule.last_timestep == 1.0 and t.dtype == torch.float32 and t.tolist() == [1.0, 1.0]
    z, v = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(schedule.one_step_x0(v, z), z - v, rtol=0, atol=0)
    # an exact velocity predictor's one-step sample is the clean sample
    x0 = torch.randn(2, 4, 3, 3)
    seen = []

    def predict(x, t):
        seen.append(t)
        return x - x0

    torch.testing.assert_close(one_step_sample(predict, z, schedule), x0)
    assert seen[0].dtype == torch.float32 and seen[0].tolist() == [1.0, 1.0]


def test_flow_shift_matches_the_schedulers_sigmas():
    for shift in (1.0, 3.0):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        schedule = schedule_from_scheduler(scheduler)
        u = torch.linspace(1, 1000, 1000, dtype=torch.float32).flip(0) / 1000
        torch.testing.assert_close(schedule.shift_sigmas(u), scheduler.sigmas, rtol=0, atol=1e-6)
    # SANA's DPM-Solver flow sigmas: the same shift of its own u grid
    dpm = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    dpm.set_timesteps(20)
    u = 1.0 - torch.linspace(1, 1 / 1000, 21, dtype=torch.float64)
    expected = schedule_from_scheduler(dpm).shift_sigmas(u).flip(0)[:-1]
    torch.testing.assert_close(dpm.sigmas[:-1].double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
def test_flow_dynamic_shift_matches_flux_and_the_scheduler(time_shift_type):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, time_shift_type=time_shift_type)
    schedule = schedule_from_scheduler(scheduler)
    with pytest.raises(ValueError, match="with_image_tokens"):
        schedule.draw_timesteps(2, torch.Generator().manual_seed(0))
    tokens = 4096  # a 1024² Flux image: 128² latents in 2×2 patches
    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    assert mu == pytest.approx(1.15)
    resolved = schedule.with_image_tokens(tokens)
    assert not resolved.use_dynamic_shifting
    assert resolved.shift == pytest.approx(math.exp(mu) if time_shift_type == "exponential" else mu, rel=1e-12)
    assert schedule.with_image_tokens(1024).shift == pytest.approx(
        math.exp(calculate_shift(1024, 256, 4096, 0.5, 1.15)) if time_shift_type == "exponential"
        else calculate_shift(1024, 256, 4096, 0.5, 1.15), rel=1e-12)
    scheduler.set_timesteps(28, mu=mu)
    u = torch.linspace(1.0, 1 / 1000, 28, dtype=torch.float64)
    torch.testing.assert_close(resolved.shift_sigmas(u).float(), scheduler.sigmas[:-1], rtol=0, atol=1e-6)
    fixed = FlowMatchSchedule(shift=3.0)
    assert fixed.with_image_tokens(4096) is fixed


def test_flow_timestep_draws_uniform_and_logit_normal():
    gen = torch.Generator().manual_seed(0)
    plain = FlowMatchSchedule()
    sigma = plain.draw_timesteps(20000, gen)
    assert sigma.dtype == torch.float32 and sigma.shape == (20000,)
    assert 0.0 <= sigma.min().item() < 0.001 and 0.999 < sigma.max().item() <= 1.0
    assert sigma.mean().item() == pytest.approx(0.5, abs=0.01)
    part = plain.draw_timesteps(20000, gen, (20, 980))
    assert 0.02 <= part.min().item() < 0.021 and 0.979 < part.max().item() <= 0.98
    # shifted: σ = 3u / (1 + 2u) of the same u, drawn from the same generator state
    shifted = FlowMatchSchedule(shift=3.0)
    u = plain.draw_timesteps(8, torch.Generator().manual_seed(1), (20, 980)).double()
    torch.testing.assert_close(shifted.draw_timesteps(8, torch.Generator().manual_seed(1), (20, 980)).double(),
                               3 * u / (1 + 2 * u), rtol=1e-6, atol=1e-7)
    # logit-normal(0, 1): logit(u) is standard normal (its median 0.5, its quartiles ±0.6745)
    sd3 = FlowMatchSchedule().with_logit_normal(0.0, 1.0)
    assert sd3.weighting == "logit_normal" and sd3.logit_normal == (0.0, 1.0)
    logits = torch.logit(sd3.draw_timesteps(40000, gen).double())
    assert logits.mean().item() == pytest.approx(0.0, abs=0.02) and logits.std().item() == pytest.approx(1.0, abs=0.02)
    assert torch.quantile(logits, 0.75).item() == pytest.approx(0.6745, abs=0.03)
    # restricted to u ∈ [0.5, 1]: the upper half of the same distribution, so logit(u) is a half-normal
    half = torch.logit(sd3.draw_timesteps(40000, gen, (500, 1000)).double())
    assert half.min().item() >= 0.0 and half.mean().item() == pytest.approx(math.sqrt(2 / math.pi), abs=0.02)
    shifted_ln = FlowMatchSchedule(shift=3.0, logit_normal=(0.0, 1.0))
    u2 = sd3.draw_timesteps(8, torch.Generator().manual_seed(2)).double()
    torch.testing.assert_close(shifted_ln.draw_timesteps(8, torch.Generator().manual_seed(2)).double(),
                               3 * u2 / (1 + 2 * u2), rtol=1e-6, atol=1e-7)


def test_flow_bad_fields_are_refused():
    with pytest.raises(WadiInputError, match="shift"):
        FlowMatchSchedule(shift=0.0)
    with pytest.raises(WadiInputError, match="std"):
        FlowMatchSchedule(logit_normal=(0.0, 0.0))
    with pytest.raises(WadiInputError, match="max_image_seq_len"):
        FlowMatchSchedule(use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=256)
    with pytest.raises(WadiInputError, match="time_shift_type"):
        FlowMatchSchedule(time_shift_type="cosine")
