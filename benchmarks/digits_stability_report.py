"""The stability study's report, from the lines ``benchmarks/digits_stability.py`` wrote (no training here).

Reads ``reports/digits_stability/curves.jsonl`` and writes ``reports/digits_stability.md`` (the declaration made
before the runs is kept as it stands, everything after the results marker is rewritten), the plot
``reports/digits_stability.png`` (curves of raw and averaged weights, each method) and
``reports/digits_stability/summary.json`` (every aggregated number in the report).

    python benchmarks/digits_stability_report.py
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _study import replace_results  # noqa: E402
from digits_stability import (  # noqa: E402 - the driver's own constants, one definition
    AVERAGES, B_SEEDS, B_STEPS, CURVES, EVAL_SEED, NOISE_SEEDS, OUT, PHASE_A, ROOT, WEIGHTS, plateau_step, queue,
    read_curves, within_run,
)

REPORTS = Path(os.environ.get("WADI_STABILITY_REPORTS", ROOT / "reports"))
REPORT = REPORTS / "digits_stability.md"
PLOT = REPORTS / "digits_stability.png"
MARKER = "<!-- results: everything below is written by benchmarks/digits_stability_report.py -->"
DECISION = ("fd_features", "fd_pixel", "recall")
METRICS = ("fd_features", "fd_pixel", "recall", "precision", "class_accuracy")
LOWER = {"fd_features", "fd_pixel"}
FLOOR = {"fd_features": 3.0, "fd_pixel": 0.05, "recall": 0.03}
TITLE = {"fd_features": "feature FD ↓", "fd_pixel": "pixel FD ↓", "recall": "recall ↑", "precision": "precision ↑",
         "class_accuracy": "class acc. ↑"}
DIGITS = {"fd_features": 1, "fd_pixel": 3, "recall": 3, "precision": 3, "class_accuracy": 3}
LENGTH = min(B_STEPS.values())  # the common length every decision is made at (amended: see the report)
METHOD_TITLE = {"lorad-probe": "LoRaD from the probe", "full": "full fine-tuning"}


def fmt(value: float | None, metric: str, extra: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{DIGITS[metric] + extra}f}"


def sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


# ------------------------------------------------------------------------------------------------ the data


class Curves:
    """The rows of curves.jsonl, indexed by run name."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows
        self.runs: dict[str, dict[str, Any]] = {}
        for r in rows:
            self.runs.setdefault(r["name"], {k: r[k] for k in ("method", "seed", "lr", "fake_updates")})

    def curve(self, name: str, weights: str, metric: str, upto: int | None = None) -> tuple[list[int], list[float]]:
        """(steps, values) on the shared noise seed, up to ``upto`` steps."""
        points = sorted({r["step"]: r[metric] for r in self.rows
                         if r["name"] == name and r["weights"] == weights and r["eval_seed"] == EVAL_SEED
                         and (upto is None or r["step"] <= upto)}.items())
        return [s for s, _ in points], [v for _, v in points]

    def last_step(self, name: str) -> int:
        return max(r["step"] for r in self.rows if r["name"] == name)

    def noise_steps(self, name: str) -> list[int]:
        """The steps at which ``name`` has all its noise-set lines (its finished lengths)."""
        return sorted({r["step"] for r in self.rows if r["name"] == name and r["eval_seed"] == NOISE_SEEDS[-1]})

    def noise_sd(self, name: str, step: int, weights: str, metric: str) -> float:
        values = [r[metric] for r in self.rows if r["name"] == name and r["step"] == step and r["weights"] == weights]
        return sd(values) if len(values) == 1 + len(NOISE_SEEDS) else float("nan")

    def value(self, name: str, step: int, weights: str, metric: str) -> float | None:
        for r in self.rows:
            if (r["name"] == name and r["step"] == step and r["weights"] == weights
                    and r["eval_seed"] == EVAL_SEED):
                return r[metric]
        return None


def recipe(run: dict[str, Any]) -> tuple[float, int]:
    return (run["lr"], run["fake_updates"])


def recipe_name(lr: float, fake: int) -> str:
    return f"lr {lr:g}, {fake} fake update{'s' if fake > 1 else ''}"


# ------------------------------------------------------------------------------------------------ numbers


