"""Stability of the digits students: raw weights against weight averages, scored along each run.

Every run is one VSD student on ``builtin:digits`` (the study's set-up: batch 16, VSD CFG 1.5, fake score LoRaD rank
32 at lr 1e-2, no weight decay, no trainer EMA, one torch thread), driven step by step through
:meth:`wadi_distill.vsd.trainer.VSDTrainer.train_step`. Beside the raw weights the driver keeps, updated after
every step, three averages of the student's trainable tensors, each a diffusers ``EMAModel`` with exactly the
parameters the trainer would take (:data:`AVERAGES`):

- ``ema-p2/3``     ramped EMA, decay_t = min(0.999, 1 - (1 + t)^(-2/3)) (``use_ema_warmup=True, inv_gamma=1``);
- ``ema-p3/4``     ramped EMA, decay_t = min(0.9999, 1 - (1 + t)^(-3/4));
- ``ema-0.999``    fixed decay 0.999 from the first step (the trainer's ``--ema-decay 0.999``).

Every ``SCORE_EVERY`` steps the raw weights and each average are merged into a plain student and scored with the
project's evaluation (:func:`wadi_distill.evaluate.evaluate_images` on :func:`one_step_digits`): 2000 one-step
images (200 per digit) on the noise seed base ``EVAL_SEED`` — the same noise for every run and step, so every
comparison is paired. At a run's last step each weights set is also scored on ``NOISE_SEEDS`` (five more noise
sets): the evaluation noise.

One JSON line per (run, step, weights[, noise seed]) is appended to ``reports/digits_stability/curves.jsonl`` as it
comes. A run keeps a checkpoint (trainer state and the averages) in ``WORK``; a run whose lines stop early resumes
from its last checkpoint, a run that reached its length and has its noise lines is skipped, and a run asked for
more steps than it has continues from its last checkpoint (the learning rate is constant after warm-up, so a
longer run is the same run continued).

    python benchmarks/digits_stability.py run --queue A:full --workers 1 &        # Phase A, one lane per method
    python benchmarks/digits_stability.py run --queue A:lorad-probe --workers 1 &
    python benchmarks/digits_stability.py run --queue B:full:2e-05:5 --queue B:lorad-probe:0.001:1
    python benchmarks/digits_stability.py job '{"method": "lorad-probe", "seed": 0, "lr": 0.001, ...}'
    python benchmarks/digits_stability_report.py
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("WADI_STABILITY_OUT", ROOT / "reports" / "digits_stability"))
CURVES = OUT / "curves.jsonl"
#: runs trained again from step 0 after their checkpoint was lost (a new machine): their lines past the recorded
#: step continue another trajectory than the lines before it (the last bits differ between machines)
RESTARTS = OUT / "restarts.jsonl"
WORK = Path(os.environ.get("WADI_STABILITY_WORK", Path(tempfile.gettempdir()) / "wadi-digits-stability"))
# the probe report whose plan the studies train (the demo report of 2026-12-02 11:21, kept fixed here so that
# re-running the demo does not change the studies' LoRaD plan: 47 layers, 98,048 parameters at the 10 % budget)
REPORT = ROOT / "reports" / "digits_study" / "probe_report.json"
BUDGET = 0.10
EVAL_SEED, NOISE_SEEDS, PER_CLASS = 1000, (3001, 3002, 3003, 3004, 3005), 200
SCORE_EVERY, CHECKPOINT_EVERY = 100, 200
METRICS = ("fd_pixel", "fd_features", "precision", "recall", "class_accuracy")
# name -> diffusers EMAModel keyword arguments (exactly what the trainer would pass)
AVERAGES: dict[str, dict[str, Any]] = {
    "ema-p2/3": {"decay": 0.999, "min_decay": 0.0, "update_after_step": 0, "use_ema_warmup": True,
                 "inv_gamma": 1.0, "power": 2 / 3},
    "ema-p3/4": {"decay": 0.9999, "min_decay": 0.0, "update_after_step": 0, "use_ema_warmup": True,
                 "inv_gamma": 1.0, "power": 3 / 4},
    "ema-0.999": {"decay": 0.999, "min_decay": 0.999, "update_after_step": -1, "use_ema_warmup": False},
}
WEIGHTS = ("raw", *AVERAGES)
METHODS = ("full", "lorad-probe", "lorad-uniform", "lora-peft", "dora-peft")


@dataclass
class Run:
    """One continuous VSD run: a student, its recipe, a seed and its length."""

    method: str  # one of METHODS
    seed: int
    lr: float
    fake_updates: int
    steps: int
    name: str = field(default="")
    extra: dict[str, Any] = field(default_factory=dict)  # DistillConfig fields changed from the study's set-up
    rank: int | None = None  # uniform adapters (lorad-uniform, lora-peft, dora-peft): None = the budget's rank
    weights: list[str] | None = None  # the weights sets scored (None: all of WEIGHTS)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SystemExit(f"unknown method {self.method!r}: one of {', '.join(METHODS)}")
        if self.weights is not None and (not self.weights or set(self.weights) - set(WEIGHTS)):
            raise SystemExit(f"weights must be a non-empty subset of {', '.join(WEIGHTS)}, not {self.weights}")
        if not self.name:
            changed = "".join(f"-{k}{v:g}" if isinstance(v, float) else f"-{k}{v}" for k, v in sorted(self.extra.items()))
            rank = f"-r{self.rank}" if self.rank else ""
            self.name = f"{self.method}{rank}-lr{self.lr:g}-f{self.fake_updates}{changed}-s{self.seed}"

    @property
    def scored(self) -> tuple[str, ...]:
        return tuple(WEIGHTS if self.weights is None else [w for w in WEIGHTS if w in self.weights])


# ------------------------------------------------------------------------------------------------ pure parts


def ramp_decay(step: int, power: float, max_decay: float) -> float:
    """The ramped EMA's decay after ``step`` optimisation steps (1-based, as diffusers counts): 0 at the first step
    (a copy), then min(max_decay, 1 - step^(-power)) — diffusers' ``EMAModel`` with ``use_ema_warmup=True``,
    ``inv_gamma=1``, ``update_after_step=0``."""
    from wadi_distill.vsd.config import ema_decay_at  # the trainer's formula: the study measures what it runs

    k = step - 1
    return 0.0 if k <= 0 else ema_decay_at(k, max_decay, power)


def slope(steps: list[int], values: list[float]) -> float:
    """Least-squares slope of ``values`` against ``steps`` (per step)."""
    n = len(steps)
    if n < 2:
        raise ValueError("a slope needs at least two points")
    ms, mv = sum(steps) / n, sum(values) / n
    var = sum((s - ms) ** 2 for s in steps)
    return sum((s - ms) * (v - mv) for s, v in zip(steps, values)) / var


def noise_set_summary(sets: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, tuple[float, float]] | None:
    """metric -> (mean, sd) over the rows of one run's step and weights, when they hold every noise set (the
    deciding one and ``NOISE_SEEDS``); None otherwise. The sd is the evaluation noise the reports print."""
    if {r.get("eval_seed", EVAL_SEED) for r in sets} < {EVAL_SEED, *NOISE_SEEDS}:
        return None
    return {k: (statistics.fmean(r[k] for r in sets), statistics.stdev(r[k] for r in sets)) for k in keys}


def tail_change(steps: list[int], values: list[float], fraction: float = 0.2) -> float:
    """The change a least-squares line predicts over the last ``fraction`` of the run (points at steps ≥ (1 −
    fraction) × last step): slope × that span, NaN when that stretch holds fewer than two points (no line to read).
    The plateau rule compares its size with the evaluation noise."""
    last = steps[-1]
    start = (1.0 - fraction) * last
    tail = [(s, v) for s, v in zip(steps, values) if s >= start]
    if len(tail) < 2:
        return float("nan")
    return slope([s for s, _ in tail], [v for _, v in tail]) * (last - start)


def plateau_step(steps: list[int], values: list[float], noise: float, fraction: float = 0.2,
                 min_points: int = 3) -> int | None:
    """The first scored step L at which the curve up to L has |tail_change| ≤ ``noise`` (its last ``fraction``
    holding at least ``min_points`` points), or None if no step does."""
    for i, last in enumerate(steps):
        upto_s, upto_v = steps[: i + 1], values[: i + 1]
        if sum(1 for s in upto_s if s >= (1.0 - fraction) * last) < min_points:
            continue
        if abs(tail_change(upto_s, upto_v, fraction)) <= noise:
            return last
    return None


def within_run(steps: list[int], values: list[float], fraction: float = 0.4) -> dict[str, float]:
    """Over the points in the last ``fraction`` of the run: the sd (n − 1), the sd about the least-squares line
    (n − 2; the jitter without the trend of a curve still improving), and the mean absolute change between
    neighbouring scored points."""
    last = steps[-1]
    pts = [(s, v) for s, v in zip(steps, values) if s >= (1.0 - fraction) * last]
    tail = [v for _, v in pts]
    mean = sum(tail) / len(tail)
    sd = math.sqrt(sum((v - mean) ** 2 for v in tail) / (len(tail) - 1)) if len(tail) > 1 else float("nan")
    detrended = float("nan")
    if len(pts) > 2:
        b = slope([s for s, _ in pts], tail)
        ms = sum(s for s, _ in pts) / len(pts)
        detrended = math.sqrt(sum((v - mean - b * (s - ms)) ** 2 for s, v in pts) / (len(pts) - 2))
    change = [abs(b - a) for a, b in zip(tail, tail[1:])]
    return {"sd": sd, "detrended_sd": detrended, "step_change": sum(change) / len(change) if change else float("nan"),
            "points": len(tail)}


# ------------------------------------------------------------------------------------------------ I/O


def read_curves(path: Path | None = None) -> list[dict[str, Any]]:
    path = CURVES if path is None else path
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_rows(rows: list[dict[str, Any]], path: Path | None = None) -> None:
    """Lines appended with a single write (two runs append to the same file)."""
    path = CURVES if path is None else path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in rows))


def finished(run: Run, rows: list[dict[str, Any]]) -> bool:
    """Whether ``rows`` hold ``run``'s last step with its evaluation-noise lines."""
    return any(r["name"] == run.name and r["step"] == run.steps and r.get("eval_seed") == NOISE_SEEDS[-1]
               for r in rows)


