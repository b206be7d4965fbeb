"""Figures of a probe report: how far each layer's weights turned (direction) versus how much they grew (norm).

Every function takes a report (a :class:`wadi_probe.report.schema.Report`, its raw ``dict``, or — where only scalar
columns are needed — its DataFrame) and returns a :class:`matplotlib.figure.Figure`. Figures are drawn on the
Agg canvas without pyplot, so nothing opens a window and nothing is kept in a global figure list; call
``fig.savefig`` or :func:`save_all_plots` to write them.

Units: norm and direction changes are plotted in percent (a fraction 0.022 is 2.2 %), angles in degrees.
"Per-row" means per output unit (a conv kernel is flattened per output channel), as everywhere in the probe.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from wadi_probe.io.atomic import atomic_path
from wadi_probe.errors import WadiInputError
from wadi_probe.rotation import as_matrix, pair_angles

NORM_COLOR = "#1f77b4"
DIRECTION_COLOR = "#d62728"
LAYER_TYPE_MARKERS = {"attention": "o", "feed-forward": "s", "resnet conv": "^", "other": "D"}
BLOCK_FAMILY_COLORS = {
    "down": "#dbe9f6",
    "mid": "#e8e8e8",
    "up": "#fde7d4",
    "transformer": "#e9e3f3",
    "embedding": "#e6f2e6",
    "other": "#f7f7f7",
}
MATRIX_KINDS = {"linear", "conv", "conv1x1", "embedding"}

ReportLike = Any  # Report | dict | pandas.DataFrame


# --------------------------------------------------------------------------------------------------- inputs


def _records(report: ReportLike) -> list[dict[str, Any]]:
    """The per-layer records of a report, a report dict or a DataFrame, in model order."""
    if isinstance(report, pd.DataFrame):
        records = [{k: _none_if_nan(v) for k, v in row.items()} for row in report.to_dict("records")]
    elif isinstance(report, Mapping):
        if "layers" not in report:
            raise WadiInputError("the report has no 'layers' list; is this a wadi-probe report.json?")
        records = list(report["layers"])
    elif hasattr(report, "data") and isinstance(report.data, Mapping):
        return _records(report.data)
    else:
        raise WadiInputError(f"expected a wadi-probe report, its dict or its DataFrame, got {type(report).__name__}.")
    if records and "order" in records[0]:
        records = sorted(records, key=lambda r: (r.get("order") is None, r.get("order") or 0))
    return records


def _none_if_nan(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _settings(report: ReportLike) -> dict[str, Any]:
    if isinstance(report, Mapping):
        return dict(report.get("settings") or {})
    if hasattr(report, "data") and isinstance(report.data, Mapping):
        return dict(report.data.get("settings") or {})
    return {}


def is_matrix_record(record: Mapping[str, Any]) -> bool:
    """True for weights with rows (linear, conv, embedding); False for biases, norm scales and other vectors."""
    shape = record.get("shape")
    if isinstance(shape, (list, tuple)):
        return len(shape) >= 2
    if isinstance(shape, str) and shape:  # the DataFrame form writes shapes as "320x4x3x3"
        return "x" in shape
    return record.get("kind") in MATRIX_KINDS


def _matrix_records(report: ReportLike, *, require: Sequence[str]) -> list[dict[str, Any]]:
    records = [r for r in _records(report) if is_matrix_record(r) and all(r.get(k) is not None for k in require)]
    return records


def _block_family(block: str | None) -> str:
    block = block or "other"
    head = block.split(".")[0]
    return head if head in BLOCK_FAMILY_COLORS else "other"


def _new_figure(width: float, height: float, rows: int = 1, cols: int = 1, **kwargs: Any) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, **kwargs)
    return fig, axes


def _no_data(what: str, hint: str) -> WadiInputError:
    return WadiInputError(f"the report has no {what} to plot; {hint}")


# ----------------------------------------------------------------------------------------- Fig. 1(a)


def plot_mean_vs_std(report: ReportLike, *, log: bool = False) -> Figure:
    """The paper's Fig. 1(a): per layer, mean against std of the per-row change, norm and direction in two colours.

    One point per weight matrix and quantity; a large star marks the average over all layers. Norm change is
    |‖s_i‖ − ‖t_i‖| / ‖t_i‖ and direction change 1 − cos(s_i, t_i), both per output row, in percent.
    """
    records = _matrix_records(
        report, require=("norm_change_mean", "norm_change_std", "direction_change_mean", "direction_change_std")
    )
    if not records:
        raise _no_data("per-row norm/direction statistics", "it contains no matched weight matrices.")
    fig, ax = _new_figure(6.4, 6.2)
    means = {}
    for quantity, color, label in (
        ("norm", NORM_COLOR, "norm change"),
        ("direction", DIRECTION_COLOR, "direction change (1 − cos)"),
    ):
        x = np.array([r[f"{quantity}_change_mean"] for r in records], dtype=float) * 100
        y = np.array([r[f"{quantity}_change_std"] for r in records], dtype=float) * 100
        ax.scatter(x, y, s=16, alpha=0.6, color=color, edgecolors="none", label=f"{label}, one point per layer")
        means[quantity] = (float(x.mean()), float(y.mean()))
        ax.scatter(
            [means[quantity][0]], [means[quantity][1]], marker="*", s=260, color=color, edgecolors="black",
            linewidths=0.8, zorder=5,
            label=f"{label}, mean of all layers: {means[quantity][0]:.3g} % ± {means[quantity][1]:.3g} %",
        )
    ax.set_xlabel("mean change over a layer's rows (%)")
    ax.set_ylabel("standard deviation over a layer's rows (%)")
    ratio = means["direction"][0] / means["norm"][0] if means["norm"][0] > 0 else float("inf")
    ratio_text = f"direction/norm = {ratio:.3g}×" if math.isfinite(ratio) else "norms unchanged"
    ax.set_title(f"Per-row weight change in {len(records)} layers: norm vs direction\n({ratio_text} in the mean)")
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    else:
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=8, ncol=1, frameon=False)
    return fig


# ------------------------------------------------------------------------------------- depth profile


def _block_spans(blocks: Sequence[str | None]) -> list[tuple[str, int, int]]:
    """Contiguous runs of the same block as (block, first index, last index)."""
    spans: list[tuple[str, int, int]] = []
    for i, block in enumerate(blocks):
        name = block or "other"
        if spans and spans[-1][0] == name:
            spans[-1] = (name, spans[-1][1], i)
        else:
            spans.append((name, i, i))
    return spans


def _shade_blocks(ax: Any, blocks: Sequence[str | None], *, label: bool) -> None:
    """Shade each run of layers that belongs to one block (down/mid/up blocks or transformer depth)."""
    spans = _block_spans(blocks)
    for n, (name, first, last) in enumerate(spans):
        color = BLOCK_FAMILY_COLORS[_block_family(name)]
        ax.axvspan(first - 0.5, last + 0.5, color=color, alpha=1.0 if n % 2 == 0 else 0.55, zorder=0, linewidth=0)
        if n > 0:
            ax.axvline(first - 0.5, color="white", linewidth=1.0, zorder=0.5)
        if label and (last - first + 1) >= max(1, len(blocks) // 40):
            ax.text(
                (first + last) / 2, 1.01, name, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                fontsize=7, rotation=90 if len(spans) > 8 else 0, clip_on=False,
            )


def _layer_axis(ax: Any, records: Sequence[Mapping[str, Any]], *, max_labels: int = 40) -> None:
    ax.set_xlim(-0.5, len(records) - 0.5)
    if len(records) <= max_labels:
        ax.set_xticks(range(len(records)))
        ax.set_xticklabels([r.get("module") or r["name"] for r in records], rotation=90, fontsize=6)
    ax.set_xlabel("layer, in model order (shaded bands are blocks)")


def plot_depth_profile(report: ReportLike) -> Figure:
    """Direction and norm change of every weight matrix in model order, with the blocks shaded.

    Top: mean per-row direction change (1 − cos); bottom: mean per-row norm change; both in percent. Markers
    tell attention, feed-forward and resnet-conv layers apart.
    """
    records = _matrix_records(report, require=("norm_change_mean", "direction_change_mean"))
    if not records:
        raise _no_data("per-row norm/direction statistics", "it contains no matched weight matrices.")
    fig, (ax_dir, ax_norm) = _new_figure(max(8.0, min(18.0, 0.06 * len(records) + 6)), 6.2, 2, 1, sharex=True)
    positions = np.arange(len(records))
    blocks = [r.get("block") for r in records]
    types = [r.get("layer_type") or "other" for r in records]
    for ax, quantity, color, ylabel in (
        (ax_dir, "direction", DIRECTION_COLOR, "direction change 1 − cos (%)"),
        (ax_norm, "norm", NORM_COLOR, "norm change (%)"),
    ):
        values = np.array([r[f"{quantity}_change_mean"] for r in records], dtype=float) * 100
        _shade_blocks(ax, blocks, label=ax is ax_dir)
        ax.plot(positions, values, color=color, linewidth=0.6, alpha=0.5, zorder=2)
        for layer_type in dict.fromkeys(types):
            idx = [i for i, t in enumerate(types) if t == layer_type]
            ax.scatter(
                positions[idx], values[idx], marker=LAYER_TYPE_MARKERS.get(layer_type, "D"), s=22, color=color,
                edgecolors="black", linewidths=0.3, zorder=3,
            )
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, axis="y", alpha=0.3)
    _layer_axis(ax_norm, records)
    handles = [
        Line2D([], [], linestyle="none", marker=LAYER_TYPE_MARKERS.get(t, "D"), color="grey", markeredgecolor="black",
               label=t)
        for t in dict.fromkeys(types)
    ]
    handles += [
        Patch(color=BLOCK_FAMILY_COLORS[f], label=f"{f} blocks")
        for f in dict.fromkeys(_block_family(b) for b in blocks)
    ]
    ax_dir.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="marker / band",
                  title_fontsize=8)
    fig.suptitle("Mean per-row change of each layer's weights, in model order")
    return fig


# ----------------------------------------------------------------------------------------- Fig. 1(b)


def _energy_at_fraction(curve: Sequence[float], fractions: np.ndarray) -> np.ndarray:
    """energy(ceil(f · R)) for a cumulative energy curve of length R; 0 at f = 0."""
    values = np.concatenate(([0.0], np.asarray(curve, dtype=float)))
    ks = np.ceil(fractions * len(curve) - 1e-9).astype(int).clip(0, len(curve))
    return values[ks]


def _plot_spectrum(
    report: ReportLike, *, curve_key: str, title: str, ylabel: str, xlabel: str, mark_fraction: float,
    threshold: float | None, hint: str,
) -> Figure:
    records = [r for r in _records(report) if r.get(curve_key)]
    if not records:
        raise _no_data(f"'{curve_key}' spectra", hint)
    fig, ax = _new_figure(6.4, 4.8)
    for r in records:
        curve = np.asarray(r[curve_key], dtype=float)
        x = np.arange(len(curve) + 1) / len(curve) * 100
        ax.plot(x, np.concatenate(([0.0], curve)) * 100, color="grey", alpha=0.25, linewidth=0.7,
                drawstyle="steps-pre")
    grid = np.linspace(0.0, 1.0, 1001)
    mean_curve = np.mean([_energy_at_fraction(r[curve_key], grid) for r in records], axis=0)
    ax.plot(grid * 100, mean_curve * 100, color=DIRECTION_COLOR, linewidth=2.4, label=f"mean of {len(records)} layers")
    at_mark = float(np.mean([_energy_at_fraction(r[curve_key], np.array([mark_fraction]))[0] for r in records]))
    ax.axvline(mark_fraction * 100, color="black", linestyle="--", linewidth=1.0)
    ax.plot([mark_fraction * 100], [at_mark * 100], marker="o", color="black", zorder=5,
            label=f"{at_mark * 100:.1f} % of the energy at {mark_fraction * 100:.0f} % of full rank")
    if threshold is not None:
        ax.axhline(threshold * 100, color="grey", linestyle=":", linewidth=1.0,
                   label=f"{threshold * 100:.0f} % energy (rank advice threshold)")
    ax.plot([], [], color="grey", alpha=0.5, label="one line per layer")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 101)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_residual_energy(report: ReportLike, *, rank_fraction: float | None = None) -> Figure:
    """The paper's Fig. 1(b): energy of the direction residual kept against the fraction of rank kept.

    The residual is ΔD = rownorm(S) − rownorm(T); energy(k) = Σ_{j≤k} σ_j² / Σ σ_j². One faint line per layer,
    the layer average in bold, and the 30 % rank mark (or ``rank_fraction``; default: the report's setting).
    """
    fraction = rank_fraction if rank_fraction is not None else float(_settings(report).get("rank_fraction", 0.3))
    return _plot_spectrum(
        report, curve_key="residual_energy", mark_fraction=fraction, threshold=None,
        title="Direction change is low-rank:\nenergy of the direction residual ΔD kept at rank k",
        ylabel="energy of the direction residual kept (%)",
        xlabel="rank kept, as % of the layer's full rank min(out, fan-in)",
        hint="it was made without spectra (--no-spectra).",
    )


def plot_angle_spectrum(report: ReportLike, *, rank_fraction: float | None = None) -> Figure:
    """Energy of the LoRaD pair-angle field Θ kept against the fraction of its rank kept, per layer and averaged.

    This says which LoRaD rank reproduces the rotation the student applied; the dotted line is the energy
    threshold the report's rank advice uses.
    """
    settings = _settings(report)
    fraction = rank_fraction if rank_fraction is not None else float(settings.get("rank_fraction", 0.3))
    threshold = settings.get("recommend_threshold", 0.9)
    return _plot_spectrum(
        report, curve_key="lorad_energy", mark_fraction=fraction,
        threshold=float(threshold) if threshold is not None else None,
        title="LoRaD angle spectrum:\nenergy of the pair-angle field Θ kept at rank k",
        ylabel="energy of the angle field Θ kept (%)",
        xlabel="LoRaD rank kept, as % of min(out, fan-in / 2)",
        hint="it was made without spectra (--no-spectra).",
    )


def plot_recommended_ranks(report: ReportLike) -> Figure:
    """The LoRaD rank the report recommends for each weight matrix (bars, model order, blocks shaded)."""
    records = _matrix_records(report, require=("recommended_rank",))
    if not records:
        raise _no_data("recommended ranks", "it was made without spectra (--no-spectra).")
    fig, ax = _new_figure(max(8.0, min(18.0, 0.06 * len(records) + 6)), 5.0)
    ranks = np.array([r["recommended_rank"] for r in records], dtype=float)
    types = [r.get("layer_type") or "other" for r in records]
    palette = {t: f"C{i}" for i, t in enumerate(dict.fromkeys(types))}
    _shade_blocks(ax, [r.get("block") for r in records], label=True)
    ax.bar(np.arange(len(records)), ranks, width=0.8, color=[palette[t] for t in types], zorder=2)
    _layer_axis(ax, records)
    threshold = float(_settings(report).get("recommend_threshold", 0.9))
    ax.set_ylabel("recommended LoRaD rank")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    total_params = sum(int(r["recommended_rank"]) * (_out_and_fan_in(r)[0] + _out_and_fan_in(r)[1] // 2) for r in records)
    fig.suptitle(
        f"LoRaD rank that keeps {threshold * 100:.0f} % of each layer's angle-field energy\n"
        f"{len(records)} layers, median rank {np.median(ranks):.0f}, {total_params:,} trainable parameters"
    )
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(handles=[Patch(color=c, label=t) for t, c in palette.items()], loc="upper left",
              bbox_to_anchor=(1.01, 1.0), fontsize=8, title="layer type", title_fontsize=8)
    return fig


def _out_and_fan_in(record: Mapping[str, Any]) -> tuple[int, int]:
    """(out, fan_in) of a matrix record, from its shape list or the DataFrame's out/fan_in columns."""
    shape = record.get("shape")
    if isinstance(shape, (list, tuple)):
        return int(shape[0]), int(np.prod(shape[1:]))
    return int(record.get("out") or 0), int(record.get("fan_in") or 0)


# ------------------------------------------------------------------------------------ angle heatmap


def _tensor_of(source: Any, layer: str | None, role: str) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        return source
    if layer is None:
        raise WadiInputError(f"name the layer to draw (--layer) when the {role} is a checkpoint.")
    if isinstance(source, (str, Path)):
        from wadi_probe.io.checkpoints import open_checkpoint

        with open_checkpoint(source) as checkpoint:
            return _tensor_of(checkpoint, layer, role)
    if hasattr(source, "tensor") and hasattr(source, "names"):
        if layer not in source.names():
            raise WadiInputError(f"the {role} checkpoint has no tensor named '{layer}'.")
        return source.tensor(layer)
    raise WadiInputError(f"the {role} must be a tensor, a checkpoint or a path, got {type(source).__name__}.")


def pair_angle_field_deg(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Θ in degrees, (out, fan_in // 2), for a teacher/student weight of the same shape (conv kernels flattened)."""
    if teacher.shape != student.shape:
        raise WadiInputError(
            f"teacher and student shapes differ ({tuple(teacher.shape)} vs {tuple(student.shape)}); "
            "pick a layer both checkpoints share."
        )
    if teacher.ndim < 2 or as_matrix(teacher).shape[1] < 2:
        raise WadiInputError(
            f"a pair-angle heatmap needs a weight matrix with at least 2 input features, got shape {tuple(teacher.shape)}."
        )
    return torch.rad2deg(pair_angles(as_matrix(teacher), as_matrix(student)).double())


def plot_pair_angle_heatmap(
    teacher: Any, student: Any, layer: str | None = None, *, max_cells: int = 512
) -> Figure:
    """Heatmap of the per-row pair angles θ_ij (degrees) that turn the teacher's column pairs into the student's.

    ``teacher``/``student`` are tensors, checkpoints or checkpoint paths (then ``layer`` names the tensor).
    Larger fields are averaged down to at most ``max_cells`` cells per side (the title says so).
    """
    theta = pair_angle_field_deg(_tensor_of(teacher, layer, "teacher"), _tensor_of(student, layer, "student"))
    out, pairs = theta.shape
    shown = theta
    pooled = out > max_cells or pairs > max_cells
    if pooled:
        shown = torch.nn.functional.adaptive_avg_pool2d(theta[None, None], (min(out, max_cells), min(pairs, max_cells)))[0, 0]
    data = shown.cpu().numpy()
    limit = float(np.quantile(np.abs(data), 0.99)) if data.size else 0.0
    limit = limit if limit > 0 else 1.0
    fig, ax = _new_figure(7.0, 5.2)
    image = ax.imshow(
        data, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest",
        extent=(-0.5, pairs - 0.5, out - 0.5, -0.5),
    )
    colorbar = fig.colorbar(image, ax=ax)
    colorbar.set_label("rotation angle θ (degrees)")
    ax.set_xlabel("input column pair j (features 2j, 2j+1)")
    ax.set_ylabel("output unit (row) i")
    abs_theta = theta.abs()
    name = layer or "weight"
    note = f", averaged to {data.shape[0]}×{data.shape[1]} cells" if pooled else ""
    ax.set_title(
        f"Pair angles of {name} {tuple(theta.shape)}{note}\n"
        f"mean |θ| = {abs_theta.mean().item():.3g}°, max |θ| = {abs_theta.max().item():.3g}° "
        f"(colours clipped at ±{limit:.3g}°, the 99th percentile)",
        fontsize=10,
    )
    return fig


# ---------------------------------------------------------------------------------------- save all


@dataclass
class SavedPlots:
    """What :func:`save_all_plots` wrote, and which figures it skipped and why."""

    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


REPORT_PLOTS = {
    "mean_vs_std": plot_mean_vs_std,
    "depth_profile": plot_depth_profile,
    "residual_energy": plot_residual_energy,
    "angle_spectrum": plot_angle_spectrum,
    "recommended_rank": plot_recommended_ranks,
}


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 150) -> Path:
    """Write one figure atomically; the format follows the file suffix."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    return path


def _safe_name(layer: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", layer)


def save_all_plots(
    report: ReportLike,
    out_dir: str | Path,
    formats: Iterable[str] = ("png", "svg"),
    *,
    layer: str | None = None,
    teacher: Any = None,
    student: Any = None,
) -> SavedPlots:
    """Write every report figure to ``out_dir`` in each format; with ``layer``, ``teacher`` and ``student`` also the
    pair-angle heatmap of that layer. Figures the report has no data for (e.g. spectra made with --no-spectra)
    are skipped and listed in the result.
    """
    formats = [f.lower().lstrip(".") for f in formats]
    unknown = [f for f in formats if f not in {"png", "svg", "pdf"}]
    if unknown or not formats:
        raise WadiInputError(f"plot formats must be png, svg or pdf, got {', '.join(unknown) or 'none'}.")
    if (layer is None) != (teacher is None) or (teacher is None) != (student is None):
        raise WadiInputError("the pair-angle heatmap needs all three of --layer, --teacher and --student.")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise WadiInputError(f"the plot folder {out} exists and is not a folder.")
    _records(report)  # validate before drawing anything
    figures: list[tuple[str, Any]] = list(REPORT_PLOTS.items())
    if layer is not None:
        figures.append((f"pair_angles_{_safe_name(layer)}", lambda _r: plot_pair_angle_heatmap(teacher, student, layer)))
    drawn: list[tuple[str, Figure]] = []
    saved = SavedPlots()
    for name, draw in figures:
        try:
            drawn.append((name, draw(report)))
        except WadiInputError as exc:
            if name.startswith("pair_angles_"):
                raise
            saved.skipped.append((name, str(exc)))
    out.mkdir(parents=True, exist_ok=True)
    for name, fig in drawn:
        for fmt in formats:
            saved.files.append(save_figure(fig, out / f"{name}.{fmt}"))
    return saved
