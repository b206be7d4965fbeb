"""`wadi-probe plot`: every figure of a report as PNG and SVG; bad input exits 2 and writes nothing."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file
from typer.testing import CliRunner

from wadi_probe.cli import app
from wadi_probe.report.schema import Report

from _planted_report import planted_pair, planted_report

STEMS = ["mean_vs_std", "depth_profile", "residual_energy", "angle_spectrum", "recommended_rank"]


@pytest.fixture
def files(tmp_path):
    report_path = Report(planted_report()).save(tmp_path / "report.json")
    teacher, student = planted_pair()
    save_file(teacher, tmp_path / "teacher.safetensors")
    save_file(student, tmp_path / "student.safetensors")
    return report_path, tmp_path / "teacher.safetensors", tmp_path / "student.safetensors"


def _run(*args: str):
    result = CliRunner().invoke(app, ["plot", *map(str, args)])
    return result, " ".join(result.output.split())


def test_plot_writes_every_figure_as_png_and_svg(files, tmp_path):
    report_path, teacher, student = files
    layer = "up_blocks.0.attentions.0.to_v.weight"
    result, text = _run(report_path, "-o", tmp_path / "figs", "--layer", layer, "--teacher", teacher, "--student", student)
    assert result.exit_code == 0, result.output
    expected = {f"{stem}.{fmt}" for stem in STEMS + [f"pair_angles_{layer}"] for fmt in ("png", "svg")}
    assert {p.name for p in (tmp_path / "figs").iterdir()} == expected
    assert "wrote 12 files" in text


def test_plot_one_format_and_a_report_without_spectra(tmp_path):
    report_path = Report(planted_report(spectra=False)).save(tmp_path / "report.json")
    result, text = _run(report_path, "-o", tmp_path / "figs", "--format", "png")
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "figs").iterdir()} == {"mean_vs_std.png", "depth_profile.png"}
    assert "skipped residual_energy" in text and "--no-spectra" in text


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--layer", "up_blocks.0.attentions.0.to_v.weight"], "--layer needs --teacher and --student"),
        (["--layer", "no.such.weight", "--teacher", "{t}", "--student", "{s}"], "has no tensor named 'no.such.weight'"),
        (["--layer", "down_blocks.0.attentions.0.to_q.bias", "--teacher", "{t}", "--student", "{s}"], "needs a weight matrix"),
        (["--format", "gif"], "formats must be png, svg or pdf"),
    ],
)
def test_plot_refuses_bad_arguments_and_writes_nothing(files, tmp_path, extra, message):
    report_path, teacher, student = files
    extra = [a.format(t=teacher, s=student) for a in extra]
    result, text = _run(report_path, "-o", tmp_path / "figs", *extra)
    assert result.exit_code == 2, result.output
    assert message in text and "Traceback" not in text
    assert not (tmp_path / "figs").exists()


def test_plot_refuses_an_unknown_report_version(tmp_path):
    data = planted_report()
    data["schema_version"] = 99
    (tmp_path / "report.json").write_text(json.dumps(data))
    result, text = _run(tmp_path / "report.json", "-o", tmp_path / "figs")
    assert result.exit_code == 2 and "schema_version" in text
    result, text = _run(tmp_path / "missing.json", "-o", tmp_path / "figs")
    assert result.exit_code == 2 and "does not exist" in text
    assert not (tmp_path / "figs").exists()


def test_compare_plots_option_writes_the_figures_of_a_real_comparison(files, tmp_path):
    _, teacher, student = files
    result = CliRunner().invoke(
        app, ["compare", str(teacher), str(student), "--no-progress", "--plots", str(tmp_path / "figs"), "-o",
              str(tmp_path / "r.json")]
    )
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "figs").iterdir()} == {f"{s}.{f}" for s in STEMS for f in ("png", "svg")}


def test_compare_plots_option_refuses_a_file_before_comparing(files, tmp_path):
    _, teacher, student = files
    (tmp_path / "figs").write_text("not a folder")
    result = CliRunner().invoke(app, ["compare", str(teacher), str(student), "--no-progress", "--plots", str(tmp_path / "figs")])
    assert result.exit_code == 2 and "is a file" in " ".join(result.output.split())
    assert (tmp_path / "figs").read_text() == "not a folder"
