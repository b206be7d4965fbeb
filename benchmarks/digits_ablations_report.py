"""The ablations' report: the swap and direction vs norm on the averaged full students (no training here).

Reads ``reports/digits_stability/ablations.jsonl`` (written by ``benchmarks/digits_ablations.py``) and rewrites
everything after the results marker of ``reports/digits_ablations.md``, and ``reports/digits_ablations.json``.

    python benchmarks/digits_ablations_report.py
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _study import replace_results  # noqa: E402
from digits_ablations import ABLATIONS, RETRAIN_OUT, VARIANTS, read_rows  # noqa: E402 - the driver's own names
from digits_stability import (  # noqa: E402
    B_SEEDS, CURVES as STUDY_CURVES, EVAL_SEED, NOISE_SEEDS, ROOT, read_curves,
)

RETRAIN_CURVES = RETRAIN_OUT / "curves.jsonl"  # digits_ablations.retrain's curve lines

REPORTS = Path(os.environ.get("WADI_ABLATIONS_REPORTS", ROOT / "reports"))
REPORT, SUMMARY = REPORTS / "digits_ablations.md", REPORTS / "digits_ablations.json"
MARKER = "<!-- results: everything below is written by benchmarks/digits_ablations_report.py -->"
METRICS = ("fd_features", "fd_pixel", "recall")
SWAP_METRICS = ("fd_pixel", "recall")  # declared
SMALLEST = {"fd_pixel": 0.10, "recall": 0.05}  # declared
RATIO_SMALLEST = 0.10  # of the row-matched chance ratio (declared)
MIN_SEEDS = 3
TITLE = {"fd_features": "feature FD ↓", "fd_pixel": "pixel FD ↓", "recall": "recall ↑"}
DIGITS = {"fd_features": 1, "fd_pixel": 3, "recall": 3}


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (nan with fewer than 2 values)."""
    mean = statistics.fmean(values) if values else float("nan")
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return mean, se


def table(rows: list[dict[str, Any]]) -> dict[int, dict[str, dict[str, Any]]]:
    """seed -> variant -> the mean over the 6 noise sets of each metric (with their sd) and the probe's numbers;
    only (seed, variant) pairs with every noise set."""
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for seed in sorted({r["seed"] for r in rows}):
        for variant in VARIANTS:
            sets = {r["eval_seed"]: r for r in rows if r["seed"] == seed and r["variant"] == variant}
            if set(sets) != {EVAL_SEED, *NOISE_SEEDS}:
                continue
            entry: dict[str, Any] = {m: statistics.fmean(s[m] for s in sets.values()) for m in METRICS}
            entry.update({f"{m}_eval_sd": statistics.stdev(s[m] for s in sets.values()) for m in METRICS})
            entry.update({k: v for k, v in sets[EVAL_SEED].items() if k.endswith(("_mean", "_ratio"))})
            out.setdefault(seed, {})[variant] = entry
    return out


