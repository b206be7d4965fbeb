"""The comparison's report: LoRaD against LoRA, DoRA and full fine-tuning on averaged weights (no training here).

Reads ``reports/digits_stability/curves.jsonl`` (Phase B of the stability study: full fine-tuning and LoRaD from
the probe; Phase C: the uniform adapters) and rewrites everything after the results marker of
``reports/digits_comparison.md`` (its declaration, made before the runs, stays as it stands), the plot
``reports/digits_comparison.png`` and ``reports/digits_comparison.json`` (every number in the report). The
learning-rate screen of LoRA and DoRA (declared in the report's amendment) is read from
``reports/digits_lr_screen/curves.jsonl`` when it exists.

    python benchmarks/digits_comparison_report.py
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _study import replace_results  # noqa: E402
from digits_ablations import RETRAIN_OUT  # noqa: E402 - where its retrained runs write
from digits_stability import (  # noqa: E402 - the driver's own constants, one definition
    B_SEEDS, B_STEPS, CURVES, EVAL_SEED, METHODS, NOISE_SEEDS, RESTARTS, ROOT, noise_set_summary, queue,
    read_curves, tail_change,
)

REPORTS = Path(os.environ.get("WADI_COMPARISON_REPORTS", ROOT / "reports"))
REPORT, PLOT, SUMMARY = (REPORTS / f"digits_comparison.{ext}" for ext in ("md", "png", "json"))
LONG_PLOT = REPORTS / "digits_comparison_longer.png"  # each group to the furthest length it was read at
MARKER = "<!-- results: everything below is written by benchmarks/digits_comparison_report.py -->"
LENGTH = B_STEPS["lorad-probe"]
WEIGHTS = "ema-p2/3"  # the default final/ weights (declared); raw is shown for the record
METRICS = ("fd_features", "fd_pixel", "recall", "precision", "class_accuracy")
VERDICT_METRICS = ("fd_features", "fd_pixel", "recall")
LOWER = {"fd_features", "fd_pixel"}
SMALLEST = {"fd_features": 5.0, "fd_pixel": 0.10, "recall": 0.05}  # declared before the runs
TITLE = {"fd_features": "feature FD ↓", "fd_pixel": "pixel FD ↓", "recall": "recall ↑", "precision": "precision ↑",
         "class_accuracy": "class acc. ↑"}
DIGITS = {"fd_features": 1, "fd_pixel": 3, "recall": 3, "precision": 3, "class_accuracy": 3}
MIN_SEEDS = 3  # a pair with fewer seeds a side gets no verdict (declared)
SEED_SD_TARGET = 3.0  # the stability target: the seed sd of feature FD at the final length (declared)
SCREEN_CURVES = ROOT / "reports" / "digits_lr_screen" / "curves.jsonl"
SCREEN_METHODS, SCREEN_RATES, SCREEN_SEED = ("lora-peft", "dora-peft"), (3e-4, 1e-3, 3e-3), 0  # declared


@dataclass(frozen=True)
class Student:
    """One student of the comparison: a label and the queue whose runs (one per seed) train it."""

    label: str
    queue: str
    params: int
    group: str  # one of GROUPS

    def run_names(self) -> dict[int, str]:
        return {run.seed: run.name for run in queue(self.queue)}


STUDENTS = (
    Student("full", "B:full:2e-05:5", 983_713, "budget"),
    Student("lorad-probe", "B:lorad-probe:0.001:1", 98_048, "budget"),
    Student("lorad-uniform", "C:lorad-uniform", 95_424, "budget"),
    Student("lora-peft", "C:lora-peft", 97_504, "budget"),
    Student("dora-peft", "C:dora-peft", 102_272, "budget"),
    Student("lorad-uniform r4", "C:lorad-uniform:4", 27_264, "rank 4"),
    Student("lora-peft r4", "C:lora-peft:4", 35_456, "rank 4"),
    Student("dora-peft r4", "C:dora-peft:4", 40_224, "rank 4"),
    # ranks 2 and 8: declared in the amendment of 2026-12-03 09:11 UTC, before their runs
    Student("lorad-uniform r2", "C:lorad-uniform:2", 13_632, "rank 2"),
    Student("lora-peft r2", "C:lora-peft:2", 17_728, "rank 2"),
    Student("dora-peft r2", "C:dora-peft:2", 22_496, "rank 2"),
    Student("lorad-uniform r8", "C:lorad-uniform:8", 54_528, "rank 8"),
    Student("lora-peft r8", "C:lora-peft:8", 70_912, "rank 8"),
    Student("dora-peft r8", "C:dora-peft:8", 75_680, "rank 8"),
)
GROUPS = ("budget", "rank 2", "rank 4", "rank 8")  # the plot's panels, in order
QUESTIONS = ("budget", "rank 2", "rank 4", "rank 8", "rank ablation")  # the verdicts' sections, in order
BY_LABEL = {s.label: s for s in STUDENTS}
PAIRS = (  # declared: (A, B, the question it answers)
    ("lorad-probe", "full", "budget"), ("lorad-probe", "lora-peft", "budget"), ("lorad-probe", "dora-peft", "budget"),
    ("lorad-probe", "lorad-uniform", "budget"), ("lorad-uniform", "lora-peft", "budget"),
    ("lorad-uniform", "dora-peft", "budget"),
    ("lorad-uniform r4", "lora-peft r4", "rank 4"), ("lorad-uniform r4", "dora-peft r4", "rank 4"),
    ("lorad-uniform r4", "lorad-uniform", "rank ablation"), ("lorad-uniform r4", "lorad-probe", "rank ablation"),
    # the amendment's pairs (ranks 2 and 8, and the rank ablation's neighbours)
    ("lorad-uniform r2", "lora-peft r2", "rank 2"), ("lorad-uniform r2", "dora-peft r2", "rank 2"),
    ("lorad-uniform r8", "lora-peft r8", "rank 8"), ("lorad-uniform r8", "dora-peft r8", "rank 8"),
    ("lorad-uniform r2", "lorad-uniform r4", "rank ablation"), ("lorad-uniform r4", "lorad-uniform r8", "rank ablation"),
    ("lorad-uniform r8", "lorad-uniform", "rank ablation"),
)
# the amendment of 2026-12-03 12:38 UTC: the budget and rank-4 uniform students continued to LONG steps, its pairs;
# then the amendment of 15:37 UTC: full fine-tuning and ranks 2 and 8 continued the same way, its pairs; then the
# amendment of 2026-12-04 19:40 UTC: LoRaD-from-the-probe trained again from step 0 to LONG, its pairs (8', 9')
LONG = 2000
LONG_AMENDMENTS = "the amendments of 2026-12-03 12:38 and 15:37 UTC and of 2026-12-04 19:40 UTC"
LONG_STUDENTS = ("full", "lorad-probe", "lorad-uniform", "lora-peft", "dora-peft", "lorad-uniform r2", "lora-peft r2", "dora-peft r2",
                 "lorad-uniform r4", "lora-peft r4", "dora-peft r4", "lorad-uniform r8", "lora-peft r8", "dora-peft r8")
LONG_PAIRS = (
    ("lorad-uniform", "lora-peft", "budget"), ("lorad-uniform", "dora-peft", "budget"),
    ("lorad-uniform r4", "lora-peft r4", "rank 4"), ("lorad-uniform r4", "dora-peft r4", "rank 4"),
    ("lorad-uniform r4", "lorad-uniform", "rank ablation"),
    ("lorad-uniform", "full", "budget"),
    ("lorad-uniform r2", "lora-peft r2", "rank 2"), ("lorad-uniform r2", "dora-peft r2", "rank 2"),
    ("lorad-uniform r8", "lora-peft r8", "rank 8"), ("lorad-uniform r8", "dora-peft r8", "rank 8"),
    ("lorad-uniform r2", "lorad-uniform r4", "rank ablation"), ("lorad-uniform r4", "lorad-uniform r8", "rank ablation"),
    ("lorad-uniform r8", "lorad-uniform", "rank ablation"),
    ("lorad-probe", "full", "budget"), ("lorad-probe", "lora-peft", "budget"), ("lorad-probe", "dora-peft", "budget"),
    ("lorad-probe", "lorad-uniform", "budget"), ("lorad-uniform r4", "lorad-probe", "rank ablation"),
)
# the same amendment of 2026-12-04 19:40 UTC: LoRaD-from-the-probe continued from LONG to PLATEAU steps (its curve's
# change over the last 20 % against the evaluation noise); the amendment of 19:48 UTC: the budget's uniform adapters
# trained to PLATEAU as well, and verdicts there (10'-12'), full fine-tuning entering with its scores at LONG (flat)
PLATEAU = 3000  # the first length students are read at past LONG


@dataclass(frozen=True)
class Longer:
    """Students read past ``LONG``, 1000 steps at a time, until their curves are flat, each length declared in an
    amendment before its runs: who is continued, the pairs read at each length, and where a student was read flat
    (not continued past it, it enters every longer length's verdicts with its scores there: each student at its
    plateau)."""

    title: str
    students: tuple[str, ...]
    pairs: tuple[tuple[str, str, str], ...]
    amendments: dict[int, str]  # length -> the amendments that declared it
    flat_at: dict[str, int]
    answer_declared: str  # when the rule "the first length where all are flat, else the last read" was declared
    # titles of the groups that continue this group's students: it is read at the lengths they were read at, each
    # student on the seeds and in the state its own group read it with (not cut again, not read alone)
    follows: tuple[str, ...] = ()


PLATEAU_MIN_SEEDS = 3  # a length is read once every continued student has this many seeds there (cut alike)
# the amendments of 2026-12-04 19:40 and 19:48 UTC: LoRaD-from-the-probe continued from LONG to PLATEAU, the budget's
# uniform adapters trained to PLATEAU as well, verdicts there (10'-12'); 21:51 UTC: the same runs continued to 4000;
# 22:46 UTC: the LoRaD students continued in 1000-step stretches while still moving (at most 7000)
BUDGET = Longer(
    title="the budget's students",
    students=("lorad-probe", "lorad-uniform", "lora-peft", "dora-peft"),
    pairs=(("lorad-probe", "lorad-uniform", "budget"), ("lorad-probe", "lora-peft", "budget"),
           ("lorad-probe", "dora-peft", "budget"), ("lorad-uniform", "lora-peft", "budget"),
           ("lorad-uniform", "dora-peft", "budget"), ("lorad-probe", "full", "budget"),
           ("lorad-uniform", "full", "budget")),
    amendments={PLATEAU: "the amendments of 2026-12-04 19:40 and 19:48 UTC",
                4000: "the amendment of 2026-12-04 21:51 UTC",
                **{length: "the amendment of 2026-12-04 22:46 UTC" for length in (5000, 6000, 7000)}},
    flat_at={"full": LONG, "lora-peft": 4000, "dora-peft": 4000},
    answer_declared="22:46 UTC")
# the amendment of 2026-12-04 23:11 UTC: the rank-4 trio trained again from step 0 to 4000, then in 1000-step
# stretches while any is still moving (at most 6000)
RANK4 = Longer(
    title="the rank-4 students",
    students=("lorad-uniform r4", "lora-peft r4", "dora-peft r4"),
    pairs=(("lorad-uniform r4", "lora-peft r4", "rank 4"), ("lorad-uniform r4", "dora-peft r4", "rank 4")),
    amendments={length: "the amendment of 2026-12-04 23:11 UTC" for length in (3000, 4000, 5000, 6000)},
    flat_at={"lorad-uniform r4": 4000},  # read at 4000 on seeds 0-4: LoRA r4 and DoRA r4 still moving there
    answer_declared="23:11 UTC")
# the amendment of 2026-12-05 01:18 UTC: the rank-2 and rank-8 trios trained the same way (seeds 3 and 4 from their
# 2000-step checkpoints, seeds 0-2 again from step 0) to 4000, then in 1000-step stretches while any is still moving
# where each small-rank student was read flat, on seeds 0-4: rank 2 DoRA at 4000, LoRA at 5000, LoRaD at 6000 (the
# last length); rank 8 LoRaD and LoRA at 4000, DoRA at 6000 (the last length)
SMALL_RANKS_FLAT_AT = {2: {"dora-peft r2": 4000, "lora-peft r2": 5000},
                       8: {"lorad-uniform r8": 4000, "lora-peft r8": 4000}}
SMALL_RANKS = tuple(
    Longer(title=f"the rank-{rank} students",
           students=(f"lorad-uniform r{rank}", f"lora-peft r{rank}", f"dora-peft r{rank}"),
           pairs=((f"lorad-uniform r{rank}", f"lora-peft r{rank}", f"rank {rank}"),
                  (f"lorad-uniform r{rank}", f"dora-peft r{rank}", f"rank {rank}")),
           amendments={length: "the amendment of 2026-12-05 01:18 UTC" for length in (4000, 5000, 6000)},
           flat_at=SMALL_RANKS_FLAT_AT[rank],
           answer_declared="2026-12-05 01:18 UTC")
    for rank in SMALL_RANKS_FLAT_AT)
# the amendment of 2026-12-05 01:26 UTC: the rank ablation's neighbours (7') read at the same lengths, r4 and the
# budget's rank entering with their flat scores
RANK_ABLATION = Longer(
    title="the rank-ablation students",
    students=("lorad-uniform r2", "lorad-uniform r8"),
    pairs=(("lorad-uniform r2", "lorad-uniform r4", "rank ablation"),
           ("lorad-uniform r4", "lorad-uniform r8", "rank ablation"),
           ("lorad-uniform r8", "lorad-uniform", "rank ablation")),
    amendments={length: "the amendments of 2026-12-05 01:18 and 01:26 UTC" for length in (4000, 5000, 6000)},
    flat_at={"lorad-uniform r4": 4000, "lorad-uniform": 5000},
    answer_declared="2026-12-05 01:26 UTC",
    follows=tuple(spec.title for spec in SMALL_RANKS))
LONGER = (BUDGET, RANK4, *SMALL_RANKS, RANK_ABLATION)
# runs the ablation study trained again from step 0 (reports/digits_ablations.md): past LENGTH they continue those
# draws, not the runs scored up to LENGTH, so a change across LENGTH is read on the other seeds only
RETRAIN_CURVES = RETRAIN_OUT / "curves.jsonl"


# ------------------------------------------------------------------------------------------------ numbers


def sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def fmt(value: float | None, metric: str, extra: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{DIGITS[metric] + extra}f}"


def index(rows: list[dict[str, Any]]) -> dict[tuple[str, int, str, int], dict[str, Any]]:
    """(run name, step, weights, noise seed) -> row (the last written, should a step have been scored twice)."""
    return {(r["name"], r["step"], r["weights"], r.get("eval_seed", EVAL_SEED)): r for r in rows}


def seconds_per_step(rows: dict, name: str, length: int) -> float | None:
    """Training seconds per step over the last stretch of a run's clock before ``length``: a resumed run restarts
    its clock (``train_s``), so the cost comes from the scored steps since the last restart."""
    clock = sorted((step, r["train_s"]) for (n, step, w, e), r in rows.items()
                   if n == name and w == WEIGHTS and e == EVAL_SEED and step <= length and r.get("train_s") is not None)
    if not clock or clock[-1][0] != length:
        return None
    first = len(clock) - 1
    while first > 0 and clock[first - 1][1] < clock[first][1]:
        first -= 1
    if first == 0:  # one clock from the start: its first scored step began at 0 seconds
        return clock[-1][1] / length
    (s0, t0), (s1, t1) = clock[first], clock[-1]
    return (t1 - t0) / (s1 - s0) if s1 > s0 else None


def student_numbers(student: Student, rows: dict, length: int = LENGTH,
                    seeds: set[int] | None = None, six_sets: bool = False) -> dict[str, Any]:
    """Per seed that reached ``length`` with its noise sets (of ``seeds`` when given): the averaged and raw scores,
    the evaluation noise (sd over the 6 noise sets), the seconds per training step; and the seed-mean curve of the
    averaged weights up to ``length``. ``six_sets``: each averaged score is the mean over the six noise sets (12,000
    images) and its evaluation noise that mean's, the sets' sd / √6 (the second read, declared at 2026-12-05 07:15
    UTC); the curve stays the deciding set's."""
    per_seed: dict[int, dict[str, Any]] = {}
    for seed, name in student.run_names().items():
        if (name, length, WEIGHTS, NOISE_SEEDS[-1]) not in rows or (seeds is not None and seed not in seeds):
            continue
        raw = rows.get((name, length, "raw", EVAL_SEED))
        sets = [rows[(name, length, WEIGHTS, s)] for s in (EVAL_SEED, *NOISE_SEEDS) if (name, length, WEIGHTS, s) in rows]
        if six_sets and len(sets) < 1 + len(NOISE_SEEDS):
            continue
        main = ({m: statistics.fmean(r[m] for r in sets) for m in METRICS} if six_sets
                else rows[(name, length, WEIGHTS, EVAL_SEED)])
        per_set = math.sqrt(len(sets)) if six_sets else 1.0  # the sd of a mean of the sets is theirs / √(count)
        per_seed[seed] = {
            "run": name,
            **{m: main[m] for m in METRICS},
            **{f"raw_{m}": (raw[m] if raw else None) for m in METRICS},
            **{f"{m}_eval_sd": sd([r[m] for r in sets]) / per_set for m in VERDICT_METRICS},
            "s_per_step": seconds_per_step(rows, name, length),
            "cpu": rows[(name, length, WEIGHTS, EVAL_SEED)].get("cpu"),
        }
    seeds = sorted(per_seed)
    out: dict[str, Any] = {"label": student.label, "params": student.params, "group": student.group, "seeds": seeds,
                           "per_seed": per_seed}
    for m in METRICS:
        values = [per_seed[s][m] for s in seeds]
        raw = [per_seed[s][f"raw_{m}"] for s in seeds if per_seed[s][f"raw_{m}"] is not None]
        out[m] = {"mean": statistics.fmean(values) if values else float("nan"), "sd": sd(values), "n": len(values),
                  "values": values, "raw_mean": statistics.fmean(raw) if raw else float("nan"), "raw_sd": sd(raw)}
    for m in VERDICT_METRICS:  # evaluation noise: RMS over the seeds of the per-run sd over noise sets
        sds = [per_seed[s][f"{m}_eval_sd"] for s in seeds if not math.isnan(per_seed[s][f"{m}_eval_sd"])]
        out[m]["eval_sd"] = math.sqrt(sum(x * x for x in sds) / len(sds)) if sds else float("nan")
    # the seed-mean curve of the averaged weights' feature FD (steps every seed has), and its change over the
    # last 20 % (the stability study's plateau rule, reported against the evaluation noise)
    names = [per_seed[s]["run"] for s in seeds]
    points: dict[int, list[float]] = {}
    for (name, step, weights, eval_seed), r in rows.items():  # one row per (run, step): a resumed run may re-score
        if name in names and weights == WEIGHTS and eval_seed == EVAL_SEED:
            points.setdefault(step, []).append(r["fd_features"])
    steps = sorted(s for s, v in points.items() if len(v) == len(names) and s <= length)
    out["curve"] = {"steps": steps, "fd_features": [statistics.fmean(points[s]) for s in steps]}
    out["tail_change"] = tail_change(steps, out["curve"]["fd_features"]) if len(steps) >= 3 else float("nan")
    secs = [per_seed[s]["s_per_step"] for s in seeds if per_seed[s]["s_per_step"]]
    out["s_per_step"] = statistics.fmean(secs) if secs else float("nan")
    return out