# ------------------------------------------------------------------------------------------------ one run


def _config(run: Run, workdir: Path, resume: bool):
    from wadi_distill.vsd.trainer import DistillConfig

    config = DistillConfig(
        teacher="builtin:digits", output_dir=str(workdir), max_steps=run.steps, batch_size=16, lr=run.lr,
        fake_lr=1e-2, fake_rank=32, cfg=1.5, seed=run.seed, device="cpu", checkpointing_steps=CHECKPOINT_EVERY,
        checkpoints_total_limit=1, tensorboard=False, progress=False, final_samples=0, student_adapter="full",
        fake_updates_per_step=run.fake_updates, adam_weight_decay=0.0, ema_decay=None,
        resume="latest" if resume else None)
    if run.method == "lorad-probe":
        config.student_adapter, config.rank_from_probe, config.budget = "lorad", str(REPORT), BUDGET
    elif run.method == "lorad-uniform":
        config.student_adapter, config.rank = "lorad", run.rank or budget_ranks()[1][run.method]
    for key, value in run.extra.items():
        if not hasattr(config, key):
            raise SystemExit(f"{run.name}: DistillConfig has no field {key!r}")
        setattr(config, key, value)
    return config


@functools.lru_cache(maxsize=1)
def budget_ranks() -> tuple[int, dict[str, int], list[str]]:
    """The probe plan's trainable parameters, the uniform rank of each adapter kind that matches it, and the
    modules a uniform adapter covers (the paper preset's layers) — the like-for-like budget of digits_study.py."""
    from digits_study import budget_ranks as study_budget_ranks

    return study_budget_ranks()


