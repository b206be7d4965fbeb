"""The probe's report: schema, summary, JSON read/write with validation, and the layer table as a DataFrame.

A report is plain JSON (``schema_version`` 2, field definitions in ``docs/report.md``). :class:`Report` wraps the
decoded dict and adds accessors; :func:`build_report` assembles one from per-layer records and computes the
summary; :func:`load_report` refuses files it does not understand with one clear sentence, and reads
``schema_version`` 1 reports by upgrading them in memory (:func:`upgrade_report`).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from wadi_probe.io.atomic import atomic_path, write_text_atomic
from wadi_probe.errors import WadiInputError
from wadi_probe.io.jsonfile import read_json

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

SCHEMA_VERSION = 2
#: Versions :func:`load_report` reads (older ones are upgraded in memory).
READABLE_VERSIONS = (1, 2)
TOOL = "wadi-probe"

#: Record fields in the order they are written (extra keys, if any, follow).
RECORD_FIELDS: tuple[str, ...] = (
    "name", "module", "kind", "layer_type", "block", "order", "shape", "params", "dtype", "student_dtype",
    "compared_dtype", "identical", "rounding_level", "norm_change_rounding", "rows", "zero_rows", "nonfinite",
    "norm_change_mean", "norm_change_std", "norm_change_max",
    "direction_change_mean", "direction_change_std", "direction_change_max",
    "angle_deg_mean", "angle_deg_std", "angle_deg_max", "matrix_norm_change", "matrix_direction_change",
    "full_rank", "residual_energy_at_30pct_rank", "residual_energy_at_30pct_rank_chance",
    "residual_energy_at_30pct_rank_chance_std", "residual_energy_at_30pct_rank_excess",
    "residual_rank_90", "residual_rank_95", "residual_rank_99",
    "residual_top_singular_values",
    "lorad_full_rank", "lorad_rank_90", "lorad_rank_95", "lorad_rank_99", "lorad_energy_at_30pct_rank",
    "lorad_explained", "lorad_explained_chance", "lorad_explained_chance_std", "lorad_explained_excess",
    "lorad_explained_at_recommended_rank", "recommended_rank",
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
            f"Report(layers={s.get('layers')}, angle_rad_mean={_fmt(s.get('angle_rad_mean'))}, "
            f"norm_change_mean={_fmt(s.get('norm_change_mean'))}, angle_to_norm_ratio={_fmt(s.get('angle_to_norm_ratio'))})"
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


#: How many names the summary lists for unmatched tensors and for layers with bad rows (the report's
#: ``pairing`` section and the layer records hold all of them).
NAMES_SHOWN = 5


def _spread(values: Sequence[float]) -> float | None:
    """Population std across layers (how much the per-layer means differ from layer to layer)."""
    return statistics.pstdev(values) if len(values) > 1 else (0.0 if values else None)


def _names(records: Iterable[Mapping[str, Any]]) -> list[str]:
    return [str(r.get("name")) for r in records]


def _chance_summary(spectral: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any]:
    """Mean of a spectral number, of its chance baseline, of the excess, and whether the excess is above chance.

    The excess counts as above chance when its mean exceeds the margin of :func:`wadi_probe.chance.above_chance`
    for the spread of a mean of this many structureless layers.
    """
    from wadi_probe.chance import above_chance

    rows = [r for r in spectral if r.get(key) is not None and r.get(f"{key}_chance") is not None]
    excess = _mean(_values(rows, f"{key}_excess"))
    spreads = _values(rows, f"{key}_chance_std")
    spread = math.sqrt(math.fsum(v * v for v in spreads) / len(spreads)) / math.sqrt(len(spreads)) if spreads else None
    return {
        f"{key}_mean": _mean(_values(spectral, key)),
        f"{key}_chance_mean": _mean(_values(rows, f"{key}_chance")),
        f"{key}_excess_mean": excess,
        f"{key}_above_chance": above_chance(excess, spread) if rows else None,
    }


def _precision(layers: Sequence[Mapping[str, Any]], matrices: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Which precisions were compared, whether the pair had to be lowered to one, and the rounding-level layers."""
    from wadi_probe.decompose import rounding_angle

    import torch

    teacher = sorted({str(r["dtype"]) for r in layers if r.get("dtype")})
    student = sorted({str(r.get("student_dtype") or r["dtype"]) for r in layers if r.get("dtype")})
    compared = sorted({str(r["compared_dtype"]) for r in layers if r.get("compared_dtype")})
    rounding = [r for r in matrices if r.get("rounding_level")]
    eps = [rounding_angle(getattr(torch, name)) for name in compared if isinstance(getattr(torch, name, None), torch.dtype)]
    return {
        "teacher_dtypes": teacher,
        "student_dtypes": student,
        "compared_dtypes": compared,
        "lowered": sum(1 for r in layers if r.get("student_dtype") and r.get("student_dtype") != r.get("dtype")),
        "rounding_angle_rad": max(eps) if eps else None,
        "rounding_level": len(rounding),
        "rounding_level_names": _names(rounding)[:NAMES_SHOWN],
    }


