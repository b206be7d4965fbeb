"""The comparison's and the ablations' pure parts (benchmarks/digits_comparison_report.py, digits_ablations.py,
digits_ablations_report.py): the declared verdict rules on known answers, and the structureless changes."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import digits_ablations as ablations  # noqa: E402
import digits_ablations_report as ablations_report  # noqa: E402
import digits_comparison_report as comparison  # noqa: E402


def _student(values: dict[str, list[float]]) -> dict:
    out = {}
    for metric, vals in values.items():
        out[metric] = {"mean": sum(vals) / len(vals), "sd": comparison.sd(vals), "n": len(vals)}
    return out


def test_verdict_rule_on_known_answers():
    a = _student({"fd_features": [40.0, 41.0, 42.0, 43.0, 44.0]})  # mean 42, sd 1.58
    b = _student({"fd_features": [50.0, 51.0, 52.0, 53.0, 54.0]})  # mean 52: d = -10, SE = 1.0
    v = comparison.verdict(a, b, "fd_features")
    assert v["d"] == pytest.approx(-10.0) and v["se"] == pytest.approx(1.0)
    assert v["verdict"] == "A better"  # lower feature FD, |d| > 2 SE and ≥ 5
    assert comparison.verdict(b, a, "fd_features")["verdict"] == "B better"
    close = _student({"fd_features": [43.0, 44.0, 45.0, 46.0, 47.0]})  # d = -3, SE 1: beyond 2 SE, below 5
    assert comparison.verdict(a, close, "fd_features")["verdict"] == "no difference that matters"  # |-3| + 2 ≤ 5
    wide = _student({"fd_features": [30.0, 40.0, 50.0, 60.0, 70.0]})  # d = -8, SE 7.1: cannot tell
    assert comparison.verdict(a, wide, "fd_features")["verdict"] == "cannot tell at this size"
    two = _student({"fd_features": [30.0, 31.0]})
    assert comparison.verdict(a, two, "fd_features")["verdict"] == "too few seeds"
    # recall: higher is better, so a positive d is A's
    hi, lo = _student({"recall": [0.6, 0.61, 0.62]}), _student({"recall": [0.5, 0.51, 0.52]})
    assert comparison.verdict(hi, lo, "recall")["verdict"] == "A better"


def test_quality_needs_feature_fd_and_no_loss_on_the_other_declared_metrics():
    def per(f, p, r):
        return {"fd_features": {"verdict": f}, "fd_pixel": {"verdict": p}, "recall": {"verdict": r}}

    assert comparison.quality(per("A better", "cannot tell at this size", "A better")) == "A better"
    assert comparison.quality(per("A better", "B better", "A better")) == "mixed"
    assert comparison.quality(per("B better", "no difference that matters", "B better")) == "B better"
    assert comparison.quality(per("cannot tell at this size", "B better", "B better")) == "cannot tell at this size"


def test_every_declared_pair_names_students_of_the_comparison():
    labels = {s.label for s in comparison.STUDENTS}
    assert all(a in labels and b in labels for a, b, _ in comparison.PAIRS)
    assert comparison.BY_LABEL["lora-peft r4"].run_names()[3] == "lora-peft-r4-lr0.001-f1-s3"
    assert comparison.BY_LABEL["full"].run_names()[0] == "full-lr2e-05-f5-s0"
    assert comparison.BY_LABEL["dora-peft r2"].run_names()[4] == "dora-peft-r2-lr0.001-f1-s4"
    assert {s.group for s in comparison.STUDENTS} == set(comparison.GROUPS)
    assert {q for _, _, q in comparison.PAIRS} == set(comparison.QUESTIONS)


def test_seconds_per_step_follow_the_clock_of_the_last_resume():
    def rows(clock):
        return {("run", step, comparison.WEIGHTS, comparison.EVAL_SEED): {"train_s": t} for step, t in clock}

    one_clock = rows([(100, 30.0), (200, 60.0), (300, 90.0)])
    assert comparison.seconds_per_step(one_clock, "run", 300) == pytest.approx(0.3)  # 90 s over 300 steps
    # resumed at 200: the clock restarts, so 1.0 s a step between its own scored steps 300 and 400
    resumed = rows([(100, 30.0), (200, 60.0), (300, 40.0), (400, 140.0)])
    assert comparison.seconds_per_step(resumed, "run", 400) == pytest.approx(1.0)
    assert comparison.seconds_per_step(resumed, "run", 200) == pytest.approx(0.3)
    assert comparison.seconds_per_step(resumed, "run", 500) is None  # not reached


def test_continued_students_get_the_declared_pairs_and_their_verdict_at_the_first_length():
    long = comparison.LONG
    curves = []
    for label, base in (("lorad-uniform", 40.0), ("lora-peft", 50.0)):
        for seed, name in comparison.BY_LABEL[label].run_names().items():
            for step in range(100, long + 1, 100):
                fd = base + seed * 0.5 + (long - step) * 0.001
                curves.append({"name": name, "step": step, "weights": comparison.WEIGHTS, "train_s": step * 0.3,
                               "fd_features": fd, "fd_pixel": 2.0, "recall": 0.4, "precision": 0.9,
                               "class_accuracy": 0.99})
            for noise in comparison.NOISE_SEEDS:
                curves.append({**curves[-1], "eval_seed": noise, "fd_features": curves[-1]["fd_features"] + 0.2 * (noise % 2)})
    rows = comparison.index(curves)
    out = comparison.continued_numbers(rows, {("lorad-uniform", "lora-peft"): "cannot tell at this size"})
    assert [n["label"] for n in out["students"]] == ["lorad-uniform", "lora-peft"]  # the others have no runs
    first = out["students"][0]
    assert first["seeds"] == [0, 1, 2, 3, 4] and first["fd_features"]["mean"] == pytest.approx(41.0)
    assert first["curve"]["steps"][-1] == long and first["tail_change"] == pytest.approx(-0.4)  # 0.001 a step
    assert out["still_moving"] == ["lorad-uniform", "lora-peft"]  # 0.4 > the evaluation noise (about 0.1)
    [pair] = out["pairs"]
    assert (pair["a"], pair["b"], pair["quality"], pair["earlier"]) == (
        "lorad-uniform", "lora-peft", "A better", "cannot tell at this size")
    text = "\n".join(comparison.continued_lines(out))
    assert "(at 1200: cannot tell at this size)" in text and "dora-peft seed 0" in text  # cut runs are named
    assert comparison.continued_lines(comparison.continued_numbers({}, {}))[-2].startswith("No run has reached")
    assert comparison.readable("B better", "lorad-uniform r4", "dora-peft r4") == "dora-peft r4 better in quality"
    assert comparison.readable("mixed", "a", "b") == "mixed" and comparison.readable(None, "a", "b") is None


def test_a_continued_pair_compares_the_same_seeds_and_a_retrained_seed_is_left_out_of_the_change():
    length, long = comparison.LENGTH, comparison.LONG
    curves = []

    def scored(name, step, fd):
        row = {"name": name, "step": step, "weights": comparison.WEIGHTS, "train_s": step * 0.3, "fd_features": fd,
               "fd_pixel": 2.0, "recall": 0.4, "precision": 0.9, "class_accuracy": 0.99}
        curves.append(row)
        if step == long:
            curves.extend({**row, "eval_seed": noise} for noise in comparison.NOISE_SEEDS)

    for seed, name in comparison.BY_LABEL["lorad-uniform"].run_names().items():  # all five seeds at 2000
        scored(name, length, 60.0 + seed)
        scored(name, long, 40.0 + seed)
    for seed, name in comparison.BY_LABEL["full"].run_names().items():  # seeds 0-2 only; 0, 1 retrained past 1200
        scored(name, length, 50.0)
        if seed <= 2:
            scored(name, long, 30.0 if seed < 2 else 45.0)
    retrained = frozenset(comparison.BY_LABEL["full"].run_names()[seed] for seed in (0, 1))
    out = comparison.continued_numbers(comparison.index(curves), {}, retrained)
    [pair] = [p for p in out["pairs"] if p["b"] == "full"]
    assert pair["seeds"] == [0, 1, 2]  # lorad-uniform's seeds 3, 4 are not in this pair
    assert pair["metrics"]["fd_features"]["d"] == pytest.approx(41.0 - 35.0)  # 40,41,42 against 30,30,45
    change = {c["label"]: c for c in out["changes"]}
    assert change["full"]["seeds"] == [2] and change["full"]["left_out"] == [0, 1]
    assert change["full"]["change"] == pytest.approx(-5.0)  # seed 2 alone: 50 -> 45
    assert change["lorad-uniform"]["change"] == pytest.approx(-20.0) and change["lorad-uniform"]["left_out"] == []
    text = "\n".join(comparison.continued_lines(out))
    assert "full 50.0 → 45.0 (seeds 2; seeds 0,1 left out" in text


@pytest.mark.parametrize("per", ["matrix", "rows"])
def test_structureless_change_matches_the_students_change_in_size(per):
    gen = torch.Generator().manual_seed(1)
    teacher = {"w": torch.randn(8, 3, 2, 2, generator=gen), "b": torch.randn(8, generator=gen)}
    row_sizes = torch.arange(1, 9, dtype=torch.float32)
    change = torch.randn(8, 12, generator=gen)
    change = change / change.norm(dim=1, keepdim=True) * row_sizes[:, None] * 1e-2
    student = {"w": teacher["w"] + change.reshape(8, 3, 2, 2), "b": teacher["b"] + 1.0}
    out = ablations.structureless(teacher, student, seed=0, per=per)
    delta = (out["w"] - teacher["w"]).reshape(8, -1)
    assert out["w"].shape == teacher["w"].shape and torch.equal(out["b"], student["b"])
    assert delta.norm().item() == pytest.approx(change.norm().item(), rel=1e-5)
    if per == "rows":
        assert torch.allclose(delta.norm(dim=1), row_sizes * 1e-2, rtol=1e-5)
    cos = torch.nn.functional.cosine_similarity(delta.flatten(), change.flatten(), dim=0).item()
    assert abs(cos) < 0.5  # a random direction, not the student's
    again = ablations.structureless(teacher, student, seed=0, per=per)
    assert torch.equal(again["w"], out["w"])  # seeded
    with pytest.raises(ValueError, match="per must be"):
        ablations.structureless(teacher, student, seed=0, per="column")


def _variant(fd_pixel, recall, ratio=10.0):
    return {"fd_features": 50.0, "fd_pixel": fd_pixel, "recall": recall, "angle_to_norm_ratio": ratio}


def test_swap_asymmetry_and_ratio_verdicts_on_known_answers():
    table = {}
    for seed, jitter in enumerate([0.0, 0.01, -0.01, 0.02]):
        table[seed] = {"student": _variant(2.0, 0.5, 9.0 + jitter),
                       "teacher norms": _variant(2.02 + jitter, 0.49),
                       "teacher directions": _variant(2.5 + jitter, 0.2),
                       "structureless (rows)": _variant(3.0, 0.1, 12.0 + jitter),
                       "structureless (matrix)": _variant(3.0, 0.1, 9.0 - jitter)}
    swap = ablations_report.swap_verdicts(table)
    assert swap["fd_pixel"]["asymmetry"][0] == pytest.approx(0.48)
    assert swap["fd_pixel"]["verdict"] == "directions matter more"
    assert swap["recall"]["asymmetry"][0] == pytest.approx(0.29)  # falls 0.30 with directions, 0.01 with norms
    assert swap["recall"]["verdict"] == "directions matter more"
    assert swap["fd_features"]["verdict"] == "for the record"
    rows = ablations_report.ratio_verdict(table, "structureless (rows)")
    assert rows["difference"][0] == pytest.approx(-3.0)
    assert rows["verdict"] == "the rows changed their norms more than chance"
    matrix = ablations_report.ratio_verdict(table, "structureless (matrix)")
    assert matrix["verdict"] == "at chance"  # differences of ±0.02 around zero
    few = ablations_report.swap_verdicts({k: table[k] for k in (0, 1)})
    assert few["fd_pixel"]["verdict"] == "too few seeds"
    assert math.isnan(ablations_report.mean_se([1.0])[1])


def test_analysis_composes_the_two_reports_and_decides_low_rank_by_its_rule(tmp_path, monkeypatch):
    import json

    import digits_analysis_report as analysis

    def entry(ratio, energy, angle=0.75, norm=0.0015):
        return {"angle_to_norm_ratio": ratio, "residual_energy_at_30pct_rank_mean": energy,
                "residual_energy_at_30pct_rank_chance_mean": 0.593, "angle_deg_mean": angle, "norm_change_mean": norm}

    variants = {str(s): {"student": entry(8.9, 0.93 + 0.001 * s), "structureless (rows)": entry(13.1, 0.675)}
                for s in (2, 3, 4)}
    verdict = {"seeds": [2, 3, 4], "student": [8.9, 0.01], "chance": [13.1, 0.02], "difference": [-4.2, 0.03],
               "verdict": "the rows changed their norms more than chance"}
    swap = {m: {"seeds": [2, 3, 4], "norms_rise": [0.07, 0.01], "directions_rise": [1.6, 0.01],
                "asymmetry": [1.5, 0.01], "verdict": "directions matter more"} for m in ("fd_pixel", "recall")}
    swap["fd_features"] = {**swap["fd_pixel"], "verdict": "for the record"}
    (tmp_path / "digits_ablations.json").write_text(json.dumps(
        {"variants": variants, "swap": swap, "ratios": {"structureless (rows)": verdict,
                                                        "structureless (matrix)": verdict}}))
    student = {"label": "lorad-probe", "params": 98048, "seeds": [0, 1, 2],
               **{m: {"mean": 1.0, "sd": 0.1} for m in ("fd_features", "fd_pixel", "recall")}}
    (tmp_path / "digits_comparison.json").write_text(json.dumps(
        {"length": 1200, "weights": "ema-p2/3", "students": [student],
         "pairs": [{"question": "budget", "sentence": "**budget sentence**"},
                   {"question": "rank 4", "sentence": "**rank sentence**"}]}))
    monkeypatch.setattr(analysis, "COMPARISON", tmp_path / "digits_comparison.json")
    monkeypatch.setattr(analysis, "ABLATIONS", tmp_path / "digits_ablations.json")
    monkeypatch.setattr(analysis, "REPORT", tmp_path / "digits_analysis.md")
    text = analysis.write()
    assert "**Reproduces**" in text and "an excess of 25.8 ± 0.1 points over 3 seeds" in text
    assert "**budget sentence**" in text and "**rank sentence**" in text
    assert "Fewer than 5 seeds (cut for time): lorad-probe (3)" in text
    assert "Continued to" not in text  # a summary without the continued runs says nothing of them
    assert (tmp_path / "digits_analysis.md").read_text() == text
    summary = json.loads((tmp_path / "digits_comparison.json").read_text())
    summary["continued"] = {"length": 2000, "students": [{"label": "lorad-uniform", "seeds": [0, 1, 2, 3, 4]}],
                            "still_moving": [], "pairs": [{"sentence": "**long sentence**", "earlier": "mixed"}]}
    (tmp_path / "digits_comparison.json").write_text(json.dumps(summary))
    text = analysis.write()
    assert "seeds per student: lorad-uniform 5; still moving there: none)" in text
    assert "- **long sentence** (at the comparison's length: mixed)" in text
    assert "at 3000 steps" not in text
    summary["longer"] = [{"title": "the budget's students", "answer": None, "plateaus": [{
        "title": "the budget's students", "length": 3000, "since": 2000, "flat": ["lorad-probe"],
        "entering": {"full": 2000}, "continued": ["lorad-probe", "lora-peft"],
        "students": [{"label": "lorad-probe", "seeds": [0, 1, 2]}, {"label": "lora-peft", "seeds": [0, 1, 2]}],
        "pairs": [{"sentence": "**plateau sentence**", "earlier": None}]}]}]
    (tmp_path / "digits_comparison.json").write_text(json.dumps(summary))
    text = analysis.write()
    assert ("The budget's students at 3000 steps (full at 2000, where flat; seeds per student: lorad-probe 3, "
            "lora-peft 3; flat there: lorad-probe; still moving or not read: lora-peft):") in text
    assert "- **plateau sentence** (at 2000: not a declared pair there)" in text
    assert "(continued to 2000, the budget's students to 3000, where section 5 says)" in text
    summary["longer"][0]["plateaus"][0]["since_read"] = False  # the length before was not read
    (tmp_path / "digits_comparison.json").write_text(json.dumps(summary))
    assert "- **plateau sentence** (at 2000: not read)" in analysis.write()
    (tmp_path / "digits_ablations.json").unlink()
    with pytest.raises(SystemExit, match="is missing"):
        analysis.write()


def test_the_analysis_says_how_far_each_student_continued_alone_was_read():
    import digits_analysis_report as analysis

    def read(length, *continued):
        return {"length": length, "continued": list(continued)}

    trio = ("lorad-uniform r2", "lora-peft r2", "dora-peft r2")
    rank2 = {"title": "the rank-2 students", "plateaus": [read(4000, *trio), read(5000, *trio[:2]), read(6000, trio[0])]}
    assert analysis.longer_text(rank2) == ("the rank-2 students to 4000 (lora-peft r2 on to 5000, lorad-uniform r2 on "
                                           "to 6000)")
    rank4 = {"title": "the rank-4 students", "plateaus": [read(3000, *trio), read(4000, *trio), read(5000, *trio[1:]),
                                                          read(6000, *trio[1:])]}
    assert analysis.longer_text(rank4) == "the rank-4 students to 3000 and 4000 (lora-peft r2 and dora-peft r2 on to 6000)"
    assert analysis.longer_text({"title": "t", "plateaus": [read(4000, *trio)]}) == "t to 4000"


def test_the_ablation_report_says_which_seeds_were_retrained_and_how_far_they_land(tmp_path):
    import json

    def line(seed, step, fd, weights="ema-p2/3", eval_seed=1000):
        return json.dumps({"name": f"full-lr2e-05-f5-s{seed}", "seed": seed, "steps": 1200, "step": step,
                           "weights": weights, "eval_seed": eval_seed, "fd_features": fd})

    retrain, study = tmp_path / "retrain.jsonl", tmp_path / "study.jsonl"
    assert ablations_report.retrained_note(retrain, study) == ""  # nothing retrained: nothing said
    retrain.write_text("\n".join([line(0, 1100, 61.0), line(0, 1200, 60.4), line(0, 1200, 59.0, eval_seed=3001),
                                  line(0, 1200, 70.0, weights="raw"), line(1, 600, 58.0)]) + "\n")
    study.write_text("\n".join([line(0, 1200, 55.5), line(1, 1200, 52.0)]) + "\n")
    note = ablations_report.retrained_note(retrain, study)
    # seed 1 has not reached its last step: only seed 0 is named, on the deciding set and weights
    assert note.startswith("Seed 0 was trained again on this machine")
    assert note.endswith("retrained against Phase B: seed 0 60.4 against 55.5.")


def test_the_learning_rate_screen_reads_each_rate_on_its_six_sets_and_applies_the_declared_rule():
    report = comparison

    def rows(name, fd, pixel=2.5, recall=0.35):
        return [{"name": name, "step": report.LENGTH, "weights": report.WEIGHTS, "eval_seed": s, "fd_features": fd + i,
                 "fd_pixel": pixel, "recall": recall, "precision": 0.95, "class_accuracy": 0.99}
                for i, s in enumerate((report.EVAL_SEED, *report.NOISE_SEEDS))]

    curves = [*rows("lora-peft-lr0.001-f1-s0", 55.0), *rows("lora-peft-lr0.0003-f1-s0", 48.0),
              *rows("lora-peft-lr0.003-f1-s0", 45.0, pixel=2.7), *rows("dora-peft-lr0.001-f1-s0", 56.0)]
    numbers = report.screen_numbers(report.index(curves))
    assert numbers["lora-peft"][0.0003]["fd_features"] == (50.5, pytest.approx(1.8708, abs=1e-4))  # 48 … 53
    assert numbers["dora-peft"][0.003] is None  # not run yet
    base = numbers["lora-peft"][1e-3]
    # 7 points lower, same pixel FD and recall: better; 10 lower but pixel FD 0.2 higher: not better
    assert report.screen_verdict(numbers["lora-peft"][0.0003], base).startswith("**better for this adapter** "
                                                                                 "(feature FD -7.0, pixel FD +0.000")
    assert report.screen_verdict(numbers["lora-peft"][0.003], base).startswith("not better (feature FD -10.0, "
                                                                               "pixel FD +0.200")
    text = "\n".join(report.screen_lines(numbers))
    assert "| dora-peft | 0.003 | not finished |" in text and "| lora-peft | 0.001 | 57.5 ± 1.9 |" in text
    assert report.screen_lines(report.screen_numbers(report.index(rows("lora-peft-lr0.001-f1-s0", 55.0)))) == []


def test_the_declared_parameter_counts_are_the_students_trainable_parameters():
    """The comparison's table states each student's trainable parameters as constants: they are what the runs'
    students train (PEFT's own injection for LoRA and DoRA, the LoRaD layers for the LoRaD students)."""
    import copy

    from wadi_distill.builtin.digits.model import load_builtin
    from wadi_distill.lorad.config import adapter_param_count
    from wadi_distill.plan import plan_from_preset, plan_from_report
    from wadi_distill.vsd.peft_student import inject_peft_student

    import digits_stability as stability

    unet = load_builtin("digits").unet
    _, budget_rank, modules = stability.budget_ranks()
    shapes = [tuple(e.shape) for e in plan_from_preset(unet, 1).layers]
    counted = {"full": sum(p.numel() for p in unet.parameters()),
               "lorad-probe": plan_from_report(unet, stability.REPORT, budget=stability.BUDGET).trainable_params}
    for student in comparison.STUDENTS:
        method, _, rank = student.label.partition(" r")
        if method == "lorad-uniform":
            counted[student.label] = sum(adapter_param_count(s, int(rank or budget_rank[method]), "lorad")
                                         for s in shapes)
        elif method in ("lora-peft", "dora-peft"):
            params = inject_peft_student(copy.deepcopy(unet), modules, int(rank or budget_rank[method]), method.split("-")[0])
            counted[student.label] = sum(p.numel() for _, p in params)
    assert {s.label: s.params for s in comparison.STUDENTS} == counted


def test_a_seed_trained_again_after_its_checkpoint_was_lost_is_left_out_of_the_change_not_the_verdicts():
    length, long = comparison.LENGTH, comparison.LONG
    curves = []
    for seed, name in comparison.BY_LABEL["lorad-uniform"].run_names().items():
        for step, fd in ((length, 60.0 + seed), (long, 40.0 + seed)):
            row = {"name": name, "step": step, "weights": comparison.WEIGHTS, "train_s": 1.0, "fd_features": fd,
                   "fd_pixel": 2.0, "recall": 0.4, "precision": 0.9, "class_accuracy": 0.99}
            curves.append(row)
            if step == long:
                curves.extend({**row, "eval_seed": noise} for noise in comparison.NOISE_SEEDS)
    restarted = frozenset({comparison.BY_LABEL["lorad-uniform"].run_names()[3]})
    out = comparison.continued_numbers(comparison.index(curves), {}, frozenset(), restarted)
    [change] = [c for c in out["changes"] if c["label"] == "lorad-uniform"]
    assert change["seeds"] == [0, 1, 2, 4] and change["restarted"] == [3] and change["left_out"] == []
    assert change["change"] == pytest.approx(-20.0)
    [student] = [n for n in out["students"] if n["label"] == "lorad-uniform"]
    assert student["seeds"] == [0, 1, 2, 3, 4]  # its score at LONG still counts: a draw of the same recipe
    text = "\n".join(comparison.continued_lines(out))
    assert "seed 3 left out: trained again from step 0 on another machine" in text and "restarts.jsonl" in text


def test_the_runner_records_a_restart_when_a_run_has_lines_but_no_checkpoint(tmp_path, monkeypatch):
    import digits_stability as stability

    monkeypatch.setattr(stability, "RESTARTS", tmp_path / "restarts.jsonl")
    monkeypatch.setattr(stability, "CURVES", tmp_path / "curves.jsonl")
    monkeypatch.setattr(stability, "WORK", tmp_path / "work")
    run = stability.Run("lorad-uniform", 3, 1e-3, 1, 2, rank=2, weights=["raw"])
    stability.append_rows([{"name": run.name, "step": 1, "weights": "raw", "eval_seed": stability.EVAL_SEED}])

    class Stop(Exception):
        pass

    def no_training(*args, **kwargs):  # the record is written before the trainer is built
        raise Stop

    monkeypatch.setattr("wadi_distill.vsd.trainer.VSDTrainer", no_training)
    with pytest.raises(Stop):
        stability.run_one(run)
    [record] = stability.read_curves(tmp_path / "restarts.jsonl")
    assert record["name"] == run.name and record["recorded_through"] == 1 and record["cpu"]


def test_every_continued_pair_names_continued_students():
    assert all(a in comparison.LONG_STUDENTS and b in comparison.LONG_STUDENTS for a, b, _ in comparison.LONG_PAIRS)
    assert all(set(spec.students) <= set(comparison.LONG_STUDENTS) for spec in comparison.LONGER)
    assert comparison.LENGTH < comparison.LONG < comparison.PLATEAU


def test_each_longer_group_reads_only_declared_pairs_of_its_own_students():
    declared = {(a, b) for a, b, _ in (*comparison.PAIRS, *comparison.LONG_PAIRS)}
    for spec in comparison.LONGER:
        for a, b, _ in spec.pairs:
            assert (a, b) in declared or (b, a) in declared, (spec.title, a, b)
            assert {a, b} <= set(spec.students) | set(spec.flat_at), (spec.title, a, b)
        assert min(spec.amendments) > comparison.LONG
    titles = [spec.title for spec in comparison.LONGER]
    assert len(set(titles)) == len(titles)
    assert [spec.students for spec in comparison.SMALL_RANKS] == [
        ("lorad-uniform r2", "lora-peft r2", "dora-peft r2"), ("lorad-uniform r8", "lora-peft r8", "dora-peft r8")]


def _scored(curves, name, step, fd, noise_sets=False):
    row = {"name": name, "step": step, "weights": comparison.WEIGHTS, "train_s": step * 0.5, "fd_features": fd,
           "fd_pixel": 2.0, "recall": 0.4, "precision": 0.9, "class_accuracy": 0.99}
    curves.append(row)
    if noise_sets:  # the five more noise sets: +-0.5 around the base set, so an evaluation sd of about 0.5
        curves.extend({**row, "eval_seed": noise, "fd_features": fd + (0.5 if i % 2 else -0.5)}
                      for i, noise in enumerate(comparison.NOISE_SEEDS))


def test_a_student_trained_again_on_every_seed_gets_no_change_line_but_says_why():
    curves = []
    names = comparison.BY_LABEL["lorad-probe"].run_names()
    for seed, name in names.items():
        _scored(curves, name, comparison.LENGTH, 55.0)
        _scored(curves, name, comparison.LONG, 45.0 + seed, noise_sets=True)
    out = comparison.continued_numbers(comparison.index(curves), {}, frozenset(), frozenset(names.values()))
    [student] = out["students"]
    assert student["label"] == "lorad-probe" and student["fd_features"]["mean"] == pytest.approx(47.0)
    text = "\n".join(comparison.continued_lines(out))
    assert "lorad-probe: no change read (seeds 0,1,2,3,4 trained again from step 0" in text
    assert "lorad-probe 55.0 →" not in text


def test_the_plateau_reading_says_flat_or_still_moving_against_the_evaluation_noise():
    names = comparison.BY_LABEL["lorad-probe"].run_names()
    plateau, long = comparison.PLATEAU, comparison.LONG

    def curves_for(slope, spec=comparison.BUDGET):  # falls by `slope` a step; seeds 0-3 reach PLATEAU, 4 stops at LONG
        curves = []
        for seed, name in names.items():
            last = plateau if seed < 4 else long
            for step in range(100, last + 1, 100):
                _scored(curves, name, step, 40.0 + seed + (plateau - step) * slope,
                        noise_sets=step in (long, plateau))
        return comparison.plateau_numbers(comparison.index(curves), spec=spec)

    assert comparison.plateau_numbers({})["students"] == []
    flat = curves_for(0.0001)  # 0.06 over the last 600 steps, against an evaluation noise of 0.5
    assert flat["students"] == []  # no other student reached PLATEAU: every seed is cut alike
    alone = dataclasses.replace(comparison.BUDGET, students=("lorad-probe",))
    flat = curves_for(0.0001, alone)
    [student] = flat["students"]
    assert student["seeds"] == [0, 1, 2, 3] and student["tail_change"] == pytest.approx(-0.06)
    assert flat["flat"] == ["lorad-probe"] and flat["pairs"] == []  # no other student: no pair
    [change] = flat["changes"]
    assert change["before"] == pytest.approx(41.5 + 0.1) and change["after"] == pytest.approx(41.5)
    text = "\n".join(comparison.plateau_lines(flat))
    assert "lorad-probe: flat at step 3000 (change over steps 2400–3000 -0.1 against an evaluation noise of 0.5)" in text
    assert "Not finished (cut for time): lorad-probe seed 4." in text
    moving = curves_for(0.002, alone)  # 1.2 over the last 600 steps: more than the noise
    assert moving["flat"] == [] and "lorad-probe: still moving at step 3000" in "\n".join(
        comparison.plateau_lines(moving))
    assert comparison.plateau_lines(comparison.plateau_numbers({})) == []


def test_the_verdicts_at_the_plateau_compare_full_fine_tuning_at_its_flat_length_and_leave_restarts_out_of_the_change():
    plateau, long = comparison.PLATEAU, comparison.LONG
    spec = dataclasses.replace(comparison.BUDGET, students=("lorad-probe", "lorad-uniform"))
    curves = []
    for seed in range(5):
        probe = comparison.BY_LABEL["lorad-probe"].run_names()[seed]
        uniform = comparison.BY_LABEL["lorad-uniform"].run_names()[seed]
        full = comparison.BY_LABEL["full"].run_names()[seed]
        _scored(curves, probe, long, 50.0 + seed, noise_sets=True)
        _scored(curves, probe, plateau, 40.0 + seed, noise_sets=True)
        _scored(curves, uniform, long, 60.0, noise_sets=True)  # the earlier runs' score: left out of the change
        _scored(curves, uniform, plateau, 50.0 + seed, noise_sets=True)
        _scored(curves, full, long, 30.0 + seed, noise_sets=True)  # flat there: enters at LONG
        _scored(curves, full, plateau, 99.0, noise_sets=True)  # never read: full is compared at LONG
    restarts = [{"name": name, "recorded_through": long}
                for name in comparison.BY_LABEL["lorad-uniform"].run_names().values()]
    out = comparison.plateau_numbers(comparison.index(curves), {("lorad-probe", "lorad-uniform"): "A better"},
                                     restarts, spec=spec)
    pairs = {(p["a"], p["b"]): p for p in out["pairs"]}
    assert set(pairs) == {("lorad-probe", "lorad-uniform"), ("lorad-probe", "full"), ("lorad-uniform", "full")}
    assert pairs[("lorad-probe", "lorad-uniform")]["metrics"]["fd_features"]["d"] == pytest.approx(-10.0)
    assert pairs[("lorad-probe", "lorad-uniform")]["earlier"] == "lorad-probe better in quality"
    assert pairs[("lorad-probe", "full")]["metrics"]["fd_features"]["d"] == pytest.approx(10.0)  # 42 against 32
    assert pairs[("lorad-uniform", "full")]["quality"] == "B better"
    change = {c["label"]: c for c in out["changes"]}
    assert change["lorad-probe"]["before"] == pytest.approx(52.0) and change["lorad-probe"]["after"] == pytest.approx(42.0)
    assert change["lorad-uniform"]["seeds"] == [] and change["lorad-uniform"]["restarted"] == [0, 1, 2, 3, 4]
    text = "\n".join(comparison.plateau_lines(out))
    assert ("- lorad-uniform: not read at step 3000 (change over steps 2400–3000 – against an evaluation noise of "
            "0.5); no change from 2000 read (every seed trained again from step 0).") in text  # two scored steps
    assert "lorad-uniform seeds 0,1,2,3,4" in text and "| full (at 2000) |" in text
    assert "- **full is better in quality than lorad-uniform**" in text


def test_a_seed_not_every_student_reached_at_the_plateau_is_cut_for_all_of_them():
    plateau = comparison.PLATEAU
    curves = []
    for label in comparison.BUDGET.students:
        for seed, name in comparison.BY_LABEL[label].run_names().items():
            if seed < 4 or label == "lorad-probe":  # only lorad-probe reached PLATEAU at seed 4
                _scored(curves, name, plateau, 40.0 + seed, noise_sets=True)
    out = comparison.plateau_numbers(comparison.index(curves))
    assert {n["label"]: n["seeds"] for n in out["students"]} == {label: [0, 1, 2, 3]
                                                                for label in comparison.BUDGET.students}
    assert out["cut_alike"] == {"lorad-probe": [4]}
    text = "\n".join(comparison.plateau_lines(out))
    assert ("Not finished (cut for time): lorad-uniform seed 4; lora-peft seed 4; dora-peft seed 4. Finished but left "
            "out, as the seeds above are cut for every student alike (declared): lorad-probe seed 4.") in text


def test_each_longer_length_is_read_against_the_one_before_once_every_student_has_three_seeds_there():
    long, plateau, further = comparison.LONG, comparison.PLATEAU, sorted(comparison.BUDGET.amendments)[1]
    assert plateau < further
    curves = []
    for label in comparison.BUDGET.students:
        for seed, name in comparison.BY_LABEL[label].run_names().items():
            _scored(curves, name, long, 60.0 + seed, noise_sets=True)
            _scored(curves, name, plateau, 50.0 + seed, noise_sets=True)
            if seed < 2 or label == "lorad-probe":  # two seeds a student at the further length: below the minimum
                _scored(curves, name, further, (45.0 if label == "lorad-probe" else 40.0) + seed, noise_sets=True)
    for seed, name in comparison.BY_LABEL["full"].run_names().items():
        _scored(curves, name, long, 55.0 + seed, noise_sets=True)
    rows = comparison.index(curves)
    long_pairs = [{"a": "lorad-probe", "b": "lora-peft", "quality": "B better"}]
    [at_plateau] = comparison.plateaus_read(rows, long_pairs, [])  # the further length waits for a third seed
    assert at_plateau["length"] == plateau and at_plateau["since"] == long
    pairs = {(p["a"], p["b"]): p for p in at_plateau["pairs"]}
    assert pairs[("lorad-probe", "lora-peft")]["earlier"] == "lora-peft better in quality"
    assert pairs[("lorad-probe", "lora-peft")]["quality"] == "no difference that matters"
    for label in comparison.BUDGET.students[1:]:  # a third seed for the others: the further length is read
        _scored(curves, comparison.BY_LABEL[label].run_names()[2], further, 42.0, noise_sets=True)
    # a restart recorded between LONG and PLATEAU leaves PLATEAU's change, not the further one's
    restarted = comparison.BY_LABEL["lora-peft"].run_names()[0]
    first, second = comparison.plateaus_read(comparison.index(curves), long_pairs,
                                             [{"name": restarted, "recorded_through": long}])
    assert (second["length"], second["since"], second["amendments"]) == (
        further, plateau, "the amendment of 2026-12-04 21:51 UTC")
    assert {n["label"]: n["seeds"] for n in second["students"]} == {
        label: [0, 1, 2] for label in comparison.BUDGET.students}
    assert second["cut_alike"] == {"lorad-probe": [3, 4]}
    change = {c["label"]: c for c in second["changes"]}
    assert change["lora-peft"]["seeds"] == [0, 1, 2] and change["lora-peft"]["change"] == pytest.approx(-10.0)
    assert {c["label"]: c["restarted"] for c in first["changes"]}["lora-peft"] == [0]
    pairs = {(p["a"], p["b"]): p for p in second["pairs"]}
    assert pairs[("lorad-probe", "lora-peft")]["metrics"]["fd_features"]["d"] == pytest.approx(5.0)
    assert pairs[("lorad-probe", "lora-peft")]["earlier"] == "no difference that matters"
    assert pairs[("lorad-probe", "full")]["metrics"]["fd_features"]["d"] == pytest.approx(46.0 - 56.0)
    text = "\n".join(comparison.plateau_lines(second))
    assert text.startswith(f"### The budget's students at {further} steps (the amendment of 2026-12-04 21:51 UTC)")
    assert f"the change from step {plateau} is read on the runs not trained again in between." in text
    assert f"(at {plateau}: no difference that matters)" in text and f"| full (at {long}) |" in text


def test_past_the_length_where_a_student_was_flat_it_enters_with_its_scores_there_and_only_the_others_are_cut_alike():
    further, next_length = sorted(comparison.BUDGET.amendments)[1:3]
    assert comparison.BUDGET.flat_at["lora-peft"] == comparison.BUDGET.flat_at["dora-peft"] == further
    curves = []
    for label in comparison.BUDGET.students:
        for seed, name in comparison.BY_LABEL[label].run_names().items():
            _scored(curves, name, further, 40.0 + seed, noise_sets=True)
            if label.startswith("lorad") and (seed < 4 or label == "lorad-probe"):
                _scored(curves, name, next_length, 30.0 + seed, noise_sets=True)
    for seed, name in comparison.BY_LABEL["full"].run_names().items():
        _scored(curves, name, comparison.LONG, 50.0, noise_sets=True)
    rows = comparison.index(curves)
    out = comparison.plateau_numbers(rows, {("lorad-probe", "lora-peft"): "mixed"}, [], next_length)
    assert out["continued"] == ["lorad-probe", "lorad-uniform"]
    assert out["entering"] == {"full": comparison.LONG, "lora-peft": further, "dora-peft": further}
    assert {n["label"]: n["seeds"] for n in out["students"]} == {"lorad-probe": [0, 1, 2, 3], "lorad-uniform": [0, 1, 2, 3]}
    assert out["cut_alike"] == {"lorad-probe": [4]}  # lora-peft and dora-peft are not continued: nothing to cut there
    pairs = {(p["a"], p["b"]): p for p in out["pairs"]}
    assert pairs[("lorad-probe", "lora-peft")]["seeds"] == [0, 1, 2, 3]  # lora-peft's seed 4 waits for the probe's
    assert pairs[("lorad-probe", "lora-peft")]["metrics"]["fd_features"]["d"] == pytest.approx(-10.0)  # 31.5 vs 41.5
    assert pairs[("lorad-probe", "lora-peft")]["earlier"] == "mixed"
    assert pairs[("lorad-uniform", "full")]["metrics"]["fd_features"]["d"] == pytest.approx(31.5 - 50.0)
    text = "\n".join(comparison.plateau_lines(out))
    assert (f"Entering with their scores at the length where their curves were read flat: full at {comparison.LONG}, "
            f"lora-peft at {further}, dora-peft at {further} (full was declared flat at") in text
    assert f"| lora-peft (at {further}) |" in text and "Not finished (cut for time): lorad-uniform seed 4." in text
    read = comparison.plateaus_read(rows, [], [])
    assert [(p["length"], p["since"]) for p in read] == [(further, comparison.PLATEAU), (next_length, further)]
    assert read[1]["pairs"][0]["earlier"] == "no difference that matters"  # the same scores at 4000: d 0 ± 1
    assert out["since"] == further and comparison.length_before(comparison.PLATEAU) == comparison.LONG
    # nothing at `further` for the continued students here: their change is not read, for want of scores
    assert f"lorad-probe: not read at step {next_length}" in text and f"(no scores at {further})" not in text
    assert out["entering_state"] == {"full": "not read", "lora-peft": "not read", "dora-peft": "not read"}
    assert f"(lora-peft was declared flat at {further} but reads not read there)" in text


def test_a_restart_counts_for_the_stretch_it_splices_and_the_answer_is_the_first_length_where_all_are_flat():
    restarts = [{"name": "a", "recorded_through": comparison.PLATEAU}, {"name": "b", "recorded_through": 4000}]
    assert comparison.restarted_between(restarts, comparison.LONG, comparison.PLATEAU) == frozenset()
    assert comparison.restarted_between(restarts, comparison.PLATEAU, 4000) == frozenset({"a"})

    def plateau(length, flat, entering_state):
        return {"length": length, "students": [{"label": "x", "fd_features": {"sd": 1.0, "n": 5}},
                                               {"label": "y", "fd_features": {"sd": 4.0, "n": 3}}], "flat": flat,
                "entering_state": entering_state, "entering_students": [],
                "pairs": [{"a": "x", "b": "y", "quality": "A better", "seeds": [0, 1, 2], "sentence": "s",
                           "metrics": {"fd_features": {"verdict": "A better"}, "fd_pixel": {"verdict": "B better"},
                                       "recall": {"verdict": "cannot tell at this size"}}}]}

    assert comparison.longer_answer([]) is None and comparison.answer_lines(None) == []
    read = [plateau(4000, ["x"], {"full": "flat"}), plateau(5000, ["x", "y"], {"full": "flat"}),
            plateau(6000, ["x", "y"], {"full": "flat"})]
    answer = comparison.longer_answer(read)
    assert (answer["length"], answer["all_flat"], answer["still_moving"]) == (5000, True, [])
    text = "\n".join(comparison.answer_lines(answer))
    assert "the first length read where every student is flat" in text
    assert ("- x vs y: x better in quality (feature FD ↓ x better; pixel FD ↓ y better; recall ↑ cannot tell at this "
            "size; seeds 0,1,2)") in text
    # the chi-square interval of an sd: 0.60–2.87 times it on 5 draws, 0.52–6.28 on 3
    assert ("Seed sd of feature FD (the target is at most 3 points): within 3: x 1.0 (0.6–2.9); above it: y 4.0 "
            "(2.1–25.1) (in brackets each sd's 95 % interval for its number of seeds).") in text
    answer = comparison.longer_answer([read[0], plateau(5000, ["x", "y"], {"full": "still moving"})])
    assert (answer["length"], answer["all_flat"], answer["still_moving"]) == (5000, False, ["full"])
    answer = comparison.longer_answer(read[:1])
    assert (answer["length"], answer["all_flat"], answer["still_moving"]) == (4000, False, ["y"])
    assert "the last length read; not every student is flat there (still moving or not read: y)" in "\n".join(
        comparison.answer_lines(answer))


def test_a_change_without_scores_at_the_length_before_says_so_not_that_the_runs_restarted():
    length = sorted(comparison.BUDGET.amendments)[2]
    curves = []
    for label in ("lorad-probe", "lorad-uniform"):
        for name in comparison.BY_LABEL[label].run_names().values():
            _scored(curves, name, length, 30.0, noise_sets=True)
    out = comparison.plateau_numbers(comparison.index(curves), length=length)
    text = "\n".join(comparison.plateau_lines(out))
    assert f"no change from {out['since']} read (no scores at {out['since']})" in text
    assert "trained again from step 0" not in text


def test_the_rank_4_trio_is_read_like_the_budget_with_its_own_pairs_and_answer():
    spec = comparison.RANK4
    assert [p[:2] for p in spec.pairs] == [("lorad-uniform r4", "lora-peft r4"), ("lorad-uniform r4", "dora-peft r4")]
    curves, restarts = [], []
    for label, base in zip(spec.students, (50.0, 60.0, 45.0)):
        for seed, name in comparison.BY_LABEL[label].run_names().items():
            _scored(curves, name, comparison.LONG, 70.0, noise_sets=True)  # the earlier runs, on another machine
            restarts.append({"name": name, "recorded_through": comparison.LONG})
            for step in range(2100, 3100, 100):  # the new runs past 2000: flat
                _scored(curves, name, step, base + seed, noise_sets=step == 3000)
    earlier = [{"a": "lorad-uniform r4", "b": "dora-peft r4", "quality": "B better"}]
    [at_3000] = comparison.plateaus_read(comparison.index(curves), earlier, restarts, spec)
    assert at_3000["title"] == "the rank-4 students" and at_3000["entering"] == {} and len(at_3000["flat"]) == 3
    assert all(c["seeds"] == [] and c["restarted"] == [0, 1, 2, 3, 4] for c in at_3000["changes"])
    pairs = {(p["a"], p["b"]): p for p in at_3000["pairs"]}
    assert pairs[("lorad-uniform r4", "lora-peft r4")]["quality"] == "A better"  # 52 against 62
    assert pairs[("lorad-uniform r4", "dora-peft r4")]["earlier"] == "dora-peft r4 better in quality"
    text = "\n".join(comparison.plateau_lines(at_3000))
    assert text.startswith("### The rank-4 students at 3000 steps (the amendment of 2026-12-04 23:11 UTC)")
    assert "no change from 2000 read (every seed trained again from step 0)" in text
    answer = comparison.longer_answer([at_3000], spec)
    assert (answer["length"], answer["all_flat"]) == (3000, True)
    assert comparison.answer_lines(answer)[0] == ("### The rank-4 answer (declared at 23:11 UTC: at step 3000, the "
                                                  "first length read where every student is flat)")
    # runs that went to 4000 in one stretch: no noise sets at 3000, so 3000 is not read and says why
    curves = []
    for label, base in zip(spec.students, (50.0, 60.0, 45.0)):
        for seed, name in comparison.BY_LABEL[label].run_names().items():
            _scored(curves, name, comparison.LONG, 70.0, noise_sets=True)
            for step in range(2100, 4100, 100):
                _scored(curves, name, step, base + seed, noise_sets=step == 4000)
    [at_4000] = comparison.plateaus_read(comparison.index(curves), earlier, restarts, spec)
    assert (at_4000["length"], at_4000["since"], at_4000["since_read"]) == (4000, 3000, False)
    assert all(c["seeds"] == [0, 1, 2, 3, 4] and c["change"] == 0.0 for c in at_4000["changes"])  # same trajectory
    text = "\n".join(comparison.plateau_lines(at_4000))
    assert "(the declared rule; in brackets the same pair's verdict at step 3000)" in text
    assert "(at 3000: not read)" in text and "Trained again from step 0" in text and "lora-peft r4 seeds 0,1,2,3,4" in text
    [unread] = comparison.unread_lines([at_4000], spec)
    assert unread.startswith("### The rank-4 students at 3000 steps (the amendment of 2026-12-04 23:11 UTC)\n\nNot read: "
                             "fewer than 3 seeds a student with the six noise sets at step 3000")
    assert comparison.unread_lines([], spec) == [] and comparison.unread_lines([at_3000], spec) == []
    # a group that follows others is unread at a length because they were not read there, not for want of seeds
    [unread] = comparison.unread_lines([{"length": 5000}], comparison.RANK_ABLATION)
    assert unread.endswith("Not read: not every group it follows (the rank-2 students, the rank-8 students) was read "
                           "at step 4000.\n")


def _curve(curves, label, seeds, end, fd, slope=0.0, start=comparison.LONG):
    """A run's rows every 100 steps from ``start`` to ``end`` (fd + slope per 1000 steps), noise sets at ``end``."""
    for seed in seeds:
        name = comparison.BY_LABEL[label].run_names()[seed]
        for step in range(start, end + 1, 100):
            _scored(curves, name, step, fd + seed + slope * (step - end) / 1000, noise_sets=step == end)


def test_the_rank_ablation_follows_the_rank_2_and_rank_8_reads_and_takes_r4_and_the_budget_rank_where_flat():
    # the trios as declared, before any student was read flat (their live flat_at records the real runs)
    spec, (rank2, rank8) = comparison.RANK_ABLATION, (dataclasses.replace(s, flat_at={}) for s in comparison.SMALL_RANKS)
    assert spec.follows == (rank2.title, rank8.title)
    first, second = sorted(spec.amendments)[:2]
    curves = []
    _curve(curves, "lorad-uniform r2", [0, 1, 2, 3], first, 60.0)  # seed 3: one its trio cuts (the others lack it)
    _curve(curves, "lora-peft r2", [0, 1, 2], first, 55.0)
    _curve(curves, "dora-peft r2", [0, 1, 2], first, 55.0)
    for label in rank8.students:  # rank 8 still moving at `first`, flat at `second`
        _curve(curves, label, range(5), first, 50.0, slope=-5.0)
        _curve(curves, label, range(5), second, 50.0, start=first + 100)
    _curve(curves, "lorad-uniform r4", range(5), spec.flat_at["lorad-uniform r4"], 45.0)
    _curve(curves, "lorad-uniform", range(5), spec.flat_at["lorad-uniform"], 35.0)
    rows = comparison.index(curves)
    reads = {s.title: comparison.plateaus_read(rows, [], [], s) for s in (rank2, rank8)}
    assert [p["length"] for p in reads[rank2.title]] == [first] and len(reads[rank8.title]) == 2
    at_first, at_second = comparison.followed_plateaus(rows, [], spec, reads)
    assert at_first["continued"] == ["lorad-uniform r2", "lorad-uniform r8"]
    r2 = {n["label"]: n for n in at_first["students"]}["lorad-uniform r2"]
    assert r2["seeds"] == [0, 1, 2] and at_first["cut_alike"] == {"lorad-uniform r2": [3]}  # the trio's cut
    assert at_first["flat"] == ["lorad-uniform r2"]  # r8 still moving, as its trio reads it
    assert at_first["entering"] == {"lorad-uniform r4": 4000, "lorad-uniform": 5000}
    d = {(p["a"], p["b"]): p["metrics"]["fd_features"]["d"] for p in at_first["pairs"]}
    assert d == pytest.approx({("lorad-uniform r2", "lorad-uniform r4"): 15.0,
                               ("lorad-uniform r4", "lorad-uniform r8"): -5.0,
                               ("lorad-uniform r8", "lorad-uniform"): 15.0})
    # at `second` rank 2 had settled (all flat at `first`): r2 enters with its scores there, r8 continues
    assert at_second["continued"] == ["lorad-uniform r8"] and at_second["entering"]["lorad-uniform r2"] == first
    assert at_second["since_read"] and {p["a"] for p in at_second["pairs"]} >= {"lorad-uniform r2"}
    answer = comparison.longer_answer([at_first, at_second], spec)
    assert answer["all_flat"] and answer["length"] == second
    assert comparison.answer_lines(answer)[0].startswith("### The rank-ablation answer (declared at 2026-12-05")
    # without rank 8 read, the ablation is not read at all
    assert comparison.followed_plateaus(rows, [], spec, {rank2.title: reads[rank2.title]}) == []


def test_the_second_read_averages_the_six_noise_sets_and_says_where_its_verdict_differs():
    spec, rows_of = comparison.RANK4, []
    for label, fd in zip(spec.students, (50.0, 45.0, 45.0)):
        _curve(rows_of, label, range(5), 3000, fd, start=2100)
    for seed, name in comparison.BY_LABEL["lorad-uniform r4"].run_names().items():
        # the deciding set scores 50 + seed, the five others 12 points lower: a six-set mean of 40 + seed
        rows_of.extend({"name": name, "step": 3000, "weights": comparison.WEIGHTS, "eval_seed": noise,
                        "fd_features": 38.0 + seed, "fd_pixel": 2.0, "recall": 0.4, "precision": 0.9,
                        "class_accuracy": 0.99} for noise in comparison.NOISE_SEEDS)
    for label in ("lora-peft r4", "dora-peft r4"):  # every set scores the same: no evaluation noise
        for seed, name in comparison.BY_LABEL[label].run_names().items():
            rows_of.extend({"name": name, "step": 3000, "weights": comparison.WEIGHTS, "eval_seed": noise,
                            "fd_features": 45.0 + seed, "fd_pixel": 2.0, "recall": 0.4, "precision": 0.9,
                            "class_accuracy": 0.99} for noise in comparison.NOISE_SEEDS)
    rows = comparison.index(rows_of)
    [at_3000] = comparison.plateaus_read(rows, [], [], spec)
    assert at_3000["lengths"] == {label: 3000 for label in spec.students}
    answer = comparison.longer_answer([at_3000], spec, rows)
    assert answer["pairs"][0]["quality"] == "B better"  # declared read: 50 + seed against 45 + seed
    assert answer["seed_sd"] == {label: (pytest.approx(math.sqrt(2.5)), 5) for label in spec.students}
    read = answer["six_sets"]
    lorad = next(n for n in read["students"] if n["label"] == "lorad-uniform r4")
    assert lorad["fd_features"]["mean"] == pytest.approx(42.0) and lorad["seeds"] == [0, 1, 2, 3, 4]
    # the sd of [12, 0, 0, 0, 0, 0] is √24; its six-set mean's, √24 / √6 = 2
    assert lorad["fd_features"]["eval_sd"] == pytest.approx(2.0)
    lora = next(n for n in read["students"] if n["label"] == "lora-peft r4")
    assert lora["fd_features"]["mean"] == pytest.approx(47.0) and lora["fd_features"]["eval_sd"] == 0.0
    first = read["pairs"][0]
    assert (first["quality"], first["declared"]) == ("A better", "lora-peft r4 better in quality")
    text = "\n".join(comparison.answer_lines(answer))
    assert ("Seed sd of feature FD (the target is at most 3 points): within 3: lorad-uniform r4 1.6 (0.9–4.5), "
            "lora-peft r4 1.6 (0.9–4.5), dora-peft r4 1.6 (0.9–4.5); above it: none (in brackets") in text
    assert "| lorad-uniform r4 | 3000 | 0,1,2,3,4 | 42.0 ± 1.6 | 2.000 ± 0.000 | 0.400 ± 0.000 | 2.0 |" in text
    assert ("- lorad-uniform r4 vs lora-peft r4: lorad-uniform r4 better in quality (feature FD ↓ lorad-uniform r4 "
            "better; pixel FD ↓ no difference that matters; recall ↑ no difference that matters; seeds 0,1,2,3,4): "
            "**not the declared read's quality verdict** (lora-peft r4 better in quality)") in text
    assert "Seed sd of feature FD on this read: within 3: lorad-uniform r4 1.6 (0.9–4.5)," in text
    # a run without all six sets has no second-read score (the declared read needs only the last of them)
    del rows[(comparison.BY_LABEL["lora-peft r4"].run_names()[0], 3000, comparison.WEIGHTS, comparison.NOISE_SEEDS[0])]
    six = comparison.student_numbers(comparison.BY_LABEL["lora-peft r4"], rows, 3000, six_sets=True)
    assert six["seeds"] == [1, 2, 3, 4]
