"""The multi-step teacher sampler on a flow-matching teacher: Euler steps of an exact Gaussian velocity field
carry each noise sample to its known image; guidance, the shift and the sampler's scheduler on known values."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from wadi_distill.sample import multistep_scheduler, sample_multistep
from wadi_probe.errors import WadiInputError

STD = 0.3


class GaussianVelocity(torch.nn.Module):
    """The exact velocity of N(c, STD²) data (c: the prompt's number), called as diffusers' denoisers are, with the
    scheduler's timestep σ·1000."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # the sampler reads the device from a parameter
        self.seen: list[float] = []

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def forward(self, x, t, encoder_hidden_states):
        self.seen.append(float(t))
        sigma = t.float() / 1000
        mu = encoder_hidden_states.view(-1, 1, 1, 1)
        a = 1 - sigma
        var = a * a * STD ** 2 + sigma * sigma
        centred = x - a * mu
        return SimpleNamespace(sample=sigma / var * centred - (mu + a * STD ** 2 / var * centred))


def _teacher(scheduler) -> SimpleNamespace:
    return SimpleNamespace(unet=GaussianVelocity(), scheduler=scheduler, image_size=4, channels=1, null_prompt="",
                           encode_prompts=lambda prompts: torch.tensor([float(p or 0) for p in prompts]).view(-1, 1, 1))


def _max_error(teacher, cfg: float, steps: int) -> float:
    images = sample_multistep(teacher, ["1", "-2"], steps=steps, cfg=cfg, generator=torch.Generator().manual_seed(0),
                              clamp=False)
    z = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    mu = torch.tensor([1.0, -2.0]).view(-1, 1, 1, 1)
    return float((images - (cfg * mu + STD * z)).abs().max())


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_euler_steps_of_an_exact_field_reach_the_known_image(cfg):
    """For Gaussian data the flow ODE is affine in the noise: z ends at μ + STD·z. Guidance with the null prompt
    (μ = 0) moves the mean to cfg·μ (the velocity is affine in μ). Euler is first order: four times the steps, a
    quarter of the error."""
    teacher = _teacher(FlowMatchEulerDiscreteScheduler(shift=3.0))
    coarse = _max_error(teacher, cfg, 100)
    # the denoiser saw σ·1000 from σ = 1 down to shift(1/100)
    assert teacher.unet.seen[0] == pytest.approx(1000.0) and len(teacher.unet.seen) == 100
    assert teacher.unet.seen[-1] == pytest.approx(1000 * 0.03 / 1.02, rel=1e-5)
    fine = _max_error(teacher, cfg, 400)
    assert fine < 0.01 and fine == pytest.approx(coarse / 4, rel=0.2)


def test_few_euler_steps_are_the_hand_computed_steps():
    """Two Euler steps, x ← x + (σ_next − σ)·v, on the σ grid 1 → shift(1/2) = 3/4 → 0."""
    teacher = _teacher(FlowMatchEulerDiscreteScheduler(shift=3.0))
    out = sample_multistep(teacher, ["1"], steps=2, cfg=1.0, generator=torch.Generator().manual_seed(1),
                           clamp=False)
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    field = GaussianVelocity()
    for s, s_next in ((1.0, 0.75), (0.75, 0.0)):
        v = field(x, torch.tensor(s * 1000), torch.tensor([[[1.0]]])).sample
        x = x + (s_next - s) * v
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


def test_the_samplers_scheduler_follows_the_teachers_schedule():
    vp = multistep_scheduler(DDPMScheduler(), 10, "cpu")
    assert isinstance(vp, DDIMScheduler) and vp.timesteps.dtype == torch.long and len(vp.timesteps) == 10
    flow = multistep_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), 4, "cpu")
    assert isinstance(flow, FlowMatchEulerDiscreteScheduler) and flow.timesteps.dtype == torch.float32
    # SANA-style DPM-Solver with flow sigmas: an Euler sampler with its flow_shift
    sana = multistep_scheduler(DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                           flow_shift=3.0), 4, "cpu")
    torch.testing.assert_close(sana.sigmas, flow.sigmas)
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    with pytest.raises(WadiInputError, match="image_tokens"):
        multistep_scheduler(dynamic, 4, "cpu")
    resolved = multistep_scheduler(dynamic, 4, "cpu", image_tokens=4096)
    reference = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    reference.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=1.15)  # μ at 4096 tokens, Flux's grid
    torch.testing.assert_close(resolved.sigmas, reference.sigmas, rtol=0, atol=1e-6)
    assert math.isclose(resolved.shift, math.exp(1.15), rel_tol=1e-9)
