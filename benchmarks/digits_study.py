"""The paper's findings on builtin:digits, measured like for like: one driver for every run of the study.

Every run is one VSD student on the built-in digits teacher (batch 16, VSD CFG 1.5, fake score LoRaD rank 32 at
lr 1e-2, one torch thread), trained continuously and, at each of its lengths, scored and probed:

- scores: :func:`wadi_distill.digits_demo.demo.score_one_step_digits`, the demo's scorer, on its noise sets
  (``EVAL_NOISE_SETS`` sets of ``10·EVAL_PER_CLASS`` one-step images, noise seeds from ``EVAL_SEED`` — the same
  noise for every run, so runs are compared on paired samples) against the 300 held-out reference digits: the
  mean over the sets and, as ``<metric>_sd``, the evaluation noise (reports/digits_eval_noise.md);
- probe: :func:`wadi_probe.analyze.compare` of the teacher against the merged student — mean angle (rad), mean
  relative norm change, both ratios (first-order angle / norm and the paper's (1 − cos) / norm), residual energy
  at 30 % rank with its chance value and excess.

One JSON line per (run, length) lands in ``reports/digits_study/runs.jsonl`` as it comes; a run whose lines are
all there is skipped, so an interrupted study continues where it stopped. Phases (declared before any result):

``sweep``  validation seed 100, 800 steps: each student at its learning rate with 1 and with 5 fake-score updates
           per step, and once more at 2.5× (full fine-tuning) or 3× (adapters) the learning rate. The setting a
           student keeps is the one with the lowest **feature FD** at 800 steps (declared criterion).
``length`` seed 0, the demo's two recipes (full fine-tuning: lr 2e-5, 5 fake updates; LoRaD from the probe: lr
           1e-3, 1 fake update), scored and probed at 100, 200, 400, 800, 1600 and 3200 steps.
``main``   seeds 0, 1, 2 at 800 steps, each student at its sweep-chosen setting (a seed-0 run equal to a length
           run — same student, lr and fake updates — is that run's 800-step point: the learning rate is constant
           after warm-up, so an 800-step run is the first 800 steps of a longer one).
``demo``   the demo's two recipes (the length runs' settings) at seeds 1 and 2, if the sweep kept another setting.
``rank``   LoRaD on the paper preset at ranks 4, 8, 14 (the budget), 32 and 64 (≥ full rank on every layer), seeds
           0, 1, 2, on the demo's LoRaD recipe (lr 1e-3, 1 fake update per step), with the probe-planned student of
           the same recipe (``demo``) beside it. Declared after the sweep: the sweep kept 5 fake updates for
           LoRaD-uniform, and 15 runs at 5 updates (≈7.5 min each on one core) did not fit the machine's time
           beside the benchmark; at 1 update a run takes ≈2.5 min. The sweep's own 1-update LoRaD-uniform run shows
           where that setting stands.
``swap``   the swap ablation on the three ``main`` fully fine-tuned students (teacher norms into the student, and
           teacher directions), all metrics; declared verdict metric: the rise of feature FD over the student.
``noise``  the evaluation's own spread: the seed-0 full and LoRaD students scored with five other noise seeds.
``extras`` reference rows (real test digits, the teacher at one step and at DDIM 25 + CFG 2) and, for each kept
           fully fine-tuned student, a structureless change of the same size per matrix (Gaussian, same Frobenius
           norm), scored and probed: what the probe's ratios and spectra give by chance.

    python benchmarks/digits_study.py run --phases sweep,length --workers 2
    python benchmarks/digits_study.py run --phases main,demo,rank --workers 2   # needs the sweep's choice
    python benchmarks/digits_study.py swap && python benchmarks/digits_study.py extras
    python benchmarks/digits_study.py noise
    python benchmarks/digits_study_report.py
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("WADI_STUDY_OUT", ROOT / "reports" / "digits_study"))
RUNS = OUT / "runs.jsonl"
STUDENTS = Path(os.environ.get("WADI_STUDY_WORK", Path(tempfile.gettempdir()) / "wadi-digits-study"))
# the probe report whose plan the studies train (the demo report of 2026-12-02 11:21, kept fixed here so that
# re-running the demo does not change the studies' LoRaD plan: 47 layers, 98,048 parameters at the 10 % budget)
REPORT = ROOT / "reports" / "digits_study" / "probe_report.json"
METHODS = ("full", "lora-peft", "dora-peft", "lorad-uniform", "lorad-probe")
BASE_LR = {"full": 2e-5, "lora-peft": 1e-3, "dora-peft": 1e-3, "lorad-uniform": 1e-3, "lorad-probe": 1e-3}
LR_UP = {"full": 2.5, "lora-peft": 3.0, "dora-peft": 3.0, "lorad-uniform": 3.0, "lorad-probe": 3.0}
VALIDATION_SEED, SEEDS, EVAL_SEED = 100, (0, 1, 2), 1000
LENGTHS = (100, 200, 400, 800, 1600, 3200)
RANKS = (4, 8, 32, 64)
RANK_LR, RANK_FAKE_UPDATES = 1e-3, 1  # the demo's LoRaD recipe (see ``rank`` in the module docstring)
BUDGET = 0.10
METRICS = ("fd_pixel", "fd_features", "precision", "recall", "class_accuracy")
PROBE_KEYS = ("angle_rad_mean", "angle_deg_mean", "norm_change_mean", "angle_to_norm_ratio",
              "paper_direction_to_norm_ratio", "residual_energy_at_30pct_rank_mean",
              "residual_energy_at_30pct_rank_chance_mean", "residual_energy_at_30pct_rank_excess_mean",
              "lorad_explained_mean", "lorad_explained_chance_mean", "recommended_rank_median")


@dataclass
class Job:
    """One continuous VSD run: a student, its setting, a seed, and the lengths at which it is scored."""

    phase: str
    method: str
    seed: int
    lr: float
    fake_updates: int
    lengths: tuple[int, ...] = (800,)
    rank: int | None = None  # uniform adapters: the rank (None: the one matching the probe plan's budget)
    keep: bool = False  # keep the final merged student (for the swap ablation)
    name: str = field(default="")

    def __post_init__(self) -> None:
        self.lengths = tuple(self.lengths)
        if not self.name:
            rank = f"-r{self.rank}" if self.rank else ""
            self.name = f"{self.phase}/{self.method}{rank}-lr{self.lr:g}-f{self.fake_updates}-s{self.seed}"


# ------------------------------------------------------------------------------------------------ one run


@functools.lru_cache(maxsize=1)
def budget_ranks() -> tuple[int, dict[str, int], list[str]]:
    """(Once per process.) The probe plan's trainable parameters, the uniform rank of each adapter kind that matches it, the modules."""
    from wadi_distill.builtin.digits.model import load_builtin
    from wadi_distill.plan import plan_from_preset, plan_from_report
    from wadi_distill.vsd.peft_student import rank_for_budget

    unet = load_builtin("digits").unet
    budget = plan_from_report(unet, REPORT, budget=BUDGET).trainable_params
    preset = plan_from_preset(unet, 1)
    shapes = [tuple(e.shape) for e in preset.layers]
    ranks = {m: rank_for_budget(shapes, budget, m.split("-")[0]) for m in ("lora-peft", "dora-peft", "lorad-uniform")}
    return budget, ranks, [e.module for e in preset.layers]


