"""The two ramped averages side by side at the plateau (reports/digits_ema_seeds.md, declared before its runs).

Reads the runs of ``digits_stability.py run --queue E:lora-peft@4000`` (``WADI_STABILITY_OUT=reports/digits_ema_seeds``)
and writes, below the report's marker: each average's seed sd of feature FD at the last step (deciding set and six-set
mean, with its 95 % interval), the paired quality difference p = 3/4 − p = 2/3 by the declared rule, each average's
steadiness over the last 1000 steps, and the reproduction of the comparison's own scores of the same seeds.

    python benchmarks/digits_ema_seeds_report.py
"""

from __future__ import annotations

import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _study import replace_results  # noqa: E402
from digits_comparison_report import (  # noqa: E402 - the comparison's rule and formatting, one definition
    SEED_SD_TARGET,
    SMALLEST,
    TITLE,
    VERDICT_METRICS,
    fmt,
    index,
    rule,
    sd,
    sd_interval,
)
from digits_stability import (  # noqa: E402
    E_WEIGHTS,
    EVAL_SEED,
    METRICS,
    NOISE_SEEDS,
    ROOT,
    noise_set_summary,
    queue,
    read_curves,
    tail_change,
)

QUEUE = "E:lora-peft@4000"  # declared
OUT = Path(os.environ.get("WADI_STABILITY_OUT", ROOT / "reports" / "digits_ema_seeds"))
REPORT = ROOT / "reports" / "digits_ema_seeds.md"
STUDY_CURVES = ROOT / "reports" / "digits_stability" / "curves.jsonl"  # the comparison's runs of the same seeds
MARKER = "<!-- results: everything below is written by benchmarks/digits_ema_seeds_report.py -->"
SLOW, DEFAULT = E_WEIGHTS[1], E_WEIGHTS[0]  # ema-p3/4 against the default ema-p2/3: d = slow − default
WITHIN_FROM = 3000  # the within-run sd is read over steps WITHIN_FROM..the last step (declared)
REPRODUCED_PAST = 2000  # the comparison's runs of these seeds were trained again from step 0 past their 2000 lines


def final_scores(rows: dict, name: str, step: int, weights: str) -> dict[str, Any] | None:
    """One run's scores at ``step`` for ``weights``: the deciding set's, the six sets' mean and sd; None until every
    noise set is there."""
    sets = [row for seed in (EVAL_SEED, *NOISE_SEEDS) if (row := rows.get((name, step, weights, seed)))]
    summary = noise_set_summary(sets, METRICS)
    if summary is None:
        return None
    return {"deciding": {m: sets[0][m] for m in METRICS}, "six": {m: summary[m][0] for m in METRICS},
            "eval_sd": {m: summary[m][1] for m in VERDICT_METRICS}}


def paired_verdict(differences: list[float], metric: str) -> dict[str, Any]:
    """The declared rule on paired differences d = slow − default: mean d, SE = sd(d) / √n; "better" or "worse"
    (for the slow average) where |d| > 2 SE and |d| ≥ the smallest effect, "no difference that matters" where
    |d| + 2 SE is within it, else "cannot tell"."""
    n = len(differences)
    if n < 3:
        return {"d": float("nan"), "se": float("nan"), "n": n, "verdict": "too few seeds"}
    d, se = statistics.fmean(differences), sd(differences) / math.sqrt(n)
    said = {"A better": "better", "B better": "worse", "cannot tell at this size": "cannot tell"}
    verdict = rule(d, se, metric)
    return {"d": d, "se": se, "n": n, "verdict": said.get(verdict, verdict)}