def verdict(a: dict[str, Any], b: dict[str, Any], metric: str) -> dict[str, Any]:
    """The declared rule on one metric: d = mean(A) − mean(B), SE = √(s_A²/n_A + s_B²/n_B)."""
    na, nb = a[metric]["n"], b[metric]["n"]
    if min(na, nb) < MIN_SEEDS:
        return {"verdict": "too few seeds", "d": float("nan"), "se": float("nan"), "n": (na, nb)}
    d = a[metric]["mean"] - b[metric]["mean"]
    se = math.sqrt(a[metric]["sd"] ** 2 / na + b[metric]["sd"] ** 2 / nb)
    return {"verdict": rule(d, se, metric), "d": d, "se": se, "n": (na, nb)}


def rule(d: float, se: float, metric: str) -> str:
    """The declared rule on a difference d = A − B with standard error ``se``: A or B better where |d| > 2 SE and
    |d| is at least the smallest effect, "no difference that matters" where |d| + 2 SE is within it."""
    smallest = SMALLEST[metric]
    if abs(d) > 2 * se and abs(d) >= smallest:
        return "A better" if (d < 0 if metric in LOWER else d > 0) else "B better"
    if abs(d) + 2 * se <= smallest:
        return "no difference that matters"
    return "cannot tell at this size"