def _config(job: Job, workdir: Path, steps: int, resume: bool):
    from wadi_distill.vsd.trainer import DistillConfig

    config = DistillConfig(
        teacher="builtin:digits", output_dir=str(workdir), max_steps=steps, batch_size=16, lr=job.lr, fake_lr=1e-2,
        fake_rank=32, cfg=1.5, seed=job.seed, device="cpu", checkpointing_steps=min(job.lengths), tensorboard=False,
        progress=False, final_samples=2, student_adapter="full", fake_updates_per_step=job.fake_updates,
        resume="latest" if resume else None)
    if job.method == "lorad-probe":
        config.student_adapter, config.rank_from_probe, config.budget = "lorad", str(REPORT), BUDGET
    elif job.method == "lorad-uniform":
        config.student_adapter, config.rank = "lorad", job.rank or budget_ranks()[1]["lorad-uniform"]
    return config


def _train(job: Job, workdir: Path, steps: int, resume: bool):
    from wadi_distill.vsd.trainer import distill_peft
    from wadi_distill.vsd.trainer import distill

    config = _config(job, workdir, steps, resume)
    if job.method in ("lora-peft", "dora-peft"):
        _, ranks, modules = budget_ranks()
        return distill_peft(config, kind=job.method.split("-")[0], rank=job.rank or ranks[job.method], modules=modules)
    return distill(config)


