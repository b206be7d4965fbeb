"""Reports holding NaN: `show` prints a NaN statistic as such; a NaN in a layer's shape is refused by name."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from typer.testing import CliRunner

from wadi_distill.cli import app as distill_app
from wadi_probe.cli import app as probe_app

DEMO_REPORT = Path(__file__).resolve().parents[3] / "reports" / "demo" / "report.json"


def said(result) -> str:
    return " ".join(result.output.split())


def _report(tmp_path, change) -> Path:
    data = json.loads(DEMO_REPORT.read_text())
    changed = copy.deepcopy(data)
    change(changed)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(changed))  # json writes NaN as the bare word NaN, as Python's json reads it back
    return path


def test_show_prints_nan_statistics_instead_of_crashing(tmp_path):
    def nan_everywhere(data):
        for key, value in data["summary"].items():
            if isinstance(value, float):
                data["summary"][key] = float("nan")
        for record in data["layers"]:
            record["norm_change_std"] = float("nan")

    path = _report(tmp_path, nan_everywhere)
    assert "NaN" in path.read_text()
    result = CliRunner().invoke(probe_app, ["show", str(path)])
    assert result.exit_code == 0, result.output
    assert "mean angle nan rad (nan°)" in said(result)


def test_a_nan_in_a_layer_shape_is_refused_by_name_by_plot_and_plan(tmp_path):
    def nan_shape(data):
        data["layers"][3]["shape"][0] = float("nan")

    path = _report(tmp_path, nan_shape)
    name = json.loads(DEMO_REPORT.read_text())["layers"][3]["name"]
    sentence = f"{path} is malformed: the shape of layer {name} is [NaN"
    plot = CliRunner().invoke(probe_app, ["plot", str(path), "-o", str(tmp_path / "plots")])
    plan = CliRunner().invoke(distill_app, ["plan", "--teacher", "builtin:digits", "--rank-from-probe", str(path),
                                            "-o", str(tmp_path / "plan.json")])
    for result in (plot, plan):
        assert result.exit_code == 2, result.output
        assert sentence in said(result) and said(result).endswith("not a list of whole numbers.")
        assert result.output.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
