"""Plots of a probe report: each figure shows one mark per layer (or per bar), no empty axes, readable labels."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle

from wadi_probe.report import plots
from wadi_probe.errors import WadiInputError
from wadi_probe.report.schema import report_to_dataframe
from wadi_probe.rotation import rotate_pairs

from _planted_report import LAYER_SPECS, planted_pair, planted_report


@pytest.fixture(scope="module")
def report() -> dict:
    return planted_report()


def test_planted_report_has_the_blocks_and_types_the_figures_group_by(report):
    got = {(r["name"], r["block"], r["layer_type"], r["kind"]) for r in report["layers"]}
    assert got == {(name, block, layer_type, kind) for name, _, block, layer_type, kind in LAYER_SPECS}


def _matrix_layers(report: dict) -> list[dict]:
    return [r for r in report["layers"] if len(r["shape"]) >= 2]


def _scatter_offsets(ax) -> list[np.ndarray]:
    return [c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)]


def _assert_no_empty_axes(fig: Figure) -> None:
    for ax in fig.axes:
        has_content = ax.lines or ax.collections or ax.images or ax.patches
        assert has_content, f"empty axes: {ax.get_title()!r}"
        if ax.get_label() != "<colorbar>":
            assert ax.get_xlabel() or ax.get_ylabel()


def test_mean_vs_std_has_one_point_per_layer_and_quantity_and_the_means(report):
    fig = plots.plot_mean_vs_std(report, direction="1-cos", log=False)
    _assert_no_empty_axes(fig)
    (ax,) = fig.axes
    offsets = _scatter_offsets(ax)
    n = len(_matrix_layers(report))
    # norm points, norm mean, direction points, direction mean
    assert [len(o) for o in offsets] == [n, 1, n, 1]
    direction = np.array([r["direction_change_mean"] for r in _matrix_layers(report)]) * 100
    np.testing.assert_allclose(offsets[2][:, 0], direction)
    np.testing.assert_allclose(offsets[3][0, 0], direction.mean())
    assert "%" in ax.get_xlabel() and "%" in ax.get_ylabel()
    norm = np.array([r["norm_change_mean"] for r in _matrix_layers(report)]) * 100
    assert f"direction/norm = {direction.mean() / norm.mean():.3g}×" in ax.get_title()


def test_mean_vs_std_title_keeps_small_ratios_readable(report):
    # A student whose norms moved 20× more than its directions must not be titled "0.1×" or "0.0×".
    small = copy.deepcopy(report)
    for record in _matrix_layers(small):
        record["direction_change_mean"] = record["norm_change_mean"] * 0.0512
    (ax,) = plots.plot_mean_vs_std(small, direction="1-cos").axes
    assert "direction/norm = 0.0512×" in ax.get_title()


def test_scalar_plots_accept_the_dataframe_form(report):
    frame = report_to_dataframe(report)
    offsets = _scatter_offsets(plots.plot_mean_vs_std(frame).axes[0])
    assert len(offsets[0]) == len(_matrix_layers(report))
    points = np.concatenate(_scatter_offsets(plots.plot_depth_profile(frame).axes[0]))
    assert len(points) == len(_matrix_layers(report))
    bars = [p for p in plots.plot_recommended_ranks(frame).axes[0].patches if p.get_zorder() == 2]
    assert len(bars) == len(_matrix_layers(report))
    with pytest.raises(WadiInputError, match="no 'residual_energy' spectra"):
        plots.plot_residual_energy(frame)


def test_depth_profile_marks_every_layer_in_both_panels_by_type(report):
    fig = plots.plot_depth_profile(report, direction="1-cos", log=False)
    _assert_no_empty_axes(fig)
    ax_dir, ax_norm = fig.axes
    layers = _matrix_layers(report)
    for ax, key in ((ax_dir, "direction_change_mean"), (ax_norm, "norm_change_mean")):
        offsets = _scatter_offsets(ax)
        types = {r["layer_type"] for r in layers}
        assert len(offsets) == len(types)  # one marker style per layer type
        points = np.concatenate(offsets)
        assert len(points) == len(layers)
        by_position = dict(zip(points[:, 0].astype(int), points[:, 1]))
        np.testing.assert_allclose([by_position[i] for i in range(len(layers))], [r[key] * 100 for r in layers])
    # three block runs (down.0, mid, up.0) -> three shaded bands per panel
    bands = [p for p in ax_dir.patches if isinstance(p, Rectangle) and p.get_zorder() == 0]
    assert len(bands) == 3
    assert {t.get_text() for t in ax_dir.texts} == {"down.0", "mid", "up.0"}


@pytest.mark.parametrize("draw,key", [(plots.plot_residual_energy, "residual_energy"), (plots.plot_angle_spectrum, "lorad_energy")])
def test_spectrum_plots_draw_one_faint_line_per_layer_plus_the_mean(report, draw, key):
    fig = draw(report)
    _assert_no_empty_axes(fig)
    (ax,) = fig.axes
    faint = [line for line in ax.lines if line.get_alpha() == 0.25]
    with_curve = [r for r in report["layers"] if r[key]]
    assert len(faint) == len(with_curve)
    mean_line = next(line for line in ax.lines if line.get_linewidth() == 2.4)
    x, y = mean_line.get_xdata(), mean_line.get_ydata()
    # the mean curve at 30 % equals the mean of energy(ceil(0.3 R)) over the layers
    expected = np.mean([r[key][math.ceil(0.3 * len(r[key])) - 1] for r in with_curve]) * 100
    assert y[np.argmin(abs(x - 30))] == pytest.approx(expected, abs=1e-6)
    assert y[-1] == pytest.approx(100.0, abs=0.01)
    assert any(line.get_xdata()[0] == 30 for line in ax.lines if line.get_linestyle() == "--")


def test_recommended_rank_has_one_bar_per_layer(report):
    fig = plots.plot_recommended_ranks(report)
    _assert_no_empty_axes(fig)
    (ax,) = fig.axes
    bars = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_zorder() == 2]
    layers = _matrix_layers(report)
    assert [b.get_height() for b in bars] == [r["recommended_rank"] for r in layers]


def test_pair_angle_heatmap_shows_the_planted_angles():
    teacher = torch.randn(6, 10, dtype=torch.float64)
    theta = torch.linspace(-0.2, 0.2, 30, dtype=torch.float64).reshape(6, 5)
    student = rotate_pairs(teacher, theta)
    fig = plots.plot_pair_angle_heatmap(teacher, student, "blocks.0.to_q.weight")
    _assert_no_empty_axes(fig)
    (image,) = [im for ax in fig.axes for im in ax.images if isinstance(im, AxesImage)]
    np.testing.assert_allclose(image.get_array(), np.rad2deg(theta.numpy()), atol=1e-9)
    assert "degrees" in fig.axes[1].get_ylabel()
    assert "blocks.0.to_q.weight" in fig.axes[0].get_title()


def test_pair_angle_heatmap_pools_large_fields_and_flattens_convs():
    teacher = torch.randn(40, 8, 3, 3)
    fig = plots.plot_pair_angle_heatmap(teacher, teacher.clone(), "conv", max_cells=16)
    image = fig.axes[0].images[0]
    assert image.get_array().shape == (16, 16)
    assert np.all(image.get_array() == 0)
    assert "averaged to 16×16" in fig.axes[0].get_title()


def test_pair_angle_heatmap_refuses_vectors_and_mismatched_shapes():
    with pytest.raises(WadiInputError, match="weight matrix"):
        plots.plot_pair_angle_heatmap(torch.ones(4), torch.ones(4))
    with pytest.raises(WadiInputError, match="shapes differ"):
        plots.plot_pair_angle_heatmap(torch.ones(4, 4), torch.ones(4, 6))


def test_save_all_plots_writes_every_figure_in_each_format(report, tmp_path):
    teacher, student = planted_pair()
    name = "down_blocks.0.attentions.0.to_q.weight"
    saved = plots.save_all_plots(report, tmp_path / "figs", layer=name, teacher=teacher[name], student=student[name])
    stems = ["mean_vs_std", "depth_profile", "residual_energy", "angle_spectrum", "recommended_rank", f"pair_angles_{name}"]
    assert sorted(p.name for p in saved.files) == sorted(f"{s}.{f}" for s in stems for f in ("png", "svg"))
    assert saved.skipped == []
    for path in saved.files:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG") if path.suffix == ".png" else b"<svg" in data[:2000]
    assert not [p for p in (tmp_path / "figs").iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_save_all_plots_skips_spectra_a_report_does_not_have(tmp_path):
    saved = plots.save_all_plots(planted_report(spectra=False), tmp_path, formats=("png",))
    assert sorted(p.stem for p in saved.files) == ["depth_profile", "mean_vs_std"]
    assert [name for name, _ in saved.skipped] == ["residual_energy", "angle_spectrum", "recommended_rank"]
    assert all("--no-spectra" in why for _, why in saved.skipped)


def test_save_all_plots_refuses_bad_arguments_before_writing(report, tmp_path):
    with pytest.raises(WadiInputError, match="formats"):
        plots.save_all_plots(report, tmp_path / "a", formats=("bmp",))
    with pytest.raises(WadiInputError, match="all three"):
        plots.save_all_plots(report, tmp_path / "a", layer="x")
    with pytest.raises(WadiInputError, match="layers"):
        plots.save_all_plots({"schema_version": 1}, tmp_path / "a")
    assert not (tmp_path / "a").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pair_angle_heatmap_takes_cuda_tensors():
    teacher = torch.randn(6, 10, device="cuda")
    theta = torch.full((6, 5), 0.1, device="cuda")
    fig = plots.plot_pair_angle_heatmap(teacher, rotate_pairs(teacher, theta), "cuda layer")
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), np.rad2deg(0.1), atol=1e-4)