def steadiness(rows: dict, names: dict[int, str], weights: str, last: int, noise: list[float]) -> dict[str, Any]:
    """The within-run sd of feature FD over steps ``WITHIN_FROM``..``last`` (deciding set; mean over the seeds) and
    the seed-mean curve's change over its last 20 % against the evaluation noise (RMS of the runs' six-set sd,
    ``noise``)."""
    within, curves = [], {}
    for name in names.values():
        points = sorted((s, r["fd_features"]) for (n, s, w, e), r in rows.items()
                        if n == name and w == weights and e == EVAL_SEED and s <= last)
        if not points or points[-1][0] != last:
            continue
        within.append(sd([v for s, v in points if s >= WITHIN_FROM]))
        for s, v in points:
            curves.setdefault(s, []).append(v)
    steps = sorted(s for s, v in curves.items() if len(v) == len(within))
    change = tail_change(steps, [statistics.fmean(curves[s]) for s in steps]) if len(steps) >= 3 else float("nan")
    rms = math.sqrt(statistics.fmean(x * x for x in noise)) if noise else float("nan")
    return {"within_sd": statistics.fmean(within) if within else float("nan"), "tail_change": change,
            "noise": rms, "flat": (abs(change) <= rms) if not (math.isnan(change) or math.isnan(rms)) else None}


def reproduction(rows: dict, study: dict, names: dict[int, str]) -> dict[int, dict[str, Any]]:
    """Per seed: the steps past ``REPRODUCED_PAST`` that both these runs and the comparison's scored on the default
    average, the largest absolute difference over every metric, and the first step where any differs."""
    out = {}
    for seed, name in names.items():
        theirs = name.removesuffix("-averages")
        steps = sorted(s for (n, s, w, e) in rows if n == name and w == DEFAULT and e == EVAL_SEED
                       and s > REPRODUCED_PAST and (theirs, s, DEFAULT, EVAL_SEED) in study)
        gaps = {s: max(abs(rows[(name, s, DEFAULT, EVAL_SEED)][m] - study[(theirs, s, DEFAULT, EVAL_SEED)][m])
                       for m in METRICS) for s in steps}
        out[seed] = {"steps": len(steps), "max_gap": max(gaps.values()) if gaps else float("nan"),
                     "first_differs": next((s for s in steps if gaps[s] > 0), None)}
    return out


def analyse(curves: list[dict[str, Any]], study_curves: list[dict[str, Any]]) -> dict[str, Any]:
    rows, study = index(curves), index(study_curves)
    runs = queue(QUEUE)
    last = runs[0].steps
    names = {run.seed: run.name for run in runs}
    finals = {w: {seed: f for seed, name in names.items() if (f := final_scores(rows, name, last, w))}
              for w in E_WEIGHTS}
    seeds = sorted(set(finals[SLOW]) & set(finals[DEFAULT]))
    spread = {}
    for w in E_WEIGHTS:
        for read in ("deciding", "six"):
            values = [finals[w][s][read]["fd_features"] for s in seeds]
            value = sd(values)
            spread[(w, read)] = {"mean": statistics.fmean(values) if values else float("nan"), "sd": value,
                                 "interval": sd_interval(value, len(values))}
    paired = {m: paired_verdict([finals[SLOW][s]["six"][m] - finals[DEFAULT][s]["six"][m] for s in seeds], m)
              for m in VERDICT_METRICS}
    means = {w: {m: statistics.fmean(finals[w][s]["six"][m] for s in seeds) if seeds else float("nan")
                 for m in VERDICT_METRICS} for w in E_WEIGHTS}
    adopt = (spread[(SLOW, "six")]["sd"] <= SEED_SD_TARGET
             and all(p["verdict"] in ("better", "no difference that matters") for p in paired.values()))
    cpus = sorted({r.get("cpu") or "not recorded" for r in curves if r["name"] in names.values()})
    return {"length": last, "seeds": seeds, "planned": sorted(names), "cpus": cpus, "spread": spread,
            "paired": paired, "means": means,
            "steadiness": {w: steadiness(rows, {s: names[s] for s in seeds}, w, last,
                                         [finals[w][s]["eval_sd"]["fd_features"] for s in seeds]) for w in E_WEIGHTS},
            "reproduction": reproduction(rows, study, {s: names[s] for s in seeds}), "adopt": adopt}


