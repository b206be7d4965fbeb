"""The demo's seed report (benchmarks/demo_seeds.py): seed spread, wins over the one-step teacher, the ratio to
the 25-step teacher at the students' set size."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import demo_seeds  # noqa: E402


def _row(key, name, fd, images, **other):
    return {"key": key, "name": name, "fd_pixel": other.get("fd_pixel", 3.0), "fd_features": fd,
            "precision": other.get("precision", 0.97), "recall": other.get("recall", 0.3),
            "class_accuracy": other.get("class_accuracy", 0.9995), "num_images": images, "fd_features_sd": 0.5}


def _write_seed(folder: Path, lorad_fd: float, teacher_fd: float) -> None:
    folder.mkdir(parents=True)
    rows = [_row("teacher_multistep", "teacher, DDIM 25 steps + CFG 2", teacher_fd, 1000, fd_pixel=0.7),
            _row("teacher_one_step", "teacher, one step", 63.0, 5000, fd_pixel=3.58, precision=0.966, recall=0.11),
            _row("full_student", "full fine-tuning VSD student, one step", 20.0, 5000),  # ties on class acc.
            _row("lorad_student", "LoRaD-from-probe VSD student, one step", lorad_fd, 5000, class_accuracy=1.0)]
    record = {"rows": rows, "settings": {"eval_noise_sets": 5}, "timings_seconds": {"total": 600.0}}
    (folder / "metrics.json").write_text(json.dumps(record))


def test_the_ratio_uses_the_teacher_at_the_students_set_size_when_it_was_scored(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_seeds, "seed_folder", lambda seed: tmp_path / f"seed-{seed}")
    _write_seed(tmp_path / "seed-0", 21.0, 7.5)
    _write_seed(tmp_path / "seed-1", 23.0, 7.9)
    text = demo_seeds.report([0, 1], teacher_sizes=tmp_path / "missing.json")
    # without the teacher at 5000 images: the demo's own row (sets of 1000), said to flatter the students
    assert "| 0 | LoRaD-from-probe | 3.00 | 21.00 | 0.9700 | 0.300 | 1.0000 | yes | 2.80× |" in text
    assert "Ratio: over the demo's own 25-step teacher row (7.70, the mean over the seeds, on sets of 1000" in text
    assert ("| 0 | full fine-tuning | 3.00 | 20.00 | 0.9700 | 0.300 | 0.9995 ✗ (0.9995) | no: class acc. ↑ | 2.67× |"
            in text)
    assert "flatters the students" in text
    assert "| LoRaD-from-probe VSD student, one step | 3.00 ± 0.00 | 22.00 ± 1.41" in text
    sizes = tmp_path / "sizes.json"
    sizes.write_text(json.dumps({"rows": [
        {"model": "teacher_multistep", "images_per_set": 5000, "noise_sets": 3, "mean": {"fd_features": 7.0},
         "sd": {"fd_features": 0.2}}]}))
    text = demo_seeds.report([0, 1], teacher_sizes=sizes)
    assert "| 1 | LoRaD-from-probe | 3.00 | 23.00 | 0.9700 | 0.300 | 1.0000 | yes | 3.29× |" in text
    assert "feature FD / 25-step teacher's (same set size) |" in text
    assert "feature FD 7.00 ± 0.20 over 3 sets" in text
