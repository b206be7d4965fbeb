"""The probe's report: schema, summary, JSON read/write with validation, and the layer table as a DataFrame.

A report is plain JSON (``schema_version`` 1, field definitions in ``docs/report.md``). :class:`Report` wraps the
decoded dict and adds accessors; :func:`build_report` assembles one from per-layer records and computes the
summary; :func:`load_report` refuses files it does not understand with one clear sentence.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from wadi_probe.io.atomic import atomic_path, write_text_atomic
from wadi_probe.errors import WadiInputError
from wadi_probe.io.jsonfile import read_json

SCHEMA_VERSION = 1
TOOL = "wadi-probe"

#: Record fields in the order they are written (extra keys, if any, follow).
RECORD_FIELDS: tuple[str, ...] = (
    "name", "module", "kind", "layer_type", "block", "order", "shape", "params", "dtype",
    "identical", "rows", "zero_rows", "nonfinite",
    "norm_change_mean", "norm_change_std", "norm_change_max",
    "direction_change_mean", "direction_change_std", "direction_change_max",
    "angle_deg_mean", "angle_deg_max", "matrix_norm_change", "matrix_direction_change",
    "full_rank", "residual_energy_at_30pct_rank", "residual_rank_90", "residual_rank_95", "residual_rank_99",
    "residual_top_singular_values",
    "lorad_full_rank", "lorad_rank_90", "lorad_rank_95", "lorad_rank_99", "lorad_energy_at_30pct_rank",
    "lorad_explained", "lorad_explained_at_recommended_rank", "recommended_rank",
    "residual_energy", "lorad_energy",
)
_INTEGER_FIELDS = (
    "order", "params", "rows", "zero_rows", "nonfinite", "full_rank", "residual_rank_90", "residual_rank_95",
    "residual_rank_99", "lorad_full_rank", "lorad_rank_90", "lorad_rank_95", "lorad_rank_99", "recommended_rank",
)
_LIST_FIELDS = ("shape", "residual_top_singular_values", "residual_energy", "lorad_energy")
_REQUIRED_TOP = ("schema_version", "tool", "inputs", "settings", "pairing", "summary", "layers")
_REQUIRED_RECORD = ("name", "shape", "identical", "norm_change_mean", "direction_change_mean")


@dataclass
class Report:
    """A probe report: ``data`` is exactly what report.json holds."""

    data: dict[str, Any]

    @property
    def layers(self) -> list[dict[str, Any]]:
        """One record per matched tensor, in model order."""
        return self.data["layers"]

    @property
    def summary(self) -> dict[str, Any]:
        """Whole-model numbers (see :func:`summarize`)."""
        return self.data["summary"]

    @property
    def settings(self) -> dict[str, Any]:
        return self.data["settings"]

    @property
    def inputs(self) -> dict[str, Any]:
        return self.data["inputs"]

    @property
    def pairing(self) -> dict[str, Any]:
        return self.data["pairing"]

    def layer(self, name: str) -> dict[str, Any]:
        """The record of one tensor by its normalised name (``...attn1.to_q.weight``) or module path."""
        for record in self.layers:
            if record["name"] == name:
                return record
        matches = [record for record in self.layers if record.get("module") == name and record.get("kind") != "bias"]
        if len(matches) == 1:
            return matches[0]
        raise KeyError(f"{name!r} is not a layer of this report")

    def to_dataframe(self) -> pd.DataFrame:
        """The layer table (one row per tensor, scalar columns only)."""
        return report_to_dataframe(self)

    def to_csv(self, path: str | Path) -> Path:
        """Write the layer table as CSV, atomically."""
        with atomic_path(path) as tmp:
            self.to_dataframe().to_csv(tmp, index=False)
        return Path(path)

    def to_json(self) -> str:
        """The report as JSON text: readable top level, one line per layer record."""
        return dumps_report(self.data)

    def save(self, path: str | Path) -> Path:
        """Write report.json atomically (a crash never leaves a half-written file)."""
        return write_text_atomic(path, self.to_json())

    def __repr__(self) -> str:
        s = self.summary
        return (
            f"Report(layers={s.get('layers')}, norm_change_mean={_fmt(s.get('norm_change_mean'))}, "
            f"direction_change_mean={_fmt(s.get('direction_change_mean'))})"
        )


def _fmt(value: Any) -> str:
    return "None" if value is None else f"{value:.4g}"


# ---- building ------------------------------------------------------------------------------------------------
def order_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record with the schema's fields first, in schema order (missing ones null), extras after."""
    ordered = {key: record.get(key) for key in RECORD_FIELDS}
    ordered.update({key: value for key, value in record.items() if key not in ordered})
    return ordered


def build_report(
    *,
    inputs: Mapping[str, Any],
    settings: Mapping[str, Any],
    pairing: Mapping[str, Any],
    layers: Sequence[Mapping[str, Any]],
    created: str | None = None,
) -> Report:
    """Assemble a report from its parts and compute the summary."""
    records = [order_record(record) for record in layers]
    data = {
        "schema_version": SCHEMA_VERSION,
        "tool": TOOL,
        "created": created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": dict(inputs),
        "settings": dict(settings),
        "pairing": dict(pairing),
        "summary": summarize(records, pairing),
        "layers": records,
    }
    return Report(data)