def eval_noise(c: Curves) -> dict[str, dict[str, float]]:
    """σ_eval per method (and "all") per metric: RMS over runs × weights of the sd over the noise sets at each
    finished length."""
    out: dict[str, dict[str, float]] = {}
    for method in (*METHOD_TITLE, "all"):
        out[method] = {}
        for metric in METRICS:
            sds = [c.noise_sd(n, step, w, metric) for n, run in c.runs.items()
                   if method in ("all", run["method"]) for step in c.noise_steps(n) for w in WEIGHTS]
            sds = [s for s in sds if not math.isnan(s)]
            out[method][metric] = math.sqrt(sum(s * s for s in sds) / len(sds)) if sds else float("nan")
        out[method]["sets"] = len([1 for n, run in c.runs.items() if method in ("all", run["method"])
                                   for _ in c.noise_steps(n)])
    return out


def effect(noise: dict[str, float], metric: str) -> float:
    sigma = noise.get(metric, float("nan"))
    return max(FLOOR[metric], 2 * sigma) if not math.isnan(sigma) else FLOOR[metric]


def run_stats(c: Curves, name: str, upto: int) -> dict[str, dict[str, Any]]:
    """Per weights: the scores at ``upto``, and the within-run sd / neighbour change over its last 40 %."""
    out = {}
    for w in WEIGHTS:
        row: dict[str, Any] = {}
        for metric in METRICS:
            steps, values = c.curve(name, w, metric, upto)
            if not steps or steps[-1] != upto:
                continue
            row[metric] = values[-1]
            if metric in DECISION:
                stats = within_run(steps, values)
                row[f"{metric}_sd"], row[f"{metric}_change"] = stats["sd"], stats["step_change"]
                row[f"{metric}_detrended"] = stats["detrended_sd"]
        out[w] = row
    return out


def phase_a(c: Curves) -> dict[str, list[dict[str, Any]]]:
    """Per method, per recipe: the runs that reached LENGTH steps, their stats there."""
    out: dict[str, list[dict[str, Any]]] = {}
    for method, recipes in PHASE_A.items():
        out[method] = []
        for lr, fake in recipes:
            names = [n for n, r in c.runs.items() if r["method"] == method and recipe(r) == (lr, fake)
                     and c.value(n, LENGTH, "raw", "fd_features") is not None]
            if names:
                out[method].append({"lr": lr, "fake_updates": fake, "runs": sorted(names),
                                    "stats": {n: run_stats(c, n, LENGTH) for n in sorted(names)}})
    return out


def mean_over(stats: list[dict[str, dict[str, Any]]], weights: str, key: str) -> float:
    values = [s[weights][key] for s in stats if key in s.get(weights, {})]
    return statistics.fmean(values) if values else float("nan")


def better(metric: str, a: float, b: float) -> bool:
    return a < b if metric in LOWER else a > b


def choose_average(c: Curves, noise: dict[str, float]) -> dict[str, Any]:
    """The declared averaging rule on every run's scores at LENGTH steps (every run that reached it)."""
    stats = [run_stats(c, n, LENGTH) for n in sorted(c.runs) if c.value(n, LENGTH, "raw", "fd_features") is not None]
    means = {w: {m: mean_over(stats, w, m) for m in (*DECISION, "fd_features_sd", "fd_features_detrended",
                                                      "fd_features_change")}
             for w in WEIGHTS}
    if not stats:
        return {"runs": 0, "means": means, "best": {}, "eligible": {}, "all_three": False, "chosen": None}
    best = {m: (min if m in LOWER else max)(means[w][m] for w in AVERAGES) for m in DECISION}
    eligible = {w: {m: abs(means[w][m] - best[m]) <= effect(noise, m) for m in DECISION} for w in AVERAGES}
    full = [w for w in AVERAGES if all(eligible[w].values())]
    pool = full or [w for w in AVERAGES if eligible[w]["fd_features"] and eligible[w]["recall"]]
    chosen = min(pool, key=lambda w: means[w]["fd_features_sd"]) if pool else None  # None: the rule picks none
    # not declared, reported only when the rule picks none: the same rule among the averages that are within the
    # effect of the best on pixel FD and recall
    subset = [w for w in AVERAGES if eligible[w]["fd_pixel"] and eligible[w]["recall"]]
    restricted = None
    if chosen is None and subset:
        sbest = {m: (min if m in LOWER else max)(means[w][m] for w in subset) for m in DECISION}
        close = [w for w in subset if all(abs(means[w][m] - sbest[m]) <= effect(noise, m) for m in DECISION)]
        restricted = min(close, key=lambda w: means[w]["fd_features_sd"]) if close else None
    return {"runs": len(stats), "means": means, "best": best, "eligible": eligible, "all_three": bool(full),
            "chosen": chosen, "subset": subset, "restricted": restricted}