def _student(run: Run):
    """The student object of a PEFT run (None: the trainer builds the config's student)."""
    if run.method not in ("lora-peft", "dora-peft"):
        return None
    from wadi_distill.vsd.students import PeftStudent

    _, ranks, modules = budget_ranks()
    return PeftStudent(run.method.split("-")[0], run.rank or ranks[run.method], modules)


class Scorer:
    """The project's digits evaluation on fixed noise, for merged students given as state dicts."""

    def __init__(self, per_class: int = PER_CLASS) -> None:
        from wadi_distill.builtin.digits.data import load_split
        from wadi_distill.digits_demo.demo import eval_labels
        from wadi_distill.teachers.pipeline import load_teacher

        self.bundle = load_teacher("builtin:digits")
        self.labels = eval_labels(per_class)
        self.reference = load_split("reference")

    def __call__(self, merged: Path, eval_seed: int) -> dict[str, float]:
        from wadi_distill.digits_demo.demo import one_step_digits
        from wadi_distill.evaluate import evaluate_images
        from wadi_distill.one_step import load_merged_weights

        load_merged_weights(self.bundle.denoiser, merged)
        images = one_step_digits(self.bundle, self.bundle.denoiser.eval(), self.labels, seed=eval_seed)
        metrics = evaluate_images(images, self.labels, self.reference)
        return {k: float(metrics[k]) for k in METRICS}


