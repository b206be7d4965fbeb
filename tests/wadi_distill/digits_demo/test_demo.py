"""The end-to-end demo in a tiny configuration: every file is written and every value is sane."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from wadi_distill.digits_demo.demo import (
    METRIC_KEYS,
    eval_labels,
    eval_seeds,
    grid_subset,
    metrics_markdown,
    run_demo,
)

BUILTIN = Path(__file__).resolve().parents[3] / "wadi_distill" / "builtin" / "digits"
needs_shipped = pytest.mark.skipif(
    not (BUILTIN / "digits_unet.safetensors").is_file() or not (BUILTIN / "digits_classifier.safetensors").is_file(),
    reason="the shipped digits teacher/classifier are not in wadi_distill/builtin/digits/",
)

TINY = dict(full_steps=2, lorad_steps=2, batch_size=2, lorad_batch_size=3, lorad_fake_updates=2, ddim_steps=4,
            eval_per_class=4)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return run_demo(out, seed=0, progress=False, **TINY)


@needs_shipped
def test_demo_writes_every_file(demo):
    out = demo.output_dir
    for name in ("report.json", "metrics.json", "metrics.md", "full_student.safetensors",
                 "lorad_student/adapter.safetensors", "lorad_student/adapter_config.json"):
        assert (out / name).is_file(), name
    for key in ("real", "teacher_multistep", "teacher_one_step", "full_student", "lorad_student"):
        grid = out / f"samples_{key}.png"
        assert grid.is_file() and grid.stat().st_size > 100
        from PIL import Image

        # 4 images per class in a 4-wide grid: 10 rows of 8 px + borders, upscaled 4×
        assert Image.open(grid).size == ((4 * 10 + 2) * 4, (10 * 10 + 2) * 4)
    assert sorted(p.name for p in (out / "plots").glob("*.png"))  # at least the report's figures
    assert not list(out.glob(".runs-*")), "the training work folders are removed"


@needs_shipped
def test_one_process_scores_the_same_as_two(demo, tmp_path):
    """The default demo scores the teacher and the full student in a second process while it trains; with
    processes=1 everything runs here, after the training: every score is the same to the bit."""
    assert demo.settings["processes"] == 2
    alone = run_demo(tmp_path / "one", seed=0, progress=False, processes=1, **TINY)
    assert alone.settings["processes"] == 1
    assert [r["key"] for r in alone.rows] == [r["key"] for r in demo.rows]
    for one, two in zip(alone.rows, demo.rows):
        assert {k: v for k, v in one.items() if k not in ("score_seconds", "train_seconds")} == \
               {k: v for k, v in two.items() if k not in ("score_seconds", "train_seconds")}, one["key"]
    for key, grid in demo.grids.items():
        assert grid.read_bytes() == alone.grids[key].read_bytes(), key
    notes = (tmp_path / "one" / "metrics.md").read_text()
    assert "one process, each stage after the other" in notes
    assert "a second process scored the teacher's rows and the full student's while the students trained" in \
        (demo.output_dir / "metrics.md").read_text()


@needs_shipped
def test_demo_metrics_are_sane(demo):
    record = json.loads((demo.output_dir / "metrics.json").read_text())
    rows = {row["key"]: row for row in record["rows"]}
    assert list(rows) == ["real", "teacher_multistep", "teacher_one_step", "full_student", "lorad_student"]
    for row in rows.values():
        assert row["num_images"] == 40 and row["num_reference"] == 300
        for key in METRIC_KEYS:
            assert math.isfinite(row[key])
            assert row[key] >= 0
            if not key.startswith("fd_"):
                assert row[key] <= 1
    assert rows["teacher_multistep"]["steps_per_image"] == 2 * TINY["ddim_steps"]
    assert rows["full_student"]["steps_per_image"] == 1
    # the held-out real digits are recognised and sit closer to the reference than the blurry one-step teacher
    assert rows["real"]["class_accuracy"] >= 0.9
    assert rows["real"]["fd_features"] < rows["teacher_one_step"]["fd_features"]
    # students: every weight vs a LoRaD plan within the 10 % budget
    teacher_params = rows["full_student"]["trainable_params"]
    assert teacher_params > 900_000
    assert 0 < rows["lorad_student"]["trainable_params"] <= 0.10 * teacher_params
    assert record["plan"]["layers"] == len(record["plan"]["ranks"]) > 0
    assert record["timings_seconds"]["total"] > 0
    table = (demo.output_dir / "metrics.md").read_text()
    assert "LoRaD-from-probe" in table and "DDIM 4 steps" in table


@needs_shipped
def test_demo_report_and_students_are_real(demo):
    from safetensors.torch import load_file

    from wadi_distill.lorad.serialization import load_adapter
    from wadi_distill.builtin.digits.model import load_builtin
    from wadi_probe.report.schema import load_report

    report = load_report(demo.output_dir / "report.json")
    summary = report.summary
    assert summary["matrices"] > 50 and summary["unmatched"] == 0
    assert summary["direction_change_mean"] > 0 and summary["norm_change_mean"] > 0
    teacher = load_builtin("digits")
    student = load_file(str(demo.full_student_path))
    teacher_state = teacher.unet.state_dict()
    assert set(student) == set(teacher_state)
    assert any(not torch.equal(student[k], teacher_state[k].float()) for k in student)
    # the probe's per-layer numbers match the files: recompute one layer's direction change
    name = next(r["name"] for r in report.layers if r["kind"] == "linear")
    t, s = teacher_state[name].double(), student[name].double()
    direction = 1 - torch.nn.functional.cosine_similarity(t, s, dim=1)
    assert report.layer(name)["direction_change_mean"] == pytest.approx(direction.mean().item(), rel=1e-3, abs=1e-9)
    # the LoRaD adapter loads back onto the teacher with the planned layers
    config = load_adapter(teacher.unet, demo.lorad_adapter_dir, adapter_name="student")
    assert set(config.target_modules) == set(demo.plan["ranks"])


def test_metrics_markdown_marks_the_best_generated_value():
    rows = [
        {"key": "real", "name": "real", "fd_pixel": 0.1, "fd_features": 1.0, "precision": 1.0, "recall": 1.0,
         "class_accuracy": 1.0},
        {"key": "a", "name": "a", "steps_per_image": 1, "fd_pixel": 2.0, "fd_features": 5.0, "precision": 0.5,
         "recall": 0.2, "class_accuracy": 0.9, "trainable_params": 1000, "train_seconds": 3.0},
        {"key": "b", "name": "b", "steps_per_image": 50, "fd_pixel": 1.0, "fd_features": 9.0, "precision": 0.7,
         "recall": 0.1, "class_accuracy": 0.8},
    ]
    text = metrics_markdown(rows)
    line_a = next(line for line in text.splitlines() if line.startswith("| a |"))
    line_b = next(line for line in text.splitlines() if line.startswith("| b |"))
    assert "**5.00**" in line_a and "**0.200**" in line_a and "1,000" in line_a
    assert "**1.00**" in line_b and "**0.700**" in line_b
    assert "**" not in next(line for line in text.splitlines() if line.startswith("| real |"))


def test_evaluation_set_helpers():
    labels = eval_labels(3)
    assert labels.tolist() == [k for k in range(10) for _ in range(3)]
    assert eval_seeds(3, 0) == [0, 1, 2] and eval_seeds(2, 1) == [1_000_003, 1_000_004]
    images = torch.arange(30, dtype=torch.float32).view(30, 1, 1, 1).expand(30, 1, 8, 8)
    picked = grid_subset(images, labels, 2)
    assert picked[:, 0, 0, 0].tolist() == [0, 1, 3, 4, 6, 7, 9, 10, 12, 13, 15, 16, 18, 19, 21, 22, 24, 25, 27, 28]


def test_cli_refuses_bad_input_without_writing(tmp_path):
    from wadi_distill.cli import app

    runner = CliRunner()
    target = tmp_path / "taken"
    target.write_text("keep me")
    result = runner.invoke(app, ["demo", "-o", str(target), "--quick", "--no-progress"])
    assert result.exit_code == 2
    assert "is a file" in result.output
    assert target.read_text() == "keep me"

    fresh = tmp_path / "fresh"
    result = runner.invoke(app, ["demo", "-o", str(fresh), "--full-steps", "0", "--no-progress"])
    assert result.exit_code == 2
    assert "full-steps must be at least 1" in result.output
    assert not fresh.exists()
    result = runner.invoke(app, ["demo", "-o", str(fresh), "--processes", "0", "--no-progress"])
    assert result.exit_code == 2 and "processes must be at least 1" in result.output and not fresh.exists()
    result = runner.invoke(app, ["demo", "-o", str(fresh), "--lorad-batch-size", "0", "--no-progress"])
    assert result.exit_code == 2 and "lorad-batch-size must be at least 1" in result.output and not fresh.exists()
    result = runner.invoke(app, ["demo", "-o", str(fresh), "--lorad-fake-updates", "0", "--no-progress"])
    assert result.exit_code == 2 and "lorad-fake-updates must be at least 1" in result.output and not fresh.exists()


@needs_shipped
def test_each_student_trains_again_from_its_recorded_run_command(demo, tmp_path, single_thread):
    """metrics.json names every setting a student was trained with as `wadi-distill run` options; the recorded
    command, run as it is, trains the same LoRaD adapter bit for bit."""
    import shlex

    from safetensors.torch import load_file

    from wadi_distill.cli import app

    trained = json.loads((demo.output_dir / "metrics.json").read_text())["settings"]["trained_with"]
    full, lorad = trained["full_student"]["run_options"], trained["lorad_student"]["run_options"]
    assert full["--full-finetune"] is True and full["--fake-updates-per-step"] == 5
    assert full["--lr"] == 2e-5 and full["--max-steps"] == TINY["full_steps"]
    assert full["--cfg"] == 2.0 and full["--fake-cfg"] == 1.0
    assert lorad["--rank-from-probe"] == str(demo.output_dir / "report.json") and lorad["--budget"] == 0.1
    assert lorad["--fake-updates-per-step"] == 2 and lorad["--batch-size"] == TINY["lorad_batch_size"]
    assert full["--batch-size"] == TINY["batch_size"]
    assert lorad["--ema-decay"] == 0.999 and lorad["--adam-weight-decay"] == 0.0 and lorad["--fake-cfg"] == 1.0
    words = shlex.split(trained["lorad_student"]["command"])
    assert words[:2] == ["wadi-distill", "run"]
    words[words.index("--output-dir") + 1] = str(tmp_path / "again")
    result = CliRunner().invoke(app, ["run", *words[2:], "--no-progress", "--no-tensorboard"])
    assert result.exit_code == 0, result.output
    again = load_file(str(tmp_path / "again" / "final" / "adapter.safetensors"))
    shipped = load_file(str(demo.lorad_adapter_dir / "adapter.safetensors"))
    assert again.keys() == shipped.keys() and all(torch.equal(again[k], shipped[k]) for k in shipped)


@needs_shipped
@pytest.mark.slow
def test_sigterm_mid_demo_ends_both_processes_and_leaves_no_scratch(tmp_path):
    """SIGTERM while the full student trains and the second process scores the teacher: one sentence, the requeue
    exit code, the scratch runs removed and the scoring process gone with the demo."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    out = tmp_path / "demo"
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": os.pathsep.join([str(BUILTIN.parents[2]),
                                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", "from wadi_distill.cli import main; main()", "demo", "-o",
                             str(out), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        deadline = time.monotonic() + 120
        children: list = []
        while time.monotonic() < deadline and not (children and list(out.glob(".runs-*/full/run.json"))):
            children = psutil.Process(proc.pid).children(recursive=True)  # the training loop has started
            time.sleep(0.5)
        scorers = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
        assert scorers, [c.cmdline() for c in children]
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 75, stdout[-2000:] + stderr[-2000:]
    assert "SIGTERM received: the demo stopped and removed its training runs" in stderr
    assert "Traceback" not in stderr and "--resume" not in stdout + stderr  # nothing is left to resume
    assert not list(out.glob(".runs-*")) and not (out / "metrics.json").exists()
    gone = psutil.wait_procs(scorers, timeout=20)[1] == []
    assert gone, "the scoring process outlived the demo"
