"""``benchmarks/digits_stability.py``'s pure parts: the EMA bookkeeping the study relies on (diffusers' EMAModel
with the study's arguments follows the declared decay formula), the slope / plateau rule and the within-run sd."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import digits_stability as stability  # noqa: E402


def _trajectory(steps: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(3, generator=gen) + 0.01 * k for k in range(steps)]


@pytest.mark.parametrize("name", ["ema-p2/3", "ema-p3/4"])
def test_ramped_average_is_diffusers_emamodel_with_the_declared_decay(name):
    """The averages the study scores equal a hand-computed EMA with decay min(max, 1 - (1 + t)^-power), t from 0."""
    kwargs = stability.AVERAGES[name]
    param = torch.nn.Parameter(torch.zeros(3))
    ema = stability._averages([param])[name]
    expected = None
    for k, value in enumerate(_trajectory(50), start=1):
        param.data.copy_(value)
        ema.step([param])
        decay = stability.ramp_decay(k, kwargs["power"], kwargs["decay"])
        assert decay == pytest.approx(0.0 if k == 1 else min(kwargs["decay"], 1 - k ** -kwargs["power"]))
        assert ema.cur_decay_value == pytest.approx(decay)
        expected = value.clone() if expected is None else decay * expected + (1 - decay) * value
    assert torch.allclose(ema.shadow_params[0], expected, atol=1e-6)


def test_fixed_average_uses_its_decay_from_the_first_step():
    param = torch.nn.Parameter(torch.ones(2))
    ema = stability._averages([param])["ema-0.999"]
    param.data.fill_(3.0)
    ema.step([param])
    assert ema.cur_decay_value == pytest.approx(0.999)
    assert torch.allclose(ema.shadow_params[0], torch.full((2,), 1.0 + 0.001 * 2.0))


def test_slope_and_tail_change_of_a_line_and_a_flat_tail():
    steps = list(range(100, 1100, 100))
    assert stability.slope(steps, [2.0 * s + 1 for s in steps]) == pytest.approx(2.0)
    # last 20 % of 1000 steps = steps 800..1000: a line of slope -0.01 falls 2 points there
    assert stability.tail_change(steps, [50 - 0.01 * s for s in steps]) == pytest.approx(-2.0)
    falling_then_flat = [100 - 0.1 * s if s <= 500 else 50.0 for s in steps]
    assert stability.tail_change(steps, falling_then_flat) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        stability.slope([1], [1.0])
    assert math.isnan(stability.tail_change([2000, 3000, 4000], [50.0, 45.0, 47.0]))  # one point past 3200


def test_plateau_step_is_the_first_length_whose_tail_moves_less_than_the_noise():
    steps = list(range(100, 2100, 100))
    values = [max(40.0, 100 - 0.05 * s) for s in steps]  # falls 5 points per 100 steps until 1200, flat after
    # at L = 1500 the tail (1200..1500) is flat; at L = 1400 it holds 1200 (=40), 1300, 1400: flat too
    assert stability.plateau_step(steps, values, noise=1.0) == 1400
    assert stability.plateau_step(steps, [100 - 0.05 * s for s in steps], noise=1.0) is None
    # a line falling 0.05 per step moves 0.01 L over the last 20 % of L; three points first at L = 1000
    assert stability.plateau_step(steps, [100 - 0.05 * s for s in steps], noise=10.0) == 1000
    assert stability.plateau_step(steps, [100 - 0.05 * s for s in steps], noise=9.9) is None


def test_within_run_sd_and_neighbour_change_over_the_last_40_percent():
    steps = [100 * k for k in range(1, 11)]
    values = [0, 0, 0, 0, 0, 1, 3, 1, 3, 1]  # last 40 %: steps 600..1000
    stats = stability.within_run(steps, [float(v) for v in values])
    assert stats["points"] == 5
    assert stats["sd"] == pytest.approx(math.sqrt(sum((v - 1.8) ** 2 for v in (1, 3, 1, 3, 1)) / 4))
    assert stats["step_change"] == pytest.approx(2.0)
    line = stability.within_run(steps, [3.0 * s for s in steps])
    assert line["sd"] > 100 and line["detrended_sd"] == pytest.approx(0.0, abs=1e-9)


def test_queues_name_the_declared_runs_and_refuse_unknown_ones():
    a = stability.queue("A:full")
    assert [(r.lr, r.fake_updates, r.steps, r.seed) for r in a] == [(2e-5, 5, 1200, 0), (5e-5, 5, 1200, 0),
                                                                      (2e-5, 1, 1200, 0)]
    b = stability.queue("B:lorad-probe:0.001:1")
    assert [r.seed for r in b] == [0, 1, 2, 3, 4] and {r.steps for r in b} == {1200}
    assert b[0].name == "lorad-probe-lr0.001-f1-s0"
    with pytest.raises(SystemExit):
        stability.queue("C")
    with pytest.raises(SystemExit):
        stability.queue("C:full")  # full fine-tuning is Phase B's, not a uniform adapter


def test_phase_c_queues_the_uniform_adapters_on_the_lorad_recipe():
    budget = stability.queue("C:lora-peft")
    assert [r.name for r in budget] == [f"lora-peft-lr0.001-f1-s{s}" for s in range(5)]
    assert {(r.lr, r.fake_updates, r.steps, r.rank) for r in budget} == {(1e-3, 1, 1200, None)}
    small = stability.queue("C:dora-peft:4")
    assert small[0].name == "dora-peft-r4-lr0.001-f1-s0" and small[0].rank == 4
    assert small[0].scored == ("raw", "ema-p2/3")  # the comparison scores the default average and raw only
    assert stability.Run("full", 0, 2e-5, 5, 10).scored == stability.WEIGHTS
    longer = stability.queue("C:dora-peft:4@2000")  # the same runs continued: same names, so the same checkpoints
    assert [(r.name, r.steps) for r in longer] == [(r.name, 2000) for r in small]
    assert {r.steps for r in stability.queue("C:lorad-uniform@2000")} == {2000}
    both = stability.queue("E:lora-peft@4000")  # the two ramped averages, under names no Phase C run has
    assert [r.name for r in both] == [f"lora-peft-lr0.001-f1-s{s}-averages" for s in range(5)]
    assert {(r.lr, r.fake_updates, r.steps, r.rank) for r in both} == {(1e-3, 1, 4000, None)}
    assert both[0].scored == ("ema-p2/3", "ema-p3/4")
    with pytest.raises(SystemExit):
        stability.queue("E:lora-peft")  # a length is required
    with pytest.raises(SystemExit, match="unknown queue 'E:full@4000'"):  # named as given, not as the C: it builds on
        stability.queue("E:full@4000")
    full = stability.queue("B:full:2e-05:5@2000")  # Phase B's runs continued the same way
    assert [(r.name, r.steps) for r in full] == [(f"full-lr2e-05-f5-s{s}", 2000) for s in range(5)]
    assert full[0].scored == ("raw", "ema-p2/3")  # the comparison's weights
    for bad in ("C:lora-peft@", "C:lora-peft@-5", "C:lora-peft@2k", "B:full:2e-05:5@0", "A:full@2000"):
        with pytest.raises(SystemExit, match="@<steps>"):
            stability.queue(bad)
    with pytest.raises(SystemExit, match="unknown method"):
        stability.Run("lorad", 0, 1e-3, 1, 10)
    with pytest.raises(SystemExit, match="weights must be"):
        stability.Run("full", 0, 2e-5, 5, 10, weights=["ema-p9"])
