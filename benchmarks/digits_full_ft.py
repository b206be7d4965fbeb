"""VSD on builtin:digits: how the one-step student's quality moves with training length, per recipe.

Each variant trains one student (fully fine-tuned, or the demo's LoRaD-from-probe student for ``lorad*``) (seed 0, batch 16, VSD CFG 1.5, fake score LoRaD rank 32 at lr
1e-2, as in the demo) and is scored after 100, 200, 400 and 800 steps (the run is resumed from its checkpoint
between lengths, so each variant is one continuous run). Scores: :func:`wadi_distill.evaluate.evaluate_images` on
300 one-step images (30 per digit) against the 300 held-out reference digits. One JSON line per (variant, steps).

    python benchmarks/digits_full_ft.py --variants base,ttur5 --output reports/digits_full_ft.jsonl
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

VARIANTS = {
    "base": {"lr": 2e-5},  # the demo's recipe before: one fake-score update per student step
    "ttur5": {"lr": 2e-5, "fake_updates_per_step": 5},  # DMD2's two time-scale update rule
    "lr5e-6": {"lr": 5e-6},
    "fakerank128": {"lr": 2e-5, "fake_rank": 128},
    # The demo's LoRaD student (layers and ranks from reports/demo/report.json, 10 % budget), at 1 and 5 fake updates.
    "lorad": {"lr": 1e-3, "student": "lorad-probe"},
    "lorad-ttur5": {"lr": 1e-3, "student": "lorad-probe", "fake_updates_per_step": 5},
}
REPORT = Path(__file__).resolve().parents[1] / "reports" / "demo" / "report.json"
LENGTHS = (100, 200, 400, 800)
METRICS = ("fd_pixel", "fd_features", "precision", "recall", "class_accuracy")


def run_variant(name: str, workdir: Path, lengths: tuple[int, ...] = LENGTHS) -> Iterator[dict]:
    """Train one variant through ``lengths`` (resuming in between); yield its scores at each length as they come."""
    from wadi_distill.teachers.pipeline import load_teacher
    from wadi_distill.builtin.digits.demo import eval_labels, one_step_digits
    from wadi_distill.builtin.digits.data import load_split
    from wadi_distill.evaluate import evaluate_images
    from wadi_distill.one_step import load_merged_weights
    from wadi_distill.vsd.trainer import DistillConfig, distill

    variant = VARIANTS[name]
    reference, labels = load_split("reference"), eval_labels(30)
    for index, steps in enumerate(lengths):
        config = DistillConfig(
            teacher="builtin:digits", output_dir=str(workdir / name), max_steps=steps, batch_size=16,
            lr=variant["lr"], fake_lr=1e-2, fake_rank=variant.get("fake_rank", 32), cfg=1.5, seed=0, device="cpu",
            checkpointing_steps=min(lengths), tensorboard=False, progress=False, final_samples=2,
            student_adapter="full", fake_updates_per_step=variant.get("fake_updates_per_step", 1),
            resume="latest" if index else None)
        if variant.get("student") == "lorad-probe":
            config.student_adapter, config.rank_from_probe, config.budget = "lorad", str(REPORT), 0.10
        started = time.perf_counter()
        result = distill(config)
        seconds = time.perf_counter() - started
        bundle = load_teacher("builtin:digits")
        load_merged_weights(bundle.denoiser, result.merged_path)
        metrics = evaluate_images(one_step_digits(bundle, bundle.denoiser.eval(), labels, seed=1000), labels, reference)
        yield {"variant": name, "steps": steps, "train_s": round(seconds, 1),
               **{key: round(metrics[key], 3) for key in METRICS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="base,ttur5", help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--output", type=Path, help="append the JSON lines here too")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.variants.split(","):
            for row in run_variant(name, Path(workdir)):
                line = json.dumps(row)
                print(line, flush=True)
                if args.output:
                    with open(args.output, "a") as handle:
                        handle.write(line + "\n")


if __name__ == "__main__":
    main()
