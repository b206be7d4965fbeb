"""The demo at several training seeds: its table as seed mean ± seed sd, beside the evaluation noise.

``run`` starts ``wadi-distill demo --seed S`` for each seed (one torch thread in each of the demo's two processes,
``--workers`` demos at a time: 1 on two cores; seed 0 writes the README's ``reports/demo``, the others
``reports/demo_seeds/seed-S``, of which only the metrics are committed). ``report`` reads each seed's ``metrics.json`` and writes ``reports/demo_seeds.md``:

- per model and metric, the mean over the seeds ± their sd (the training-seed spread, which includes the
  evaluation noise) and the evaluation noise alone (the mean over seeds of each run's sd over its noise sets);
- per seed, whether each student beats the teacher's own one-step sample on every metric, and each student's
  feature FD as a multiple of the 25-step teacher's, scored on sets of the students' size: the demo scores the
  teacher on sets of 1000 (50 UNet calls an image) and a smaller set inflates a Fréchet distance, so the ratio
  takes the teacher's score at 5000 images a set from ``reports/digits_teacher_set_size.json`` (written by
  ``benchmarks/digits_eval_noise.py``) and says which it used.

    python benchmarks/demo_seeds.py run --seeds 0,1,2
    python benchmarks/demo_seeds.py report --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "reports" / "demo_seeds.md"
KEYS = ("fd_pixel", "fd_features", "precision", "recall", "class_accuracy")
TITLES = {"fd_pixel": "FD pixel ↓", "fd_features": "FD features ↓", "precision": "precision ↑",
          "recall": "recall ↑", "class_accuracy": "class acc. ↑"}
STUDENTS = ("full_student", "lorad_student")
TEACHER_SIZES = ROOT / "reports" / "digits_teacher_set_size.json"


def teacher_row(model: str, images: int, path: Path = TEACHER_SIZES) -> dict[str, Any] | None:
    """``model``'s row (``teacher_multistep`` or ``teacher_one_step``) on sets of ``images`` in ``path``: per metric
    ``mean`` and ``sd`` over its ``noise_sets``; None if that size was not scored."""
    if not path.exists():
        return None
    return next((row for row in json.loads(path.read_text())["rows"]
                 if row["model"] == model and row["images_per_set"] == images), None)


def teacher_feature_fd(images: int, path: Path = TEACHER_SIZES) -> tuple[float, float, int] | None:
    """The 25-step teacher's feature FD on sets of ``images``: (mean, sd over the sets, sets), None if not scored."""
    row = teacher_row("teacher_multistep", images, path)
    return None if row is None else (row["mean"]["fd_features"], row["sd"]["fd_features"], row["noise_sets"])


def seed_folder(seed: int) -> Path:
    """Where the demo of training seed ``seed`` writes: the README's folder for seed 0."""
    return ROOT / "reports" / ("demo" if seed == 0 else f"demo_seeds/seed-{seed}")


def better(key: str, a: float, b: float) -> bool:
    """Whether ``a`` is better than ``b`` on metric ``key`` (lower FD, higher otherwise)."""
    return a < b if key.startswith("fd_") else a > b


def fmt(key: str, value: float) -> str:
    return f"{value:.2f}" if key.startswith("fd_") else f"{value:.3f}"


def fine(key: str, value: float) -> str:
    """A per-seed value: class accuracy and precision with four decimals (near 1 they differ in the fourth)."""
    return f"{value:.2f}" if key.startswith("fd_") else f"{value:.4f}" if key != "recall" else f"{value:.3f}"


def load_rows(seeds: list[int]) -> dict[int, dict[str, dict[str, Any]]]:
    """Per seed, the demo's metrics rows by model key."""
    found = {}
    for seed in seeds:
        record = json.loads((seed_folder(seed) / "metrics.json").read_text())
        found[seed] = {row["key"]: row for row in record["rows"]}
        found[seed]["_record"] = record
    return found