def swap_verdicts(t: dict[int, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per metric: the rise of each hybrid over its student, and the asymmetry directions − norms (declared rule)."""
    seeds = [s for s, v in t.items() if {"student", "teacher norms", "teacher directions"} <= set(v)]
    out = {}
    for m in METRICS:
        sign = -1.0 if m == "recall" else 1.0  # recall: the fall
        norms = [sign * (t[s]["teacher norms"][m] - t[s]["student"][m]) for s in seeds]
        dirs = [sign * (t[s]["teacher directions"][m] - t[s]["student"][m]) for s in seeds]
        asym = [d - n for d, n in zip(dirs, norms)]
        mean, se = mean_se(asym)
        if m not in SWAP_METRICS:
            verdict = "for the record"
        elif len(seeds) < MIN_SEEDS:
            verdict = "too few seeds"
        elif abs(mean) > 2 * se and abs(mean) >= SMALLEST[m]:
            verdict = "directions matter more" if mean > 0 else "norms matter more"
        else:
            verdict = "cannot tell at this size"
        out[m] = {"seeds": seeds, "norms_rise": mean_se(norms), "directions_rise": mean_se(dirs),
                  "asymmetry": (mean, se), "verdict": verdict}
    return out


def ratio_verdict(t: dict[int, dict[str, dict[str, Any]]], chance: str) -> dict[str, Any]:
    """The probe's angle / norm ratio, student − ``chance`` variant, paired by seed (declared rule for rows)."""
    seeds = [s for s, v in t.items() if {"student", chance} <= set(v)]
    diffs = [t[s]["student"]["angle_to_norm_ratio"] - t[s][chance]["angle_to_norm_ratio"] for s in seeds]
    chance_ratio = mean_se([t[s][chance]["angle_to_norm_ratio"] for s in seeds])
    student_ratio = mean_se([t[s]["student"]["angle_to_norm_ratio"] for s in seeds])
    mean, se = mean_se(diffs)
    if len(seeds) < MIN_SEEDS:
        verdict = "too few seeds"
    elif abs(mean) > 2 * se and abs(mean) >= RATIO_SMALLEST * chance_ratio[0]:
        verdict = "the rows turned more than chance" if mean > 0 else "the rows changed their norms more than chance"
    else:
        verdict = "at chance"
    return {"seeds": seeds, "student": student_ratio, "chance": chance_ratio, "difference": (mean, se),
            "verdict": verdict}


def f(value: float, digits: int) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def pm(pair: tuple[float, float], digits: int) -> str:
    return f"{f(pair[0], digits)} ± {f(pair[1], digits)}"


def retrained_note(retrain_curves: Path, study_curves: Path) -> str:
    """Which seeds were trained again (``--retrain``) and how far each lands from the Phase B run it replaces."""
    if not retrain_curves.exists():
        return ""
    retrained = [r for r in read_curves(retrain_curves) if r["weights"] == "ema-p2/3" and r["eval_seed"] == EVAL_SEED]
    last = {r["seed"]: r for r in retrained if r["step"] == r["steps"]}
    if not last:
        return ""
    phase_b = {(r["name"], r["step"]): r for r in read_curves(study_curves)
               if r["weights"] == "ema-p2/3" and r.get("eval_seed", EVAL_SEED) == EVAL_SEED}
    pairs = []
    for seed, row in sorted(last.items()):
        before = phase_b.get((row["name"], row["step"]))
        against = f" against {before['fd_features']:.1f}" if before else ""
        pairs.append(f"seed {seed} {row['fd_features']:.1f}{against}")
    seeds = sorted(last)
    return (f"Seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} {'were' if len(seeds) > 1 else 'was'} "
            "trained again on this machine (`--retrain`, the checkpoints being gone). The retrained curves leave "
            "the Phase B ones from the first scored step (reports/digits_stability.md: Phase B's seeds 0 and 1 ran "
            "on an Intel Xeon VM; floating-point results differ between CPUs and training amplifies the last "
            "bits), so these students are other draws "
            "of the same recipe, not the runs the comparison scored: the averaged student's feature FD at the last "
            f"step on noise set {EVAL_SEED}, retrained against Phase B: {'; '.join(pairs)}.")


def write(rows: list[dict[str, Any]]) -> dict[str, Any]:
    t = table(rows)
    swap = swap_verdicts(t)
    ratios = {c: ratio_verdict(t, c) for c in ("structureless (rows)", "structureless (matrix)")}
    cpus = sorted({r.get("cpu") or "not recorded" for r in rows})
    retrained = retrained_note(RETRAIN_CURVES, STUDY_CURVES)
    lines = [MARKER, "", "## Results", "",
             f"Written from `{ABLATIONS.name}` ({len(rows)} lines; seeds {', '.join(map(str, sorted(t))) or 'none'}). "
             f"Machine: 2-core VM, CPU {', '.join(cpus)}, one torch thread. Scores: mean over the 6 noise sets "
             f"({EVAL_SEED}, {', '.join(map(str, NOISE_SEEDS))}), 2000 one-step images each; ± is the standard "
             "error over the seeds (paired differences where a difference is shown).", "",
             "Seeds not run (cut for time; `--retrain` trains them again): "
             + (", ".join(str(x) for x in B_SEEDS if x not in t) or "none") + ".", "",
             *([retrained, ""] if retrained else []),
             "### Every variant (mean over the seeds)", "",
             "| variant | seeds | " + " | ".join(TITLE[m] for m in METRICS)
             + " | mean angle (°) | norm change (%) | angle / norm | E@30 % (excess over closed-form chance) |",
             "|---|---|" + "---:|" * (len(METRICS) + 4)]
    for variant in VARIANTS:
        seeds = [s for s in t if variant in t[s]]
        if not seeds:
            lines.append(f"| {variant} | – |" + " – |" * (len(METRICS) + 4))
            continue

        def col(key: str, scale: float = 1.0, digits: int = 3) -> str:
            values = [t[s][variant][key] * scale for s in seeds if t[s][variant].get(key) is not None]
            return pm(mean_se(values), digits) if values else "–"

        # a hybrid keeps the teacher's norms (or directions) exactly: its ratio divides by a rounding error
        ratio = "–" if variant.startswith("teacher") else col("angle_to_norm_ratio", 1, 2)
        energy = col("residual_energy_at_30pct_rank_mean", 100, 1)
        excess = col("residual_energy_at_30pct_rank_excess_mean", 100, 1)
        lines.append(f"| {variant} | {len(seeds)} | " + " | ".join(col(m, 1, DIGITS[m]) for m in METRICS)
                     + f" | {col('angle_deg_mean', 1, 3)} | {col('norm_change_mean', 100, 4)}"
                     + f" | {ratio} | {energy} ({excess}) |")
    lines += ["", "### The swap", ""]
    for m in METRICS:
        s = swap[m]
        word = "fall" if m == "recall" else "rise"
        lines.append(f"- {TITLE[m]} ({'declared' if m in SWAP_METRICS else 'for the record'}): {word} with the "
                     f"teacher's norms {pm(s['norms_rise'], DIGITS[m] + 1)}, with the teacher's directions "
                     f"{pm(s['directions_rise'], DIGITS[m] + 1)}; directions − norms "
                     f"{pm(s['asymmetry'], DIGITS[m] + 1)} over {len(s['seeds'])} seeds: **{s['verdict']}**.")
    lines += ["", "### Direction vs norm", ""]
    for chance, r in ratios.items():
        declared = "declared" if chance == "structureless (rows)" else "for the record"
        lines.append(f"- Against the {chance} change ({declared}): angle / norm change {pm(r['student'], 2)} for the "
                     f"students, {pm(r['chance'], 2)} by chance; difference {pm(r['difference'], 2)} over "
                     f"{len(r['seeds'])} seeds: **{r['verdict']}**.")
    replace_results(REPORT, MARKER, "\n".join(lines).rstrip() + "\n")
    summary = {"variants": t, "swap": swap, "ratios": ratios}
    SUMMARY.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def main() -> None:
    rows = read_rows()
    if not rows:
        raise SystemExit(f"{ABLATIONS} holds no lines yet: run benchmarks/digits_ablations.py first")
    summary = write(rows)
    print(f"wrote {REPORT} and {SUMMARY}")
    for m, s in summary["swap"].items():
        print(f"  swap {m}: {s['verdict']}")
    for c, r in summary["ratios"].items():
        print(f"  angle/norm vs {c}: {r['verdict']}")


if __name__ == "__main__":
    main()