def quality(per_metric: dict[str, dict[str, Any]]) -> str:
    """Better in quality: better on feature FD and not worse on pixel FD or recall (declared)."""
    main = per_metric["fd_features"]["verdict"]
    for side, other in (("A better", "B better"), ("B better", "A better")):
        if main == side and all(per_metric[m]["verdict"] != other for m in ("fd_pixel", "recall")):
            return side
    return main if main in ("no difference that matters", "cannot tell at this size", "too few seeds") else "mixed"


# ------------------------------------------------------------------------------------------------ the report


def machine(numbers: list[dict[str, Any]]) -> str:
    import platform

    import torch

    cpus = sorted({ps["cpu"] or "not recorded" for n in numbers for ps in n["per_seed"].values()})
    return (f"2-core VMs shared with other jobs, CPUs {', '.join(cpus)}; this report written with Python "
            f"{platform.python_version()}, torch {torch.__version__}; one torch thread per run, two runs at a time")


def students_table(numbers: list[dict[str, Any]]) -> list[str]:
    lines = ["| student | trainable params | seeds | " + " | ".join(TITLE[m] for m in METRICS)
             + " | raw: feature FD | eval noise (feature FD) | change over last 20 % | s / step |",
             "|---|---:|---|" + "---:|" * (len(METRICS) + 4)]
    for n in numbers:
        cells = [f"{fmt(n[m]['mean'], m)} ± {fmt(n[m]['sd'], m)}" if n[m]["n"] else "–" for m in METRICS]
        raw = n["fd_features"]
        speed = "–" if math.isnan(n["s_per_step"]) else f"{n['s_per_step']:.2f}"
        lines.append(f"| {n['label']} | {n['params']:,} | {','.join(map(str, n['seeds'])) or '–'} | "
                     + " | ".join(cells)
                     + f" | {fmt(raw['raw_mean'], 'fd_features')} ± {fmt(raw['raw_sd'], 'fd_features')}"
                     + f" | {fmt(raw.get('eval_sd'), 'fd_features')} | {fmt(n['tail_change'], 'fd_features')}"
                     + f" | {speed} |")
    return lines


def named(metric_verdict: str, a: str, b: str) -> str:
    """A per-metric verdict with the students named ("A better" -> "<a> better")."""
    return metric_verdict.replace("A better", a + " better").replace("B better", b + " better")


def verdict_sentence(a: str, b: str, per_metric: dict[str, dict[str, Any]]) -> str:
    q = quality(per_metric)
    f = per_metric["fd_features"]
    if q == "too few seeds":
        return f"**{a} vs {b}: no verdict** — fewer than {MIN_SEEDS} seeds a side ({f['n'][0]}, {f['n'][1]})."
    head = {"A better": f"**{a} is better in quality than {b}**",
            "B better": f"**{b} is better in quality than {a}**",
            "no difference that matters": f"**{a} and {b}: no difference that matters**",
            "cannot tell at this size": f"**{a} vs {b}: cannot tell on feature FD at this size**",
            "mixed": f"**{a} vs {b}: mixed** (the feature-FD winner is worse on another declared metric)"}[q]
    parts = []
    for m in VERDICT_METRICS:
        v = per_metric[m]
        parts.append(f"{TITLE[m]} d = {fmt(v['d'], m, 1)} ± {fmt(v['se'], m, 1)} (SE): {named(v['verdict'], a, b)}")
    return head + " — " + "; ".join(parts) + "."