def _is_matrix(record: Mapping[str, Any]) -> bool:
    return len(record.get("shape") or ()) >= 2


def _values(records: Iterable[Mapping[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in records if r.get(key) is not None]


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def _pooled(records: Sequence[Mapping[str, Any]], prefix: str) -> tuple[float | None, float | None]:
    """Mean and population std over every output unit of every record, from the per-layer mean/std/rows."""
    items = [(r["rows"], r[f"{prefix}_mean"], r[f"{prefix}_std"]) for r in records
             if r.get("rows") and r.get(f"{prefix}_mean") is not None and r.get(f"{prefix}_std") is not None]
    total = sum(n for n, _, _ in items)
    if not total:
        return None, None
    mean = math.fsum(n * m for n, m, _ in items) / total
    second = math.fsum(n * (sd * sd + m * m) for n, m, sd in items) / total
    return mean, math.sqrt(max(second - mean * mean, 0.0))


def summarize(layers: Sequence[Mapping[str, Any]], pairing: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Whole-model numbers. Statistics are over *matrices* (tensors with 2+ dimensions: linear, conv, embedding).

    ``norm_change_mean``/``direction_change_mean`` (and ``_std``) average the per-layer mean (std) over matrices,
    each layer counting once, as in a per-layer plot; the ``_rows`` variants pool every output unit of every
    matrix instead. ``direction_to_norm_ratio`` = direction_change_mean / norm_change_mean. Recommended-rank
    statistics are over the matrices whose direction changed (recommended rank > 0).
    """
    pairing = pairing or {}
    matrices = [r for r in layers if _is_matrix(r)]
    measured = [r for r in matrices if r.get("norm_change_mean") is not None]
    unmatched = (len(pairing.get("shape_mismatch", [])) + len(pairing.get("only_in_teacher", []))
                 + len(pairing.get("only_in_student", [])))
    summary: dict[str, Any] = {
        "layers": len(layers),
        "matrices": len(matrices),
        "vectors": len(layers) - len(matrices),
        "identical": sum(1 for r in layers if r.get("identical")),
        "identical_matrices": sum(1 for r in matrices if r.get("identical")),
        "unmatched": unmatched,
        "skipped": sum(1 for r in layers if r.get("norm_change_mean") is None),
        "zero_rows": sum(int(r.get("zero_rows") or 0) for r in layers),
        "nonfinite": sum(int(r.get("nonfinite") or 0) for r in layers),
        "params": sum(int(r.get("params") or 0) for r in layers),
        "matrix_params": sum(int(r.get("params") or 0) for r in matrices),
    }
    for prefix in ("norm_change", "direction_change"):
        summary[f"{prefix}_mean"] = _mean(_values(measured, f"{prefix}_mean"))
        summary[f"{prefix}_std"] = _mean(_values(measured, f"{prefix}_std"))
    summary["angle_deg_mean"] = _mean(_values(measured, "angle_deg_mean"))
    summary["angle_deg_max"] = max(_values(measured, "angle_deg_max"), default=None)
    nc, dc = summary["norm_change_mean"], summary["direction_change_mean"]
    summary["direction_to_norm_ratio"] = dc / nc if nc and dc is not None else None
    for prefix in ("norm_change", "direction_change"):
        summary[f"{prefix}_mean_rows"], summary[f"{prefix}_std_rows"] = _pooled(measured, prefix)
    for key in ("residual_energy_at_30pct_rank", "lorad_energy_at_30pct_rank", "lorad_explained",
                "lorad_explained_at_recommended_rank"):
        summary[f"{key}_mean"] = _mean(_values(matrices, key))
    ranks = [int(r["recommended_rank"]) for r in matrices if r.get("recommended_rank")]
    summary["recommended_rank_median"] = statistics.median(ranks) if ranks else None
    summary["recommended_rank_max"] = max(ranks, default=None)
    summary["recommended_params"] = sum(int(r["recommended_rank"]) * (int(r["shape"][0]) + _pairs(r)) for r in matrices if r.get("recommended_rank"))
    summary["groups"] = group_by_block(layers)
    return summary


def _pairs(record: Mapping[str, Any]) -> int:
    """⌊fan_in/2⌋ of a matrix record (the width of its LoRaD angle field)."""
    shape = record["shape"]
    return math.prod(shape[1:]) // 2


def _block_sort_key(block: str) -> tuple:
    head, _, index = block.partition(".")
    order = {"embedding": 0, "down": 1, "mid": 2, "up": 3, "transformer": 4, "single": 5, "other": 6}
    return (order.get(head, 7), int(index) if index.isdigit() else -1, block)


def group_by_block(layers: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (block, layer type): matrices, parameters, mean norm/direction change, mean angle, spectra means.

    Only matrices enter (biases and norm vectors would dilute the means). Groups come in model order
    (embedding, down, mid, up / transformer depth, other) and by layer type within a block.
    """
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for record in layers:
        if _is_matrix(record):
            groups.setdefault((record.get("block") or "other", record.get("layer_type") or "other"), []).append(record)
    result = []
    for (block, layer_type), records in sorted(groups.items(), key=lambda item: (_block_sort_key(item[0][0]), item[0][1])):
        measured = [r for r in records if r.get("norm_change_mean") is not None]
        ranks = [int(r["recommended_rank"]) for r in records if r.get("recommended_rank")]
        result.append({
            "block": block,
            "layer_type": layer_type,
            "matrices": len(records),
            "params": sum(int(r.get("params") or 0) for r in records),
            "identical": sum(1 for r in records if r.get("identical")),
            "norm_change_mean": _mean(_values(measured, "norm_change_mean")),
            "direction_change_mean": _mean(_values(measured, "direction_change_mean")),
            "angle_deg_mean": _mean(_values(measured, "angle_deg_mean")),
            "residual_energy_at_30pct_rank_mean": _mean(_values(records, "residual_energy_at_30pct_rank")),
            "lorad_explained_mean": _mean(_values(records, "lorad_explained")),
            "recommended_rank_median": statistics.median(ranks) if ranks else None,
        })
    return result


# ---- JSON ----------------------------------------------------------------------------------------------------
def dumps_report(data: Mapping[str, Any]) -> str:
    """JSON text with one line per top-level section and per layer record (NaN/Inf refused)."""
    parts = []
    for key, value in data.items():
        if key == "layers":
            rows = ",\n".join("  " + json.dumps(r, allow_nan=False, ensure_ascii=False) for r in value)
            parts.append(f' "layers": [\n{rows}\n ]' if value else ' "layers": []')
        else:
            parts.append(f" {json.dumps(key)}: " + json.dumps(value, allow_nan=False, ensure_ascii=False))
    return "{\n" + ",\n".join(parts) + "\n}\n"


def validate_report(data: Any, source: str = "the report") -> None:
    """Raise :class:`WadiInputError` unless ``data`` is a report this version reads."""
    if not isinstance(data, dict) or data.get("tool") not in (TOOL, None) or "schema_version" not in data:
        raise WadiInputError(f"{source} is not a wadi-probe report (no schema_version).")
    version = data["schema_version"]
    if version != SCHEMA_VERSION:
        raise WadiInputError(
            f"{source} has schema_version {version!r}, but this wadi-probe reads schema_version {SCHEMA_VERSION} only; "
            "re-create it with `wadi-probe compare` or use a matching wadi version."
        )
    missing = [key for key in _REQUIRED_TOP if key not in data]
    if missing:
        raise WadiInputError(f"{source} is missing {', '.join(missing)}; it is not a complete wadi-probe report.")
    if not isinstance(data["layers"], list) or not isinstance(data["summary"], dict):
        raise WadiInputError(f"{source} is malformed: 'layers' must be a list and 'summary' an object.")
    for index, record in enumerate(data["layers"]):
        if not isinstance(record, dict) or any(key not in record for key in _REQUIRED_RECORD):
            raise WadiInputError(f"{source} is malformed: layer record {index} lacks name/shape/statistics.")


def load_report(path: str | Path) -> Report:
    """Read and validate a report.json; unknown schema versions and malformed files raise WadiInputError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WadiInputError(f"{path} does not exist." if not path.exists() else f"{path} is not a file.")
    data = read_json(path)
    validate_report(data, str(path))
    return Report(data)


# ---- table ---------------------------------------------------------------------------------------------------
def report_to_dataframe(report: Report | Mapping[str, Any]) -> pd.DataFrame:
    """One row per layer with the scalar fields; ``shape`` becomes text like ``320x4x3x3``, plus out/fan_in."""
    records = report.layers if isinstance(report, Report) else report["layers"]
    rows = []
    for record in records:
        row = {key: value for key, value in record.items() if key not in _LIST_FIELDS and not isinstance(value, (list, dict))}
        shape = list(record.get("shape") or [])
        row["shape"] = "x".join(str(n) for n in shape)
        row["out"] = shape[0] if len(shape) >= 2 else 1
        row["fan_in"] = math.prod(shape[1:]) if len(shape) >= 2 else math.prod(shape)
        rows.append(row)
    columns = [key for key in RECORD_FIELDS if key not in _LIST_FIELDS or key == "shape"]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=columns + ["out", "fan_in"])
    ordered = [c for c in columns if c in frame.columns] + ["out", "fan_in"]
    extras = [c for c in frame.columns if c not in ordered]
    frame = frame[ordered + extras]
    for column in _INTEGER_FIELDS:  # keep ranks integers when some rows are null (1-D tensors, --no-spectra)
        if column in frame.columns:
            frame[column] = frame[column].astype("Int64")
    return frame
