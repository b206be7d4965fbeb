"""One VSD step without a trainer: the losses from an analytic ``predict(role, x, t, cond)``, by hand."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from wadi_distill.schedules import VPSchedule
from wadi_distill.teachers.conditioning import Conditioning
from wadi_distill.vsd.step import VSDStep

B = 2


def _schedule() -> VPSchedule:
    return VPSchedule.from_scheduler(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                   beta_end=0.012))


def _cond(values: list[float]) -> Conditioning:
    return Conditioning(torch.tensor(values).view(-1, 1, 1))


class Analytic:
    """ε-predictions: teacher 0.5·x + c, fake ``fake_slope``·x + c (c: the prompt's one number), student w·x."""

    def __init__(self, fake_slope: float = 0.25) -> None:
        self.w = torch.nn.Parameter(torch.tensor(0.3))
        self.fake_slope = fake_slope
        self.calls: list[tuple[str, int, list[int]]] = []

    def __call__(self, role, x, t, cond):
        self.calls.append((role, x.shape[0], t.tolist()))
        c = cond.encoder_hidden_states.view(-1, 1, 1, 1)
        if role == "student":
            return self.w * x
        return (0.5 if role == "teacher" else self.fake_slope) * x + c


def _by_hand(schedule, t, like):
    a_bar = schedule.alphas_cumprod[t].to(torch.float32).view(-1, 1, 1, 1)
    return a_bar, a_bar.sqrt(), (1 - a_bar).sqrt()


def test_student_loss_and_gradient_match_the_hand_computation():
    schedule, predict = _schedule(), Analytic()
    step = VSDStep(schedule, predict, null=_cond([0.0]), cfg=2.0)
    gen = torch.Generator().manual_seed(0)
    z, noise = torch.randn(B, 1, 3, 3, generator=gen), torch.randn(B, 1, 3, 3, generator=gen)
    t = torch.tensor([100, 700])
    cond = _cond([1.0, -2.0])
    loss, x0 = step.student_loss(z, cond, t, noise)

    a_last = float(schedule.alphas_cumprod[-1])
    x0_hand = (z - math.sqrt(1 - a_last) * 0.3 * z) / math.sqrt(a_last)
    torch.testing.assert_close(x0, x0_hand, rtol=1e-5, atol=1e-5)
    a_bar, alpha, sigma = _by_hand(schedule, t, z)
    x_t = alpha * x0_hand + sigma * noise
    c = cond.encoder_hidden_states.view(-1, 1, 1, 1)
    eps_real = 0.5 * x_t + 2.0 * c  # guided: null 0.5·x_t, conditional 0.5·x_t + c, scale 2
    eps_fake = 0.25 * x_t + 2.0 * c
    g = (1 - a_bar) * (eps_real - eps_fake)
    assert loss.item() == pytest.approx(0.5 * float((g ** 2).mean()), rel=1e-5)
    loss.backward()
    dx0_dw = -math.sqrt(1 - a_last) * z / math.sqrt(a_last)
    assert predict.w.grad.item() == pytest.approx(float((g * dx0_dw).sum() / g.numel()), rel=1e-4)
    # the student once at T − 1; teacher and fake once each, conditional and null prompt in one batch
    assert predict.calls == [("student", B, [999] * B), ("teacher", 2 * B, [100, 700] * 2),
                             ("fake", 2 * B, [100, 700] * 2)]


def test_a_fake_score_equal_to_the_teacher_gives_no_student_gradient():
    predict = Analytic(fake_slope=0.5)
    step = VSDStep(_schedule(), predict, null=_cond([0.0]), cfg=1.0)
    z = torch.randn(B, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    loss, _ = step.student_loss(z, _cond([1.0, 3.0]), torch.tensor([20, 980]), torch.randn(B, 1, 3, 3))
    loss.backward()
    assert loss.item() == 0.0 and predict.w.grad.item() == 0.0
    assert [role for role, batch, _ in predict.calls] == ["student", "teacher", "fake"]  # cfg 1: no null pass
    assert all(batch == B for _, batch, _ in predict.calls)


def test_fake_loss_uses_the_null_prompt_where_the_mask_says():
    schedule, predict = _schedule(), Analytic()
    step = VSDStep(schedule, predict, null=_cond([0.0]), cfg=2.0)
    gen = torch.Generator().manual_seed(2)
    sample, noise = torch.randn(B, 1, 3, 3, generator=gen), torch.randn(B, 1, 3, 3, generator=gen)
    t = torch.tensor([0, 999])
    loss = step.fake_loss(sample, _cond([1.0, 5.0]), t, noise, torch.tensor([True, False]))
    a_bar, alpha, sigma = _by_hand(schedule, t, sample)
    x_t = alpha * sample + sigma * noise
    c = torch.tensor([0.0, 5.0]).view(-1, 1, 1, 1)  # row 0 sees the null prompt
    expected = (a_bar * (0.25 * x_t + c - noise) ** 2).mean()
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)
    assert predict.calls == [("fake", B, [0, 999])]


def test_dmd_normalization_divides_each_sample_by_its_mean_distance_to_the_real_prediction():
    schedule, predict = _schedule(), Analytic()
    step = VSDStep(schedule, predict, null=_cond([0.0]), cfg=2.0, fake_cfg=1.0, dmd_normalization=True)
    gen = torch.Generator().manual_seed(3)
    z, noise = torch.randn(B, 1, 3, 3, generator=gen), torch.randn(B, 1, 3, 3, generator=gen)
    t = torch.tensor([50, 900])
    cond = _cond([1.0, -2.0])
    loss, x0 = step.student_loss(z, cond, t, noise)

    _, alpha, sigma = _by_hand(schedule, t, z)
    x_t = alpha * x0.detach() + sigma * noise
    c = cond.encoder_hidden_states.view(-1, 1, 1, 1)
    x0_real = (x_t - sigma * (0.5 * x_t + 2.0 * c)) / alpha  # guided at 2
    x0_fake = (x_t - sigma * (0.25 * x_t + c)) / alpha  # unguided
    g = (x0_fake - x0_real) / (x0.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert loss.item() == pytest.approx(0.5 * float((g ** 2).mean()), rel=1e-5)
    # the same direction as the schedule-weighted update, each sample scaled by its own positive factor
    plain = VSDStep(schedule, Analytic(), null=_cond([0.0]), cfg=2.0, fake_cfg=1.0)
    loss_plain, _ = plain.student_loss(z, cond, t, noise)
    g_plain = (1 - alpha * alpha) * ((0.5 * x_t + 2.0 * c) - (0.25 * x_t + c))
    ratio = g / g_plain
    assert torch.all(ratio > 0)
    torch.testing.assert_close(ratio, ratio[:, :1, :1, :1].expand_as(ratio), rtol=1e-4, atol=0)
    assert not math.isclose(float(ratio[0, 0, 0, 0]), float(ratio[1, 0, 0, 0]), rel_tol=1e-2)
