"""The VSD step on a rectified-flow schedule: analytic velocity fields of Gaussian data give the VSD direction in
closed form, and a re-implementation written in velocity space gives the same losses and gradients."""

from __future__ import annotations

import pytest
import torch

from wadi_distill.schedules import FlowMatchSchedule
from wadi_distill.teachers.conditioning import Conditioning
from wadi_distill.vsd import losses as vsd
from wadi_distill.vsd.step import VSDStep

B = 3
SHAPE = (B, 2, 3, 3)


def _cond(values: list[float]) -> Conditioning:
    return Conditioning(torch.tensor(values).view(-1, 1, 1))


def _column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def gaussian_posterior(x: torch.Tensor, sigma: torch.Tensor, mu: torch.Tensor, std: float):
    """E[x0 | x_σ] and E[ε | x_σ] for data x0 ~ N(μ, std²·I), x_σ = (1 − σ)·x0 + σ·ε."""
    a = 1 - sigma
    var = a * a * std ** 2 + sigma * sigma
    centred = x - a * mu
    return mu + a * std ** 2 / var * centred, sigma / var * centred


def gaussian_velocity(x: torch.Tensor, sigma: torch.Tensor, mu: torch.Tensor, std: float) -> torch.Tensor:
    """The exact flow-matching velocity v(x, σ) = E[ε − x0 | x_σ = x] of N(μ, std²·I) data."""
    x0, eps = gaussian_posterior(x, sigma, mu, std)
    return eps - x0


class GaussianRoles:
    """Teacher: the velocity of N(c, std²) data (c the prompt's number, 0 for the null prompt); fake: of
    N(c + shift, fake_std²); student: v = w·z, so its one-step sample is (1 − w)·z."""

    def __init__(self, std: float = 0.7, fake_shift: float = 0.4, fake_std: float | None = None) -> None:
        self.w = torch.nn.Parameter(torch.tensor(0.3))
        self.std, self.fake_shift = std, fake_shift
        self.fake_std = std if fake_std is None else fake_std
        self.calls: list[tuple[str, torch.Tensor]] = []

    def __call__(self, role, x, t, cond):
        self.calls.append((role, t.clone()))
        sigma = _column(t, x)
        c = _column(cond.encoder_hidden_states, x)
        if role == "student":
            return self.w * x
        if role == "teacher":
            return gaussian_velocity(x, sigma, c, self.std)
        return gaussian_velocity(x, sigma, c + self.fake_shift, self.fake_std)


def test_gaussian_velocity_is_the_conditional_mean_of_eps_minus_x0():
    """The analytic field itself: at σ where x_σ is nearly pure data or noise it predicts the obvious, and a Monte
    Carlo regression of ε − x0 on x_σ recovers its slope and offset."""
    gen = torch.Generator().manual_seed(0)
    mu, std, sigma = 1.5, 0.5, torch.tensor(0.4)
    x0 = mu + std * torch.randn(400000, generator=gen, dtype=torch.float64)
    eps = torch.randn(400000, generator=gen, dtype=torch.float64)
    x = (1 - sigma) * x0 + sigma * eps
    design = torch.stack([x, torch.ones_like(x)], 1)
    slope, offset = torch.linalg.lstsq(design, (eps - x0)[:, None]).solution.flatten().tolist()
    probe = torch.tensor([0.0, 1.0], dtype=torch.float64)
    exact = gaussian_velocity(probe, sigma.double(), torch.tensor(mu, dtype=torch.float64), std)
    assert exact[1] - exact[0] == pytest.approx(slope, abs=5e-3) and exact[0] == pytest.approx(offset, abs=5e-3)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_vsd_direction_on_gaussian_fields_equals_the_closed_form(cfg):
    """Teacher N(μ, s²), fake N(μ + δ, s²): E_fake[x0|x] − E_real[x0|x] = δ·σ²/(α²s² + σ²) for every x, so
    g = α·σ/(α² + σ²)·(x̂0_fake − x̂0_real) = δ·α·σ³/((α² + σ²)(α²s² + σ²)), whatever the guidance scale
    (the velocity is affine in μ, so guidance moves both means by the same amount)."""
    schedule = FlowMatchSchedule(shift=3.0)
    roles = GaussianRoles(std=0.7, fake_shift=0.4)
    step = VSDStep(schedule, roles, null=_cond([0.0]), cfg=cfg)
    gen = torch.Generator().manual_seed(1)
    z, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    t = torch.tensor([0.1, 0.5, 0.9])
    loss, x0 = step.student_loss(z, _cond([1.0, -2.0, 0.5]), t, noise)
    torch.testing.assert_close(x0, 0.7 * z)  # one step at σ = 1: z − w·z
    a, s = 1 - _column(t, z), _column(t, z)
    g = 0.4 * a * s ** 3 / ((a * a + s * s) * (a * a * 0.49 + s * s))
    g = g.expand(SHAPE)
    assert loss.item() == pytest.approx(0.5 * float((g ** 2).mean()), rel=1e-5)
    loss.backward()
    # ∂x̂0/∂w = −z and the loss's gradient on x̂0 is g / numel
    assert roles.w.grad.item() == pytest.approx(float((g * -z).sum() / g.numel()), rel=1e-4)
    # σ = 1 for the student, the drawn σ for the teacher and the fake score (conditional and null in one batch)
    assert [role for role, _ in roles.calls] == ["student", "teacher", "fake"]
    assert roles.calls[0][1].dtype == torch.float32 and roles.calls[0][1].tolist() == [1.0] * B
    torch.testing.assert_close(roles.calls[1][1], t if cfg == 1.0 else torch.cat([t, t]))