def report(seeds: list[int], teacher_sizes: Path = TEACHER_SIZES) -> str:
    """The Markdown of ``reports/demo_seeds.md`` from the seeds' metrics files."""
    runs = load_rows(seeds)
    first = runs[seeds[0]]
    models = [k for k in first if not k.startswith("_")]
    settings = first["_record"]["settings"]
    student_images = first[STUDENTS[-1]]["num_images"]
    matched = teacher_feature_fd(student_images, teacher_sizes)
    lines = [
        "# The demo at several training seeds",
        "",
        f"`wadi-distill demo --seed S` for training seeds {', '.join(map(str, seeds))} (written by "
        "`python benchmarks/demo_seeds.py report`; seed 0 is the README's `reports/demo/`, the others "
        "`reports/demo_seeds/seed-S/`). Each cell: the mean over the seeds ± their sd (the training-seed spread, "
        "evaluation noise included), then in brackets the evaluation noise alone (each run's sd over its "
        f"{settings['eval_noise_sets']} noise sets, averaged over the seeds). The real digits row is one fixed set.",
        "",
        "Wall time of each demo by its own clock: "
        + ", ".join(f"{runs[s]['_record']['timings_seconds']['total']:.0f} s (seed {s})" for s in seeds) + ".",
        "",
        "| model | " + " | ".join(TITLES[k] for k in KEYS) + " |",
        "|---|" + "---:|" * len(KEYS),
    ]
    for model in models:
        cells = [first[model]["name"]]
        for key in KEYS:
            values = [runs[s][model][key] for s in seeds]
            noise = [runs[s][model].get(f"{key}_sd") for s in seeds]
            mean = statistics.fmean(values)
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cell = fmt(key, mean) if model == "real" else f"{fmt(key, mean)} ± {fmt(key, sd)}"
            if all(n is not None for n in noise) and model != "real":
                cell += f" ({fmt(key, statistics.fmean(noise))})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Per seed: the students against the teacher", "",
              "| seed | student | " + " | ".join(TITLES[k] for k in KEYS) + " | beats the one-step teacher on "
              "every metric | feature FD / 25-step teacher's" + (" (same set size)" if matched else "") + " |",
              "|---|---|" + "---:|" * len(KEYS) + "---|---:|"]
    for seed in seeds:
        rows = runs[seed]
        teacher, multistep = rows["teacher_one_step"], rows["teacher_multistep"]
        for student in STUDENTS:
            row = rows[student]
            wins = [better(k, row[k], teacher[k]) for k in KEYS]
            cells = [str(seed), row["name"].split(" VSD")[0]]
            cells += [fine(k, row[k]) + ("" if win else f" ✗ ({fine(k, teacher[k])})") for k, win in zip(KEYS, wins)]
            cells.append("yes" if all(wins) else "no: " + ", ".join(TITLES[k] for k, w in zip(KEYS, wins) if not w))
            teacher_fd = matched[0] if matched else multistep["fd_features"]
            cells.append(f"{row['fd_features'] / teacher_fd:.2f}×")
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "✗: not better than the teacher's one-step sample of the same seed (its value in brackets).", "",
              _ratio_note(matched, student_images, first["teacher_multistep"]["num_images"],
                          [runs[s]["teacher_multistep"]["fd_features"] for s in seeds]),
              "", "## Settings", "", "```", json.dumps(settings, indent=1, default=str), "```", ""]
    return "\n".join(lines)


def _ratio_note(matched: tuple[float, float, int] | None, student_images: int, teacher_images: int,
                teacher_fds: list[float]) -> str:
    """What the ratio column divides by, and why."""
    own = f"{statistics.fmean(teacher_fds):.2f}, the mean over the seeds, on sets of {teacher_images} images"
    if matched is None:
        return (f"Ratio: over the demo's own 25-step teacher row ({own}); the students are scored on sets of "
                f"{student_images}, and a smaller set inflates a Fréchet distance, so this ratio flatters the "
                f"students (`benchmarks/digits_eval_noise.py --multistep-sizes {student_images}` scores the teacher "
                "at their size).")
    mean, sd, sets = matched
    return (f"Ratio: over the 25-step teacher scored on sets of {student_images} images, the students' size: feature "
            f"FD {mean:.2f} ± {sd:.2f} over {sets} sets (`{TEACHER_SIZES.relative_to(ROOT)}`); the demo's own "
            f"row ({own}) is inflated by its smaller sets.")


def run(seeds: list[int], workers: int) -> None:
    """Each seed's demo (two processes, one torch thread each), ``workers`` demos at a time; logs beside the report."""
    from _study import LoggedProcess, run_logged

    logs = ROOT / "reports" / "demo_seeds" / "logs"
    # the output folder relative to the repository root (the working directory): the probe report and the recorded
    # run commands then name it as a user of `wadi-distill demo` would see it
    run_logged([LoggedProcess(f"seed {seed} -> {seed_folder(seed).relative_to(ROOT)}",
                              [sys.executable, "-c", "from wadi_distill.cli import main; main()", "demo", "--seed",
                               str(seed), "--output-dir", str(seed_folder(seed).relative_to(ROOT)), "--no-progress"],
                              logs / f"seed-{seed}.log", {"OMP_NUM_THREADS": "1", "COLUMNS": "120"}, cwd=ROOT)
                for seed in seeds], workers, "demos")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "report"])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workers", type=int, default=1, help="demos at a time (each uses two processes)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.command == "run":
        run(seeds, args.workers)
    else:
        REPORT.write_text(report(seeds), encoding="utf-8")
        print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()