def _averages(params: list, names: tuple[str, ...] = tuple(AVERAGES)) -> dict[str, Any]:
    from diffusers.training_utils import EMAModel

    return {name: EMAModel(params, **kwargs) for name, kwargs in AVERAGES.items() if name in names}


def run_one(run: Run) -> None:
    """Train ``run`` to its length (resuming from its checkpoint), scoring raw and averaged weights as it goes."""
    import torch

    from wadi_distill.vsd.trainer import VSDTrainer

    torch.set_num_threads(1)
    rows = read_curves()
    if finished(run, rows):
        print(f"{run.name}: finished, skipped", flush=True)
        return
    done = {(r["step"], r["weights"], r.get("eval_seed", EVAL_SEED)) for r in rows if r["name"] == run.name}
    workdir = WORK / run.name
    averages_file = workdir / "averages.pt"
    resume = averages_file.exists() and any(workdir.glob("checkpoint-*"))
    from _study import cpu_model

    cpu = cpu_model()
    if not resume and done:
        through = max(step for step, _, _ in done)
        append_rows([{"name": run.name, "recorded_through": through, "cpu": cpu,
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}], RESTARTS)
        print(f"{run.name}: no checkpoint for its lines through step {through}; trained again from step 0, and "
              f"its lines past {through} are recorded as a restart ({RESTARTS.name})", flush=True)
    trainer = VSDTrainer(_config(run, workdir, resume), student=_student(run))
    averages = _averages(trainer.student_params, run.scored)
    if resume:
        saved = torch.load(averages_file, weights_only=False)
        if saved["step"] != trainer.step:
            raise SystemExit(f"{workdir}: the averages are at step {saved['step']}, the checkpoint at {trainer.step}")
        for name, ema in averages.items():
            ema.load_state_dict(saved["averages"][name])
        print(f"{run.name}: resumed at step {trainer.step}", flush=True)
    scorer = Scorer()
    started, train_s = time.perf_counter(), 0.0
    try:
        while trainer.step < run.steps:
            t0 = time.perf_counter()
            trainer.train_step()
            for ema in averages.values():
                ema.step(trainer.student_params)
            train_s += time.perf_counter() - t0
            step = trainer.step
            if step % SCORE_EVERY == 0 or step == run.steps:
                seeds = (EVAL_SEED, *NOISE_SEEDS) if step == run.steps else (EVAL_SEED,)
                t1 = time.perf_counter()
                new = _score_all(trainer, averages, scorer, run, step, seeds, done)
                for row in new:  # the CPU too: a run's seconds (and its last bits) depend on it
                    row.update(train_s=round(train_s, 1), score_s=round(time.perf_counter() - t1, 1), cpu=cpu)
                append_rows(new)
                for row in new:
                    if row["eval_seed"] == EVAL_SEED:
                        print(json.dumps({k: row[k] for k in ("name", "step", "weights", "fd_pixel", "fd_features",
                                                              "recall", "train_s", "score_s")}), flush=True)
            if step % CHECKPOINT_EVERY == 0 or step == run.steps:
                trainer.save_checkpoint()
                torch.save({"step": step, "averages": {n: e.state_dict() for n, e in averages.items()}},
                           averages_file)
    finally:
        trainer.close()
    print(f"{run.name}: {run.steps} steps in {time.perf_counter() - started:.0f} s ({train_s:.0f} s training)",
          flush=True)