@pytest.mark.parametrize("sequential", [False, True])
def test_an_unguided_fake_score_aims_at_the_guided_teacher(sequential):
    """fake_cfg = 1 (DMD2's way): the real score guided at 3 is the velocity of N(3c, s²) (affine in μ, null
    prompt μ = 0), the fake score's conditional one that of N(c + δ, s²); the closed form of the test above holds
    with δ replaced by δ − 2c, per sample. The fake score is called once, at the batch size."""
    schedule = FlowMatchSchedule(shift=3.0)
    roles = GaussianRoles(std=0.7, fake_shift=0.4)
    step = VSDStep(schedule, roles, null=_cond([0.0]), cfg=3.0, fake_cfg=1.0, sequential_cfg=sequential)
    gen = torch.Generator().manual_seed(1)
    z, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    t, c = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([1.0, -2.0, 0.5])
    loss, _ = step.student_loss(z, _cond(c.tolist()), t, noise)
    a, s = 1 - _column(t, z), _column(t, z)
    delta = 0.4 - 2.0 * _column(c, z)
    g = (delta * a * s ** 3 / ((a * a + s * s) * (a * a * 0.49 + s * s))).expand(SHAPE)
    assert loss.item() == pytest.approx(0.5 * float((g ** 2).mean()), rel=1e-5)
    fake_calls = [t_seen for role, t_seen in roles.calls if role == "fake"]
    assert len(fake_calls) == 1 and fake_calls[0].shape == (B,)
    teacher_calls = [t_seen.shape[0] for role, t_seen in roles.calls if role == "teacher"]
    assert teacher_calls == ([B, B] if sequential else [2 * B])


def test_vsd_direction_with_different_spreads_is_the_x0_space_form():
    """Teacher N(c, 0.7²), fake N(c + 0.4, 1.1²): g is α·σ/(α² + σ²) times the difference of the two posterior
    means of x0, computed here from the Gaussians directly (not through velocities)."""
    schedule = FlowMatchSchedule()
    roles = GaussianRoles(std=0.7, fake_shift=0.4, fake_std=1.1)
    step = VSDStep(schedule, roles, null=_cond([0.0]), cfg=1.0)
    gen = torch.Generator().manual_seed(2)
    z, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    t, c = torch.tensor([0.05, 0.5, 0.97]), torch.tensor([1.0, -2.0, 0.5])
    loss, x0 = step.student_loss(z, _cond(c.tolist()), t, noise)
    a, s, mu = 1 - _column(t, z), _column(t, z), _column(c, z)
    x_t = a * x0.detach() + s * noise
    real, _ = gaussian_posterior(x_t, s, mu, 0.7)
    fake, _ = gaussian_posterior(x_t, s, mu + 0.4, 1.1)
    g = a * s / (a * a + s * s) * (fake - real)
    assert loss.item() == pytest.approx(0.5 * float((g ** 2).mean()), rel=1e-4)
    loss.backward()
    assert roles.w.grad.item() == pytest.approx(float((g * -z).sum() / g.numel()), rel=1e-4)


def test_a_fake_score_equal_to_the_teacher_gives_no_student_gradient():
    roles = GaussianRoles(fake_shift=0.0)
    step = VSDStep(FlowMatchSchedule(shift=3.0), roles, null=_cond([0.0]), cfg=2.0)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    loss, _ = step.student_loss(z, _cond([1.0, 2.0, 3.0]), torch.tensor([0.2, 0.6, 0.99]), torch.randn(SHAPE))
    loss.backward()
    assert loss.item() == 0.0 and roles.w.grad.item() == 0.0


def test_the_fake_score_learns_the_flow_matching_target():
    """The fake loss is mean((v_fake − (ε − x̂0))²), unweighted: the exact velocity of the student's own
    distribution has the smallest expected loss, and a hand value on a point."""
    schedule = FlowMatchSchedule()
    sample, noise = torch.tensor([[[[2.0]]]]), torch.tensor([[[[-1.0]]]])
    t = torch.tensor([0.25])
    roles = GaussianRoles(std=0.5, fake_shift=0.0)
    loss = VSDStep(schedule, roles, null=_cond([0.0]), cfg=1.0).fake_loss(sample, _cond([1.0]), t, noise,
                                                                         torch.tensor([False]))
    x_t = 0.75 * 2.0 + 0.25 * -1.0  # 1.25
    var = 0.75 ** 2 * 0.25 + 0.0625
    v_fake = 0.25 / var * (x_t - 0.75) - (1.0 + 0.75 * 0.25 / var * (x_t - 0.75))
    assert loss.item() == pytest.approx((v_fake - (-1.0 - 2.0)) ** 2, rel=1e-5)
    # in expectation over the student's samples N(1, 0.5²), the right Gaussian beats a wrong one
    gen = torch.Generator().manual_seed(4)
    n = 200000
    samples, noises = 1 + 0.5 * torch.randn(n, 1, 1, 1, generator=gen), torch.randn(n, 1, 1, 1, generator=gen)
    ts = schedule.draw_timesteps(n, gen)
    mask = torch.zeros(n, dtype=torch.bool)
    right = VSDStep(schedule, GaussianRoles(std=0.5, fake_shift=0.0), _cond([0.0])).fake_loss(
        samples, _cond([1.0] * n), ts, noises, mask)
    wrong = VSDStep(schedule, GaussianRoles(std=0.5, fake_shift=0.3), _cond([0.0])).fake_loss(
        samples, _cond([1.0] * n), ts, noises, mask)
    assert right.item() < wrong.item() - 0.01


