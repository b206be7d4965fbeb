"""How the evaluation noise of the digits metrics shrinks with the images per noise set (reports/digits_eval_noise.md).

Each generator (a trained one-step student, the teacher's own one-step sample, the teacher's multi-step DDIM sample)
is scored on K noise sets of N images (N/10 per digit) for several N, with
:func:`wadi_distill.digits_demo.demo.score_one_step_digits` (the demo's and the study's scorer); the sd over the
sets is the evaluation noise. Writes a JSON with every per-set value, the sds and the seconds per set.

    python benchmarks/digits_eval_noise.py NAME=STUDENT ... --sets 5 --sizes 300,1000,2000,5000 \
        --multistep-sizes 300 -o reports/digits_eval_noise.json

STUDENT: a merged ``student.safetensors`` or an adapter folder of ``builtin:digits`` (e.g. from
``wadi-distill run --teacher builtin:digits --rank 14 --max-steps 400 --batch-size 16 --lr 1e-3 --cfg 1.5``, or the
demo's ``reports/demo/full_student.safetensors`` and ``reports/demo/lorad_student``). The teacher's one-step
sample is always scored too. The JSON is rewritten after each row.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def _multistep(per_class: int, sets: int, seed: int, ddim_steps: int, cfg: float) -> dict:
    """The teacher's DDIM sample scored the same way (set j: generator seed ``seed + j·N``, as the demo does)."""
    from wadi_distill.digits_demo.demo import eval_labels, score_multistep_digits
    from wadi_distill.teachers.pipeline import load_teacher

    return score_multistep_digits(load_teacher("builtin:digits"), eval_labels(per_class), noise_sets=sets, seed=seed,
                                  steps=ddim_steps, cfg=cfg)[0]


def main() -> None:
    from wadi_distill.digits_demo.demo import score_one_step_digits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="NAME=PATH: a merged student.safetensors or an adapter folder")
    parser.add_argument("--sets", type=int, default=5)
    parser.add_argument("--sizes", default="300,1000,2000,5000")
    parser.add_argument("--multistep-sizes", default="300")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", type=Path, default=Path("reports/digits_eval_noise.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = [("teacher_one_step", None)] + [tuple(m.split("=", 1)) for m in args.models]
    out = {"models": {name: str(path) for name, path in models}, "sets": args.sets, "seed": args.seed,
           "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(), "rows": []}

    def record(model: str, size: int, run) -> None:
        started = time.perf_counter()
        summary = run()
        seconds = time.perf_counter() - started
        metrics = {k: v for k, v in summary["metrics"].items() if v is not None}
        out["rows"].append({"model": model, "images_per_set": size, "noise_sets": summary["noise_sets"],
                            "first_seeds": summary["first_seeds"],
                            "seconds_per_set": round(seconds / summary["noise_sets"], 2),
                            "mean": {k: v["mean"] for k, v in metrics.items()},
                            "sd": {k: v["sd"] for k, v in metrics.items()},
                            "values": {k: v["values"] for k, v in metrics.items()}})
        row = out["rows"][-1]
        print(json.dumps({k: row[k] for k in ("model", "images_per_set", "seconds_per_set", "mean", "sd")}), flush=True)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")  # after each row: a partial run counts

    for size in [int(s) for s in args.sizes.split(",") if s]:
        for model, generator in models:
            record(model, size, lambda: score_one_step_digits(generator, noise_sets=args.sets, per_class=size // 10,
                                                              seed=args.seed))
    for size in [int(s) for s in args.multistep_sizes.split(",") if s]:
        record("teacher_multistep", size, lambda: _multistep(size // 10, args.sets, args.seed, 25, 2.0))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