def choose_recipe(method: str, recs: list[dict[str, Any]], weights: str, noise: dict[str, float]) -> dict[str, Any]:
    """The declared recipe rule for ``method`` on the chosen average's scores at LENGTH steps."""
    table = []
    for rec in recs:
        stats = list(rec["stats"].values())
        table.append({"lr": rec["lr"], "fake_updates": rec["fake_updates"], "seeds": len(stats),
                      **{m: mean_over(stats, weights, m) for m in DECISION}})
    if not table:
        return {"table": [], "chosen": None, "why": "no Phase A run finished"}
    demo = table[0]
    best = min(table, key=lambda r: r["fd_features"])
    worse = [m for m in ("fd_pixel", "recall") if better(m, demo[m], best[m])
             and abs(best[m] - demo[m]) > effect(noise, m)]
    if worse:
        best = demo
        why = (f"the recipe with the lowest feature FD is worse than the demo's on "
               f"{' and '.join(TITLE[m] for m in worse)} by more than the smallest effect")
    else:
        why = "the lowest feature FD"
    within = [m for m in DECISION if abs(best[m] - demo[m]) > effect(noise, m)]
    if best is not demo and not within:
        cheaper = best if best["fake_updates"] < demo["fake_updates"] else demo
        why = ("best and demo recipe within the smallest effect on all three metrics: the cheaper one"
               if cheaper["fake_updates"] != demo["fake_updates"]
               else "best and demo recipe within the smallest effect on all three metrics at equal cost: the demo's")
        best = cheaper
    return {"table": table, "chosen": (best["lr"], best["fake_updates"]), "why": why}


def phase_b(c: Curves, method: str, lr: float, fake: int, sigma: float) -> dict[str, Any]:
    """The seeds of ``method``'s recipe at its Phase B length: per run stats, seed mean ± sd, and per weights set
    the plateau step of the seed-mean feature-FD curve."""
    length = B_STEPS[method]
    names = sorted(n for n, r in c.runs.items() if r["method"] == method and recipe(r) == (lr, fake)
                   and r["seed"] in B_SEEDS and length in c.noise_steps(n))
    stats = {n: run_stats(c, n, length) for n in names}
    seeds = {}
    for w in WEIGHTS:
        seeds[w] = {}
        for m in METRICS:
            values = [s[w][m] for s in stats.values() if m in s[w]]
            seeds[w][m] = (statistics.fmean(values) if values else float("nan"), sd(values))
        for key in ("fd_features_sd", "fd_features_detrended", "fd_features_change"):
            seeds[w][key] = mean_over(list(stats.values()), w, key)
    plateau: dict[str, int | None] = {}
    for w in WEIGHTS:
        curves = [c.curve(n, w, "fd_features", length) for n in names]
        if not curves or len(curves[0][0]) < 3 or math.isnan(sigma):
            plateau[w] = None
            continue
        steps = curves[0][0]
        mean = [statistics.fmean(v[i] for _, v in curves) for i in range(len(steps))]
        plateau[w] = plateau_step(steps, mean, sigma)
    return {"length": length, "runs": names, "stats": stats, "seeds": seeds, "plateau": plateau}


# ------------------------------------------------------------------------------------------------ writing


def run_cpu(c: Curves, name: str) -> str:
    """The CPU a run's rows were scored on (rows written before the driver recorded it: "not recorded")."""
    cpus = sorted({r["cpu"] for r in c.rows if r["name"] == name and r.get("cpu")})
    return " / ".join(cpus) or "not recorded"


def machine(c: Curves) -> str:
    import torch

    cpus = sorted({run_cpu(c, name) for name in c.runs})
    return (f"2-core VMs shared with other jobs (load average 2–11 during the runs), each run's CPU in the table "
            f"below ({', '.join(cpus)}); this report written with Python {platform.python_version()}, torch "
            f"{torch.__version__}; one torch thread per run, two runs at a time")