class TinyRoles(torch.nn.Module):
    """Small non-linear velocity predictors with parameters for the student and the fake score."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.student = torch.nn.Parameter(torch.randn(2, 2, generator=gen) * 0.3)
        self.fake = torch.nn.Parameter(torch.randn(2, 2, generator=gen) * 0.3)
        self.teacher = torch.randn(2, 2, generator=gen) * 0.3

    def forward(self, role, x, t, cond):
        weight = {"student": self.student, "fake": self.fake, "teacher": self.teacher}[role]
        c = _column(cond.encoder_hidden_states, x)
        h = torch.einsum("oc,bchw->bohw", weight, x)
        return torch.tanh(h) * (1 + _column(t, x)) + c * x


def _velocity_space_student_loss(roles, z, c, null, t, noise, cfg):
    """The flow VSD student loss written directly in velocity space."""
    ones = torch.ones(z.shape[0])
    x0 = z - roles("student", z, ones, c)
    s = _column(t, z)
    x_t = (1 - s) * x0.detach() + s * noise

    def guided(role):
        cond_v = roles(role, x_t, t, c)
        null_v = roles(role, x_t, t, null.expand(z.shape[0]))
        return null_v + cfg * (cond_v - null_v)

    with torch.no_grad():
        g = s * s * (1 - s) / ((1 - s) ** 2 + s * s) * (guided("teacher") - guided("fake"))
    return 0.5 * ((x0 - (x0 - g).detach()) ** 2).mean()


def test_flow_losses_equal_an_independent_velocity_space_implementation():
    schedule = FlowMatchSchedule(shift=3.0).with_logit_normal(0.0, 1.0)
    gen = torch.Generator().manual_seed(6)
    z, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    cond, null = _cond([0.5, -1.0, 2.0]), _cond([0.1])
    t = vsd.student_timesteps(B, schedule, gen)
    ours_roles, theirs_roles = TinyRoles(), TinyRoles()
    step = VSDStep(schedule, ours_roles, null=null, cfg=4.5)
    ours, x0 = step.student_loss(z, cond, t, noise)
    theirs = _velocity_space_student_loss(theirs_roles, z, cond, null, t, noise, 4.5)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5) and ours.item() > 0
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_roles.student.grad, theirs_roles.student.grad, rtol=1e-4, atol=1e-7)
    assert ours_roles.student.grad.abs().max() > 0

    t2 = vsd.fake_timesteps(B, schedule, gen)
    use_null = torch.tensor([True, False, False])
    sample = x0.detach()
    ours_fake = step.fake_loss(sample, cond, t2, noise, use_null)
    s = _column(t2, sample)
    c = Conditioning(torch.where(use_null.view(-1, 1, 1), null.encoder_hidden_states, cond.encoder_hidden_states))
    v_fake = theirs_roles("fake", (1 - s) * sample + s * noise, t2, c)
    theirs_fake = ((v_fake - (noise - sample)) ** 2).mean()
    assert ours_fake.item() == pytest.approx(theirs_fake.item(), rel=1e-5)
    ours_roles.fake.grad = theirs_roles.fake.grad = None
    ours_fake.backward()
    theirs_fake.backward()
    torch.testing.assert_close(ours_roles.fake.grad, theirs_roles.fake.grad, rtol=1e-4, atol=1e-7)


def test_flow_timestep_ranges():
    schedule = FlowMatchSchedule(shift=3.0)
    gen = torch.Generator().manual_seed(7)
    t = vsd.student_timesteps(20000, schedule, gen)
    lo, hi = (3 * u / (1 + 2 * u) for u in (0.02, 0.98))  # the student range of u, shifted
    assert t.dtype == torch.float32 and lo <= t.min().item() < lo + 1e-3 and hi - 1e-3 < t.max().item() <= hi
    t2 = vsd.fake_timesteps(20000, schedule, gen)
    assert t2.min().item() < 0.01 and t2.max().item() > 0.999
    # the shift puts more draws at high noise: P(σ > 0.5) = P(u > 0.25) = 0.75
    assert (t2 > 0.5).float().mean().item() == pytest.approx(0.75, abs=0.01)