def curves_panel(ax: Any, numbers: list[dict[str, Any]], group: str, title: str, colors: dict[str, Any],
                 references: tuple[str, ...] = ()) -> None:
    """One panel: the seed-mean feature-FD curves of ``group``'s students (and, dotted, of ``references``)."""
    for n in numbers:
        reference = n["label"] in references
        if (n["group"] == group or reference) and n["curve"]["steps"]:
            ax.plot(n["curve"]["steps"], n["curve"]["fd_features"], marker=".", color=colors[n["label"].split()[0]],
                    linestyle=":" if reference else "-", label=f"{n['label']} ({len(n['seeds'])} seeds)")
    ax.set_title(title)
    ax.set_xlabel("VSD step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot(numbers: list[dict[str, Any]], path: Path) -> None:
    """Top row: each group's seed-mean curves of the averaged weights' feature FD (the rank panels also show the
    budget's LoRaD students for reference). Bottom row: each declared metric at the length against the trainable
    parameters, one line per uniform adapter kind across its ranks, mean ± seed sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {k: plt.get_cmap("tab10")(i) for i, k in enumerate(METHODS)}  # one colour per kind of student
    fig, axes = plt.subplots(2, len(GROUPS), figsize=(4.2 * len(GROUPS), 8))
    for ax, group in zip(axes[0], GROUPS):
        references = () if group == "budget" else ("lorad-uniform", "lorad-probe")
        curves_panel(ax, numbers, group, f"{group}: {WEIGHTS}, seed mean", colors, references)
    axes[0][0].set_ylabel("feature FD (2000 images, noise base 1000)")
    for ax, metric in zip(axes[1], VERDICT_METRICS):
        for kind in METHODS:
            done = sorted((n["params"], n[metric]["mean"], n[metric]["sd"]) for n in numbers
                          if n["label"].split()[0] == kind and n[metric]["n"])
            if done:
                xs, ys, es = zip(*done)
                ax.errorbar(xs, ys, yerr=[0 if math.isnan(e) else e for e in es], marker="o", capsize=3,
                            color=colors[kind], label=kind)
        ax.set_xscale("log")
        ax.set_title(f"{TITLE[metric]} at step {LENGTH} against size")
        ax.set_xlabel("trainable parameters")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[1][len(VERDICT_METRICS):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def screen_numbers(rows: dict) -> dict[str, dict[float, dict[str, tuple[float, float]] | None]]:
    """method -> lr -> metric -> (mean, sd) over the six noise sets of the seed-0 run at the length (None: not
    finished). ``rows``: :func:`index` of the study's and the screen's curves together."""
    out: dict[str, dict[float, Any]] = {}
    for method in SCREEN_METHODS:
        for lr in SCREEN_RATES:
            name = f"{method}-lr{lr:g}-f1-s{SCREEN_SEED}"
            sets = [rows[key] for key in ((name, LENGTH, WEIGHTS, s) for s in (EVAL_SEED, *NOISE_SEEDS)) if key in rows]
            out.setdefault(method, {})[lr] = noise_set_summary(sets, METRICS)
    return out


def screen_verdict(rate: dict[str, tuple[float, float]], base: dict[str, tuple[float, float]]) -> str:
    """The declared screen rule against the lr-1e-3 run: feature FD lower by more than its smallest effect, pixel FD
    not higher by more than its smallest effect, recall not lower by more than its smallest effect."""
    delta = {m: rate[m][0] - base[m][0] for m in VERDICT_METRICS}
    better = (-delta["fd_features"] > SMALLEST["fd_features"] and delta["fd_pixel"] <= SMALLEST["fd_pixel"]
              and -delta["recall"] <= SMALLEST["recall"])
    deltas = ", ".join(f"{TITLE[m][:-2]} {delta[m]:+.{DIGITS[m]}f}" for m in VERDICT_METRICS)
    return ("**better for this adapter**" if better else "not better") + f" ({deltas})"


def screen_lines(numbers: dict[str, dict[float, Any]]) -> list[str]:
    """The learning-rate screen's section (empty when none of its runs has finished)."""
    if not any(v is not None for by_rate in numbers.values() for lr, v in by_rate.items() if lr != 1e-3):
        return []
    lines = ["### Learning-rate screen of LoRA and DoRA (the declared cut, run later; one seed)", "",
             f"Seed {SCREEN_SEED}, the `{WEIGHTS}` weights at step {LENGTH}, mean ± sd over the six noise sets "
             "(the evaluation noise); lr 1e-3 is the comparison's own seed-0 run. Written from "
             f"`{_shown(SCREEN_CURVES)}` and `{_shown(CURVES)}`.", "",
             "| student | lr | " + " | ".join(TITLE[m] for m in METRICS) + " | against lr 1e-3 |",
             "|---|---:|" + "---:|" * len(METRICS) + "---|"]
    for method, by_rate in numbers.items():
        base = by_rate.get(1e-3)
        for lr, scores in by_rate.items():
            if scores is None:
                lines.append(f"| {method} | {lr:g} | " + " | ".join(["not finished", *[""] * len(METRICS)]) + " |")
                continue
            cells = [f"{fmt(scores[m][0], m)} ± {fmt(scores[m][1], m)}" for m in METRICS]
            against = "–" if lr == 1e-3 or base is None else screen_verdict(scores, base)
            lines.append(f"| {method} | {lr:g} | " + " | ".join(cells) + f" | {against} |")
    lines += ["", "Rule (declared): a rate is better for an adapter if it lowers feature FD by more than "
              f"{SMALLEST['fd_features']:g} without raising pixel FD by more than {SMALLEST['fd_pixel']:g} or "
              f"lowering recall by more than {SMALLEST['recall']:g}; one seed, so a screen, not a verdict.", ""]
    return lines


def readable(quality_verdict: str | None, a: str, b: str) -> str | None:
    """A pair's quality verdict with the students named ("A better" -> "<a> better in quality")."""
    if quality_verdict in ("A better", "B better"):
        return f"{a if quality_verdict == 'A better' else b} better in quality"
    return quality_verdict


def curve_state(n: dict[str, Any]) -> str:
    """"flat", "still moving" or "not read": the seed-mean curve's change over its last 20 % against the student's
    evaluation noise (the stability study's plateau rule)."""
    noise = n["fd_features"].get("eval_sd", float("nan"))
    if math.isnan(n["tail_change"]) or math.isnan(noise):
        return "not read"
    return "still moving" if abs(n["tail_change"]) > noise else "flat"


def declared_verdicts(declared: tuple[tuple[str, str, str], ...], by: dict[str, dict[str, Any]],
                      numbers_of: Any, earlier: dict[tuple[str, str], str] | None = None) -> list[dict[str, Any]]:
    """The verdicts of the ``declared`` pairs whose two students are in ``by``, each on the seeds both sides have
    (``numbers_of(label, seeds)`` gives a student's numbers on them), with the same pair's verdict at the earlier
    length beside it (``earlier``: (A, B) -> quality there)."""
    pairs = []
    for a, b, question in declared:
        if a not in by or b not in by:
            continue
        common = set(by[a]["seeds"]) & set(by[b]["seeds"])  # a pair compares the same seeds a side (declared)
        per_metric = {m: verdict(numbers_of(a, common), numbers_of(b, common), m) for m in VERDICT_METRICS}
        pairs.append({"a": a, "b": b, "question": question, "quality": quality(per_metric), "metrics": per_metric,
                      "seeds": sorted(common), "sentence": verdict_sentence(a, b, per_metric),
                      "earlier": readable((earlier or {}).get((a, b)), a, b)})
    return pairs


def change_across(rows: dict, label: str, start: int, end: int, seeds: set[int] | list[int] | None = None,
                  retrained: frozenset[str] = frozenset(), restarted: frozenset[str] = frozenset()) -> dict[str, Any]:
    """``label``'s averaged feature FD at ``start`` and at ``end`` (noise base 1000) on the seeds (of ``seeds`` when
    given) that reached ``end`` with their noise sets and continue the run scored at ``start`` (runs in
    ``retrained``, the ablation study's, and in ``restarted``, trained again from step 0 after ``start`` was scored,
    left out), and their mean change."""
    names = {s: n for s, n in BY_LABEL[label].run_names().items() if seeds is None or s in seeds}
    left_out = [seed for seed in sorted(names) if names[seed] in retrained]
    reached = [seed for seed in sorted(names) if seed not in left_out
               and (names[seed], end, WEIGHTS, NOISE_SEEDS[-1]) in rows]
    restarts = [seed for seed in reached if names[seed] in restarted]
    kept = [(seed, rows[(names[seed], start, WEIGHTS, EVAL_SEED)]["fd_features"],
             rows[(names[seed], end, WEIGHTS, EVAL_SEED)]["fd_features"])
            for seed in reached if seed not in restarts and (names[seed], start, WEIGHTS, EVAL_SEED) in rows]
    before, after = [k[1] for k in kept], [k[2] for k in kept]
    return {"label": label, "from": start, "to": end, "seeds": [k[0] for k in kept],
            "before": statistics.fmean(before) if kept else None, "after": statistics.fmean(after) if kept else None,
            "change": statistics.fmean(b - a for a, b in zip(before, after)) if kept else None,
            "left_out": left_out, "restarted": restarts}


def continued_numbers(rows: dict, at_length: dict[tuple[str, str], str],
                      retrained: frozenset[str] = frozenset(),
                      restarted: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The amendment's students at ``LONG`` steps, its pairs' verdicts there, and each pair's verdict at the
    comparison's length beside it (``at_length``: (A, B) -> quality at ``LENGTH``); ``retrained``: the run names
    the ablation study trained again from step 0, ``restarted``: those this study trained again from step 0 after
    their checkpoint was lost (``RESTARTS``); both are left out of the change across ``LENGTH``."""
    def numbers_of(label: str, seeds: set[int] | None = None) -> dict[str, Any]:
        return student_numbers(BY_LABEL[label], rows, LONG, seeds)

    numbers = [n for n in (numbers_of(label) for label in LONG_STUDENTS) if n["seeds"]]
    by = {n["label"]: n for n in numbers}
    return {"length": LONG, "students": numbers, "pairs": declared_verdicts(LONG_PAIRS, by, numbers_of, at_length),
            "still_moving": [n["label"] for n in numbers if curve_state(n) == "still moving"],
            "changes": [change_across(rows, label, LENGTH, LONG, None, retrained, restarted)
                        for label in LONG_STUDENTS if label in by]}


def seeds_text(seeds: list[int]) -> str:
    """"seed 3" or "seeds 0,1"."""
    return ("seed " if len(seeds) == 1 else "seeds ") + ",".join(map(str, seeds))


def continued_lines(continued: dict[str, Any]) -> list[str]:
    """The amendment's section: the students at ``LONG`` steps, whether they sit on a plateau, the verdicts."""
    lines = [f"### Continued to {LONG} steps ({LONG_AMENDMENTS})", ""]
    numbers = continued["students"]
    if not numbers:
        return [*lines, f"No run has reached step {LONG} with its noise sets yet.", ""]
    missing = [f"{label} seed {seed}" for label in LONG_STUDENTS for seed in B_SEEDS
               if seed not in next((n["seeds"] for n in numbers if n["label"] == label), [])]
    restarted = sorted({f"{c['label']} {seeds_text(c['restarted'])}" for c in continued["changes"] if c.get("restarted")})
    lines += [f"The same runs continued from their {LENGTH}-step checkpoints"
              + (f" (where a checkpoint was lost with its machine, the run was trained again from step 0 with the "
                 f"same seed and recipe, `{RESTARTS.name}`: " + "; ".join(restarted) + ")" if restarted else "")
              + f"; every score as above, at step {LONG}; "
              f"\"change over last 20 %\": what the line through the seed-mean curve moves over steps "
              f"{int(0.8 * LONG)}–{LONG}. s / step: the continued stretch's own clock.", "",
              "Not finished (cut for time): " + ("; ".join(missing) if missing else "nothing") + ".", ""]
    lines += students_table(numbers)
    lines += ["", f"**From step {LENGTH} to {LONG}** (`{WEIGHTS}` feature FD on noise base {EVAL_SEED}, mean over the "
              "seeds that continue the run scored at " + str(LENGTH) + "): "
              + "; ".join(f"{c['label']} {fmt(c['before'], 'fd_features')} → {fmt(c['after'], 'fd_features')} "
                          f"(seeds {','.join(map(str, c['seeds']))}"
                          + (f"; {seeds_text(c['left_out'])} left out: past {LENGTH} they continue the "
                             "ablation study's retrained draws, `reports/digits_ablations.md`" if c["left_out"] else "")
                          + (f"; {seeds_text(c['restarted'])} left out: trained again from step 0 on another machine, "
                             f"past {LENGTH} another trajectory (`{RESTARTS.name}`)" if c.get("restarted") else "")
                          + ")" for c in continued["changes"] if c["seeds"])
              + "".join(f"; {c['label']}: no change read ({seeds_text(c['restarted'])} trained again from step 0 on "
                        f"another machine, past {LENGTH} another trajectory)"
                        for c in continued["changes"] if not c["seeds"] and c.get("restarted")) + ".", ""]
    lines += ["Still moving at step " + str(LONG) + " (change over the last 20 % larger than the evaluation noise): "
              + (", ".join(continued["still_moving"]) or "none") + ".", "",
              f"![curves from step 0 to the furthest length each group was read at]({LONG_PLOT.name})", "", f"**Verdicts at step {LONG}** (the declared rule; "
              f"in brackets the same pair's verdict at step {LENGTH})", ""]
    for p in continued["pairs"]:
        lines.append(f"- {p['sentence']} Seeds {','.join(map(str, p['seeds'])) or 'none'} (at {LENGTH}: "
                     f"{p['earlier'] or 'not a declared pair there'})")
    return [*lines, ""]


def length_before(length: int, spec: Longer = BUDGET) -> int:
    """The length a plateau length is read against: the declared one before it, ``LONG`` for the first."""
    return max((other for other in spec.amendments if other < length), default=LONG)


def plateau_numbers(rows: dict, earlier: dict[tuple[str, str], str] | None = None,
                    restarts: Sequence[dict[str, Any]] = (), length: int = PLATEAU,
                    spec: Longer = BUDGET) -> dict[str, Any]:
    """``spec``'s students still continued at ``length`` steps (the seeds that reached it with their noise sets,
    cut for every one of them alike) and those flat at a shorter length (``spec.flat_at``), at that length, with their curve state
    there (declared flat: the report says so if it does not read flat); each continued one's curve state over its
    last 20 %, its change from the length before (runs ``restarts`` records between the two, trained again from
    step 0, left out), and the declared pairs' verdicts (``earlier``: (A, B) -> the same pair's quality there); the
    runs restarted anywhere past ``LONG`` are named, their curves past the restart being other runs'."""
    since = length_before(length, spec)
    restarted, trained_again = restarted_between(restarts, since, length), restarted_between(restarts, LONG, length)
    # a student the spec continues enters once it was read flat at a shorter length; one it does not continue
    # (read flat in another group) enters at every length with its scores where it was flat
    entering = {label: flat for label, flat in spec.flat_at.items() if flat < length or label not in spec.students}
    continued = [label for label in spec.students if label not in entering]

    def numbers_of(label: str, seeds: set[int] | None = None) -> dict[str, Any]:
        return student_numbers(BY_LABEL[label], rows, entering.get(label, length), seeds)

    # the last seeds are cut for every continued student alike (declared): a seed counts where all reached the length
    reached = {label: set(numbers_of(label)["seeds"]) for label in continued}
    alike = set.intersection(*reached.values()) if reached else set()
    cut_alike = {label: sorted(seeds - alike) for label, seeds in reached.items() if seeds - alike}
    numbers = [n for n in (numbers_of(label, alike) for label in continued) if n["seeds"]]
    by = {n["label"]: n for n in numbers}
    by.update({label: n for label in entering if (n := numbers_of(label))["seeds"]})
    return plateau_read(
        spec, length, continued, numbers, [by[label] for label in entering if label in by], entering,
        lengths={label: entering.get(label, length) for label in by},
        changes=[change_across(rows, n["label"], since, length, n["seeds"], restarted=restarted) for n in numbers],
        pairs=declared_verdicts(spec.pairs, by, numbers_of, earlier), cut_alike=cut_alike,
        trained_again={n["label"]: seeds for n in numbers if (seeds := [
            s for s in n["seeds"] if n["per_seed"][s]["run"] in trained_again])}, since_read=True)


def plateau_read(spec: Longer, length: int, continued: list[str], students: list[dict[str, Any]],
                 entering_students: list[dict[str, Any]], entering: dict[str, int], *, lengths: dict[str, int],
                 changes: list[dict[str, Any]], pairs: list[dict[str, Any]], cut_alike: dict[str, list[int]],
                 trained_again: dict[str, list[int]], since_read: bool) -> dict[str, Any]:
    """One group's read at one length, as ``plateau_lines``, ``longer_answer`` and the summary take it: the
    continued ``students`` at ``length``, the ``entering_students`` at their own lengths (``lengths``), each one's
    curve state there, the changes and the pairs' verdicts."""
    return {"title": spec.title, "length": length, "since": length_before(length, spec),
            "amendments": spec.amendments[length], "continued": continued, "lengths": lengths,
            "entering": entering, "students": students,
            "flat": [n["label"] for n in students if curve_state(n) == "flat"], "changes": changes,
            "pairs": pairs, "cut_alike": cut_alike, "entering_students": entering_students,
            "entering_state": {n["label"]: curve_state(n) for n in entering_students},
            "trained_again": trained_again, "since_read": since_read}


def sentence_start(text: str) -> str:
    """``text`` with its first letter capitalised (a group's title opening a heading; the rest kept as written)."""
    return text[:1].upper() + text[1:]


def entering_text(entering: dict[str, int]) -> str:
    """"full at 2000, lora-peft at 4000": the students that enter a length with their scores where they were flat."""
    return ", ".join(f"{label} at {flat}" for label, flat in entering.items())


def plateau_lines(plateau: dict[str, Any]) -> list[str]:
    """The section of one group's students at one plateau length (empty until a run reaches it with its noise
    sets)."""
    numbers = plateau["students"]
    if not numbers:
        return []
    length, since, entering = plateau["length"], plateau["since"], plateau["entering"]
    cut_alike = plateau["cut_alike"]
    missing = [f"{label} seed {seed}" for label in plateau["continued"] for seed in B_SEEDS
               if seed not in next((n["seeds"] for n in numbers if n["label"] == label), [])
               and seed not in cut_alike.get(label, [])]
    alike = [f"{label} {seeds_text(seeds)}" for label, seeds in cut_alike.items()]
    trained_again = [f"{label} {seeds_text(seeds)}" for label, seeds in plateau["trained_again"].items()]
    lines = [f"### {sentence_start(plateau['title'])} at {length} steps ({plateau['amendments']})", "",
             f"Every score as above, at step {length}; the change from step {since} is read on the runs not trained "
             "again in between"
             + (f". Trained again from step 0 after their checkpoints were lost (`{RESTARTS.name}`: up to the step "
                "recorded there the curves are the earlier runs', past it the new ones'): " + "; ".join(trained_again)
                if trained_again else "")
             + f". Entering with their scores at the length where their "
             f"curves were read flat: {entering_text(entering) or 'none'}"
             + "".join(f" ({label} was declared flat at {entering[label]} but reads {state} there)"
                       for label, state in plateau["entering_state"].items() if state != "flat")
             + f". \"change over last 20 %\": what the line "
             f"through the seed-mean curve moves over steps {int(0.8 * length)}–{length}.", "",
             "Not finished (cut for time): " + ("; ".join(missing) if missing else "nothing") + "."
             + (" Finished but left out, as the seeds above are cut for every student alike (declared): "
                + "; ".join(alike) + "." if alike else ""), ""]
    flat_ones = [{**n, "label": f"{n['label']} (at {entering[n['label']]})"}
                 for n in plateau["entering_students"]]
    lines += students_table(numbers + flat_ones)
    lines.append("")
    for n, c in zip(numbers, plateau["changes"]):
        noise = n["fd_features"].get("eval_sd", float("nan"))
        since_text = (f"; feature FD {fmt(c['before'], 'fd_features')} at step {since} → "
                      f"{fmt(c['after'], 'fd_features')} at {length} ({seeds_text(c['seeds'])})" if c["seeds"] else
                      f"; no change from {since} read (every seed trained again from step 0)" if c["restarted"] else
                      f"; no change from {since} read (no scores at {since})")
        lines.append(f"- {n['label']}: {curve_state(n)} at step {length} (change over steps {int(0.8 * length)}–"
                     f"{length} {fmt(n['tail_change'], 'fd_features')} against an evaluation noise of "
                     f"{fmt(noise, 'fd_features')}){since_text}.")
    if plateau["pairs"]:
        lines += ["", f"**Verdicts at step {length}** (the declared rule; "
                  + (f"{entering_text(entering)}; " if entering else "")
                  + f"in brackets the same pair's verdict at step {since})", ""]
        earlier = "not a declared pair there" if plateau["since_read"] else "not read"
        lines += [f"- {p['sentence']} Seeds {','.join(map(str, p['seeds'])) or 'none'} (at {since}: "
                  f"{p['earlier'] or earlier})" for p in plateau["pairs"]]
    return [*lines, ""]


def long_plot(numbers: list[dict[str, Any]], path: Path) -> None:
    """The continued students' seed-mean feature-FD curves of the averaged weights, one panel per group (to
    the furthest length each student was read at)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {k: plt.get_cmap("tab10")(i) for i, k in enumerate(METHODS)}
    groups = sorted({n["group"] for n in numbers}, key=GROUPS.index)
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, group in zip(axes[0], groups):
        last = max((n["curve"]["steps"][-1] for n in numbers if n["group"] == group and n["curve"]["steps"]),
                   default=LONG)
        curves_panel(ax, numbers, group, f"{group}: {WEIGHTS}, seed mean, to step {last}", colors)
        for step in (LENGTH, LONG, *sorted({length for spec in LONGER for length in spec.amendments})):
            if step < last:
                ax.axvline(step, color="grey", linestyle=":", linewidth=1)
    axes[0][0].set_ylabel("feature FD (2000 images, noise base 1000)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def restarted_between(restarts: Sequence[dict[str, Any]], start: int, end: int) -> frozenset[str]:
    """The runs whose restart (``RESTARTS``) came after ``start`` was scored and before ``end``: past ``start`` they
    splice two trajectories."""
    return frozenset(r["name"] for r in restarts if start <= r["recorded_through"] < end)


def plateaus_read(rows: dict, long_pairs: list[dict[str, Any]], restarts: list[dict[str, Any]],
                  spec: Longer = BUDGET) -> list[dict[str, Any]]:
    """``spec``'s students at each of its declared lengths that every continued student reached with at least
    ``PLATEAU_MIN_SEEDS`` seeds (cut alike); each length read against the one before it (its change, the same pairs'
    verdicts there), the first against ``LONG`` (``long_pairs``)."""
    plateaus, earlier, earlier_read = [], long_pairs, True
    for length in sorted(spec.amendments):
        plateau = plateau_numbers(rows, {(p["a"], p["b"]): p["quality"] for p in earlier}, restarts, length, spec)
        plateau["since_read"] = earlier_read  # the length before was read: its verdicts stand beside these
        read = bool(plateau["continued"]) and len(plateau["students"]) == len(plateau["continued"]) and all(
            len(n["seeds"]) >= PLATEAU_MIN_SEEDS for n in plateau["students"])
        if read:
            plateaus.append(plateau)
        earlier, earlier_read = plateau["pairs"], read
    return plateaus


def all_flat(plateau: dict[str, Any]) -> bool:
    """Whether every student of a group's read is flat there, the continued and the entering ones (settled)."""
    return len(plateau["flat"]) == len(plateau["students"]) and all(
        state == "flat" for state in plateau["entering_state"].values())


def followed_plateaus(rows: dict, long_pairs: list[dict[str, Any]], spec: Longer,
                      reads: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """``spec``'s students at each declared length where every group it ``follows`` was read, or had settled (all
    flat) at a shorter length read: each student with the seeds, numbers, change and state its own group read it
    with there (entering with its settled or flat scores where its group no longer continues it), ``spec.flat_at``'s
    students with their scores where they were flat; the declared pairs' verdicts on those numbers."""
    plateaus, earlier, earlier_read = [], long_pairs, True
    for length in sorted(spec.amendments):
        parts = []  # (the followed group's read, whether its students enter from a shorter length)
        for title in spec.follows:
            by_length = {p["length"]: p for p in reads.get(title, [])}
            settled = [p for p in by_length.values() if p["length"] < length and all_flat(p)]
            parts.append((by_length[length], False) if length in by_length else
                         (min(settled, key=lambda p: p["length"]), True) if settled else None)
        if None in parts:
            earlier_read = False
            continue
        if all(settled for _, settled in parts):  # every followed group had settled before: nothing ran this far
            break
        students, changes, entering, entering_students, cut_alike, trained_again = [], [], {}, [], {}, {}
        for part, settled in parts:
            own = {n["label"]: n for n in part["students"]}
            for label in spec.students:
                if label in own and not settled:
                    students.append(own[label])
                    changes += [c for c in part["changes"] if c["label"] == label]
                    cut_alike.update({label: part["cut_alike"][label]} if label in part["cut_alike"] else {})
                    trained_again.update({label: part["trained_again"][label]} if label in part["trained_again"]
                                         else {})
                elif label in own or label in part["entering"]:
                    entering[label] = part["length"] if label in own else part["entering"][label]
                    entering_students += [own.get(label) or next(n for n in part["entering_students"]
                                                                  if n["label"] == label)]
        for label, flat in spec.flat_at.items():
            if label not in entering and (n := student_numbers(BY_LABEL[label], rows, flat))["seeds"]:
                entering[label] = flat
                entering_students.append(n)
        by = {n["label"]: n for n in (*students, *entering_students)}
        lengths = {**{n["label"]: length for n in students}, **entering}

        def numbers_of(label: str, seeds: set[int] | None = None) -> dict[str, Any]:
            return student_numbers(BY_LABEL[label], rows, lengths[label], seeds)

        plateau = plateau_read(
            spec, length, [n["label"] for n in students], students, entering_students, entering, lengths=lengths,
            changes=changes, pairs=declared_verdicts(spec.pairs, by, numbers_of,
                                                     {(p["a"], p["b"]): p["quality"] for p in earlier}),
            cut_alike=cut_alike, trained_again=trained_again, since_read=earlier_read)
        plateaus.append(plateau)
        earlier, earlier_read = plateau["pairs"], True
    return plateaus


def unread_lines(plateaus: list[dict[str, Any]], spec: Longer) -> list[str]:
    """One line for each of ``spec``'s declared lengths below the longest one read that was not read itself."""
    read = {p["length"] for p in plateaus}

    def why(length: int) -> str:
        if spec.follows:
            return f"not every group it follows ({', '.join(spec.follows)}) was read at step {length}"
        return (f"fewer than {PLATEAU_MIN_SEEDS} seeds a student with the six noise sets at step {length} (a run "
                "scores them at the end of each stretch it is given)")

    return [f"### {sentence_start(spec.title)} at {length} steps ({spec.amendments[length]})\n\nNot read: "
            f"{why(length)}.\n"
            for length in sorted(spec.amendments) if read and length < max(read) and length not in read]


def six_set_read(rows: dict, plateau: dict[str, Any], spec: Longer) -> dict[str, Any]:
    """The second read of a group's answer (declared at 2026-12-05 07:15 UTC, beside the declared read, never
    instead of it): every student of ``plateau`` at the length and on the seeds it was read with there, each score
    the mean over its run's six noise sets; the same pairs, metrics, smallest effects and rule, each pair's
    declared-read quality beside it."""
    seeds_of = {n["label"]: set(n["seeds"]) for n in (*plateau["students"], *plateau["entering_students"])}

    def numbers_of(label: str, seeds: set[int] | None = None) -> dict[str, Any]:
        return student_numbers(BY_LABEL[label], rows, plateau["lengths"][label],
                               seeds_of[label] if seeds is None else seeds, six_sets=True)

    by = {label: numbers_of(label) for label in plateau["lengths"]}
    declared = {(p["a"], p["b"]): p["quality"] for p in plateau["pairs"]}
    pairs = declared_verdicts(spec.pairs, by, numbers_of, declared)
    return {"students": [{"label": label, "length": plateau["lengths"][label], "seeds": n["seeds"],
                          **{m: {k: n[m][k] for k in ("mean", "sd", "n", "eval_sd")} for m in VERDICT_METRICS}}
                         for label, n in by.items()],
            "pairs": [{**{k: p[k] for k in ("a", "b", "quality", "seeds")},
                       "metrics": {m: p["metrics"][m]["verdict"] for m in VERDICT_METRICS},
                       "declared": p["earlier"]} for p in pairs]}


def longer_answer(plateaus: list[dict[str, Any]], spec: Longer = BUDGET, rows: dict | None = None
                  ) -> dict[str, Any] | None:
    """The declared answer for ``spec``'s students: the verdicts at the first length read where every continued
    student is flat (the others entering flat), else at the last length read, said as such; None before any length
    past ``LONG`` is read. With ``rows``, the six-set second read of the same length beside it."""
    if not plateaus:
        return None
    settled = next((p for p in plateaus if all_flat(p)), None)
    chosen = settled or plateaus[-1]
    answer = {"title": spec.title, "declared": spec.answer_declared, "length": chosen["length"],
              "all_flat": settled is not None,
              "still_moving": [n["label"] for n in chosen["students"] if n["label"] not in chosen["flat"]]
              + [label for label, state in chosen["entering_state"].items() if state != "flat"],
              "pairs": [{**{k: p[k] for k in ("a", "b", "quality", "seeds")},
                         "metrics": {m: p["metrics"][m]["verdict"] for m in VERDICT_METRICS}}
                        for p in chosen["pairs"]],
              "seed_sd": {n["label"]: (n["fd_features"]["sd"], n["fd_features"]["n"])
                          for n in (*chosen["students"], *chosen["entering_students"])}}
    if rows is not None:
        answer["six_sets"] = six_set_read(rows, chosen, spec)
    return answer


def pair_line(p: dict[str, Any]) -> str:
    """"a vs b: <quality> (<each metric's verdict>; seeds …)": one pair of an answer."""
    return (f"{p['a']} vs {p['b']}: {readable(p['quality'], p['a'], p['b'])} ("
            + "; ".join(f"{TITLE[m]} {named(v, p['a'], p['b'])}" for m, v in p["metrics"].items())
            + f"; seeds {','.join(map(str, p['seeds']))})")


def sd_interval(value: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """The ``level`` confidence interval of a standard deviation ``value`` measured on ``n`` normal draws (the
    chi-square interval): with five seeds an sd is known only to within a factor of about 0.6–2.9."""
    from scipy.stats import chi2

    if n < 2 or math.isnan(value):
        return float("nan"), float("nan")
    tail = (1 - level) / 2
    return (value * math.sqrt((n - 1) / chi2.ppf(1 - tail, n - 1)),
            value * math.sqrt((n - 1) / chi2.ppf(tail, n - 1)))


def seed_sd_text(seed_sd: dict[str, tuple[float, int]]) -> str:
    """Which students' seed sd of feature FD (label -> (sd, seeds)) is within the stability target
    (≤ ``SEED_SD_TARGET``) and which not, each with its 95 % interval."""
    def shown(label: str, value: float, n: int) -> str:
        low, high = sd_interval(value, n)
        return f"{label} {fmt(value, 'fd_features')} ({fmt(low, 'fd_features')}–{fmt(high, 'fd_features')})"

    within = [shown(label, v, n) for label, (v, n) in seed_sd.items() if v <= SEED_SD_TARGET]
    above = [shown(label, v, n) for label, (v, n) in seed_sd.items() if not v <= SEED_SD_TARGET]
    return (f"within {SEED_SD_TARGET:g}: {', '.join(within) or 'none'}; above it: {', '.join(above) or 'none'} "
            "(in brackets each sd's 95 % interval for its number of seeds)")


def answer_lines(answer: dict[str, Any] | None) -> list[str]:
    """The answer's paragraph: at which length, whether every student is flat there, each pair's verdict."""
    if answer is None:
        return []
    where = (f"at step {answer['length']}, the first length read where every student is flat" if answer["all_flat"]
             else f"at step {answer['length']}, the last length read; not every student is flat there (still moving "
             f"or not read: {', '.join(answer['still_moving'])}), so this is the answer as far as the runs went")
    return [f"### {sentence_start(answer['title'].replace('students', 'answer'))} (declared at {answer['declared']}: "
            f"{where})", "",
            *(f"- {pair_line(p)}" for p in answer["pairs"]), "",
            f"Seed sd of feature FD (the target is at most {SEED_SD_TARGET:g} points): {seed_sd_text(answer['seed_sd'])}.",
            "", *six_set_lines(answer.get("six_sets"))]


def six_set_lines(read: dict[str, Any] | None) -> list[str]:
    """The answer's second read: each student on its six noise sets' mean, the pairs' verdicts there, whether each
    agrees with the declared read, and the seed sd against the target."""
    if read is None:
        return []
    lines = ["Read a second way (declared at 2026-12-05 07:15 UTC, beside the declared read and never instead of "
             "it): each score the mean over its run's six noise sets (12,000 images), its evaluation noise the sets' "
             "sd / √6 (root mean square over the seeds); the same lengths, seeds, pairs and rule.", "",
             "| student | at step | seeds | " + " | ".join(TITLE[m] for m in VERDICT_METRICS)
             + " | eval noise (feature FD) |", "|---|---:|---|" + "---:|" * (len(VERDICT_METRICS) + 1)]
    for n in read["students"]:
        lines.append(f"| {n['label']} | {n['length']} | {','.join(map(str, n['seeds']))} | "
                     + " | ".join(f"{fmt(n[m]['mean'], m)} ± {fmt(n[m]['sd'], m)}" for m in VERDICT_METRICS)
                     + f" | {fmt(n['fd_features']['eval_sd'], 'fd_features')} |")
    lines.append("")
    for p in read["pairs"]:
        same = p["declared"] == readable(p["quality"], p["a"], p["b"])
        lines.append(f"- {pair_line(p)}: " + ("the declared read's quality verdict" if same else
                                               f"**not the declared read's quality verdict** ({p['declared']})"))
    sds = {n["label"]: (n["fd_features"]["sd"], n["fd_features"]["n"]) for n in read["students"]}
    return [*lines, "", f"Seed sd of feature FD on this read: {seed_sd_text(sds)}.", ""]


def write(curves: list[dict[str, Any]], screen: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    rows = index(curves)
    numbers = [student_numbers(s, rows) for s in STUDENTS]
    by = {n["label"]: n for n in numbers}
    pairs = declared_verdicts(PAIRS, by, lambda label, seeds=None: student_numbers(BY_LABEL[label], rows, LENGTH,
                                                                                   seeds))
    missing = [f"{s.label} seed {seed}" for s in STUDENTS for seed in B_SEEDS if seed not in by[s.label]["seeds"]]
    lines = [MARKER, "", "## Results", "",
             f"Written from `{_shown(CURVES)}`. Machine: {machine(numbers)}. Every score: the `{WEIGHTS}` "
             f"weights at step {LENGTH}, 2000 one-step images on noise seed base {EVAL_SEED} (the same noise for "
             "every run); mean ± sd over the training seeds. \"eval noise\": the sd over the 6 noise sets "
             f"({EVAL_SEED}, {', '.join(map(str, NOISE_SEEDS))}) of one run, root mean square over its seeds. "
             "\"change over last 20 %\": what the least-squares line through the seed-mean curve moves over its last "
             "240 steps (the stability study's plateau rule compares it with the evaluation noise). s / step: "
             "training seconds per step on the shared machine (full fine-tuning does 5 fake-score updates per step, "
             "the adapters 1; Phase B ran in earlier sessions under other loads, so the column compares costs only "
             "within Phase C).", "",
             "Not run or not finished (cut for time): " + ("; ".join(missing) if missing else "nothing") + ".", "",
             "### The students", ""]
    lines += students_table(numbers)
    moving = [n for n in numbers if curve_state(n) == "still moving"]
    lines += ["", "Still moving at the length (the seed-mean feature FD's change over its last 20 % larger than the "
              "evaluation noise): " + (", ".join(f"{n['label']} ({fmt(n['tail_change'], 'fd_features')})"
                                                  for n in moving) or "none")
              + ". A verdict is about students trained this long, not about where each would settle.", ""]
    lines += [f"![seed-mean curves]({PLOT.name})", "", "### Verdicts (declared pairs and rule)", ""]
    for question in QUESTIONS:
        lines += [f"**{question}**", ""]
        lines += [f"- {p['sentence']}" for p in pairs if p["question"] == question]
        lines.append("")
    screened = screen_numbers(index([*curves, *(screen or [])]))
    screen_text = screen_lines(screened)
    lines += ["Smallest effects (declared): " + ", ".join(f"{TITLE[m]} {SMALLEST[m]:g}" for m in VERDICT_METRICS)
              + ". The adapters all ran at lr 1e-3 without a sweep on averaged weights (declared cut"
              + ("; the screen below tries LoRA and DoRA at 3e-4 and 3e-3 at one seed)." if screen_text else ")."),
              "", *screen_text]
    retrained = frozenset(r["name"] for r in read_curves(RETRAIN_CURVES))  # none when the file is absent
    restarts = read_curves(RESTARTS)
    continued = continued_numbers(rows, {(p["a"], p["b"]): p["quality"] for p in pairs}, retrained,
                                  restarted_between(restarts, LENGTH, LONG))
    lines += continued_lines(continued)
    longer, reads = [], {}
    for spec in LONGER:
        plateaus = (followed_plateaus(rows, continued["pairs"], spec, reads) if spec.follows
                    else plateaus_read(rows, continued["pairs"], restarts, spec))
        reads[spec.title] = plateaus
        lines += unread_lines(plateaus, spec)
        for plateau in plateaus:
            lines += plateau_lines(plateau)
        answer = longer_answer(plateaus, spec, rows)
        lines += answer_lines(answer)
        longer.append({"title": spec.title, "plateaus": plateaus, "answer": answer})
    replace_results(REPORT, MARKER, "\n".join(lines).rstrip() + "\n")
    plot(numbers, PLOT)
    if continued["students"]:
        student_reads = sorted((n for group in longer for p in group["plateaus"] for n in p["students"]),
                               key=lambda n: n["curve"]["steps"][-1] if n["curve"]["steps"] else 0)
        furthest = {n["label"]: n for n in student_reads}  # the last, so the longest, read of each student
        long_plot([furthest.get(n["label"], n) for n in continued["students"]], LONG_PLOT)  # each to its longest
    summary = {"length": LENGTH, "weights": WEIGHTS, "smallest": SMALLEST, "students": numbers, "pairs": pairs,
               "still_moving": [n["label"] for n in moving],
               "lr_screen": {m: {f"{lr:g}": v for lr, v in by.items()} for m, by in screened.items()},
               "continued": continued, "longer": longer}
    SUMMARY.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def main() -> None:
    curves = read_curves()
    if not curves:
        raise SystemExit(f"{CURVES} holds no lines yet: run benchmarks/digits_stability.py first")
    summary = write(curves, read_curves(SCREEN_CURVES) if SCREEN_CURVES.exists() else None)
    print(f"wrote {REPORT}, {PLOT} and {SUMMARY}")
    for p in summary["pairs"]:
        print(f"  {p['a']} vs {p['b']}: {p['quality']}")


if __name__ == "__main__":
    main()