def how_lines(c: Curves) -> list[str]:
    """Machine, commands, seeds, and what of the declared plan did not run."""
    declared = [r for m in PHASE_A for r in queue(f"A:{m}")] + [
        r for m in PHASE_A for r in queue(f"B:{m}:{PHASE_A[m][0][0]:g}:{PHASE_A[m][0][1]}")]
    seen, missing = set(), []
    for r in declared:
        if r.name in seen:
            continue
        seen.add(r.name)
        if r.name not in c.runs or r.steps not in c.noise_steps(r.name):
            got = c.last_step(r.name) if r.name in c.runs else 0
            missing.append(f"{r.name} ({'not started' if not got else f'stopped at step {got}'})")
    return ["### How it was run", "",
            f"Machine: {machine(c)}.", "",
            "Commands (each lane one run at a time; the queue order is in the amendments above):", "",
            "```",
            "python benchmarks/digits_stability.py run --queue B:lorad-probe:0.001:1 --queue A:lorad-probe --workers 1",
            "python benchmarks/digits_stability.py run --queue B:full:2e-05:5 --queue A:full --workers 1",
            "python benchmarks/digits_stability_report.py",
            "```", "",
            "The whole declared plan (Phase A: both seeds, every recipe; Phase B: 5 seeds; the declared lengths: "
            "set `A_STEPS = 1600` and `B_STEPS = {\"lorad-probe\": 2400, \"full\": 2000}` in the driver; finished "
            "runs continue from their last checkpoint in `$WADI_STABILITY_WORK`):", "",
            "```",
            "python benchmarks/digits_stability.py run --queue A:lorad-probe --queue A1:lorad-probe --queue A:full "
            "--queue A1:full --queue B:lorad-probe:0.001:1 --queue B:full:2e-05:5 --workers 2",
            "```", "",
            f"Training seeds {', '.join(map(str, B_SEEDS))} (Phase B) and 0 (Phase A); evaluation noise seed base "
            f"{EVAL_SEED} for every score, {', '.join(map(str, NOISE_SEEDS))} for the noise sets.", "",
            "Not run or not finished at the common length (cut for time): "
            + ("; ".join(missing) if missing else "nothing") + ". Phase A at seed 1 (declared: only if time was left) "
            "was not run.", ""]


def runs_table(c: Curves) -> list[str]:
    """Every run: how far it got, and its measured seconds per step (the machine's load shows here)."""
    lines = ["### The runs", "",
             "| run | seed | last scored step | lengths with noise sets | training s / step | scoring s / point | CPU |",
             "|---|---|---|---|---|---|---|"]
    for name in sorted(c.runs, key=lambda n: (c.runs[n]["method"], c.runs[n]["lr"], c.runs[n]["fake_updates"],
                                               c.runs[n]["seed"])):
        last = c.last_step(name)
        rows = [r for r in c.rows if r["name"] == name and r["eval_seed"] == EVAL_SEED and r["weights"] == "raw"]
        row = max(rows, key=lambda r: r["step"])
        scoring = statistics.fmean(r["score_s"] for r in rows)
        lines.append(f"| {name} | {c.runs[name]['seed']} | {last} | "
                     f"{', '.join(map(str, c.noise_steps(name))) or '–'} | {row['train_s'] / row['step']:.2f} | "
                     f"{scoring:.0f} | {run_cpu(c, name)} |")
    lines += ["", "Training seconds per step are cumulative over the run (a resumed run counts from its resume); "
              "scoring seconds per point: the four weights sets on 2000 images each (six noise sets at the last "
              "step). Both depend on the other jobs on the shared machine.", ""]
    return lines


