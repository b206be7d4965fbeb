"""The two-averages report (benchmarks/digits_ema_seeds_report.py): its declared reads on known answers."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import digits_ema_seeds_report as report  # noqa: E402

NAMES = {seed: f"lora-peft-lr0.001-f1-s{seed}-averages" for seed in range(5)}


def _row(name, step, weights, fd, eval_seed=report.EVAL_SEED, pixel=2.0, recall=0.4):
    return {"name": name, "step": step, "weights": weights, "eval_seed": eval_seed, "fd_features": fd,
            "fd_pixel": pixel, "precision": 0.9, "recall": recall, "class_accuracy": 0.99}


def _runs(default_fd, slow_fd, last=4000, spread=None):
    """Both averages every 100 steps from 3000 (flat), all six noise sets at ``last``: seed s scores fd + s·spread."""
    rows = []
    for seed, name in NAMES.items():
        for weights, fd in ((report.DEFAULT, default_fd), (report.SLOW, slow_fd)):
            value = fd + seed * (spread or {}).get(weights, 1.0)
            rows += [_row(name, step, weights, value + (0.5 if step % 200 else -0.5)) for step in range(3000, last, 100)]
            rows += [_row(name, last, weights, value, seed_) for seed_ in (report.EVAL_SEED, *report.NOISE_SEEDS)]
    return rows


def test_the_queue_names_the_runs_the_report_reads():
    assert {run.seed: run.name for run in report.queue(report.QUEUE)} == NAMES
    assert (report.DEFAULT, report.SLOW) == ("ema-p2/3", "ema-p3/4")


def test_paired_differences_follow_the_declared_rule():
    assert report.paired_verdict([-6.0, -6.5, -5.5, -6.2, -5.8], "fd_features")["verdict"] == "better"
    assert report.paired_verdict([6.0, 6.5, 5.5, 6.2, 5.8], "fd_features")["verdict"] == "worse"
    assert report.paired_verdict([0.06, 0.07, 0.06, 0.065, 0.055], "recall")["verdict"] == "better"  # higher is better
    small = report.paired_verdict([0.2, -0.1, 0.0, 0.1, -0.2], "fd_features")
    assert small["verdict"] == "no difference that matters" and small["d"] == pytest.approx(0.0)
    assert small["se"] == pytest.approx(math.sqrt(0.025) / math.sqrt(5))
    assert report.paired_verdict([-8.0, 2.0, -9.0, 1.0, -6.0], "fd_features")["verdict"] == "cannot tell"
    assert report.paired_verdict([1.0, 2.0], "fd_features")["verdict"] == "too few seeds"


def test_the_reads_on_known_answers():
    # the slow average 2 points lower in every seed and half as spread: seeds score 40 + s and 38 + s / 2
    rows = _runs(40.0, 38.0, spread={report.DEFAULT: 1.0, report.SLOW: 0.5})
    study = [_row(name.removesuffix("-averages"), step, report.DEFAULT, 40.0 + seed + (0.5 if step % 200 else -0.5))
             for seed, name in NAMES.items() for step in range(3000, 4000, 100)]
    study[3]["fd_pixel"] = 2.25  # seed 0 at step 3300: one metric differs by 0.25
    result = report.analyse(rows, study)
    assert result["seeds"] == [0, 1, 2, 3, 4] and result["length"] == 4000
    assert result["spread"][(report.DEFAULT, "six")]["sd"] == pytest.approx(math.sqrt(2.5))
    assert result["spread"][(report.SLOW, "six")]["sd"] == pytest.approx(math.sqrt(2.5) / 2)
    low, high = result["spread"][(report.SLOW, "deciding")]["interval"]
    assert (low, high) == pytest.approx((0.5991 * math.sqrt(2.5) / 2, 2.8736 * math.sqrt(2.5) / 2), rel=1e-3)
    fd = result["paired"]["fd_features"]
    # d = -2 - s/2: mean -3, SE √2.5 / 2 / √5 = 0.35, so |d| + 2 SE = 3.7 is within the smallest effect of 5
    assert fd["d"] == pytest.approx(-3.0) and fd["verdict"] == "no difference that matters"
    assert result["paired"]["fd_pixel"]["verdict"] == "no difference that matters"
    steady = result["steadiness"][report.DEFAULT]
    # within-run sd over 3000-4000 of +-0.5 around the value and the value itself at 4000
    assert steady["within_sd"] == pytest.approx(report.sd([*[0.5 if s % 200 else -0.5 for s in range(3000, 4000, 100)],
                                                            0.0]))
    assert steady["noise"] == 0.0 and steady["flat"] is False  # identical noise sets: any slope is movement
    assert result["adopt"] is True  # seed sd 0.8 and no difference that matters on every metric
    repro = result["reproduction"]
    assert repro[0] == {"steps": 10, "max_gap": pytest.approx(0.25), "first_differs": 3300}
    assert repro[1] == {"steps": 10, "max_gap": 0.0, "first_differs": None}
    text = "\n".join(report.lines(result))
    assert "at step 4000: 0, 1, 2, 3, 4 (not finished: none). Machine: not recorded, one torch thread" in text
    assert "| `ema-p3/4` | 39.0 ± 0.8 (0.5–2.3) | 39.0 ± 0.8 (0.5–2.3) |" in text
    assert "- feature FD ↓: `ema-p2/3` 42.0, `ema-p3/4` 39.0; d = -3.00 ± 0.35: no difference that matters." in text
    assert "- seed 0: 10 steps, largest difference 0.25: first differs at step 3300." in text
    assert "- seed 1: 10 steps, largest difference 0: identical at every step." in text
    assert text.endswith("**Decision (the declared rule):** the slower average meets both conditions: the next step "
                         "is the demo re-run on it.")


def test_the_slow_average_is_adopted_only_within_the_target_and_not_worse():
    rows = _runs(40.0, 39.9, spread={report.DEFAULT: 1.0, report.SLOW: 1.0})  # same spread, 0.1 lower: no difference
    assert report.analyse(rows, [])["adopt"] is True
    rows = _runs(40.0, 39.9, spread={report.DEFAULT: 1.0, report.SLOW: 2.0})  # seed sd 3.2 on the slow one
    assert report.analyse(rows, [])["adopt"] is False
    rows = _runs(40.0, 33.0, spread={report.DEFAULT: 1.0, report.SLOW: 3.0})  # d = -7 + 2s: "cannot tell"
    result = report.analyse(rows, [])
    assert result["paired"]["fd_features"]["verdict"] == "cannot tell" and result["adopt"] is False
    assert "the default stays `ema-p2/3`" in report.lines(result)[-1]


def test_fewer_than_three_seeds_read_nothing():
    rows = [r for r in _runs(40.0, 38.0) if r["name"] in (NAMES[0], NAMES[1])]
    result = report.analyse(rows, [])
    assert result["seeds"] == [0, 1]
    assert "(not finished: 2, 3, 4)" in report.lines(result)[4]
    assert report.lines(result)[-1] == "Fewer than 3 seeds: nothing is read yet."
