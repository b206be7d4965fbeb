"""The swap ablation and direction-vs-norm on the stable recipe's fully fine-tuned students (no weight decay).

The students are the stability study's Phase B full fine-tuning runs (lr 2e-5, 5 fake-score updates per step,
``adam_weight_decay=0``, 1200 steps), taken as their default ``final/`` weights: the ramped EMA ``ema-p2/3``,
rebuilt from each run's last checkpoint and saved averages in ``$WADI_STABILITY_WORK``. For each student:

- ``student``                     the averaged student itself;
- ``teacher norms``               the student with the teacher's per-row norms (:func:`wadi_probe.hybrid.write_hybrid`);
- ``teacher directions``          the student with the teacher's per-row directions;
- ``structureless (matrix)``      the teacher plus Gaussian noise of the student's change's Frobenius norm per matrix;
- ``structureless (rows)``        the teacher plus Gaussian noise matched row by row: each row's noise scaled to the
                                  norm of that row's change — the probe's chance for changes of exactly these sizes.

Each variant is scored with the stability study's evaluation (2000 one-step images, noise seed base 1000 and the
five noise sets 3001–3005) and probed against the teacher (:func:`wadi_probe.analyze.compare`). One JSON line per
(seed, variant, noise seed) lands in ``reports/digits_stability/ablations.jsonl``; a (seed, variant) already there is
skipped. A seed whose checkpoint is gone is retrained first with ``--retrain`` (the same run, from step 0, into
``$WADI_STABILITY_WORK``; its curve lines go to ``ablation_retrain/curves.jsonl``, not the study's file).

    python benchmarks/digits_ablations.py run [--seeds 0,1,2,3,4] [--retrain]
    python benchmarks/digits_ablations_report.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits_stability import (  # noqa: E402 - the study's runs and evaluation, one definition
    B_SEEDS, EVAL_SEED, NOISE_SEEDS, OUT, WORK, Run, Scorer, _averages, _config, _student, queue,
)

ABLATIONS = OUT / "ablations.jsonl"
RETRAIN_OUT = OUT / "ablation_retrain"  # retrain()'s runs write their curve lines here, not in the study's file
WEIGHTS = "ema-p2/3"
VARIANTS = ("student", "teacher norms", "teacher directions", "structureless (matrix)", "structureless (rows)")
PROBE_KEYS = ("angle_rad_mean", "angle_deg_mean", "norm_change_mean", "angle_to_norm_ratio",
              "paper_direction_to_norm_ratio", "residual_energy_at_30pct_rank_mean",
              "residual_energy_at_30pct_rank_chance_mean", "residual_energy_at_30pct_rank_excess_mean")
METRICS = ("fd_pixel", "fd_features", "precision", "recall", "class_accuracy")


def full_runs() -> dict[int, Run]:
    return {run.seed: run for run in queue("B:full:2e-05:5")}


def averaged_student(run: Run, path: Path) -> None:
    """Write ``run``'s ``WEIGHTS`` average at its last checkpoint, merged into a plain student, to ``path``."""
    import torch
    from safetensors.torch import save_file

    from wadi_distill.vsd.trainer import VSDTrainer

    workdir = WORK / run.name
    trainer = VSDTrainer(_config(run, workdir, resume=True), student=_student(run))
    try:
        if trainer.step != run.steps:
            raise SystemExit(f"{workdir}: the last checkpoint is at step {trainer.step}, not {run.steps}")
        saved = torch.load(workdir / "averages.pt", weights_only=False)
        if saved["step"] != run.steps:
            raise SystemExit(f"{workdir}: the averages are at step {saved['step']}, not {run.steps}")
        ema = _averages(trainer.student_params, (WEIGHTS,))[WEIGHTS]
        ema.load_state_dict(saved["averages"][WEIGHTS])
        ema.copy_to(trainer.student_params)
        save_file(trainer.merged_student_state(), str(path))
    finally:
        trainer.close()