def summarize(layers: Sequence[Mapping[str, Any]], pairing: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Whole-model numbers. Statistics are over *matrices* (tensors with 2+ dimensions: linear, conv, embedding).

    ``norm_change_mean``/``direction_change_mean``/``angle_rad_mean`` (and ``_std``) average the per-layer mean
    (std) over matrices, each layer counting once, as in a per-layer plot; the ``_rows`` variants pool every
    output unit of every matrix instead; ``*_layer_std`` is the spread of the per-layer means across layers.

    The headline ratio is first order on both sides: ``angle_to_norm_ratio`` = mean angle in radians (how far a
    row moved sideways, relative to its length) / mean relative norm change (how far it moved radially). The
    paper's ratio ``paper_direction_to_norm_ratio`` = mean (1 − cos) / mean norm change sets a second-order
    quantity (1 − cos θ ≈ θ²/2) against a first-order one. Either ratio is null when the norms changed only at
    the rounding level (``norm_change_at_rounding_level``).

    Spectral means (and their chance baselines and excess) are over the matrices with spectra that changed
    beyond rounding; recommended-rank statistics over the matrices with a recommended rank > 0.
    """
    pairing = pairing or {}
    matrices = [r for r in layers if _is_matrix(r)]
    measured = [r for r in matrices if r.get("norm_change_mean") is not None]
    summary = _counts(layers, matrices, pairing)
    summary.update(_change_means(measured))
    precision = _precision(layers, matrices)
    precision["norm_change_rounding_mean"] = _mean(_values(measured, "norm_change_rounding")) or 0.0
    summary.update(_first_order_ratios(summary, precision))
    for prefix in ("norm_change", "direction_change"):
        summary[f"{prefix}_mean_rows"], summary[f"{prefix}_std_rows"] = _pooled(measured, prefix)
    spectral = [r for r in matrices if not r.get("rounding_level")]
    summary.update(_chance_summary(spectral, "residual_energy_at_30pct_rank"))
    summary.update(_chance_summary(spectral, "lorad_explained"))
    for key in ("lorad_energy_at_30pct_rank", "lorad_explained_at_recommended_rank"):
        summary[f"{key}_mean"] = _mean(_values(spectral, key))
    summary.update(_rank_summary(matrices))
    summary["precision"] = precision
    summary["groups"] = group_by_block(layers)
    return summary


def _counts(
    layers: Sequence[Mapping[str, Any]], matrices: Sequence[Mapping[str, Any]], pairing: Mapping[str, Any]
) -> dict[str, Any]:
    """How many layers, matrices, identical, unmatched, skipped and bad-row tensors, with the first few names."""
    unmatched_names = ([str(item[0]) for item in pairing.get("shape_mismatch", [])]
                       + [str(n) for n in pairing.get("only_in_teacher", [])]
                       + [str(n) for n in pairing.get("only_in_student", [])])
    nonfinite = [r for r in layers if r.get("nonfinite")]
    zero_rows = [r for r in layers if r.get("zero_rows")]
    return {
        "layers": len(layers),
        "matrices": len(matrices),
        "vectors": len(layers) - len(matrices),
        "identical": sum(1 for r in layers if r.get("identical")),
        "identical_matrices": sum(1 for r in matrices if r.get("identical")),
        "unmatched": len(unmatched_names),
        "unmatched_names": unmatched_names[:NAMES_SHOWN],
        "skipped": sum(1 for r in layers if r.get("norm_change_mean") is None),
        "zero_rows": sum(int(r.get("zero_rows") or 0) for r in layers),
        "zero_row_layers": _names(zero_rows)[:NAMES_SHOWN],
        "nonfinite": sum(int(r.get("nonfinite") or 0) for r in layers),
        "nonfinite_layers": _names(nonfinite)[:NAMES_SHOWN],
        "nonfinite_layer_count": len(nonfinite),
        "params": sum(int(r.get("params") or 0) for r in layers),
        "matrix_params": sum(int(r.get("params") or 0) for r in matrices),
    }


def _change_means(measured: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Norm change, direction change and angle averaged over the measured matrices (each layer once), their
    spread across layers, the largest angle, and the mean angle in radians."""
    fields: dict[str, Any] = {}
    for prefix in ("norm_change", "direction_change", "angle_deg"):
        means = _values(measured, f"{prefix}_mean")
        fields[f"{prefix}_mean"] = _mean(means)
        fields[f"{prefix}_std"] = _mean(_values(measured, f"{prefix}_std"))
        fields[f"{prefix}_layer_std"] = _spread(means)
    fields["angle_deg_max"] = max(_values(measured, "angle_deg_max"), default=None)
    angle = fields["angle_deg_mean"]
    fields["angle_rad_mean"] = math.radians(angle) if angle is not None else None
    return fields


def _first_order_ratios(summary: Mapping[str, Any], precision: Mapping[str, Any]) -> dict[str, Any]:
    """Whether the mean norm and angle changes are at the rounding level, and the two ratios (null when the norms
    changed only at the rounding level: a ratio against rounding says nothing)."""
    floor = precision["rounding_angle_rad"] or 0.0
    norm_floor = precision["norm_change_rounding_mean"]
    nc, dc, rad = summary["norm_change_mean"], summary["direction_change_mean"], summary["angle_rad_mean"]
    usable_norm = nc is not None and nc > norm_floor
    return {
        "norm_change_at_rounding_level": nc is not None and nc <= norm_floor,
        "angle_at_rounding_level": rad is not None and rad <= floor,
        "angle_to_norm_ratio": rad / nc if usable_norm and rad is not None else None,
        "paper_direction_to_norm_ratio": dc / nc if usable_norm and dc is not None else None,
    }


def _rank_summary(matrices: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Median and largest recommended LoRaD rank over the matrices given one, how many, and their parameters."""
    ranks = [int(r["recommended_rank"]) for r in matrices if r.get("recommended_rank")]
    return {
        "recommended_rank_median": statistics.median(ranks) if ranks else None,
        "recommended_rank_max": max(ranks, default=None),
        "recommended_layers": len(ranks),
        "recommended_params": sum(int(r["recommended_rank"]) * (int(r["shape"][0]) + _pairs(r))
                                  for r in matrices if r.get("recommended_rank")),
    }


def _pairs(record: Mapping[str, Any]) -> int:
    """⌊fan_in/2⌋ of a matrix record (the width of its LoRaD angle field)."""
    shape = record["shape"]
    return math.prod(shape[1:]) // 2


def _block_sort_key(block: str) -> tuple:
    head, _, index = block.partition(".")
    order = {"embedding": 0, "down": 1, "mid": 2, "up": 3, "noise_refiner": 4, "context_refiner": 4,
             "transformer": 5, "single": 6, "other": 7}
    return (order.get(head, 8), int(index) if index.isdigit() else -1, block)


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
        spectral = [r for r in records if not r.get("rounding_level")]
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
            "residual_energy_at_30pct_rank_mean": _mean(_values(spectral, "residual_energy_at_30pct_rank")),
            "residual_energy_at_30pct_rank_excess_mean": _mean(_values(spectral, "residual_energy_at_30pct_rank_excess")),
            "lorad_explained_mean": _mean(_values(spectral, "lorad_explained")),
            "lorad_explained_excess_mean": _mean(_values(spectral, "lorad_explained_excess")),
            "rounding_level": sum(1 for r in records if r.get("rounding_level")),
            "norm_change_rounding_mean": _mean(_values(measured, "norm_change_rounding")),
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
    if version not in READABLE_VERSIONS:
        raise WadiInputError(
            f"{source} has schema_version {version!r}, but this wadi-probe reads schema_version "
            f"{' and '.join(str(v) for v in READABLE_VERSIONS)} only; "
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
        shape = record["shape"]
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            shown = json.dumps(shape) if isinstance(shape, list) and len(shape) <= 8 else type(shape).__name__
            raise WadiInputError(f"{source} is malformed: the shape of layer {str(record['name'])[:200]} is {shown}, "
                                 "not a list of whole numbers.")


def load_report(path: str | Path) -> Report:
    """Read and validate a report.json; unknown schema versions and malformed files raise WadiInputError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WadiInputError(f"{path} does not exist." if not path.exists() else f"{path} is not a file.")
    data = read_json(path)
    validate_report(data, str(path))
    return Report(upgrade_report(data))


def upgrade_report(data: dict[str, Any]) -> dict[str, Any]:
    """A validated report in the current schema: a ``schema_version`` 1 report gains the chance baselines of its
    layers (computed from their shapes and analysed rows) and a recomputed summary; ``upgraded_from`` says so.

    Version 1 did not record the precision each layer was compared at, so an upgraded report's rounding-level
    flags are all false.
    """
    if data.get("schema_version") == SCHEMA_VERSION:
        return data
    from wadi_probe.decompose import chance_fields

    fraction = float((data.get("settings") or {}).get("rank_fraction", 0.3))
    layers = []
    for record in data["layers"]:
        record = dict(record)
        record.setdefault("rounding_level", False)
        if record.get("dtype") and record.get("norm_change_rounding") is None:
            from wadi_probe.decompose import norm_rounding

            import torch

            dtype = getattr(torch, str(record["dtype"]), None)
            if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
                shape = record.get("shape") or [1]
                fan_in = math.prod(int(n) for n in shape[1:]) if len(shape) >= 2 else math.prod(int(n) for n in shape)
                record["norm_change_rounding"] = norm_rounding(dtype, fan_in)
        record.setdefault("angle_deg_std", None)
        shape = record.get("shape") or []
        if len(shape) >= 2 and record.get("residual_energy_at_30pct_rank") is not None and record.get("rows"):
            record.update(chance_fields(record, int(record["rows"]), math.prod(int(n) for n in shape[1:]), fraction))
        layers.append(order_record(record))
    upgraded = {**data, "schema_version": SCHEMA_VERSION, "upgraded_from": data.get("schema_version"), "layers": layers}
    upgraded["summary"] = summarize(layers, data.get("pairing") or {})
    return upgraded


# ---- table ---------------------------------------------------------------------------------------------------
def report_to_dataframe(report: Report | Mapping[str, Any]) -> pd.DataFrame:
    """One row per layer with the scalar fields; ``shape`` becomes text like ``320x4x3x3``, plus out/fan_in."""
    # pandas is imported here, not with the module: loading a report (e.g. to plan ranks before training) must
    # not cost the ~27 MB that importing pandas adds to a process.
    import pandas as pd

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