def score_and_probe(merged_path: Path, eval_seed: int = EVAL_SEED) -> dict[str, Any]:
    """The digits metrics of the merged student at ``merged_path`` (means over the demo's noise sets, with each
    metric's sd over them as ``<metric>_sd``) and the probe's summary against the teacher."""
    from wadi_distill.digits_demo.demo import EVAL_NOISE_SETS, EVAL_PER_CLASS, score_one_step_digits
    from wadi_probe.analyze import compare
    from wadi_probe.builtins import builtin_path
    from safetensors.torch import load_file

    scores = score_one_step_digits(merged_path, noise_sets=EVAL_NOISE_SETS, per_class=EVAL_PER_CLASS, seed=eval_seed)
    teacher_state = {k: v.float() for k, v in load_file(builtin_path("digits")).items()}
    summary = compare(teacher_state, merged_path, device="cpu").summary
    metrics = scores["metrics"]
    return {**{k: float(metrics[k]["mean"]) for k in METRICS}, **{f"{k}_sd": metrics[k]["sd"] for k in METRICS},
            "noise_sets": scores["noise_sets"], "images_per_set": scores["images_per_set"],
            **{k: summary.get(k) for k in PROBE_KEYS}}


def run_job(job: Job) -> None:
    """Train ``job`` through its lengths (resuming between them) and append one line per length to RUNS."""
    import torch

    torch.set_num_threads(1)
    done = {r["steps"] for r in read_runs() if r["name"] == job.name}
    with tempfile.TemporaryDirectory(prefix="wadi-study-") as tmp:
        workdir, elapsed = Path(tmp) / "run", 0.0
        for index, steps in enumerate(job.lengths):
            started = time.perf_counter()
            result = _train(job, workdir, steps, resume=index > 0)
            elapsed += time.perf_counter() - started
            params = sum(int(v.numel()) for v in result.student_state.values())
            if steps in done:
                continue
            row = {"name": job.name, **asdict(job), "steps": steps, "trainable_params": params,
                   "train_s_cumulative": round(elapsed, 1), **score_and_probe(result.merged_path)}
            row["lengths"] = list(job.lengths)
            append_run(row)
            print(json.dumps({k: row.get(k) for k in ("name", "steps", "fd_pixel", "fd_features", "recall")}), flush=True)
        if job.keep:
            STUDENTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(result.merged_path, student_path(job))


def student_path(job: Job) -> Path:
    return STUDENTS / (job.name.replace("/", "__") + ".safetensors")


def read_runs(path: Path | None = None) -> list[dict[str, Any]]:
    path = RUNS if path is None else path
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_run(row: dict[str, Any], path: Path | None = None) -> None:
    """One JSON line, appended with a single write (two workers append to the same file)."""
    path = RUNS if path is None else path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------------------ the phases


def sweep_jobs() -> list[Job]:
    jobs = []
    for method in METHODS:
        lr = BASE_LR[method]
        up_fake = 5 if method == "full" else 1  # full fine-tuning with 1 fake update is the known unstable setting
        jobs += [Job("sweep", method, VALIDATION_SEED, lr, 1), Job("sweep", method, VALIDATION_SEED, lr, 5),
                 Job("sweep", method, VALIDATION_SEED, lr * LR_UP[method], up_fake)]
    return jobs


def length_jobs() -> list[Job]:
    return [Job("length", "full", 0, 2e-5, 5, LENGTHS, keep=True), Job("length", "lorad-probe", 0, 1e-3, 1, LENGTHS)]


def chosen_settings(runs: list[dict[str, Any]] | None = None) -> dict[str, tuple[float, int]]:
    """Per student, the (lr, fake updates) of its sweep run with the lowest feature FD at 800 steps."""
    runs = read_runs() if runs is None else runs
    chosen = {}
    for method in METHODS:
        rows = [r for r in runs if r["phase"] == "sweep" and r["method"] == method and r["steps"] == 800]
        if len(rows) < 3:
            raise SystemExit(f"the sweep of {method} is not finished ({len(rows)} of 3 runs): run --phases sweep")
        best = min(rows, key=lambda r: r["fd_features"])
        chosen[method] = (best["lr"], best["fake_updates"])
    return chosen


