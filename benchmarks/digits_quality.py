"""Quality benchmark on builtin:digits -> reports/digits_quality.md and .json.

Same teacher, same VSD loop, same number of steps, same prompts (the ten class prompts), same batch and seeds;
only the student differs:

- ``full``: every weight trainable (DMD2 / SwiftBrush style);
- ``lora-peft`` / ``dora-peft``: PEFT ``LoraConfig`` (``use_dora`` off / on) on the paper preset's layers (every
  Linear inside the down/mid/up blocks), rank chosen so the trainable parameters match the budget;
- ``lorad-uniform``: LoRaD, the paper preset, one rank everywhere matching the budget;
- ``lorad-probe``: LoRaD with layers and ranks from a probe report (``plan_from_report``) — the budget.

The budget is the trainable-parameter count of the probe's plan (10 % of the backbone by default). Each method runs
once per seed; every metric of :func:`wadi_distill.evaluate.evaluate_images` is reported as mean ± std over seeds,
with the wall time per VSD step.

    python benchmarks/digits_quality.py --report reports/demo/report.json --steps 200 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("full", "lora-peft", "dora-peft", "lorad-uniform", "lorad-probe")


def run_method(method: str, *, seed: int, steps: int, batch_size: int, lr: dict[str, float], report: Path,
               budget: float, ranks: dict[str, int], modules: list[str], per_class: int, workdir: Path) -> dict:
    """Train one student with VSD and score its one-step samples; returns metrics, params and timings."""
    from wadi_distill.teachers.pipeline import load_teacher
    from wadi_distill.builtin.digits.demo import eval_labels, one_step_digits
    from wadi_distill.builtin.digits.data import load_split
    from wadi_distill.evaluate import evaluate_images
    from wadi_distill.one_step import load_merged_weights
    from wadi_distill.vsd.peft_student import distill_peft
    from wadi_distill.vsd.trainer import DistillConfig, distill

    kind = method.split("-")[0]
    config = DistillConfig(teacher="builtin:digits", output_dir=str(workdir / f"{method}-s{seed}"), max_steps=steps,
                           batch_size=batch_size, lr=lr[kind], seed=seed, checkpointing_steps=steps, tensorboard=False,
                           progress=False, final_samples=2, student_adapter="full")
    started = time.perf_counter()
    if method == "full":
        result = distill(config)
    elif method in ("lora-peft", "dora-peft"):
        result = distill_peft(config, kind=kind, rank=ranks[method], modules=modules)
    elif method == "lorad-uniform":
        config.student_adapter, config.rank = "lorad", ranks[method]
        result = distill(config)
    else:
        config.student_adapter, config.rank_from_probe, config.budget = "lorad", str(report), budget
        result = distill(config)
    train_seconds = time.perf_counter() - started
    step_seconds = [json.loads(line)["step_seconds"]
                    for line in (Path(config.output_dir) / "logs" / "losses.jsonl").read_text().splitlines() if line]
    bundle = load_teacher("builtin:digits")
    load_merged_weights(bundle.denoiser, result.merged_path)
    labels = eval_labels(per_class)
    images = one_step_digits(bundle, bundle.denoiser.eval(), labels, seed=1000 + seed)
    metrics = evaluate_images(images, labels, load_split("reference"))
    return {"method": method, "seed": seed, "trainable_params": sum(int(v.numel()) for v in result.student_state.values()),
            "train_seconds": round(train_seconds, 1), "step_seconds_median": statistics.median(step_seconds),
            "final_loss_student": result.losses.get("loss_student"), **metrics}


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def summarize(runs: list[dict], keys=("fd_pixel", "fd_features", "precision", "recall", "class_accuracy")) -> list[dict]:
    """Per method: mean and std of every metric over seeds, trainable params, median seconds per step."""
    out = []
    for method in METHODS:
        rows = [r for r in runs if r["method"] == method]
        if not rows:
            continue
        entry = {"method": method, "seeds": [r["seed"] for r in rows], "trainable_params": rows[0]["trainable_params"],
                 "step_seconds": statistics.median(r["step_seconds_median"] for r in rows)}
        for key in keys:
            values = [r[key] for r in rows]
            entry[key] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                          "values": values}
        out.append(entry)
    return out


def markdown(summary: list[dict], settings: dict, command: str, wall: float) -> str:
    titles = {"fd_pixel": "FD pixel ↓", "fd_features": "FD features ↓", "precision": "precision ↑",
              "recall": "recall ↑", "class_accuracy": "class acc. ↑"}
    lines = ["# Digits quality benchmark: which one-step student is best at the same budget?", "",
             f"Command: `{command}` — wall time {wall / 60:.1f} min on this machine "
             f"({settings['torch_threads']} torch threads, CPU shared with other jobs, so seconds are indicative).", "",
             "| student | trainable params | s / step | " + " | ".join(titles.values()) + " |",
             "|---|---:|---:|" + "---:|" * len(titles)]
    for entry in summary:
        cells = [entry["method"], f"{entry['trainable_params']:,}", f"{entry['step_seconds']:.2f}"]
        cells += [_mean_std(entry[k]["values"]) for k in titles]
        lines.append("| " + " | ".join(cells) + " |")
    best = []
    for key, title in titles.items():
        pick = (min if key.startswith("fd_") else max)(summary, key=lambda e: e[key]["mean"])
        best.append(f"{title.rstrip(' ↓↑')}: {pick['method']}")
    lines += ["", "Best mean per metric — " + "; ".join(best) + "."]
    lines += ["", "Mean ± standard deviation over seeds " + ", ".join(map(str, settings["seeds"])) + "; "
              f"{settings['per_class'] * 10} one-step images per run ({settings['per_class']} per digit) against the "
              "300 held-out reference digits.", "",
              "Settings: " + ", ".join(f"{k} = {v}" for k, v in settings.items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", type=Path, default=ROOT / "reports" / "demo" / "report.json")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--budget", type=float, default=0.10)
    parser.add_argument("--full-lr", type=float, default=2e-5)
    parser.add_argument("--adapter-lr", type=float, default=1e-3, help="learning rate of every adapter student")
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids oversubscribing shared cores)")
    parser.add_argument("--output", type=Path, default=ROOT / "reports" / "digits_quality")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from wadi_distill.builtin.digits.model import load_builtin
    from wadi_distill.vsd.peft_student import rank_for_budget
    from wadi_distill.plan import plan_from_preset, plan_from_report
    from wadi_probe.io.atomic import write_json_atomic, write_text_atomic

    unet = load_builtin("digits").unet
    probe_plan = plan_from_report(unet, args.report, budget=args.budget)
    budget_params = probe_plan.trainable_params
    preset = plan_from_preset(unet, 1)
    shapes = [tuple(e.shape) for e in preset.layers]
    modules = [e.module for e in preset.layers]
    ranks = {m: rank_for_budget(shapes, budget_params, m.split("-")[0]) for m in ("lora-peft", "dora-peft", "lorad-uniform")}
    lr = {"full": args.full_lr, "lora": args.adapter_lr, "dora": args.adapter_lr, "lorad": args.adapter_lr}
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    started = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="digits-quality-") as work:
        for seed in seeds:
            for method in methods:
                run = run_method(method, seed=seed, steps=args.steps, batch_size=args.batch_size, lr=lr,
                                 report=args.report, budget=args.budget, ranks=ranks, modules=modules,
                                 per_class=args.per_class, workdir=Path(work))
                runs.append(run)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in run.items()}), flush=True)
    wall = time.perf_counter() - started
    settings = {"steps": args.steps, "batch_size": args.batch_size, "seeds": seeds, "budget_params": budget_params,
                "budget_fraction": args.budget, "ranks": ranks, "full_lr": args.full_lr, "adapter_lr": args.adapter_lr,
                "fake_score": "LoRaD rank 32, lr 1e-2", "vsd_cfg": 1.5, "per_class": args.per_class,
                "report": str(args.report.relative_to(ROOT) if args.report.is_relative_to(ROOT) else args.report),
                "torch_threads": torch.get_num_threads()}
    summary = summarize(runs)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix().split(str(ROOT) + "/")[-1], *sys.argv[1:]])
    write_json_atomic(args.output.with_suffix(".json"), {"settings": settings, "command": command,
                                                          "wall_seconds": round(wall, 1), "runs": runs,
                                                          "summary": summary})
    write_text_atomic(args.output.with_suffix(".md"), markdown(summary, settings, command, wall))
    print(markdown(summary, settings, command, wall))


if __name__ == "__main__":
    main()
