"""Several students against one teacher, side by side: the combined summary table and its files.

One row per student (the columns of :data:`wadi_probe.analyze.SUMMARY_COLUMNS`), written as ``summary.json``
(with the refused students and why) and ``summary.csv``, and rendered for a terminal at 80 columns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from rich.text import Text

from wadi_probe.io.atomic import atomic_path, write_json_atomic
from wadi_probe.report.summary import compact_table, percent

COMBINED_SCHEMA_VERSION = 1


def write_combined(rows: Sequence[Mapping[str, Any]], refused: Mapping[str, str], folder: str | Path,
                   *, teacher: str, reports: Mapping[str, str]) -> tuple[Path, Path]:
    """Write ``summary.json`` and ``summary.csv`` into ``folder`` atomically; returns both paths."""
    import pandas as pd

    folder = Path(folder)
    data = {"schema_version": COMBINED_SCHEMA_VERSION, "tool": "wadi-probe", "teacher": teacher,
            "students": [dict(row, report=reports.get(str(row["label"]))) for row in rows],
            "refused": dict(refused)}
    json_path = write_json_atomic(folder / "summary.json", data)
    csv_path = folder / "summary.csv"
    with atomic_path(csv_path) as tmp:
        pd.DataFrame([dict(row) for row in rows]).to_csv(tmp, index=False)
    return Path(json_path), csv_path


def _ratio(value: Any) -> str:
    return "-" if value is None else f"{value:.3g}×"


def _excess(value: Any, excess: Any) -> str:
    if value is None:
        return "-"
    return f"{percent(value)} ({excess * 100:+.2g})" if excess is not None else percent(value)


def combined_table(rows: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The side-by-side table (fits 80 columns) and its legend, as rich renderables."""
    table = compact_table("Students side by side", tight=True)
    headers = ("student", "θ/norm", "paper", "angle", "norm σ", "E@30% (±ch.)", "rot. (±ch.)", "rank", "id/unm")
    widest = max([len(str(row["label"])) for row in rows] + [len(headers[0])])
    for index, header in enumerate(headers):
        table.add_column(header, justify="left" if index == 0 else "right", overflow="fold", no_wrap=index > 0,
                         min_width=min(widest, 14) if index == 0 else None)
    for row in rows:
        rank = row.get("recommended_rank_median")
        table.add_row(
            str(row["label"]), _ratio(row.get("angle_to_norm_ratio")), _ratio(row.get("paper_direction_to_norm_ratio")),
            "-" if row.get("angle_deg_mean") is None else f"{row['angle_deg_mean']:.3g}°",
            percent(row.get("norm_change_layer_std")),
            _excess(row.get("residual_energy_at_30pct_rank_mean"), row.get("residual_energy_at_30pct_rank_excess_mean")),
            _excess(row.get("lorad_explained_mean"), row.get("lorad_explained_excess_mean")),
            "-" if rank is None else f"{rank:g}",
            f"{row.get('identical', 0)}/{row.get('unmatched', 0)}",
        )
    legend = Text(
        "θ/norm: mean angle (rad) / mean relative norm change (first order); paper: the paper's mean (1 − cos) / "
        "mean norm change; angle: mean angle; norm σ: spread of the per-layer mean norm change across layers; "
        "E@30%: residual energy at 30 % rank, and in brackets its excess over a structureless change of the same "
        "shapes (percentage points); rot.: share a pairwise rotation explains, and its excess over chance; rank: "
        "median recommended LoRaD rank; id/unm: identical / unmatched tensors; a ratio is '-' when the norms "
        "changed only at the rounding level.", style="dim",
    )
    return [table, legend]
