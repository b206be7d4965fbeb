"""`wadi-probe compare` and `wadi-probe show`: real runs on tiny files, and bad inputs (exit 2, one sentence)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from _planted_pairs import planted_unet_pair
from conftest import make_tiny_unet
from wadi_probe.cli import app
from wadi_probe.report.schema import load_report

runner = CliRunner()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    planted = planted_unet_pair(make_tiny_unet(seed=1).state_dict(), rank=2, seed=2)
    teacher, student = folder / "teacher.safetensors", folder / "student.safetensors"
    save_file(planted.teacher, str(teacher))
    save_file(planted.student, str(student))
    return teacher, student


def _one_sentence_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    err = result.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) <= 3  # one sentence (rich may wrap it)
    for fragment in fragments:
        assert fragment in " ".join(err.split()), err


def test_compare_writes_report_and_csv_and_prints_summary(pair, tmp_path):
    out, csv = tmp_path / "report.json", tmp_path / "layers.csv"
    result = runner.invoke(app, ["compare", str(pair[0]), str(pair[1]), "-o", str(out), "--csv", str(csv),
                                 "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = load_report(out)
    assert report.summary["layers"] == report.pairing["matched"] > 100
    assert "farther sideways" in result.stdout and "Most rotated layers" in result.stdout
    assert "By block and layer type" in result.stdout
    assert csv.read_text().splitlines()[0].startswith("name,module,kind")
    assert len(csv.read_text().splitlines()) == report.summary["layers"] + 1

    shown = runner.invoke(app, ["show", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "Most rotated layers" in shown.stdout
    headline = next(line for line in result.stdout.splitlines() if "farther sideways" in line)
    assert headline in shown.stdout


def test_compare_no_spectra_and_filters(pair, tmp_path):
    out = tmp_path / "fast.json"
    result = runner.invoke(app, ["compare", str(pair[0]), str(pair[1]), "-o", str(out), "--no-spectra",
                                 "--include", "attn", "--exclude", "bias", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = load_report(out)
    assert report.settings["spectra"] is False
    assert all("attn" in r["name"] and "bias" not in r["name"] for r in report.layers)
    rotated = [r for r in report.layers if len(r["shape"]) >= 2 and r["direction_change_max"] > 1e-9]
    assert rotated and all(r["residual_rank_90"] is None and r["lorad_explained"] is None for r in rotated)


def test_missing_path(pair, tmp_path):
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["compare", str(pair[0]), str(tmp_path / "nope.safetensors"), "-o", str(out)])
    _one_sentence_error(result, "does not exist")
    assert not out.exists()


def test_different_architectures(pair, tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in make_tiny_unet(seed=0, block_out_channels=(12, 24)).state_dict().items()},
              str(other))
    out = tmp_path / "report.json"
    out.write_text("previous report")
    result = runner.invoke(app, ["compare", str(pair[0]), str(other), "-o", str(out)])
    _one_sentence_error(result, "different architectures")
    assert out.read_text() == "previous report"


def test_bad_device_and_bad_regex(pair, tmp_path):
    _one_sentence_error(runner.invoke(app, ["compare", str(pair[0]), str(pair[1]), "--device", "tpu"]), "unknown device")
    _one_sentence_error(runner.invoke(app, ["compare", str(pair[0]), str(pair[1]), "--include", "("]), "invalid name pattern")


def test_output_that_is_a_folder(pair, tmp_path):
    _one_sentence_error(runner.invoke(app, ["compare", str(pair[0]), str(pair[1]), "-o", str(tmp_path)]), "is a folder")


def test_show_refuses_unknown_schema_version(tmp_path):
    path = tmp_path / "future.json"
    path.write_text(json.dumps({"schema_version": 3, "tool": "wadi-probe", "layers": [], "summary": {}}))
    _one_sentence_error(runner.invoke(app, ["show", str(path)]), "schema_version 3")


def test_show_missing_and_garbage(tmp_path):
    _one_sentence_error(runner.invoke(app, ["show", str(tmp_path / "absent.json")]), "does not exist")
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\x00\x01 not json")
    _one_sentence_error(runner.invoke(app, ["show", str(garbage)]), "not valid JSON")


def test_crash_mid_run_leaves_no_half_written_report(pair, tmp_path, monkeypatch):
    import wadi_probe.analyze as analyze

    out = tmp_path / "report.json"
    out.write_text("previous report")
    calls = {"n": 0}
    real = analyze.analyze_pair

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(analyze, "analyze_pair", failing)
    result = runner.invoke(app, ["compare", str(pair[0]), str(pair[1]), "-o", str(out), "--no-progress"])
    assert result.exit_code != 0 and isinstance(result.exception, RuntimeError)
    assert out.read_text() == "previous report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_failed_write_leaves_no_half_written_report(pair, tmp_path, monkeypatch):
    import wadi_probe.report.schema as report_module

    out = tmp_path / "report.json"

    def broken_dump(data):
        return '{"schema_version": 1, "layers": [' + json.dumps({"x": torch.nan}, allow_nan=False)

    monkeypatch.setattr(report_module, "dumps_report", broken_dump)
    result = runner.invoke(app, ["compare", str(pair[0]), str(pair[1]), "-o", str(out), "--no-progress", "--no-spectra"])
    assert result.exit_code != 0
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_summary_tables_keep_layer_names_and_numbers_on_an_80_column_console(pair):
    from rich.console import Console

    from wadi_probe import compare
    from wadi_probe.report.summary import print_summary

    report = compare(pair[0], pair[1], device="cpu")
    console = Console(width=80, record=True, file=open(os.devnull, "w"))
    print_summary(report, console, top=5)
    text = console.export_text()
    top = max(report.layers, key=lambda r: r["direction_change_mean"] if len(r["shape"]) >= 2 else -1)
    assert top["module"][:20] in text  # the layer column is not squeezed out
    assert "…" not in text  # no number or header cut short
    assert console.width == 80  # the console is left as it was
