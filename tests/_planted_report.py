"""A small report in the report.json schema (schema_version 1), computed from planted teacher/student tensors.

Used by the plot tests so that they do not depend on a whole comparison run; the values are computed directly
from the definitions in DESIGN §4 (per-row norm/direction change, residual and angle-field spectra).
"""

from __future__ import annotations

import math

import torch

from wadi_probe.rotation import as_matrix, pair_angles, rotate_pairs

LAYER_SPECS = [
    # name, shape, block, layer_type, kind
    ("down_blocks.0.resnets.0.conv1.weight", (8, 4, 3, 3), "down.0", "resnet conv", "conv"),
    ("down_blocks.0.attentions.0.to_q.weight", (16, 16), "down.0", "attention", "linear"),
    ("down_blocks.0.attentions.0.to_q.bias", (16,), "down.0", "attention", "bias"),
    ("down_blocks.0.attentions.0.ff.net.2.weight", (16, 32), "down.0", "feed-forward", "linear"),
    ("mid_block.attentions.0.to_k.weight", (16, 16), "mid", "attention", "linear"),
    ("up_blocks.0.attentions.0.to_v.weight", (12, 16), "up.0", "attention", "linear"),
    ("up_blocks.0.resnets.0.conv2.weight", (8, 8, 3, 3), "up.0", "resnet conv", "conv"),
]