def plot(c: Curves, chosen: dict[str, tuple[float, int] | None], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(METHOD_TITLE)
    fig, axes = plt.subplots(len(DECISION), len(methods), figsize=(6 * len(methods), 3.2 * len(DECISION)),
                             squeeze=False)
    colours = dict(zip(WEIGHTS, ("tab:grey", "tab:blue", "tab:orange", "tab:green")))
    for j, method in enumerate(methods):
        rec = chosen.get(method)
        names = sorted(n for n, r in c.runs.items() if r["method"] == method and rec and recipe(r) == rec)
        for i, metric in enumerate(DECISION):
            ax = axes[i][j]
            for w in WEIGHTS:
                for k, n in enumerate(names):
                    steps, values = c.curve(n, w, metric)
                    ax.plot(steps, values, color=colours[w], lw=1.0 if w != "raw" else 0.8,
                            alpha=0.9 if w != "raw" else 0.6, label=w if k == 0 else None)
            ax.set_title(f"{METHOD_TITLE[method]} ({recipe_name(*rec) if rec else 'no runs'}), "
                         f"{len(names)} seeds: {TITLE[metric]}", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if i == 0 and names:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_lines(c: Curves, average: dict[str, Any], b: dict[str, Any], noise: dict[str, Any]) -> list[str]:
    """The findings in a few sentences, each computed from the tables below."""
    out = ["### Summary (computed from the tables below)", ""]
    for method, r in b.items():
        if not r["runs"]:
            out.append(f"- {METHOD_TITLE[method]}: no seed reached {LENGTH} steps.")
            continue
        sw = r["seeds"]
        sds = ", ".join(f"{w} {fmt(sw[w]['fd_features_sd'], 'fd_features')}" for w in WEIGHTS)
        seed_sd = ", ".join(f"{w} {fmt(sw[w]['fd_features'][1], 'fd_features')}" for w in WEIGHTS)
        met = [w for w in WEIGHTS if not math.isnan(sw[w]["fd_features"][1]) and sw[w]["fd_features"][1] <= 3.0]
        out.append(f"- {METHOD_TITLE[method]} ({len(r['runs'])} seeds, {LENGTH} steps): within-run sd of feature FD "
                   f"over steps {math.ceil(0.6 * LENGTH / 100) * 100}–{LENGTH} (mean over seeds): {sds}. "
                   + (f"Seed sd of feature FD at {LENGTH}: {seed_sd}; at most 3 points (the target) for: "
                      f"{', '.join(met) or 'none'}." if len(r["runs"]) > 1 else "One seed: no seed sd."))
    if average["runs"]:
        per_run = [run_stats(c, n, LENGTH) for n in sorted(c.runs)
                   if c.value(n, LENGTH, "raw", "fd_features") is not None]
        for w in AVERAGES:
            others = [o for o in AVERAGES if o != w]
            lower_fd = sum(1 for s in per_run if all(s[w]["fd_features"] < s[o]["fd_features"] for o in others))
            worse = sum(1 for s in per_run if all(
                s[w]["fd_pixel"] - s[o]["fd_pixel"] > effect(noise, "fd_pixel")
                and s[o]["recall"] - s[w]["recall"] > effect(noise, "recall") for o in others))
            if lower_fd or worse:
                out.append(f"- {w}: the lowest feature FD of the three averages in {lower_fd} of {len(per_run)} "
                           f"runs at {LENGTH} steps; worse than both other averages on pixel FD and on recall by "
                           f"more than the smallest effect in {worse} of {len(per_run)}.")
    out.append("")
    return out


def comparison_lines(average: dict[str, Any], noise: dict[str, float]) -> list[str]:
    """Pairwise, from the table above: which averages differ by more than the smallest effect, on which metric,
    and each average's within-run sd against the raw weights'. Sentences follow from the numbers only."""
    if not average["runs"]:
        return []
    means, names = average["means"], list(AVERAGES)
    out = ["Pairwise differences of the means (more than the smallest effect marked **beyond**; else within):", ""]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            parts = []
            for m in DECISION:
                d = means[a][m] - means[b][m]
                tag = "**beyond**" if abs(d) > effect(noise, m) else "within"
                parts.append(f"{TITLE[m]} {d:+.{DIGITS[m]}f} ({tag})")
            out.append(f"- {a} − {b}: " + ", ".join(parts))
    raw_sd = means["raw"]["fd_features_sd"]
    out += ["", "Within-run sd of feature FD relative to the raw weights' "
            f"({fmt(raw_sd, 'fd_features')}): "
            + ", ".join(f"{w} {means[w]['fd_features_sd'] / raw_sd:.2f}×" for w in names) + ".", ""]
    return out


def write(c: Curves) -> dict[str, Any]:
    noise = eval_noise(c)
    a = phase_a(c)
    average = choose_average(c, noise["all"])
    # the recipe rule needs one average: the chosen one, else (the rule chose none) each average in turn
    recipes = {m: {w: choose_recipe(m, a[m], w, noise[m]) for w in ([average["chosen"]] if average["chosen"]
                                                                   else list(AVERAGES))} for m in METHOD_TITLE}
    # Phase B ran the demo's recipe of each method (amended: see the declaration)
    b = {m: phase_b(c, m, *PHASE_A[m][0], noise[m]["fd_features"]) for m in METHOD_TITLE}
    lines = [MARKER, "", "## Results", ""]
    lines += [f"Written from `reports/digits_stability/curves.jsonl` ({len(c.rows)} lines, {len(c.runs)} runs). Scores on the "
              f"shared noise seed base {EVAL_SEED}, 2000 one-step images each; σ_eval from the 6 noise sets "
              "(bases 1000, 3001–3005) at each finished length.", ""]
    lines += ["### Evaluation noise (σ_eval, 2000 images)", "",
              "| runs of | finished lengths | " + " | ".join(TITLE[m] for m in METRICS) + " |",
              "|---|---|" + "---|" * len(METRICS)]
    for method, row in noise.items():
        lines.append(f"| {METHOD_TITLE.get(method, 'both methods')} | {row['sets']} | "
                     + " | ".join(fmt(row[m], m, 1) for m in METRICS) + " |")
    lines += ["", "Smallest effect that matters (max of 2 σ_eval over both methods and the declared floor): "
              + ", ".join(f"{TITLE[m]} {fmt(effect(noise['all'], m), m, 1)}" for m in DECISION) + ".", ""]
    lines += summary_lines(c, average, b, noise["all"]) + how_lines(c) + runs_table(c)
    lines += [f"### Every run at {LENGTH} steps", "",
              f"Per run and weights set: the scores at {LENGTH} steps; sd and mean neighbour change (|Δ| between "
              f"points 100 steps apart) of each decision metric over steps {math.ceil(0.6 * LENGTH / 100) * 100}–"
              f"{LENGTH}. Phase A recipes other than the demo's appear only where they were run.", ""]
    for method, recs in a.items():
        lines += [f"**{METHOD_TITLE[method]}**", "",
                  "| recipe | seed | weights | FD feat. | sd | \\|Δ\\| | FD pixel | sd | \\|Δ\\| | recall | sd | "
                  "\\|Δ\\| | precision | class acc. |", "|---|---|---|" + "---|" * 11]
        for rec in recs:
            for n, stats in rec["stats"].items():
                for w in WEIGHTS:
                    s = stats[w]
                    cells = []
                    for m in DECISION:
                        cells += [fmt(s.get(m), m), fmt(s.get(f"{m}_sd"), m), fmt(s.get(f"{m}_change"), m)]
                    cells += [fmt(s.get("precision"), "precision"), fmt(s.get("class_accuracy"), "class_accuracy")]
                    lines.append(f"| {recipe_name(rec['lr'], rec['fake_updates'])} | {c.runs[n]['seed']} | {w} | "
                                 + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"### The averaging (declared rule, every run at {LENGTH} steps)", "",
              f"Means over the {average['runs']} runs that reached {LENGTH} steps (both methods):", "",
              "| weights | FD feat. | FD pixel | recall | within-run sd of FD feat. | sd about trend | "
              "mean \\|Δ\\| of FD feat. | eligible (feat., pixel, recall) |", "|---|---|---|---|---|---|---|---|"]
    for w in WEIGHTS:
        mm = average["means"][w]
        elig = average["eligible"].get(w)
        lines.append(f"| {w} | {fmt(mm['fd_features'], 'fd_features')} | {fmt(mm['fd_pixel'], 'fd_pixel')} | "
                     f"{fmt(mm['recall'], 'recall')} | {fmt(mm['fd_features_sd'], 'fd_features')} | "
                     f"{fmt(mm['fd_features_detrended'], 'fd_features')} | "
                     f"{fmt(mm['fd_features_change'], 'fd_features')} | "
                     + (", ".join("yes" if elig[m] else "no" for m in DECISION) if elig else "(not a candidate)")
                     + " |")
    chosen = average["chosen"]
    if average["runs"] == 0:
        lines += ["", f"No run reached {LENGTH} steps: no averaging chosen yet.", ""]
    elif chosen is None:
        lines += ["", "**The declared rule chooses none**: no average is within the smallest effect of the best "
                  "average on all three metrics, and none is within it on both feature FD and recall.", ""]
        if average["restricted"]:
            r = average["restricted"]
            kw = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in AVERAGES[r].items())
            lines += [f"Not declared, shown because the rule chooses none: the same rule applied only to the "
                      f"averages within the effect of the best on pixel FD and recall ({', '.join(average['subset'])})"
                      f" picks **{r}** (diffusers `EMAModel` with {kw}).", ""]
    else:
        kw = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in AVERAGES[chosen].items())
        lines += ["", f"Chosen by the declared rule: **{chosen}** (diffusers `EMAModel` with {kw})"
                  + ("" if average["all_three"] else "; no average was within the effect on all three metrics, "
                     "so the declared fallback (feature FD and recall) applied") + ".", ""]
    lines += comparison_lines(average, noise["all"])
    lines += [f"### The recipe per method (declared rule at {LENGTH} steps)", ""]
    for method, per_average in recipes.items():
        for w, r in per_average.items():
            lines += [f"**{METHOD_TITLE[method]}**, scored on {w}: "
                      + (f"the rule keeps **{recipe_name(*r['chosen'])}** ({r['why']})." if r["chosen"]
                         else r["why"] + ".")
                      + (" Only the demo's recipe was run: nothing to choose between." if len(r["table"]) == 1
                         else ""), "",
                      "| recipe | seeds | FD feat. | FD pixel | recall |", "|---|---|---|---|---|"]
            for row in r["table"]:
                lines.append(f"| {recipe_name(row['lr'], row['fake_updates'])} | {row['seeds']} | "
                             + " | ".join(fmt(row[m], m) for m in DECISION) + " |")
            lines.append("")
    lines += ["### Phase B: seeds on the demo's recipe", ""]
    for method, r in b.items():
        lines += [f"**{METHOD_TITLE[method]}**, {recipe_name(*PHASE_A[method][0])}: {len(r['runs'])} of "
                  f"{len(B_SEEDS)} seeds reached {r['length']} steps"
                  + (f" (seeds {', '.join(str(c.runs[n]['seed']) for n in r['runs'])})." if r["runs"] else "."), ""]
        if not r["runs"]:
            continue
        lines += ["Seed mean ± sd at the final length; within-run sd and mean neighbour change of feature FD over "
                  "the last 40 % (mean over seeds); plateau: the first step at which the seed-mean feature-FD "
                  f"curve's change over its last 20 % is at most σ_eval ({fmt(noise[method]['fd_features'], 'fd_features', 1)}):", "",
                  "| weights | " + " | ".join(TITLE[m] for m in METRICS) + " | within-run sd | sd about trend | "
                  "\\|Δ\\| | plateau |", "|---|" + "---|" * (len(METRICS) + 4)]
        for w in WEIGHTS:
            sw = r["seeds"][w]
            pl = r["plateau"][w]
            lines.append(f"| {w} | " + " | ".join(f"{fmt(sw[m][0], m)} ± {fmt(sw[m][1], m)}" for m in METRICS)
                         + f" | {fmt(sw['fd_features_sd'], 'fd_features')} | "
                           f"{fmt(sw['fd_features_detrended'], 'fd_features')} | "
                           f"{fmt(sw['fd_features_change'], 'fd_features')} | "
                           f"{pl if pl else 'not met by ' + str(r['length'])} |")
        lines.append("")
    plot(c, {m: PHASE_A[m][0] for m in METHOD_TITLE}, PLOT)
    lines += [f"![curves]({PLOT.name})", "",
              "The plot: every seed of each method's demo recipe, raw weights (grey) and the three averages.", ""]
    replace_results(REPORT, MARKER, "\n".join(lines) + "\n")
    summary = {"noise": noise, "average": average, "recipes": recipes,
               "phase_b": {m: {k: v for k, v in r.items() if k != "stats"} for m, r in b.items()}}
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def main() -> None:
    # the stability study's own methods; Phase C's adapters (the same file) are digits_comparison_report.py's
    rows = [r for r in read_curves() if r["method"] in METHOD_TITLE]
    if not rows:
        raise SystemExit(f"{CURVES} holds no lines yet: run benchmarks/digits_stability.py first")
    summary = write(Curves(rows))
    print(f"wrote {REPORT} and {PLOT}; averaging {summary['average']['chosen']}, recipes "
          + ", ".join(f"{m}: {[r['chosen'] for r in per.values()]}" for m, per in summary["recipes"].items()))


if __name__ == "__main__":
    main()
