"""The figures say only what their data supports: log axes past two decades, identical layers apart, legends
that say what the ± is, a chance line and an honest title, nothing drawn without data, labels that do not
overlap, titles that fit."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection

from wadi_probe import compare, load_report
from wadi_probe.errors import WadiInputError
from wadi_probe.report import plots

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def demo():
    return load_report(ROOT / "reports" / "demo" / "report.json")


def test_log_axes_by_default_past_two_decades_and_on_request(demo):
    (ax,) = plots.plot_mean_vs_std(demo).axes
    assert ax.get_xscale() == "linear"  # the demo's values span less than two decades
    (ax,) = plots.plot_mean_vs_std(demo, log=True).axes
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    wide = copy.deepcopy(demo.data)
    wide["layers"][0]["norm_change_mean"] = 1e-7  # now 1e-5 % against ~2 %: more than two decades
    (ax,) = plots.plot_mean_vs_std(wide).axes
    assert ax.get_xscale() == "log"
    assert plots.wants_log([1, 50], None) is False and plots.wants_log([1, 500], None) is True


def test_identical_layers_are_counted_not_drawn_and_the_legend_says_what_the_star_is(demo):
    data = copy.deepcopy(demo.data)
    matrices = [r for r in data["layers"] if len(r["shape"]) >= 2]
    for record in matrices[:5]:
        record.update(identical=True, norm_change_mean=0.0, norm_change_std=0.0, direction_change_mean=0.0,
                      direction_change_std=0.0, angle_deg_mean=0.0, angle_deg_std=0.0)
    (ax,) = plots.plot_mean_vs_std(data).axes
    points = [c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)]
    assert len(points[0]) == len(matrices) - 5
    assert "5 identical layers not drawn" in ax.get_title()
    star = np.radians([r["angle_deg_mean"] for r in matrices[5:]]).mean() * 100
    assert points[3][0, 0] == pytest.approx(star)
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("mean per-layer std" in t for t in texts)


def test_the_residual_energy_title_claims_low_rank_only_above_chance(demo):
    (ax,) = plots.plot_residual_energy(demo).axes
    assert ax.get_title().startswith("Direction change is low-rank beyond chance")
    chance = [line for line in ax.lines if line.get_linestyle() == "-."]
    assert len(chance) == 1 and "chance" in chance[0].get_label()
    gen = torch.Generator().manual_seed(0)
    teacher = {f"b.{i}.weight": torch.randn(64, 48, generator=gen) for i in range(3)}
    noise = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in teacher.items()}
    (ax,) = plots.plot_residual_energy(compare(teacher, noise, device="cpu")).axes
    assert ax.get_title().startswith("Direction change is no more low-rank than chance")


def test_nothing_is_drawn_without_its_data(demo):
    fast = copy.deepcopy(demo.data)
    fast["settings"]["spectra"] = False
    for record in fast["layers"]:
        for key in ("recommended_rank", "residual_energy", "lorad_energy"):
            record[key] = 0 if key == "recommended_rank" and record.get("identical") else None
    with pytest.raises(WadiInputError, match="without spectra"):
        plots.plot_recommended_ranks(fast)
    unchanged = copy.deepcopy(demo.data)
    for record in unchanged["layers"]:
        record["recommended_rank"] = 0 if len(record["shape"]) >= 2 else None
    with pytest.raises(WadiInputError, match="no layer has a rank above 0"):
        plots.plot_recommended_ranks(unchanged)


def test_band_labels_do_not_overlap_and_titles_fit(demo):
    for draw in (plots.plot_depth_profile, plots.plot_recommended_ranks):
        fig = draw(demo)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        boxes = [t.get_window_extent(renderer) for t in fig.axes[0].texts]
        assert boxes
        for a, b in zip(boxes, boxes[1:]):
            assert not a.overlaps(b), (a, b)
        width = fig.bbox.width
        for text in [fig._suptitle, *(ax.title for ax in fig.axes)]:
            if text is not None and text.get_text():
                box = text.get_window_extent(renderer)
                assert box.x0 >= 0 and box.x1 <= width


def test_an_identical_layer_heatmap_says_why_it_is_empty():
    t = torch.randn(16, 16)
    fig = plots.plot_pair_angle_heatmap(t, t.clone(), "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0.weight")
    ax = fig.axes[0]
    assert "nothing turned" in ax.get_title() and any("no pair turned" in x.get_text() for x in ax.texts)
    fig.canvas.draw()
    box = ax.title.get_window_extent(fig.canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width


def test_side_by_side_figures_have_one_colour_per_student(demo):
    other = copy.deepcopy(demo.data)
    for record in other["layers"]:
        if record.get("angle_deg_mean") is not None:
            record["angle_deg_mean"] *= 2
    fig = plots.plot_students_mean_vs_std([demo, other], ["a", "b"])
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert sum(t.startswith("a, ") for t in texts) == 2 and sum(t.startswith("b, ") for t in texts) == 2
    profile = plots.plot_students_depth_profile([demo, other], ["a", "b"])
    assert [line.get_label() for line in profile.axes[0].lines if not line.get_label().startswith("_")] == ["a", "b"]
    with pytest.raises(WadiInputError, match="labels for 2 reports"):
        plots.plot_students_residual_energy([demo, other], ["a"])