def planted_pair(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Teacher and student tensors: student = rank-2 pair rotation of the teacher, rows rescaled by ≤ 1 %."""
    gen = torch.Generator().manual_seed(seed)
    teacher, student = {}, {}
    for name, shape, *_ in LAYER_SPECS:
        t = torch.randn(shape, generator=gen)
        teacher[name] = t
        if len(shape) == 1:
            student[name] = t * 1.01
            continue
        m = as_matrix(t)
        theta = 0.05 * torch.randn(m.shape[0], 2, generator=gen) @ torch.randn(2, m.shape[1] // 2, generator=gen)
        scale = 1 + 0.01 * torch.rand(m.shape[0], 1, generator=gen)
        student[name] = (rotate_pairs(m, theta) * scale).reshape(shape)
    return teacher, student


def _cumulative_energy(matrix: torch.Tensor) -> list[float]:
    sigma_sq = torch.linalg.svdvals(matrix.double()) ** 2
    total = sigma_sq.sum()
    if total == 0:
        return [1.0] * sigma_sq.numel()
    return [round(float(v), 4) for v in (sigma_sq.cumsum(0) / total)]


def _rank_at(curve: list[float], p: float) -> int:
    return next((k + 1 for k, v in enumerate(curve) if v >= p - 1e-12), len(curve))


def _record(order: int, name: str, shape, block: str, layer_type: str, kind: str, t: torch.Tensor, s: torch.Tensor) -> dict:
    rows_t = as_matrix(t).double() if t.ndim >= 2 else t.double()[None]
    rows_s = as_matrix(s).double() if s.ndim >= 2 else s.double()[None]
    nt, ns = rows_t.norm(dim=1), rows_s.norm(dim=1)
    nc = (ns - nt).abs() / nt
    cos = (rows_t * rows_s).sum(1) / (nt * ns)
    dc = 1 - cos
    ang = torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))
    record = {
        "name": name, "module": name.rsplit(".", 1)[0], "kind": kind, "layer_type": layer_type, "block": block,
        "order": order, "shape": list(shape), "params": t.numel(), "dtype": "float32",
        "identical": bool(torch.equal(t, s)), "zero_rows": 0, "nonfinite": 0,
        "norm_change_mean": float(nc.mean()), "norm_change_std": float(nc.std(unbiased=False)),
        "norm_change_max": float(nc.max()),
        "direction_change_mean": float(dc.mean()), "direction_change_std": float(dc.std(unbiased=False)),
        "direction_change_max": float(dc.max()),
        "angle_deg_mean": float(ang.mean()), "angle_deg_max": float(ang.max()),
        "matrix_norm_change": float(abs(s.double().norm() - t.double().norm()) / t.double().norm()),
        "matrix_direction_change": float(1 - (t.double() * s.double()).sum() / (t.double().norm() * s.double().norm())),
    }
    spectra = dict.fromkeys(
        ["full_rank", "residual_energy_at_30pct_rank", "residual_rank_90", "residual_rank_95", "residual_rank_99",
         "residual_top_singular_values", "lorad_full_rank", "lorad_rank_90", "lorad_rank_95", "lorad_rank_99",
         "lorad_energy_at_30pct_rank", "lorad_explained", "recommended_rank", "residual_energy", "lorad_energy"]
    )
    if t.ndim >= 2:
        mt, ms = as_matrix(t).double(), as_matrix(s).double()
        residual = ms / ms.norm(dim=1, keepdim=True) - mt / mt.norm(dim=1, keepdim=True)
        res_curve = _cumulative_energy(residual)
        theta = pair_angles(mt, ms)
        lorad_curve = _cumulative_energy(theta)
        full, lfull = len(res_curve), len(lorad_curve)
        sigma = torch.linalg.svdvals(residual)
        spectra.update(
            full_rank=full,
            residual_energy_at_30pct_rank=res_curve[math.ceil(0.3 * full) - 1],
            residual_rank_90=_rank_at(res_curve, 0.9), residual_rank_95=_rank_at(res_curve, 0.95),
            residual_rank_99=_rank_at(res_curve, 0.99),
            residual_top_singular_values=[float(v) for v in (sigma / sigma.norm())[:16]],
            lorad_full_rank=lfull,
            lorad_rank_90=_rank_at(lorad_curve, 0.9), lorad_rank_95=_rank_at(lorad_curve, 0.95),
            lorad_rank_99=_rank_at(lorad_curve, 0.99),
            lorad_energy_at_30pct_rank=lorad_curve[math.ceil(0.3 * lfull) - 1],
            lorad_explained=None, recommended_rank=_rank_at(lorad_curve, 0.9),
            residual_energy=res_curve, lorad_energy=lorad_curve,
        )
    record.update(spectra)
    return record


def planted_report(seed: int = 0, *, spectra: bool = True) -> dict:
    """A schema-conformant report dict for :func:`planted_pair` (``spectra=False`` nulls the spectra fields)."""
    teacher, student = planted_pair(seed)
    layers = [
        _record(i, name, shape, block, layer_type, kind, teacher[name], student[name])
        for i, (name, shape, block, layer_type, kind) in enumerate(LAYER_SPECS)
    ]
    if not spectra:
        for r in layers:
            for key in ("residual_energy", "lorad_energy", "recommended_rank", "full_rank", "lorad_full_rank"):
                r[key] = None
    matrices = [r for r in layers if len(r["shape"]) >= 2]
    mean = lambda key: sum(r[key] for r in matrices) / len(matrices)  # noqa: E731
    return {
        "schema_version": 1, "tool": "wadi-probe", "created": "2026-01-01T00:00:00+00:00",
        "inputs": {"teacher": {"path": "teacher.safetensors", "layout": "safetensors", "tensors": len(layers)},
                   "student": {"path": "student.safetensors", "layout": "safetensors", "tensors": len(layers)}},
        "settings": {"device": "cpu", "include": None, "exclude": None, "spectra": spectra, "rank_fraction": 0.3,
                     "energy_thresholds": [0.9, 0.95, 0.99], "recommend_threshold": 0.9},
        "pairing": {"matched": len(layers), "shape_mismatch": [], "only_in_teacher": [], "only_in_student": []},
        "summary": {"layers": len(layers), "matrices": len(matrices), "identical": 0, "unmatched": 0, "skipped": 0,
                    "norm_change_mean": mean("norm_change_mean"), "norm_change_std": mean("norm_change_std"),
                    "direction_change_mean": mean("direction_change_mean"),
                    "direction_change_std": mean("direction_change_std"),
                    "direction_to_norm_ratio": mean("direction_change_mean") / mean("norm_change_mean"),
                    "residual_energy_at_30pct_rank_mean": None},
        "layers": layers,
    }
