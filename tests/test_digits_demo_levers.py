"""The demo levers study's report (benchmarks/digits_demo_levers_report.py): the declared rule on known answers."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import digits_demo_levers_report as report  # noqa: E402
from digits_stability import NOISE_SEEDS  # noqa: E402

TEACHER_BEATEN = {"fd_pixel": 3.0, "fd_features": 21.0, "precision": 0.975, "recall": 0.30, "class_accuracy": 1.0}


def test_a_lever_is_adopted_only_when_it_lowers_feature_fd_by_the_effect_and_beats_the_one_step_teacher():
    base = dict(TEACHER_BEATEN, fd_features=26.4)
    assert report.verdict(TEACHER_BEATEN, base).startswith("**passes the quality rule** (feature FD -5.4")
    close = dict(TEACHER_BEATEN, fd_features=23.0)
    assert report.verdict(close, base).startswith("fails the quality rule (feature FD -3.4")
    worse_precision = dict(TEACHER_BEATEN, precision=0.944, class_accuracy=0.999)
    assert report.verdict(worse_precision, base) == ("fails the quality rule: feature FD -5.4, but not better "
                                                     "than the one-step teacher on precision, class accuracy")
    assert report.beats_one_step_teacher(TEACHER_BEATEN) == []
    assert report.beats_one_step_teacher(dict(TEACHER_BEATEN, fd_pixel=3.58, recall=0.111)) == ["pixel FD", "recall"]


def test_markdown_names_each_lever_by_what_differs_from_the_baseline():
    def row(name, step, fd, lr=0.001, fake=1, extra=None, seed=1000):
        return {"name": name, "steps": 800, "step": step, "weights": "ema-p2/3", "eval_seed": seed, "lr": lr,
                "fake_updates": fake, "extra": {"cfg": 2.0, "fake_cfg": 1.0, **(extra or {})},
                "train_s": 0.5 * step, "fd_features": fd, "fd_pixel": 3.0, "precision": 0.98, "recall": 0.3,
                "class_accuracy": 1.0}

    base, five = report.BASELINE, "lorad-probe-lr0.001-f5-cfg2-fake_cfg1-s0"
    rows = [row(base, 100, 30.0), row(base, 800, 26.4), row(five, 100, 28.0, fake=5), row(five, 800, 21.0, fake=5),
            row("b64", 800, 25.0, extra={"batch_size": 64})]
    text = report.markdown(rows)
    assert "| fake updates 5 | 28.0 | 21.0 | 0.50 |" in text and "| baseline | 30.0 | 26.4 | 0.50 |" in text
    assert "- `fake updates 5`: **passes the quality rule** (feature FD -5.4" in text
    assert "- `batch_size=64`: fails the quality rule (feature FD -1.4" in text


def test_continued_runs_get_their_last_scores_a_plateau_verdict_and_the_teacher_at_the_same_set_size(tmp_path):
    import json

    def row(step, fd, seed=1000, name="long"):
        return {"name": name, "steps": 1000, "step": step, "weights": "ema-p2/3", "eval_seed": seed, "lr": 0.001,
                "fake_updates": 5, "extra": {"cfg": 2.0, "fake_cfg": 1.0, "batch_size": 64}, "train_s": step,
                "fd_features": fd, "fd_pixel": 2.5, "precision": 0.97, "recall": 0.4, "class_accuracy": 1.0}

    sets = (1000, *NOISE_SEEDS)
    rows = [row(s, 20.0) for s in (100, 200, 300, 400, 500, 600, 700)] + [row(800, 18.0, seed=k) for k in sets]
    rows += [row(900, 17.0), row(1000, 16.0)]
    teacher = tmp_path / "teacher.json"
    teacher.write_text(json.dumps({"rows": [{"model": "teacher_multistep", "images_per_set": 2000, "noise_sets": 3,
                                             "mean": {"fd_features": 8.0}, "sd": {"fd_features": 0.5}}]}))
    running = "\n".join(report.continued(rows, teacher))
    assert "| long | 1000 | running |" in running  # no baseline among the rows: the run keeps its name
    assert "8.00 ± 0.50 (mean ± sd over 3 sets of 2000)" in running
    rows += [row(1000, 16.0 + 0.2 * i, seed=k) for i, k in enumerate(sets[1:], 1)]
    done = "\n".join(report.continued(rows, teacher))
    # six sets at 1000 (16.0 … 17.0 by 0.2): mean 16.5, sd 0.37; the last fifth (800, 900, 1000 on the deciding set:
    # 18, 17, 16) falls 2.0 over its 200 steps, more than the noise: not flat
    assert "| 1000 | 16.5 ± 0.4 | 2.500 ± 0.000 |" in done
    assert "| 2.06× | -2.0 | no (the evaluation noise is 0.4) | yes, on all five metrics |" in done
    assert "| 600 | 700 | 800 | 900 | 1000 |" in done
    # a run continued twice (six sets at 900 as well) gets a row per scored length, each judged on its curve so far
    rows += [row(900, 17.0, seed=k) for k in sets[1:]]
    twice = "\n".join(report.continued(rows, teacher))
    assert "| long | 900 | 17.0 ± 0.0 |" in twice and twice.index("| long | 900 |") < twice.index("| long | 1000 |")
    assert report.scores_at(rows, 800)["long"]["fd_features"] == (18.0, 0.0)
    assert report.teacher_feature_fd(5000, teacher) is None and report.teacher_feature_fd(2000, tmp_path / "x") is None
    # a run scored only at 100 and 1000: one point in its last fifth, so no plateau is read
    sparse = [row(100, 30.0, name="sparse"), *(row(1000, 20.0, seed=k, name="sparse") for k in sets)]
    text = "\n".join(report.continued(sparse, teacher))
    assert "| 2.50× | – | not read (fewer than two points in the last 20 %) |" in text