def main_jobs() -> list[Job]:
    jobs, chosen = [], chosen_settings()
    lengths = {(j.method, j.lr, j.fake_updates): j for j in length_jobs()}
    for method in METHODS:
        lr, fake = chosen[method]
        for seed in SEEDS:
            if seed == 0 and (method, lr, fake) in lengths and method != "full":
                continue  # the length run's 800-step point (see the module docstring)
            # (full fine-tuning's seed 0 runs again: the swap ablation needs its 800-step student, and the two runs
            # must agree exactly — a check of the reuse above)
            jobs.append(Job("main", method, seed, lr, fake, keep=method == "full"))
    return jobs


def demo_jobs() -> list[Job]:
    """The demo's two recipes (its length runs' settings) at seeds 1 and 2: the demo's seed spread. Named as main
    runs, so where the sweep kept the demo's setting they are the main runs themselves and run once."""
    return [Job("main", j.method, seed, j.lr, j.fake_updates, keep=j.method == "full")
            for j in length_jobs() for seed in SEEDS if seed != 0]


def rank_jobs() -> list[Job]:
    """LoRaD-uniform at each rank (None: the budget rank) on the demo's LoRaD recipe, seeds 0, 1, 2."""
    return [Job("rank", "lorad-uniform", seed, RANK_LR, RANK_FAKE_UPDATES, rank=rank)
            for rank in (*RANKS, None) for seed in SEEDS]


PHASES = {"sweep": sweep_jobs, "length": length_jobs, "main": main_jobs, "demo": demo_jobs, "rank": rank_jobs}


def pending(jobs: list[Job]) -> list[Job]:
    """The jobs whose lines are not all in RUNS yet, each name once (phases may list the same run)."""
    runs, seen, out = read_runs(), set(), []
    for job in jobs:
        if job.name not in seen and {r["steps"] for r in runs if r["name"] == job.name} != set(job.lengths):
            out.append(job)
        seen.add(job.name)
    return out


def run_pool(jobs: list[Job], workers: int) -> None:
    """Each job in its own process (one torch thread each), ``workers`` at a time, longest first."""
    cost = {1: 1.0, 5: 2.9}
    jobs = sorted(jobs, key=lambda j: -max(j.lengths) * cost.get(j.fake_updates, 1.0) * (2 if j.method == "full" else 1))

    from _study import LoggedProcess, run_logged

    run_logged([LoggedProcess(job.name, [sys.executable, __file__, "job", json.dumps(asdict(job))],
                              OUT / "logs" / (job.name.replace("/", "__") + ".log"), {"OMP_NUM_THREADS": "1"})
                for job in jobs], workers, "jobs")


# ------------------------------------------------------------------------------------------------ swap, noise


def _full_students() -> list[Job]:
    """The kept fully fine-tuned students at the sweep's setting for full fine-tuning, one per seed."""
    lr, fake = chosen_settings()["full"]
    jobs = {j.seed: j for j in main_jobs() + demo_jobs()
            if j.method == "full" and j.lr == lr and j.fake_updates == fake and j.keep}
    return [jobs[s] for s in sorted(jobs)]


