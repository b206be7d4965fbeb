"""The report schema: summary arithmetic, JSON round trip, validation, atomic saves, DataFrame/CSV."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from wadi_probe import Report, WadiInputError, compare, load_report
from wadi_probe.report.schema import SCHEMA_VERSION, build_report, group_by_block, report_to_dataframe, summarize


def _record(name, shape, nc, nc_std, dc, dc_std, rows, rank=None, **extra):
    return {
        "name": name, "shape": list(shape), "block": extra.pop("block", "down.0"),
        "layer_type": extra.pop("layer_type", "attention"), "kind": "linear", "params": math.prod(shape),
        "identical": nc == 0 and dc == 0, "rows": rows, "zero_rows": 0, "nonfinite": 0,
        "norm_change_mean": nc, "norm_change_std": nc_std, "direction_change_mean": dc,
        "direction_change_std": dc_std, "angle_deg_mean": 1.0, "angle_deg_max": 2.0,
        "recommended_rank": rank, **extra,
    }


def test_summary_known_values():
    layers = [
        _record("a.weight", (10, 20), 0.001, 0.002, 0.02, 0.01, rows=10, rank=4, residual_energy_at_30pct_rank=0.9),
        _record("b.weight", (30, 8), 0.003, 0.0, 0.04, 0.03, rows=30, rank=2, block="up.1", layer_type="feed-forward",
                residual_energy_at_30pct_rank=0.8),
        _record("b.bias", (30,), 0.5, 0.0, 0.5, 0.0, rows=1),  # vectors do not enter the matrix statistics
        _record("c.weight", (4, 4), 0.0, 0.0, 0.0, 0.0, rows=4, rank=0, block="mid"),
    ]
    pairing = {"matched": 4, "shape_mismatch": [["x", [1], [2]]], "only_in_teacher": ["y"], "only_in_student": []}
    s = summarize(layers, pairing)
    assert s["layers"] == 4 and s["matrices"] == 3 and s["vectors"] == 1
    assert s["identical"] == 1 and s["unmatched"] == 2 and s["skipped"] == 0
    assert s["norm_change_mean"] == pytest.approx((0.001 + 0.003 + 0.0) / 3)
    assert s["direction_change_mean"] == pytest.approx((0.02 + 0.04) / 3)
    assert s["direction_change_std"] == pytest.approx((0.01 + 0.03) / 3)
    assert s["paper_direction_to_norm_ratio"] == pytest.approx(0.06 / 0.004)
    # first order on both sides: the mean angle in radians (1° in every record) over the mean norm change
    assert s["angle_rad_mean"] == pytest.approx(math.pi / 180)
    assert s["angle_to_norm_ratio"] == pytest.approx((math.pi / 180) / (0.004 / 3))
    assert s["unmatched_names"] == ["x", "y"]
    # pooled over the 44 rows: mean = Σ n·m / N, var = Σ n·(sd² + m²)/N − mean²
    mean = (10 * 0.02 + 30 * 0.04) / 44
    var = (10 * (0.01**2 + 0.02**2) + 30 * (0.03**2 + 0.04**2)) / 44 - mean**2
    assert s["direction_change_mean_rows"] == pytest.approx(mean)
    assert s["direction_change_std_rows"] == pytest.approx(math.sqrt(var))
    assert s["residual_energy_at_30pct_rank_mean"] == pytest.approx(0.85)
    assert s["recommended_rank_median"] == 3  # over the changed matrices (ranks 4 and 2)
    assert s["recommended_params"] == 4 * (10 + 10) + 2 * (30 + 4)
    groups = group_by_block(layers)
    assert [(g["block"], g["layer_type"]) for g in groups] == [("down.0", "attention"), ("mid", "attention"),
                                                             ("up.1", "feed-forward")]
    assert groups[0]["params"] == 200 and groups[2]["direction_change_mean"] == 0.04


@pytest.fixture(scope="module")
def small_report() -> Report:
    gen = torch.Generator().manual_seed(0)
    teacher = {
        "down_blocks.0.attentions.0.to_q.weight": torch.randn(12, 16, generator=gen),
        "down_blocks.0.attentions.0.to_q.bias": torch.randn(12, generator=gen),
        "mid_block.resnets.0.conv1.weight": torch.randn(8, 4, 3, 3, generator=gen),
    }
    student = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in teacher.items()}
    return compare(teacher, student, device="cpu")


def test_save_and_load_round_trip(small_report, tmp_path):
    path = small_report.save(tmp_path / "report.json")
    text = path.read_text()
    assert text.count("\n") == len(small_report.data) + len(small_report.layers) + 3  # one line per layer record
    loaded = load_report(path)
    assert loaded.data == json.loads(json.dumps(small_report.data))
    assert loaded.data["schema_version"] == SCHEMA_VERSION and loaded.data["tool"] == "wadi-probe"
    assert loaded.layer("mid_block.resnets.0.conv1.weight")["kind"] == "conv"
    assert loaded.layer("down_blocks.0.attentions.0.to_q")["name"].endswith(".weight")  # module path lookup
    with pytest.raises(KeyError):
        loaded.layer("nope")


def test_report_json_has_no_nan(small_report):
    text = small_report.to_json()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text)


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"schema_version": 99, "tool": "wadi-probe", "layers": [], "summary": {}}', "schema_version 99"),
        ("{not json", "not valid JSON"),
        ('{"hello": 1}', "not a wadi-probe report"),
        ('[1, 2]', "not a wadi-probe report"),
        ('{"schema_version": 1, "tool": "wadi-probe"}', "missing"),
    ],
)
def test_load_report_refuses_what_it_cannot_read(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(WadiInputError, match=message):
        load_report(path)


def test_load_report_missing_file(tmp_path):
    with pytest.raises(WadiInputError, match="does not exist"):
        load_report(tmp_path / "absent.json")


def test_malformed_record_is_refused(small_report, tmp_path):
    data = json.loads(small_report.to_json())
    del data["layers"][1]["shape"]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    with pytest.raises(WadiInputError, match="layer record 1"):
        load_report(path)


def test_failed_save_keeps_the_previous_file(small_report, tmp_path):
    path = tmp_path / "report.json"
    path.write_text("previous contents")
    broken = Report({**small_report.data, "summary": {**small_report.summary, "bad": float("nan")}})
    with pytest.raises(ValueError):
        broken.save(path)
    assert path.read_text() == "previous contents"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_dataframe_and_csv(small_report, tmp_path):
    frame = small_report.to_dataframe()
    assert len(frame) == 3 and frame is not None
    assert not any(frame[c].map(lambda v: isinstance(v, (list, dict))).any() for c in frame.columns)
    assert list(frame["shape"]) == ["12x16", "12", "8x4x3x3"]
    assert list(frame["fan_in"]) == [16, 12, 36]
    for column in ("name", "norm_change_mean", "direction_change_mean", "residual_rank_90", "lorad_explained",
                   "recommended_rank"):
        assert column in frame.columns
    path = small_report.to_csv(tmp_path / "layers.csv")
    back = pd.read_csv(path)
    assert list(back["name"]) == list(frame["name"])
    assert back["direction_change_mean"].tolist() == pytest.approx(frame["direction_change_mean"].tolist())
    assert report_to_dataframe(small_report.data).shape == frame.shape


def test_build_report_orders_fields_and_fills_missing():
    report = build_report(inputs={}, settings={}, pairing={}, layers=[{"name": "w", "shape": [2, 2], "extra": 1}])
    record = report.layers[0]
    assert list(record)[:3] == ["name", "module", "kind"] and list(record)[-1] == "extra"
    assert record["lorad_explained"] is None