def lines(result: dict[str, Any]) -> list[str]:
    seeds, length = result["seeds"], result["length"]
    out = [MARKER, "", "## Results", "",
           f"Seeds with both averages scored on all six noise sets at step {length}: "
           f"{', '.join(map(str, seeds)) or 'none yet'} (not finished: "
           f"{', '.join(str(s) for s in result['planned'] if s not in seeds) or 'none'}). Machine: "
           f"{', '.join(result['cpus'])}, one torch thread per run, two runs at a time.", ""]
    if len(seeds) < 3:
        return [*out, "Fewer than 3 seeds: nothing is read yet."]
    out += ["**1. Seed sd of feature FD at step {}** (mean ± seed sd; in brackets the sd's 95 % interval for {} "
            "seeds; the target is at most {:g}):".format(length, len(seeds), SEED_SD_TARGET), "",
            "| average | deciding set | six-set mean |", "|---|---:|---:|"]
    for w in E_WEIGHTS:
        cells = []
        for read in ("deciding", "six"):
            s = result["spread"][(w, read)]
            low, high = s["interval"]
            cells.append(f"{fmt(s['mean'], 'fd_features')} ± {fmt(s['sd'], 'fd_features')} "
                         f"({fmt(low, 'fd_features')}–{fmt(high, 'fd_features')})")
        out.append(f"| `{w}` | " + " | ".join(cells) + " |")
    out += ["", f"**2. Quality, paired by seed** (six-set means; d = `{SLOW}` − `{DEFAULT}`, ± SE over the seeds; "
            "smallest effects " + ", ".join(f"{TITLE[m]} {SMALLEST[m]:g}" for m in VERDICT_METRICS) + "):", ""]
    for m, p in result["paired"].items():
        out.append(f"- {TITLE[m]}: `{DEFAULT}` {fmt(result['means'][DEFAULT][m], m)}, `{SLOW}` "
                   f"{fmt(result['means'][SLOW][m], m)}; d = {fmt(p['d'], m, 1)} ± {fmt(p['se'], m, 1)}: "
                   + (f"`{SLOW}` {p['verdict']}" if p["verdict"] in ("better", "worse") else p["verdict"]) + ".")
    out += ["", f"**3. Steadiness** (deciding set; within-run sd over steps {WITHIN_FROM}–{length}, mean over the "
            "seeds; the seed-mean curve's change over its last 20 % against the evaluation noise):", ""]
    for w, st in result["steadiness"].items():
        state = {True: "flat", False: "still moving", None: "not read"}[st["flat"]]
        out.append(f"- `{w}`: within-run sd {fmt(st['within_sd'], 'fd_features')}; change "
                   f"{fmt(st['tail_change'], 'fd_features')} against a noise of {fmt(st['noise'], 'fd_features')}: "
                   f"{state}.")
    out += ["", f"**4. Reproduction** (`{DEFAULT}` scores of these runs against the comparison's runs of the same "
            f"seeds, every step past {REPRODUCED_PAST} both scored, largest absolute difference over every metric):",
            ""]
    for seed, r in result["reproduction"].items():
        where = ("identical at every step" if r["first_differs"] is None and r["steps"] else
                 f"first differs at step {r['first_differs']}" if r["steps"] else "no common steps")
        out.append(f"- seed {seed}: {r['steps']} steps, largest difference {r['max_gap']:.3g}: {where}.")
    verdict = ("the slower average meets both conditions: the next step is the demo re-run on it" if result["adopt"]
               else f"the default stays `{DEFAULT}`")
    return [*out, "", f"**Decision (the declared rule):** {verdict}."]


def main() -> None:
    curves = read_curves(OUT / "curves.jsonl")
    if not curves:
        raise SystemExit(f"{OUT / 'curves.jsonl'} holds no lines yet: run benchmarks/digits_stability.py first")
    result = analyse(curves, read_curves(STUDY_CURVES))
    replace_results(REPORT, MARKER, "\n".join(lines(result)) + "\n")
    print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()
