"""Figures of a probe report: how far each layer's weights turned (direction) versus how much they grew (norm).

Every function takes a report (a :class:`wadi_probe.report.schema.Report`, its raw ``dict``, or — where only scalar
columns are needed — its DataFrame) and returns a :class:`matplotlib.figure.Figure`. Figures are drawn on the
Agg canvas without pyplot, so nothing opens a window and nothing is kept in a global figure list; call
``fig.savefig`` or :func:`save_all_plots` to write them.

Units: norm and direction changes are plotted in percent (a fraction 0.022 is 2.2 %), angles in degrees.
"Per-row" means per output unit (a conv kernel is flattened per output channel), as in docs/design.md ("The probe").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

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
from wadi_probe.text import plural

NORM_COLOR = "#1f77b4"
DIRECTION_COLOR = "#d62728"
LAYER_TYPE_MARKERS = {"attention": "o", "feed-forward": "s", "resnet conv": "^", "other": "D",
                      "attention (text)": "P", "feed-forward (text)": "X", "modulation": "v", "modulation (text)": "<",
                      "attention + feed-forward": "*"}
BLOCK_FAMILY_COLORS = {
    "down": "#dbe9f6",
    "mid": "#e8e8e8",
    "up": "#fde7d4",
    "transformer": "#e9e3f3",
    "single": "#f3e3ee",
    "noise_refiner": "#e3eef3",
    "context_refiner": "#f3efe3",
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


#: Values spanning more than this many decades get log axes by default.
LOG_DECADES = 2.0


def wants_log(values: Iterable[float], log: bool | None) -> bool:
    """``log`` when given; otherwise True when the positive values span more than :data:`LOG_DECADES` decades."""
    if log is not None:
        return bool(log)
    positive = [float(v) for v in values if v is not None and float(v) > 0 and math.isfinite(float(v))]
    return len(positive) > 1 and math.log10(max(positive) / min(positive)) > LOG_DECADES


def _direction_quantity(records: Sequence[Mapping[str, Any]], direction: str | None) -> str:
    """``"angle"`` (first order, default when the records have per-layer angle stds) or ``"1-cos"`` (the paper's)."""
    if direction is None:
        return "angle" if all(r.get("angle_deg_std") is not None for r in records) else "1-cos"
    if direction not in ("angle", "1-cos"):
        raise WadiInputError(f"direction must be 'angle' or '1-cos', got {direction!r}.")
    return direction


def _direction_values(records: Sequence[Mapping[str, Any]], quantity: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer mean and std of the direction change in percent: angle in radians ×100, or (1 − cos) ×100."""
    if quantity == "angle":
        mean = np.radians([float(r["angle_deg_mean"]) for r in records]) * 100
        std = np.radians([float(r["angle_deg_std"]) for r in records]) * 100
        return mean, std
    return (np.array([r["direction_change_mean"] for r in records], dtype=float) * 100,
            np.array([r["direction_change_std"] for r in records], dtype=float) * 100)


DIRECTION_LABELS = {
    "angle": "direction change: angle (rad, as % of the row's length)",
    "1-cos": "direction change 1 − cos (the paper's)",
}


def plot_mean_vs_std(report: ReportLike, *, log: bool | None = None, direction: str | None = None) -> Figure:
    """The paper's Fig. 1(a): per layer, mean against std of the per-row change, norm and direction in two colours.

    One point per weight matrix that changed and quantity; a large star marks the mean over those layers of the
    per-layer means and of the per-layer stds. Norm change is |‖s_i‖ − ‖t_i‖| / ‖t_i‖ per output row;
    direction change is the row's angle in radians (``direction="angle"``, first order like the norm change, the
    default) or the paper's 1 − cos (``"1-cos"``), both in percent. Bit-identical layers would sit at (0, 0):
    they are counted in the title, not drawn. Log axes with ``log=True``, and by default when the values span
    more than two decades.
    """
    records = _matrix_records(
        report, require=("norm_change_mean", "norm_change_std", "direction_change_mean", "direction_change_std")
    )
    if not records:
        raise _no_data("per-row norm/direction statistics", "it contains no matched weight matrices.")
    changed = [r for r in records if not r.get("identical")]
    identical = len(records) - len(changed)
    if not changed:
        raise _no_data("changed weight matrices", f"all {len(records)} are identical in teacher and student.")
    quantity = _direction_quantity(changed, direction)
    series = {
        "norm": (np.array([r["norm_change_mean"] for r in changed], dtype=float) * 100,
                 np.array([r["norm_change_std"] for r in changed], dtype=float) * 100),
        "direction": _direction_values(changed, quantity),
    }
    use_log = wants_log(np.concatenate([np.concatenate(v) for v in series.values()]), log)
    fig, ax = _new_figure(6.4, 6.6)
    means = {}
    for key, color, label in (
        ("norm", NORM_COLOR, "norm change"),
        ("direction", DIRECTION_COLOR, DIRECTION_LABELS[quantity]),
    ):
        x, y = series[key]
        keep = (x > 0) & (y > 0) if use_log else np.ones_like(x, dtype=bool)
        ax.scatter(x[keep], y[keep], s=16, alpha=0.6, color=color, edgecolors="none", label=f"{label}, one point per layer")
        means[key] = (float(x.mean()), float(y.mean()))
        ax.scatter(
            [means[key][0]], [means[key][1]], marker="*", s=260, color=color, edgecolors="black", linewidths=0.8,
            zorder=5, label=f"mean over layers: {means[key][0]:.3g} % (mean), {means[key][1]:.3g} % (mean per-layer std)",
        )
        hidden = int((~keep).sum())
        if hidden:
            ax.plot([], [], " ", label=f"({hidden} layers with a zero {key} change not drawn on log axes)")
    ax.set_xlabel("mean change over a layer's rows (%)")
    ax.set_ylabel("standard deviation over a layer's rows (%)")
    ratio = means["direction"][0] / means["norm"][0] if means["norm"][0] > 0 else float("inf")
    what = "angle/norm = {:.3g}× in the mean" if quantity == "angle" else "direction/norm = {:.3g}× in the mean, the paper's 1 − cos ratio"
    ratio_text = what.format(ratio) if math.isfinite(ratio) else "norms unchanged"
    skipped = f"; {identical} identical layers not drawn" if identical else ""
    ax.set_title(f"Per-row weight change in {len(changed)} layers: norm vs direction\n({ratio_text}{skipped})",
                 fontsize=10)
    _mean_std_axes(ax, use_log)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=8, ncol=1, frameon=False)
    return fig


# ------------------------------------------------------------------------------------- depth profile


def _mean_std_axes(ax: Any, use_log: bool) -> None:
    """Both axes of a mean-vs-std scatter: log-log, or linear from zero."""
    if use_log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    else:
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)


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


def _shade_blocks(ax: Any, blocks: Sequence[str | None], *, label: bool, axis_inches: float | None = None) -> None:
    """Shade each run of layers that belongs to one block (down/mid/up blocks or transformer depth).

    Labels go above the bands, horizontal when every band is wide enough for its name, else vertical; a band too
    narrow even for a vertical label (7 pt) is left unlabelled rather than overlapping its neighbour.
    """
    spans = _block_spans(blocks)
    inches = axis_inches or 8.0
    per_layer = inches / max(1, len(blocks))  # inches of axis per layer
    char = 7 / 72 * 0.62  # width of one 7-pt character, inches
    horizontal = all((last - first + 1) * per_layer >= (len(name) + 1) * char for name, first, last in spans)
    last_end = -math.inf
    for n, (name, first, last) in enumerate(spans):
        color = BLOCK_FAMILY_COLORS[_block_family(name)]
        ax.axvspan(first - 0.5, last + 0.5, color=color, alpha=1.0 if n % 2 == 0 else 0.55, zorder=0, linewidth=0)
        if n > 0:
            ax.axvline(first - 0.5, color="white", linewidth=1.0, zorder=0.5)
        if not label:
            continue
        centre = (first + last) / 2 * per_layer
        if centre - last_end < 7 / 72 * 1.3:  # the previous vertical label is closer than one line height
            continue
        ax.text(
            (first + last) / 2, 1.01, name, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
            fontsize=7, rotation=0 if horizontal else 90, clip_on=False,
        )
        last_end = centre


def _layer_axis(ax: Any, records: Sequence[Mapping[str, Any]], *, max_labels: int = 40) -> None:
    ax.set_xlim(-0.5, len(records) - 0.5)
    if len(records) <= max_labels:
        ax.set_xticks(range(len(records)))
        ax.set_xticklabels([r.get("module") or r["name"] for r in records], rotation=90, fontsize=6)
    ax.set_xlabel("layer, in model order (shaded bands are blocks)")


def plot_depth_profile(report: ReportLike, *, log: bool | None = None, direction: str | None = None) -> Figure:
    """Direction and norm change of every weight matrix in model order, with the blocks shaded.

    Top: mean per-row direction change (the angle in radians as % of the row's length, or the paper's 1 − cos
    with ``direction="1-cos"``); bottom: mean per-row norm change; both in percent. Markers tell attention,
    feed-forward and resnet-conv layers apart; hollow markers are bit-identical layers. Log value axes with
    ``log=True`` and by default when the values span more than two decades (zeros then sit on the bottom edge).
    """
    records = _matrix_records(report, require=("norm_change_mean", "direction_change_mean"))
    if not records:
        raise _no_data("per-row norm/direction statistics", "it contains no matched weight matrices.")
    quantity = "angle" if direction in (None, "angle") else _direction_quantity(records, direction)
    width = max(8.0, min(18.0, 0.06 * len(records) + 6))
    fig, (ax_dir, ax_norm) = _new_figure(width, 6.6, 2, 1, sharex=True)
    positions = np.arange(len(records))
    blocks = [r.get("block") for r in records]
    types = [r.get("layer_type") or "other" for r in records]
    identical = np.array([bool(r.get("identical")) for r in records])
    direction_values = (np.radians([float(r.get("angle_deg_mean") or 0.0) for r in records]) * 100 if quantity == "angle"
                        else np.array([r["direction_change_mean"] for r in records], dtype=float) * 100)
    for ax, values, color, ylabel in (
        (ax_dir, direction_values, DIRECTION_COLOR,
         "angle (% of row length)" if quantity == "angle" else "1 − cos, the paper's (%)"),
        (ax_norm, np.array([r["norm_change_mean"] for r in records], dtype=float) * 100, NORM_COLOR, "norm change (%)"),
    ):
        use_log = wants_log(values, log)
        _shade_blocks(ax, blocks, label=ax is ax_dir, axis_inches=width - 2.6)
        shown = values.copy()
        if use_log:
            floor = values[values > 0].min() / 2 if (values > 0).any() else 1e-12
            shown = np.where(values > 0, values, floor)
            ax.set_yscale("log")
        ax.plot(positions, shown, color=color, linewidth=0.6, alpha=0.5, zorder=2)
        for layer_type in dict.fromkeys(types):
            idx = [i for i, t in enumerate(types) if t == layer_type]
            ax.scatter(positions[idx], shown[idx], marker=LAYER_TYPE_MARKERS.get(layer_type, "D"), s=22,
                       facecolors=["white" if identical[i] else color for i in idx],
                       edgecolors=[color if identical[i] else "black" for i in idx], linewidths=0.5, zorder=3)
        ax.set_ylabel(ylabel + (" (log)" if use_log else ""))
        if not use_log:
            ax.set_ylim(bottom=0)
        ax.grid(True, axis="y", alpha=0.3)
    _layer_axis(ax_norm, records)
    handles = [
        Line2D([], [], linestyle="none", marker=LAYER_TYPE_MARKERS.get(t, "D"), color="grey", markeredgecolor="black",
               label=t)
        for t in dict.fromkeys(types)
    ]
    if identical.any():
        handles.append(Line2D([], [], linestyle="none", marker="o", color="white", markeredgecolor="grey",
                              label=f"identical ({int(identical.sum())})"))
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


def _chance_curve(record: Mapping[str, Any], fraction: float) -> list[float] | None:
    """The structureless residual's mean energy curve for this record's analysed shape (None without rows)."""
    from wadi_probe.chance import chance_for_shape

    rows = record.get("rows")
    out, fan_in = _out_and_fan_in(record)
    if not rows or fan_in < 2:
        return None
    curve = chance_for_shape(int(rows), fan_in, fraction).residual_curve
    return list(curve) if curve else None


def _plot_spectrum(
    report: ReportLike, *, curve_key: str, title: str | Callable[[float, float | None], str], ylabel: str,
    xlabel: str, mark_fraction: float, threshold: float | None, hint: str, chance: bool = False,
) -> Figure:
    records = [r for r in _records(report) if r.get(curve_key) and not r.get("rounding_level")]
    if not records:
        raise _no_data(f"'{curve_key}' spectra", hint)
    fig, ax = _new_figure(6.4, 5.0)
    for r in records:
        curve = np.asarray(r[curve_key], dtype=float)
        x = np.arange(len(curve) + 1) / len(curve) * 100
        ax.plot(x, np.concatenate(([0.0], curve)) * 100, color="grey", alpha=0.25, linewidth=0.7,
                drawstyle="steps-pre")
    grid = np.linspace(0.0, 1.0, 1001)
    mean_curve = np.mean([_energy_at_fraction(r[curve_key], grid) for r in records], axis=0)
    ax.plot(grid * 100, mean_curve * 100, color=DIRECTION_COLOR, linewidth=2.4, label=f"mean of {len(records)} layers")
    at_mark = float(np.mean([_energy_at_fraction(r[curve_key], np.array([mark_fraction]))[0] for r in records]))
    chance_at_mark = None
    if chance:
        curves = [c for c in (_chance_curve(r, mark_fraction) for r in records) if c]
        if curves:
            chance_mean = np.mean([_energy_at_fraction(c, grid) for c in curves], axis=0)
            chance_at_mark = float(np.mean([_energy_at_fraction(c, np.array([mark_fraction]))[0] for c in curves]))
            ax.plot(grid * 100, chance_mean * 100, color="black", linestyle="-.", linewidth=1.4,
                    label=f"chance: a structureless change of the same shapes ({chance_at_mark * 100:.1f} % at "
                          f"{mark_fraction * 100:.0f} %)")
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
    ax.set_title(title(at_mark, chance_at_mark) if callable(title) else title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_residual_energy(report: ReportLike, *, rank_fraction: float | None = None) -> Figure:
    """The paper's Fig. 1(b): energy of the direction residual kept against the fraction of rank kept.

    The residual is ΔD = rownorm(S) − rownorm(T); energy(k) = Σ_{j≤k} σ_j² / Σ σ_j². One faint line per layer,
    the layer average in bold, the same average for a structureless change of the same shapes (the chance line),
    and the 30 % rank mark (or ``rank_fraction``; default: the report's setting). The title claims "low-rank"
    only when the average exceeds chance at the mark. Rounding-level layers are left out.
    """
    fraction = rank_fraction if rank_fraction is not None else float(_settings(report).get("rank_fraction", 0.3))

    def title(at_mark: float, chance_at_mark: float | None) -> str:
        from wadi_probe.chance import above_chance

        if chance_at_mark is None:
            claim = "Spectrum of the direction change"
        elif above_chance(at_mark - chance_at_mark):
            claim = f"Direction change is low-rank beyond chance (+{(at_mark - chance_at_mark) * 100:.2g} points)"
        else:
            claim = "Direction change is no more low-rank than chance"
        return f"{claim}:\nenergy of the direction residual ΔD kept at rank k"

    return _plot_spectrum(
        report, curve_key="residual_energy", mark_fraction=fraction, threshold=None, chance=True,
        title=title,
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
    if not records or _settings(report).get("spectra") is False:
        raise _no_data("recommended ranks", "it was made without spectra (--no-spectra).")
    if not any(r["recommended_rank"] for r in records):
        raise _no_data("recommended ranks", "no layer has a rank above 0 (none changed beyond rounding, or the "
                       "spectra were skipped).")
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
    ax.set_ylim(bottom=0)
    total_params = sum(int(r["recommended_rank"]) * (_out_and_fan_in(r)[0] + _out_and_fan_in(r)[1] // 2) for r in records)
    advised = ranks[ranks > 0]
    fig.suptitle(
        f"LoRaD rank that keeps {threshold * 100:.0f} % of each layer's angle-field energy\n"
        f"{len(advised)} of {len(records)} layers changed beyond rounding: median rank {np.median(advised):.0f}, "
        f"{total_params:,} trainable parameters"
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


def _wrap_name(text: str, width: int) -> str:
    """Wrap a dotted layer name at its dots (never inside a part), so that a title fits its figure."""
    lines: list[str] = []
    for piece in re.split(r"(?<=\.)", text):
        if lines and len(lines[-1]) + len(piece) <= width:
            lines[-1] += piece
        else:
            lines.append(piece)
    return "\n".join(lines)


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
    name = _wrap_name(f"{layer or 'weight'} {tuple(theta.shape)}", 56)
    note = f", averaged to {data.shape[0]}×{data.shape[1]} cells" if pooled else ""
    if float(abs_theta.max()) == 0:
        stats = "θ = 0 everywhere: teacher and student pairs point the same way (nothing turned)"
        ax.text(0.5, 0.5, "no pair turned\n(θ = 0 in every cell)", transform=ax.transAxes, ha="center", va="center",
                fontsize=12, color="dimgrey")
    else:
        stats = (f"mean |θ| = {abs_theta.mean().item():.3g}°, max |θ| = {abs_theta.max().item():.3g}°\n"
                 f"(colours clipped at ±{limit:.3g}°, the 99th percentile)")
    ax.set_title(f"Pair angles of\n{name}{note}\n{stats}", fontsize=9)
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


_LOG_PLOTS = ("mean_vs_std", "depth_profile")


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
    log: bool | None = None,
) -> SavedPlots:
    """Write every report figure to ``out_dir`` in each format; with ``layer``, ``teacher`` and ``student`` also the
    pair-angle heatmap of that layer. Figures the report has no data for (e.g. spectra made with --no-spectra)
    are skipped and listed in the result. ``log`` forces log (True) or linear (False) value axes where a figure
    offers both; by default they are log when the values span more than two decades.
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
    figures: list[tuple[str, Any]] = [
        (name, (lambda r, draw=draw: draw(r, log=log)) if name in _LOG_PLOTS else draw)
        for name, draw in REPORT_PLOTS.items()
    ]
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
    return _write_drawn(drawn, out, formats, saved)


# ------------------------------------------------------------------------------ several students side by side

STUDENT_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def _write_drawn(drawn: Sequence[tuple[str, Any]], out: Path, formats: Sequence[str], saved: Any) -> Any:
    """Write every drawn figure in every format into ``out`` (only once all were drawn), listed in ``saved``; the
    folder is made by the first write, so a write that fails leaves no empty folder behind."""
    for name, fig in drawn:
        for fmt in formats:
            saved.files.append(save_figure(fig, out / f"{name}.{fmt}"))
    return saved


def _student_color(index: int) -> str:
    return STUDENT_COLORS[index % len(STUDENT_COLORS)]


def _check_students(reports: Sequence[ReportLike], labels: Sequence[str]) -> None:
    if not reports:
        raise WadiInputError("give at least one report to plot.")
    if len(labels) != len(reports):
        raise WadiInputError(f"{len(labels)} labels for {len(reports)} reports; give one --label per report or none.")


def plot_students_mean_vs_std(reports: Sequence[ReportLike], labels: Sequence[str], *, log: bool | None = None) -> Figure:
    """Fig. 1(a) for several students: per changed layer, mean against std of the per-row change, one colour per
    student; circles are the direction change (angle in radians, %), squares the norm change (%), stars the
    means over each student's layers. Identical layers are not drawn (they would sit at 0)."""
    _check_students(reports, labels)
    series = []
    for report, label in zip(reports, labels):
        records = [r for r in _matrix_records(report, require=("norm_change_mean", "norm_change_std",
                                                                 "angle_deg_mean")) if not r.get("identical")]
        if not records:
            raise _no_data(f"changed weight matrices for {label}", "all are identical or none matched.")
        quantity = _direction_quantity(records, None)
        direction = _direction_values(records, quantity)
        norm = (np.array([r["norm_change_mean"] for r in records], dtype=float) * 100,
                np.array([r["norm_change_std"] for r in records], dtype=float) * 100)
        series.append((label, quantity, direction, norm))
    values = np.concatenate([np.concatenate([*d, *n]) for _, _, d, n in series])
    use_log = wants_log(values, log)
    fig, ax = _new_figure(7.0, 6.8)
    for index, (label, quantity, direction, norm) in enumerate(series):
        color = _student_color(index)
        for (x, y), marker, what in ((direction, "o", "angle" if quantity == "angle" else "1 − cos"), (norm, "s", "norm")):
            keep = (x > 0) & (y > 0) if use_log else np.ones_like(x, dtype=bool)
            ax.scatter(x[keep], y[keep], s=14, alpha=0.45, color=color, marker=marker, edgecolors="none")
            ax.scatter([x.mean()], [y.mean()], marker="*", s=240, color=color, edgecolors="black", linewidths=0.7,
                       zorder=5, label=f"{label}, {what}: {x.mean():.3g} % mean, {y.mean():.3g} % mean per-layer std")
    ax.scatter([], [], marker="o", color="grey", label="circles: direction (angle, % of row length), one per layer")
    ax.scatter([], [], marker="s", color="grey", label="squares: norm change, one per layer")
    _mean_std_axes(ax, use_log)
    ax.set_xlabel("mean change over a layer's rows (%)")
    ax.set_ylabel("standard deviation over a layer's rows (%)")
    ax.set_title(f"Per-row weight change of {plural(len(series), 'student')}: direction vs norm", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=7, ncol=1, frameon=False)
    return fig


def plot_students_residual_energy(reports: Sequence[ReportLike], labels: Sequence[str]) -> Figure:
    """Fig. 1(b) for several students: the layer-average energy of the direction residual kept at rank k, one
    curve per student, each with its own chance line (a structureless change of the same shapes, dash-dotted)."""
    _check_students(reports, labels)
    grid = np.linspace(0.0, 1.0, 1001)
    fig, ax = _new_figure(6.6, 5.2)
    drawn = 0
    for index, (report, label) in enumerate(zip(reports, labels)):
        records = [r for r in _records(report) if r.get("residual_energy") and not r.get("rounding_level")]
        if not records:
            continue
        fraction = float(_settings(report).get("rank_fraction", 0.3))
        color = _student_color(index)
        mean_curve = np.mean([_energy_at_fraction(r["residual_energy"], grid) for r in records], axis=0)
        at = float(np.mean([_energy_at_fraction(r["residual_energy"], np.array([fraction]))[0] for r in records]))
        ax.plot(grid * 100, mean_curve * 100, color=color, linewidth=2.0,
                label=f"{label}: {at * 100:.1f} % at {fraction * 100:.0f} % rank ({len(records)} layers)")
        curves = [c for c in (_chance_curve(r, fraction) for r in records) if c]
        if curves:
            chance = np.mean([_energy_at_fraction(c, grid) for c in curves], axis=0)
            chance_at = float(np.mean([_energy_at_fraction(c, np.array([fraction]))[0] for c in curves]))
            ax.plot(grid * 100, chance * 100, color=color, linewidth=1.0, linestyle="-.",
                    label=f"{label}, chance: {chance_at * 100:.1f} %")
        drawn += 1
    if not drawn:
        raise _no_data("'residual_energy' spectra", "the reports were made without spectra (--no-spectra).")
    ax.axvline(30, color="black", linestyle="--", linewidth=1.0)
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 101)
    ax.set_xlabel("rank kept, as % of the layer's full rank min(out, fan-in)")
    ax.set_ylabel("energy of the direction residual kept (%)")
    ax.set_title("Energy of the direction residual ΔD kept at rank k,\nlayer average per student (dash-dotted: chance)",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    return fig


def plot_students_depth_profile(reports: Sequence[ReportLike], labels: Sequence[str], *,
                                log: bool | None = None) -> Figure:
    """Mean angle (top) and mean norm change (bottom) of every weight matrix in the first report's model order,
    one line per student; layers a student lacks are gaps. Log value axes by default past two decades."""
    _check_students(reports, labels)
    order = [r for r in _matrix_records(reports[0], require=("norm_change_mean",))]
    if not order:
        raise _no_data("per-row norm/direction statistics", "the first report has no matched weight matrices.")
    names = [r["name"] for r in order]
    width = max(8.0, min(18.0, 0.06 * len(order) + 6))
    fig, (ax_dir, ax_norm) = _new_figure(width, 6.6, 2, 1, sharex=True)
    tables = []
    for report in reports:
        by_name = {r["name"]: r for r in _records(report)}
        angle = np.array([math.radians(by_name[n]["angle_deg_mean"]) * 100
                          if n in by_name and by_name[n].get("angle_deg_mean") is not None else np.nan for n in names])
        norm = np.array([by_name[n]["norm_change_mean"] * 100
                         if n in by_name and by_name[n].get("norm_change_mean") is not None else np.nan for n in names])
        tables.append((angle, norm))
    for ax, column, ylabel in ((ax_dir, 0, "angle (% of row length)"), (ax_norm, 1, "norm change (%)")):
        values = np.concatenate([t[column] for t in tables])
        use_log = wants_log(values[np.isfinite(values)], log)
        _shade_blocks(ax, [r.get("block") for r in order], label=ax is ax_dir, axis_inches=width - 2.6)
        for index, (label, table) in enumerate(zip(labels, tables)):
            y = table[column]
            if use_log:
                y = np.where(y > 0, y, np.nan)
            ax.plot(np.arange(len(names)), y, color=_student_color(index), linewidth=1.0, marker="o", markersize=2.5,
                    label=label, zorder=3)
        if use_log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.set_ylabel(ylabel + (" (log; zeros not drawn)" if use_log else ""))
        ax.grid(True, axis="y", alpha=0.3)
    _layer_axis(ax_norm, order)
    ax_dir.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="student", title_fontsize=8)
    fig.suptitle(f"Mean per-row change of each layer, {plural(len(reports), 'student')}, in model order")
    return fig


COMPARISON_PLOTS = {
    "students_mean_vs_std": plot_students_mean_vs_std,
    "students_residual_energy": plot_students_residual_energy,
    "students_depth_profile": plot_students_depth_profile,
}


def save_comparison_plots(
    reports: Sequence[ReportLike], labels: Sequence[str], out_dir: str | Path, formats: Iterable[str] = ("png", "svg")
) -> SavedPlots:
    """Write the side-by-side figures of several students' reports to ``out_dir`` (skipping those without data)."""
    formats = [f.lower().lstrip(".") for f in formats]
    unknown = [f for f in formats if f not in {"png", "svg", "pdf"}]
    if unknown or not formats:
        raise WadiInputError(f"plot formats must be png, svg or pdf, got {', '.join(unknown) or 'none'}.")
    _check_students(reports, labels)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise WadiInputError(f"the plot folder {out} exists and is not a folder.")
    saved = SavedPlots()
    drawn = []
    for name, draw in COMPARISON_PLOTS.items():
        try:
            drawn.append((name, draw(reports, labels)))
        except WadiInputError as exc:
            saved.skipped.append((name, str(exc)))
    return _write_drawn(drawn, out, formats, saved)
