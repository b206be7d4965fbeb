"""Several students against one teacher: one teacher read per layer, the same numbers as separate comparisons,
refusals one by one, the combined summary files, side-by-side plots, and the built-in teacher by name."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from wadi_probe import compare
from wadi_probe.analyze import SUMMARY_COLUMNS, compare_many, default_labels
from wadi_probe.builtins import builtin_path
from wadi_probe.cli import app
from wadi_probe.io.checkpoints import Checkpoint

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "reports" / "demo"
runner = CliRunner()


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    folder = tmp_path_factory.mktemp("many")
    gen = torch.Generator().manual_seed(0)
    teacher = {f"blocks.{i}.proj.weight": torch.randn(24, 20, generator=gen) for i in range(6)}
    teacher.update({f"blocks.{i}.proj.bias": torch.randn(24, generator=gen) for i in range(6)})
    paths = {"teacher": folder / "teacher.safetensors"}
    save_file(teacher, str(paths["teacher"]))
    for index, scale in enumerate((0.01, 0.03, 0.1)):
        student = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in teacher.items()}
        paths[f"s{index}"] = folder / f"student{index}.safetensors"
        save_file(student, str(paths[f"s{index}"]))
    other = {f"blocks.{i}.proj.weight": torch.randn(24, 16, generator=gen) for i in range(6)}
    paths["other"] = folder / "other.safetensors"
    save_file(other, str(paths["other"]))
    return paths


def test_three_students_cost_one_teacher_read_and_match_separate_comparisons(trio, monkeypatch):
    reads: list[str] = []
    original = Checkpoint.tensor

    def counting(self, name):
        if Path(self.path).name == "teacher.safetensors":
            reads.append(name)
        return original(self, name)

    monkeypatch.setattr(Checkpoint, "tensor", counting)
    students = [trio["s0"], trio["s1"], trio["s2"]]
    result = compare_many(trio["teacher"], students, device="cpu")
    assert len(reads) == result.teacher_reads == 12 and len(set(reads)) == 12  # each teacher tensor once
    assert list(result.reports) == ["student0", "student1", "student2"] and not result.refused
    reads.clear()
    for label, path in zip(result.reports, students):
        alone = compare(trio["teacher"], path, device="cpu")
        many = result.reports[label]
        for a, b in zip(alone.layers, many.layers):
            assert a["name"] == b["name"] and a["angle_deg_mean"] == b["angle_deg_mean"]
            assert a["recommended_rank"] == b["recommended_rank"]
    assert len(reads) == 36  # three separate comparisons read the teacher three times
    # the students moved more and more: the table says so, in order
    angles = [row["angle_deg_mean"] for row in result.table()]
    assert angles == sorted(angles) and set(result.table()[0]) == set(SUMMARY_COLUMNS)


def test_a_student_of_another_architecture_is_refused_alone(trio):
    result = compare_many(trio["teacher"], [trio["s0"], trio["other"], trio["s1"]], labels=["a", "b", "c"], device="cpu")
    assert list(result.reports) == ["a", "c"]
    assert "different architectures" in result.refused["b"] or "share no" in result.refused["b"]


def test_labels_default_to_file_and_folder_names_and_must_differ():
    assert default_labels(["x/dmd2.safetensors", "y/turbo/", "z/dmd2.safetensors", "builtin:digits"]) == [
        "dmd2", "turbo", "dmd2-2", "digits"]
    with pytest.raises(Exception, match="labels must differ"):
        compare_many({"a.weight": torch.ones(2, 2)}, [{"a.weight": torch.ones(2, 2)}] * 2, labels=["x", "x"])


def test_cli_writes_one_report_per_student_and_the_combined_summary(trio, tmp_path):
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(trio["teacher"]), str(trio["s0"]), str(trio["s1"]), str(trio["other"]),
                                 "--label", "small", "--label", "big", "--label", "wrong", "-o", str(out),
                                 "--no-progress"])
    # a refused student makes the exit code 2 (a script can tell), the others are written all the same
    assert result.exit_code == 2, result.output
    assert sorted(p.name for p in out.iterdir()) == ["big.json", "small.json", "summary.csv", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert [row["label"] for row in summary["students"]] == ["small", "big"] and "wrong" in summary["refused"]
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [row["label"] for row in rows] == ["small", "big"] and set(rows[0]) == set(SUMMARY_COLUMNS)
    text = " ".join(result.stdout.split())
    assert "Students side by side" in text and "read once for 2 students" in text and "2 reports, summary.json" in text
    errors = " ".join(result.stderr.split())
    assert "refused wrong:" in errors and "refused" not in text
    assert errors.endswith("error: 1 of 3 students was refused (wrong); the other reports are written.")
    # every line but the one naming the (long, unbroken) output path fits 80 columns
    assert max(len(line) for line in result.stdout.splitlines() if str(out) not in line) <= 80

    plots = tmp_path / "plots"
    shown = runner.invoke(app, ["plot", str(out / "small.json"), str(out / "big.json"), "--label", "small",
                                "--label", "big", "-o", str(plots), "-f", "png"])
    assert shown.exit_code == 0, shown.output
    assert sorted(p.stem for p in plots.iterdir()) == ["students_depth_profile", "students_mean_vs_std",
                                                       "students_residual_energy"]


def test_a_broken_student_file_is_refused_and_the_exit_code_says_so(trio, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    out = tmp_path / "d"
    result = runner.invoke(app, ["compare", str(trio["teacher"]), str(trio["s0"]), str(broken), "-o", str(out),
                                 "--no-progress"])
    assert result.exit_code == 2, result.output
    assert sorted(p.name for p in out.iterdir()) == ["student0.json", "summary.csv", "summary.json"]
    text = " ".join(result.stdout.split())
    assert "read once for 1 student " in text and "1 report, summary.json" in text
    errors = " ".join(result.stderr.split())
    assert "refused broken:" in errors
    assert errors.endswith("error: 1 of 2 students was refused (broken); the other reports are written.")


def test_builtin_teacher_by_name_and_a_mixed_adapter_and_full_student(tmp_path):
    assert builtin_path("builtin:digits").name == "digits_unet.safetensors"
    out = tmp_path / "demo"
    result = runner.invoke(app, ["compare", "builtin:digits", str(DEMO / "full_student.safetensors"),
                                 str(DEMO / "lorad_student"), "-o", str(out), "--no-progress", "--no-spectra"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert [row["label"] for row in summary["students"]] == ["full_student", "lorad_student"]
    lorad = json.loads((out / "lorad_student.json").read_text())
    assert lorad["inputs"]["student"]["layout"] == "adapter" and lorad["summary"]["identical"] > 0

    swapped = tmp_path / "hybrid.safetensors"
    done = runner.invoke(app, ["swap", "builtin:digits", str(DEMO / "full_student.safetensors"), "--take", "norm",
                               "-o", str(swapped)])
    assert done.exit_code == 0, done.output and swapped.exists()
    bad = runner.invoke(app, ["compare", "builtin:nope", str(DEMO / "full_student.safetensors")])
    assert bad.exit_code == 2 and "not a built-in checkpoint" in bad.stderr


def test_resolving_a_builtin_name_does_not_import_the_distiller():
    import os
    import subprocess

    code = ("import sys; from wadi_probe.builtins import builtin_path; builtin_path('builtin:digits'); "
            "print('wadi_distill' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout.strip() == "False"


def test_plot_takes_the_builtin_teacher_for_a_heatmap(tmp_path):
    out = tmp_path / "figs"
    layer = "mid_block.attentions.0.proj_in.weight"
    result = runner.invoke(app, ["plot", str(DEMO / "report.json"), "-o", str(out), "-f", "png", "--layer", layer,
                                 "--teacher", "builtin:digits", "--student", str(DEMO / "full_student.safetensors")])
    assert result.exit_code == 0, result.output
    assert (out / f"pair_angles_{layer}.png").stat().st_size > 0
