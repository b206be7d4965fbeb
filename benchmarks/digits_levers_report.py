"""The results of the levers study (reports/digits_levers.md) from its curves, by the rule declared there.

Reads ``reports/digits_levers/curves.jsonl`` (written by ``benchmarks/digits_stability.py`` with
``WADI_STABILITY_OUT=reports/digits_levers``) and replaces everything below the results marker of
``reports/digits_levers.md``: per run that reached its length, each weights set's mean over the six noise sets at
the last step ± their sd, the change against the baseline, and the declared verdict on ``ema-p3/4``.

    python benchmarks/digits_levers_report.py
"""

from __future__ import annotations

from pathlib import Path

from _study import cpu_model, replace_results
from digits_stability import noise_set_summary, read_curves

ROOT = Path(__file__).resolve().parents[1]
CURVES = ROOT / "reports" / "digits_levers" / "curves.jsonl"
REPORT = ROOT / "reports" / "digits_levers.md"
MARKER = "<!-- results: everything below is written by benchmarks/digits_levers_report.py -->"
BASELINE = "lorad-probe-lr0.001-f1-s0"
DECIDING = "ema-p3/4"
KEYS = ("fd_features", "fd_pixel", "recall", "precision", "class_accuracy")
#: the smallest effect that matters (reports/digits_stability.md), for the three decision metrics
EFFECT = {"fd_features": 3.7, "fd_pixel": 0.073, "recall": 0.052}
LOWER_IS_BETTER = {"fd_features", "fd_pixel"}


def final_scores(rows: list[dict]) -> dict[str, dict[str, dict[str, tuple[float, float]]]]:
    """run -> weights -> metric -> (mean, sd) over the noise sets at the run's last step (runs with all six)."""
    found: dict = {}
    for name in sorted({r["name"] for r in rows}):
        mine = [r for r in rows if r["name"] == name]
        last = max(r["step"] for r in mine)
        if last != mine[0]["steps"]:
            continue
        for weights in sorted({r["weights"] for r in mine}):
            summary = noise_set_summary([r for r in mine if r["step"] == last and r["weights"] == weights], KEYS)
            if summary is not None:
                found.setdefault(name, {})[weights] = summary
    return found


def lever(name: str) -> str:
    """The lever of a run, from its name (``lorad-probe-lr0.001-f1-<lever>-s0``)."""
    middle = name.removeprefix("lorad-probe-lr0.001-f1").removesuffix("-s0").strip("-")
    return middle or "baseline"


def verdict(scores: dict[str, tuple[float, float]], base: dict[str, tuple[float, float]]) -> str:
    """The declared rule: feature FD lower by more than its effect, pixel FD and recall not worse by more."""
    delta = {k: scores[k][0] - base[k][0] for k in EFFECT}
    worse = [k for k in ("fd_pixel", "recall")
             if (delta[k] > EFFECT[k] if k in LOWER_IS_BETTER else -delta[k] > EFFECT[k])]
    if -delta["fd_features"] <= EFFECT["fd_features"]:
        return "not promising (feature FD within the effect or worse)"
    if worse:
        return "not promising: feature FD better, but worse beyond the effect on " + " and ".join(
            {"fd_pixel": "pixel FD", "recall": "recall"}[k] for k in worse)
    return "**promising**"


def markdown(rows: list[dict]) -> str:
    scores = final_scores(rows)
    base = scores.get(BASELINE, {}).get(DECIDING)
    lines = [MARKER, "", "## Results", "",
             f"Written from `{CURVES.relative_to(ROOT)}` ({len(rows)} lines). Each cell: the mean over the six noise "
             "sets at 1200 steps (2000 one-step images each) ± their sd; Δ against the baseline's same weights.",
             "", "| run | weights | FD feat. ↓ | Δ | FD pixel ↓ | Δ | recall ↑ | Δ | precision ↑ | class acc. ↑ |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, by_weights in scores.items():
        for weights in ("raw", "ema-p2/3", "ema-p3/4", "ema-0.999"):
            if weights not in by_weights:
                continue
            s = by_weights[weights]
            b = scores.get(BASELINE, {}).get(weights)
            cells = [lever(name), weights]
            for key in ("fd_features", "fd_pixel", "recall"):
                digits = 1 if key == "fd_features" else 3
                cells.append(f"{s[key][0]:.{digits}f} ± {s[key][1]:.{digits}f}")
                cells.append("–" if b is None or name == BASELINE else f"{s[key][0] - b[key][0]:+.{digits}f}")
            cells += [f"{s['precision'][0]:.3f}", f"{s['class_accuracy'][0]:.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"**Verdicts** (declared rule, on `{DECIDING}`; smallest effects: feature FD 3.7, pixel FD 0.073, "
              "recall 0.052):", ""]
    for name, by_weights in scores.items():
        if name == BASELINE or base is None or DECIDING not in by_weights:
            continue
        lines.append(f"- `{lever(name)}`: {verdict(by_weights[DECIDING], base)}")
    lines += ["", f"Machine of the runs: {cpu_model()}, one torch thread per run, two runs at a time.", ""]
    return "\n".join(lines)


def main() -> None:
    rows = read_curves(CURVES)
    replace_results(REPORT, MARKER, markdown(rows))
    print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()