def structureless(teacher: dict, student: dict, seed: int, per: str) -> dict:
    """The teacher plus Gaussian noise in every weight matrix, scaled to the student's change per matrix
    (``per="matrix"``: same Frobenius norm) or per row (``per="rows"``: each output row's noise has the norm of
    that row's change); vectors (biases, norm scales) as in the student."""
    import torch

    generator, out = torch.Generator().manual_seed(seed), {}
    for name in sorted(student):
        value = student[name]
        base = teacher[name].float()
        if value.ndim < 2:
            out[name] = value.clone()
            continue
        delta = (value.float() - base).reshape(base.shape[0], -1)
        noise = torch.randn(delta.shape, generator=generator)
        if per == "matrix":
            scaled = noise * (delta.norm() / noise.norm())
        elif per == "rows":
            scaled = noise * (delta.norm(dim=1, keepdim=True) / noise.norm(dim=1, keepdim=True))
        else:
            raise ValueError(f"per must be 'matrix' or 'rows', not {per!r}")
        out[name] = base + scaled.reshape(base.shape)
    return out


def probe(teacher_state: dict, path: Path) -> dict[str, Any]:
    from wadi_probe.analyze import compare

    summary = compare(teacher_state, path, device="cpu").summary
    return {k: summary.get(k) for k in PROBE_KEYS}


def read_rows() -> list[dict[str, Any]]:
    if not ABLATIONS.exists():
        return []
    return [json.loads(line) for line in ABLATIONS.read_text().splitlines() if line.strip()]


def ablate(seed: int) -> None:
    """Every variant of the seed's averaged full student, scored on all noise sets and probed once."""
    import torch
    from safetensors.torch import load_file, save_file

    from wadi_probe.builtins import builtin_path
    from wadi_probe.hybrid import write_hybrid

    from _study import cpu_model

    torch.set_num_threads(1)
    run = full_runs()[seed]
    done = {r["variant"] for r in read_rows() if r["seed"] == seed and r["eval_seed"] == NOISE_SEEDS[-1]}
    if set(VARIANTS) <= done:
        print(f"seed {seed}: done, skipped", flush=True)
        return
    teacher = {k: v.float() for k, v in load_file(builtin_path("digits")).items()}
    scorer, cpu = Scorer(), cpu_model()
    with tempfile.TemporaryDirectory(prefix="wadi-ablations-") as tmp:
        student = Path(tmp) / "student.safetensors"
        averaged_student(run, student)
        for variant in VARIANTS:
            if variant in done:
                continue
            path = Path(tmp) / f"{variant.replace(' ', '-').strip('()')}.safetensors"
            if variant == "student":
                path = student
            elif variant.startswith("teacher"):
                write_hybrid("builtin:digits", student, "norm" if variant == "teacher norms" else "direction", path)
            else:
                per = "matrix" if "matrix" in variant else "rows"
                save_file(structureless(teacher, load_file(student), seed=seed, per=per), str(path))
            probed = probe(teacher, path)
            rows = [{"seed": seed, "run": run.name, "weights": WEIGHTS, "variant": variant, "eval_seed": s,
                     "cpu": cpu, **scorer(path, s), **(probed if s == EVAL_SEED else {})}
                    for s in (EVAL_SEED, *NOISE_SEEDS)]
            ABLATIONS.parent.mkdir(parents=True, exist_ok=True)
            with open(ABLATIONS, "a") as handle:
                handle.write("".join(json.dumps(r) + "\n" for r in rows))
            first = rows[0]
            print(json.dumps({k: first.get(k) for k in ("seed", "variant", "fd_features", "fd_pixel", "recall",
                                                        "angle_to_norm_ratio")}), flush=True)


def retrain(seed: int) -> None:
    """The seed's Phase B run again from step 0 (its checkpoint is gone), curves in a file of their own."""
    run = full_runs()[seed]
    run = Run(**{**asdict(run), "weights": ["raw", WEIGHTS]})
    env = {**os.environ, "WADI_STABILITY_OUT": str(RETRAIN_OUT), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    driver = Path(__file__).resolve().parent / "digits_stability.py"
    subprocess.run([sys.executable, str(driver), "job", json.dumps(asdict(run))], env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="ablate the averaged full students of the given seeds")
    run.add_argument("--seeds", default=",".join(map(str, B_SEEDS)))
    run.add_argument("--retrain", action="store_true", help="retrain a seed whose checkpoint is gone")
    args = parser.parse_args()
    for seed in (int(s) for s in args.seeds.split(",") if s):
        name = full_runs()[seed].name
        if not (WORK / name / "averages.pt").exists():
            if not args.retrain:
                print(f"seed {seed}: no checkpoint in {WORK / name} (skipped; --retrain trains it again)", flush=True)
                continue
            retrain(seed)
        ablate(seed)


if __name__ == "__main__":
    main()