def _score_all(trainer, averages, scorer: Scorer, run: Run, step: int, seeds: tuple[int, ...],
               done: set) -> list[dict[str, Any]]:
    """Raw and every average of ``trainer``'s student, merged and scored on each noise seed in ``seeds``."""
    from safetensors.torch import save_file

    rows = []
    with tempfile.TemporaryDirectory(prefix="wadi-stability-") as tmp:
        for weights in run.scored:
            todo = [s for s in seeds if (step, weights, s) not in done]
            if not todo:
                continue
            ema = averages.get(weights)
            if ema is not None:
                ema.store(trainer.student_params)
                ema.copy_to(trainer.student_params)
            try:
                path = Path(tmp) / "student.safetensors"
                save_file(trainer.merged_student_state(), str(path))
            finally:
                if ema is not None:
                    ema.restore(trainer.student_params)
            for seed in todo:
                rows.append({"name": run.name, **asdict(run), "step": step, "weights": weights, "eval_seed": seed,
                             "decay": None if ema is None else float(ema.cur_decay_value or 0.0),
                             **scorer(path, seed)})
    return rows


# ------------------------------------------------------------------------------------------------ the queue

# Phase A: per method the demo's recipe first, then the alternatives (lr, fake-score updates per step)
PHASE_A = {"full": [(2e-5, 5), (5e-5, 5), (2e-5, 1)], "lorad-probe": [(1e-3, 1), (3e-3, 1), (1e-3, 5)]}
A_STEPS = 1200  # amended from 1600 (see the report)
B_STEPS = {"lorad-probe": 1200, "full": 1200}  # Phase B's lengths (declared; cut from 2400 / 2000, see the report)
B_SEEDS = (0, 1, 2, 3, 4)
# Phase C, the like-for-like comparison (reports/digits_comparison.md, declared before its runs): the adapters the
# stability study did not run, on the LoRaD recipe of Phase B (lr 1e-3, 1 fake-score update per step, 1200 steps),
# raw weights and the default average only; full fine-tuning and LoRaD-from-the-probe are Phase B's runs
C_METHODS = ("lorad-uniform", "lora-peft", "dora-peft")
C_LR, C_FAKE_UPDATES, C_WEIGHTS = 1e-3, 1, ["raw", "ema-p2/3"]
E_WEIGHTS = ["ema-p2/3", "ema-p3/4"]  # the two ramped averages side by side (reports/digits_ema_seeds.md)