def swap_ablation() -> None:
    """Teacher norms / teacher directions swapped into each kept fully fine-tuned student, scored; → swap.jsonl."""
    import torch

    from wadi_probe.hybrid import write_hybrid

    torch.set_num_threads(1)
    jobs = _full_students()
    teacher = "builtin:digits"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for job in jobs:
            seed, student = job.seed, student_path(job)
            if not student.exists():
                raise SystemExit(f"{student} is missing: run the main phase (it keeps the full students)")
            rows.append({"seed": seed, "variant": "student", **score_and_probe(student)})
            for take in ("norm", "direction"):
                hybrid = Path(tmp) / f"{take}-{seed}.safetensors"
                write_hybrid(teacher, student, take, hybrid)
                rows.append({"seed": seed, "variant": f"teacher {take}s", **score_and_probe(hybrid)})
            print(json.dumps(rows[-3:])[:300], flush=True)
    (OUT / "swap.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def eval_noise() -> None:
    """The evaluation's own spread: the seed-0 full and LoRaD students at five more noise seeds → noise.jsonl."""
    rows = []
    lorad = Job("length", "lorad-probe", 0, 1e-3, 1, LENGTHS)
    with tempfile.TemporaryDirectory() as tmp:
        for job in (_full_students()[0], lorad):
            path = student_path(job)
            if not path.exists():
                # the LoRaD length run keeps no student: train its first 800 steps again (bit-identical to the run)
                result = _train(Job("noise", job.method, 0, job.lr, job.fake_updates), Path(tmp) / job.method, 800,
                                False)
                path = Path(tmp) / f"{job.method}.safetensors"
                shutil.copyfile(result.merged_path, path)
            for eval_seed in (EVAL_SEED, 2001, 2002, 2003, 2004, 2005):
                rows.append({"method": job.method, "eval_seed": eval_seed, **score_and_probe(path, eval_seed)})
    (OUT / "noise.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def structureless_student(teacher: dict, student: dict, seed: int) -> dict:
    """The teacher plus, in every weight matrix, Gaussian noise of exactly the student's change's Frobenius norm;
    every vector (bias, norm scale) as in the student. The probe's chance for a change of this size."""
    import torch

    generator, out = torch.Generator().manual_seed(seed), {}
    for name, value in student.items():
        base = teacher[name].float()
        if value.ndim < 2:
            out[name] = value.clone()
            continue
        delta = value.float() - base
        noise = torch.randn(base.shape, generator=generator)
        out[name] = base + noise * (delta.norm() / noise.norm())
    return out


def extras() -> None:
    """Reference rows (real test digits, teacher one step, teacher DDIM 25 + CFG 2, all on EVAL_SEED) and a
    structureless change of each kept fully fine-tuned student's size, scored and probed → baselines.jsonl."""
    import torch
    from safetensors.torch import load_file, save_file

    from wadi_distill.builtin.digits.data import load_split
    from wadi_distill.digits_demo.demo import eval_labels, multistep_digits, one_step_digits
    from wadi_distill.evaluate import evaluate_images
    from wadi_distill.teachers.pipeline import load_teacher
    from wadi_probe.builtins import builtin_path

    torch.set_num_threads(1)
    bundle, labels, reference = load_teacher("builtin:digits"), eval_labels(30), load_split("reference")
    test = load_split("test")
    real = torch.cat([test.images[test.labels == k][:30] for k in range(10)])  # 30 per digit, as generated
    rows = [{"variant": "held-out real digits (test split)", **evaluate_images(real, labels, reference)},
            {"variant": "teacher, one step",
             **evaluate_images(one_step_digits(bundle, bundle.denoiser.eval(), labels, seed=EVAL_SEED), labels,
                               reference)},
            {"variant": "teacher, DDIM 25 + CFG 2",
             **evaluate_images(multistep_digits(bundle, labels, EVAL_SEED, steps=25, cfg=2.0), labels, reference)}]
    teacher = load_file(builtin_path("digits"))
    jobs = _full_students()
    with tempfile.TemporaryDirectory() as tmp:
        for job in jobs:
            path = Path(tmp) / f"structureless-{job.seed}.safetensors"
            save_file(structureless_student(teacher, load_file(student_path(job)), seed=job.seed), path)
            rows.append({"variant": "structureless change of the full student's size", "seed": job.seed,
                         **score_and_probe(path)})
    (OUT / "baselines.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the phases' pending jobs")
    run.add_argument("--phases", default="sweep,length,main,rank")
    run.add_argument("--workers", type=int, default=2)
    run.add_argument("--dry-run", action="store_true", help="list the pending jobs only")
    job = sub.add_parser("job", help="one run (used by run)")
    job.add_argument("spec")
    sub.add_parser("swap")
    sub.add_parser("noise")
    sub.add_parser("extras")
    args = parser.parse_args()
    if args.command == "job":
        run_job(Job(**json.loads(args.spec)))
    elif args.command == "swap":
        swap_ablation()
    elif args.command == "noise":
        eval_noise()
    elif args.command == "extras":
        extras()
    else:
        jobs = pending([job for phase in args.phases.split(",") for job in PHASES[phase]()])
        print(f"{args.phases}: {len(jobs)} pending", flush=True)
        for job in jobs:
            print("  ", job.name, job.lengths, flush=True)
        if not args.dry_run:
            run_pool(jobs, args.workers)  # one pool: the listed phases run side by side


if __name__ == "__main__":
    main()