def queue(name: str) -> list[Run]:
    """Named queues (declared in reports/digits_stability.md before the runs).

    ``A:<method>``  Phase A, seed 0: that method's recipes at 1600 steps, the demo's first.
    ``A1:<method>`` the same at seed 1.
    ``B:<method>:<lr>:<fake>[@<steps>]``  Phase B, seeds 0-4 of that recipe at the method's Phase B length (a
                    Phase A run of the same recipe and seed continues from its 1600-step checkpoint); with
                    ``@<steps>`` the same runs continued to that length for the comparison, scoring its weights.
    ``C:<method>[:<rank>][@<steps>]``  Phase C, seeds 0-4 of a uniform adapter (lorad-uniform, lora-peft,
                    dora-peft) on the LoRaD recipe at the parameter budget of the probe plan, or at ``rank``; with
                    ``@<steps>`` the same runs (same names, so the same checkpoints) continued to that length.
    ``E:<method>[:<rank>]@<steps>``  Phase C's runs trained again from step 0 to ``<steps>``, scoring both ramped
                    averages (``E_WEIGHTS``), under their own names (``…-averages``), so that they never continue
                    or skip a Phase C run.
    ``L:<method>:<lr>:<fake>:<seed>[:<steps>][:field=value,...]``  one run with DistillConfig fields changed
                    (the levers study, reports/digits_levers.md), e.g. ``L:lorad-probe:0.001:1:0:cfg=2.0``.
    """
    kind, _, rest = name.partition(":")
    rest, at, length = rest.partition("@")
    if at and not (kind in ("B", "C", "E") and length.isdigit() and int(length) > 0):
        raise SystemExit(f"unknown queue {name!r}: only B:, C: and E: queues take @<steps>, a positive whole number")
    if kind == "E" and at and rest.split(":")[0] in C_METHODS and rest.count(":") <= 1:
        return [dataclasses.replace(run, name=f"{run.name}-averages", weights=list(E_WEIGHTS))
                for run in queue(f"C:{rest}@{length}")]
    if kind in ("A", "A1") and rest in PHASE_A:
        return [Run(rest, 0 if kind == "A" else 1, lr, fake, A_STEPS) for lr, fake in PHASE_A[rest]]
    if kind == "B" and rest.count(":") == 2:
        method, lr, fake = rest.split(":")
        if method in B_STEPS and not at:
            return [Run(method, seed, float(lr), int(fake), B_STEPS[method]) for seed in B_SEEDS]
        if method in B_STEPS:  # continued for the comparison, on its weights (a retrained run keeps only that average)
            return [Run(method, seed, float(lr), int(fake), int(length), weights=list(C_WEIGHTS)) for seed in B_SEEDS]
    if kind == "C" and rest.split(":")[0] in C_METHODS and rest.count(":") <= 1:
        method, _, rank = rest.partition(":")
        steps = int(length) if length else B_STEPS["lorad-probe"]
        return [Run(method, seed, C_LR, C_FAKE_UPDATES, steps, rank=int(rank) if rank else None,
                    weights=list(C_WEIGHTS)) for seed in B_SEEDS]
    if kind == "L" and rest.count(":") >= 3:  # one lever run: L:<method>:<lr>:<fake>:<seed>[:<steps>][:key=value,...]
        method, lr, fake, seed, *tail = rest.split(":")
        steps = int(tail.pop(0)) if tail and "=" not in tail[0] else A_STEPS
        extra = dict(_parse_field(item) for item in (tail[0].split(",") if tail else []) if item)
        return [Run(method, int(seed), float(lr), int(fake), steps, extra=extra)]
    raise SystemExit(f"unknown queue {name!r}: A:<method>, A1:<method>, B:<method>:<lr>:<fake updates>[@<steps>], "
                     f"C:<{'|'.join(C_METHODS)}>[:<rank>][@<steps>], E:<{'|'.join(C_METHODS)}>[:<rank>]@<steps> or "
                     "L:<method>:<lr>:<fake updates>:<seed>[:<steps>][:field=value,...]")


def _parse_field(item: str) -> tuple[str, Any]:
    """``key=value`` with the value read as JSON when it parses (numbers, true/false), else as a string."""
    key, _, value = item.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def run_pool(runs: list[Run], workers: int) -> None:
    """Each run in its own process (one torch thread), ``workers`` at a time, in the order given."""
    from _study import LoggedProcess, run_logged

    run_logged([LoggedProcess(run.name, [sys.executable, __file__, "job", json.dumps(asdict(run))],
                              OUT / "logs" / f"{run.name}.log", {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
                              append=True) for run in runs], workers, "runs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run queues' pending runs")
    run.add_argument("--queue", action="append", required=True,
                     help="A:<method>, A1:<method>, B:<method>:<lr>:<fake>[@<steps>], C:<method>[:<rank>][@<steps>] "
                          "or L:... (see queue(); repeatable)")
    run.add_argument("--workers", type=int, default=2)
    run.add_argument("--only", default="", help="comma-separated run names to keep from the queues")
    run.add_argument("--by-seed", action="store_true", help="order the pending runs by seed (stable), so that a "
                     "comparison cut short keeps every method at the seeds it reached")
    run.add_argument("--dry-run", action="store_true")
    job = sub.add_parser("job", help="one run (used by run)")
    job.add_argument("spec")
    args = parser.parse_args()
    if args.command == "job":
        run_one(Run(**json.loads(args.spec)))
        return
    rows, seen, runs = read_curves(), set(), []
    only = {n for n in args.only.split(",") if n}
    for name in args.queue:
        for r in queue(name):
            if r.name not in seen and not finished(r, rows) and (not only or r.name in only):
                runs.append(r)
            seen.add(r.name)
    if args.by_seed:
        runs.sort(key=lambda r: r.seed)
    for r in runs:
        print("  pending", r.name, r.steps, flush=True)
    if not args.dry_run:
        run_pool(runs, args.workers)


if __name__ == "__main__":
    main()
