"""The per-layer math of the probe (docs/design.md, "The probe") as pure tensor functions: no files, no printing, CPU or CUDA.

A weight is viewed as a matrix (out, fan_in) whose rows are output units (conv kernels flattened per output
channel, a 1-D tensor as one row). For teacher rows t_i and student rows s_i:

* norm change ``nc_i = |‖s_i‖ − ‖t_i‖| / ‖t_i‖``;
* direction change ``dc_i = 1 − cos(s_i, t_i)``, computed as ``½‖ŝ_i − t̂_i‖²`` (the same number, but without the
  cancellation of ``1 − cos`` for small angles); the angle is ``2·asin(‖ŝ_i − t̂_i‖ / 2)`` = ``arccos(cos)``;
* the direction residual ``ΔD = rownorm(S) − rownorm(T)`` and its spectrum: σ_k² are the eigenvalues of the
  smaller Gram matrix (ΔD·ΔDᵀ or ΔDᵀ·ΔD), far cheaper than an SVD; ``energy(k) = Σ_{j≤k} σ_j² / Σ σ_j²``;
* the LoRaD pair-angle field Θ (:func:`wadi_probe.rotation.pair_angles`), its spectrum the same way, and how
  much of ΔD a pairwise rotation explains: ``1 − ‖rownorm(S) − R_Θ(rownorm(T))‖² / ‖ΔD‖²``. With the exact
  per-pair Θ the rotated teacher pair lies along the student pair, so the remainder is the change of pair
  lengths alone and nothing needs rotating.

Rows with a NaN/Inf (in either tensor) or a zero norm (in either tensor) are counted and left out of every
statistic. Big products run in fp32 on the tensors' device; per-row reductions and energies are fp64.

Two tensors of different precision are first rounded to the lower one (:func:`compare_dtype`), and a change no
larger than that precision's rounding (:func:`rounding_angle`) is flagged ``rounding_level`` and gets no rank
advice. The spectral numbers come with their values for a structureless change of the same shape
(``*_chance``, :mod:`wadi_probe.chance`) and the excess over it (``*_excess``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from wadi_probe.chance import chance_for_shape
from wadi_probe.rotation import column_pairs, pair_product_angles, rotate_pairs

__all__ = [
    "AnalysisSettings",
    "analyze_pair",
    "as_rows",
    "bit_identical",
    "energy_at_rank",
    "energy_curve",
    "gram_singular_values_sq",
    "lower_gram",
    "symmetric_eigenvalues",
    "rank_at",
    "truncate_to_rank",
]

#: A layer whose largest per-row direction change is at or below this counts as "direction unchanged": its
#: spectra are not computed (nothing to explain) and its recommended rank is 0. fp32 rounding of a row that was
#: only rescaled gives about 1e-14; a real rotation of 0.001° gives 1.5e-10.
DIRECTION_TOLERANCE = 1e-12

_RANK_SLACK = 1e-9  # energy(k) >= p - slack, so that a curve reaching p up to rounding counts as reaching it


@dataclass(frozen=True)
class AnalysisSettings:
    """What to compute per layer. The defaults are the report's defaults (``settings`` in report.json)."""

    spectra: bool = True
    rank_fraction: float = 0.3
    energy_thresholds: tuple[float, ...] = (0.9, 0.95, 0.99)
    recommend_threshold: float = 0.9
    top_singular_values: int = 16
    truncated_explained: bool = False  # costs an eigh + a rank-r product per layer; off by default
    energy_decimals: int = 4
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The settings as the report stores them."""
        return {
            "spectra": self.spectra,
            "rank_fraction": self.rank_fraction,
            "energy_thresholds": list(self.energy_thresholds),
            "recommend_threshold": self.recommend_threshold,
            "top_singular_values": self.top_singular_values,
            "truncated_explained": self.truncated_explained,
            "direction_tolerance": DIRECTION_TOLERANCE,
            **self.extra,
        }


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """View a tensor as rows of output units: (out, fan_in) for ≥2-D, one row for a 1-D or 0-D tensor."""
    if tensor.ndim >= 2:
        return tensor.reshape(tensor.shape[0], -1)
    return tensor.reshape(1, -1)


def bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when the two tensors have the same shape, dtype and bytes (NaN payloads and -0.0 included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point and a.element_size() in (1, 2, 4, 8):
        as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.contiguous().view(as_int), b.contiguous().view(as_int)
    return bool(torch.equal(a, b))


def gram_singular_values_sq(matrix: torch.Tensor, *, precise: bool = False) -> torch.Tensor:
    """σ_k² of ``matrix``, descending, as the eigenvalues of its smaller Gram matrix (fp64 result, ≥ 0).

    The Gram product runs in fp32 (fp64 with ``precise=True``) on the matrix's device, only its lower triangle
    on the CPU (:func:`lower_gram`); eigenvalues come from :func:`symmetric_eigenvalues`, which reads only that
    triangle. Rounding can make the smallest eigenvalues slightly negative: they are clamped to 0. Absolute
    error per σ² is about 1e-6 of the largest σ² in fp32 (tests compare with ``svdvals``).
    """
    dtype = torch.float64 if precise else torch.float32
    values = symmetric_eigenvalues(lower_gram(matrix.to(dtype)))
    return values.flip(0).clamp_min(0).to(torch.float64)


def symmetric_eigenvalues(lower: torch.Tensor) -> torch.Tensor:
    """Ascending eigenvalues of a symmetric matrix given by its lower triangle (the upper one is not read).

    On the CPU through SciPy's LAPACK (eigenvalues only), measured 1.2–1.6× faster than ``torch.linalg.eigvalsh``
    for the 640–1280-wide Gram matrices of SD layers on 2 cores; elsewhere ``torch.linalg.eigvalsh``.
    """
    if lower.device.type != "cpu" or lower.numel() == 0:
        return torch.linalg.eigvalsh(lower)
    from scipy.linalg import eigh

    # The lower triangle of a row-major matrix is the upper triangle of its column-major transpose: no copy.
    values = eigh(lower.numpy().T, lower=False, eigvals_only=True, overwrite_a=True, check_finite=False)
    return torch.from_numpy(values)


#: Row blocks of about this many rows for :func:`lower_gram` on the CPU.
_GRAM_BLOCK_ROWS = 160


def lower_gram(matrix: torch.Tensor) -> torch.Tensor:
    """The smaller Gram matrix (M·Mᵀ or Mᵀ·M) with only its lower triangle (diagonal included) computed.

    On the CPU it is built block row by block row, each block times the rows up to its own end: with k blocks
    that is (k + 1) / 2k of a full product (56 % at k = 8; measured 1.5–2× faster than ``M @ M.T`` for a
    1280 × 11520 conv), without leaving torch's thread pool. The upper triangle is left unset. On a GPU it is
    one full product.
    """
    left = matrix.shape[0] <= matrix.shape[1]
    factor = matrix if left else matrix.mT  # the Gram is factor · factorᵀ
    size = factor.shape[0]
    blocks = max(1, min(8, size // _GRAM_BLOCK_ROWS))
    if matrix.device.type != "cpu" or blocks == 1:
        return factor @ factor.mT
    gram = factor.new_empty(size, size)
    bounds = [round(i * size / blocks) for i in range(blocks + 1)]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        torch.matmul(factor[start:stop], factor[:stop].mT, out=gram[start:stop, :stop])
    return gram


def _gram_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Eigen-decomposition of the smaller Gram matrix: (σ² descending fp64, vectors descending, left_side)."""
    m = matrix.to(torch.float32)
    left = m.shape[0] <= m.shape[1]
    values, vectors = torch.linalg.eigh(lower_gram(m))
    return values.flip(0).clamp_min(0).to(torch.float64), vectors.flip(1), left


def truncate_to_rank(matrix: torch.Tensor, vectors: torch.Tensor, left: bool, rank: int) -> torch.Tensor:
    """Best rank-``rank`` approximation of ``matrix`` from the Gram eigenvectors (projection on the top ones)."""
    if rank <= 0:
        return torch.zeros_like(matrix)
    basis = vectors[:, :rank].to(matrix.dtype)
    if left:
        return basis @ (basis.mT @ matrix)
    return (matrix @ basis) @ basis.mT


def energy_curve(sigma_sq: torch.Tensor) -> torch.Tensor:
    """Cumulative energy fraction ``energy(k)`` for k = 1..len(σ²) (fp64); all zeros when there is no energy."""
    values = sigma_sq.to(torch.float64)
    total = values.sum()
    if values.numel() == 0 or total <= 0:
        return torch.zeros_like(values)
    return (values.cumsum(0) / total).clamp_max(1.0)


def rank_at(curve: torch.Tensor, p: float) -> int:
    """Smallest k with ``energy(k) ≥ p`` (0 for an empty or all-zero curve)."""
    if curve.numel() == 0 or float(curve[-1]) <= 0:
        return 0
    hits = torch.nonzero(curve >= p - _RANK_SLACK)
    return int(hits[0, 0]) + 1 if hits.numel() else int(curve.numel())


def energy_at_rank(curve: torch.Tensor, k: int) -> float | None:
    """``energy(k)``; ranks past the curve's end (rows were excluded) hold all the energy. None when empty."""
    if curve.numel() == 0 or float(curve[-1]) <= 0:
        return None
    return float(curve[min(max(k, 1), curve.numel()) - 1])


def _pad_curve(curve: torch.Tensor, length: int) -> torch.Tensor:
    if curve.numel() >= length:
        return curve[:length]
    return torch.cat((curve, curve.new_ones(length - curve.numel())))


def _round_list(curve: torch.Tensor, decimals: int) -> list[float]:
    return [round(v, decimals) for v in curve.tolist()]


def _rank_record(prefix: str, curve: torch.Tensor, full_rank: int, settings: AnalysisSettings) -> dict[str, Any]:
    """Energy at ``rank_fraction`` of ``full_rank`` (the analysed matrix's: rows left out lower it) and rank_p."""
    k_frac = max(1, math.ceil(settings.rank_fraction * full_rank))
    record: dict[str, Any] = {f"{prefix}_energy_at_30pct_rank": energy_at_rank(curve, k_frac)}
    for p in settings.energy_thresholds:
        record[f"{prefix}_rank_{round(p * 100)}"] = rank_at(curve, p)
    return record


def _empty_spectra(settings: AnalysisSettings, zero_ranks: bool) -> dict[str, Any]:
    """Spectral fields for a layer without spectra: null, or 0 ranks when the direction did not change."""
    rank = 0 if zero_ranks else None
    record: dict[str, Any] = {
        "residual_energy_at_30pct_rank": None,
        "lorad_energy_at_30pct_rank": None,
        "residual_top_singular_values": [] if zero_ranks else None,
        "lorad_explained": None,
        "lorad_explained_at_recommended_rank": None,
        "recommended_rank": rank,
        "residual_energy": [] if zero_ranks else None,
        "lorad_energy": [] if zero_ranks else None,
    }
    for key in ("residual_energy_at_30pct_rank", "lorad_explained"):
        record.update({f"{key}_chance": None, f"{key}_chance_std": None, f"{key}_excess": None})
    for p in settings.energy_thresholds:
        record[f"residual_rank_{round(p * 100)}"] = rank
        record[f"lorad_rank_{round(p * 100)}"] = rank
    return record


def _zero_stats() -> dict[str, Any]:
    return {
        "norm_change_mean": 0.0,
        "norm_change_std": 0.0,
        "norm_change_max": 0.0,
        "direction_change_mean": 0.0,
        "direction_change_std": 0.0,
        "direction_change_max": 0.0,
        "angle_deg_mean": 0.0,
        "angle_deg_std": 0.0,
        "angle_deg_max": 0.0,
        "matrix_norm_change": 0.0,
        "matrix_direction_change": 0.0,
    }


def _null_stats() -> dict[str, Any]:
    return {key: None for key in _zero_stats()}


def _mean_std_max(values: torch.Tensor) -> tuple[float, float, float]:
    """Mean, population std (ddof 0, so layers pool exactly) and max of a 1-D fp64 tensor, as floats."""
    stats = torch.stack((values.mean(), values.std(correction=0) if values.numel() > 1 else values.new_zeros(()), values.max()))
    mean, std, top = stats.tolist()
    return mean, std, top


def analyze_pair(
    teacher: torch.Tensor,
    student: torch.Tensor,
    settings: AnalysisSettings | None = None,
    *,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Every number of the probe (docs/design.md) for one teacher/student tensor pair of equal shape, as a flat dict.

    Keys are the report's record fields (without the naming ones: name, module, kind, ...). Works for any
    dtype (fp16/bf16 are upcast to fp32) and on the given device (default: the teacher's). Spectra are only
    computed for tensors with 2 or more dimensions, when ``settings.spectra`` is on and the direction changed.
    """
    settings = settings or AnalysisSettings()
    if teacher.shape != student.shape:
        raise ValueError(f"shapes differ: {tuple(teacher.shape)} vs {tuple(student.shape)}")
    is_matrix, out, fan_in = _matrix_view(teacher.shape)
    record = _base_record(is_matrix, out, fan_in)
    device = torch.device(device) if device is not None else teacher.device
    if not (teacher.dtype.is_floating_point and student.dtype.is_floating_point):
        record.update(_null_stats(), **_empty_spectra(settings, zero_ranks=False))
        record["identical"] = bit_identical(teacher, student)
        return record

    # The precision floor: a pair stored at different precisions is compared at the lower one, so that a plain
    # cast of the teacher reads as unchanged rather than as a rotation made of rounding errors.
    compared = compare_dtype(teacher.dtype, student.dtype)
    teacher, student = teacher.to(compared), student.to(compared)
    record["compared_dtype"] = str(compared).removeprefix("torch.")
    identical = bit_identical(teacher, student)
    t, s, t_norm, s_norm, valid, counts = _rows_and_norms(teacher, student, device)
    record.update(rows=counts[0], zero_rows=counts[1], nonfinite=counts[2])

    if identical:
        record["identical"] = True
        record.update(_zero_stats(), **_empty_spectra(settings, zero_ranks=is_matrix))
        return record
    if counts[0] == 0:
        record.update(_null_stats(), **_empty_spectra(settings, zero_ranks=False))
        return record

    if counts[0] < out:
        t, s, t_norm, s_norm = t[valid], s[valid], t_norm[valid], s_norm[valid]
    return _measure_changed(record, t, s, t_norm, s_norm, compared, is_matrix, fan_in, settings)


def _measure_changed(
    record: dict[str, Any],
    t: torch.Tensor,
    s: torch.Tensor,
    t_norm: torch.Tensor,
    s_norm: torch.Tensor,
    compared: torch.dtype,
    is_matrix: bool,
    fan_in: int,
    settings: AnalysisSettings,
) -> dict[str, Any]:
    """Fill ``record`` for a pair that is not identical, from its valid rows ``t``/``s`` (fp32) and their norms.

    Row statistics first, then the rounding flags, then (for a matrix whose direction changed) the spectra and
    their chance baselines. ΔD lives only here, and is freed before Θ is formed.
    """
    t_inv, s_inv, residual, residual_row_sq = _unit_residual(t, s, t_norm, s_norm)
    record.update(_row_statistics(t_norm, s_norm, residual_row_sq))

    # No row turned by more than rounding every element by one unit in the last place of the compared precision
    # could turn it: the direction change is rounding. It is reported, but gets no rank advice (the advice is
    # about directions; a real rescale of the rows, rounded, is such a case).
    record["rounding_level"] = bool(record["angle_deg_max"] <= math.degrees(rounding_angle(compared)))
    record["norm_change_rounding"] = norm_rounding(compared, fan_in)
    skipped = _skipped_spectra(settings, is_matrix, record["direction_change_max"] > DIRECTION_TOLERANCE)
    if skipped is not None:
        record.update(skipped)
        return record

    rows = int(record["rows"])
    record.update(_residual_spectrum(residual, record["full_rank"], min(rows, fan_in), settings))
    residual_energy = float(residual_row_sq.sum())
    del residual
    lorad_rank = min(rows, fan_in // 2)
    record.update(_lorad_spectrum(t, s, t_inv, s_inv, residual_energy, record["lorad_full_rank"], lorad_rank, settings))
    record.update(chance_fields(record, rows, fan_in, settings.rank_fraction))
    if record["rounding_level"]:
        record["recommended_rank"] = 0
        record["lorad_explained_at_recommended_rank"] = None
    return record


def _matrix_view(shape: torch.Size) -> tuple[bool, int, int]:
    """(is_matrix, out, fan_in) of a tensor seen as rows: 2+ dimensions are (out, rest), anything else one row."""
    dims = tuple(int(n) for n in shape)
    is_matrix = len(dims) >= 2
    out = dims[0] if is_matrix else 1
    fan_in = math.prod(dims[1:]) if is_matrix else max(1, math.prod(dims))
    return is_matrix, out, fan_in


def _base_record(is_matrix: bool, out: int, fan_in: int) -> dict[str, Any]:
    """The fields every record starts with: the full ranks of ΔD and Θ (null for a vector) and zero row counts."""
    return {
        "full_rank": min(out, fan_in) if is_matrix else None,
        "lorad_full_rank": min(out, fan_in // 2) if is_matrix else None,
        "identical": False,
        "rounding_level": False,
        "rows": 0,
        "zero_rows": 0,
        "nonfinite": 0,
    }


def _rows_and_norms(
    teacher: torch.Tensor, student: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """The fp32 rows on ``device``, their fp64 norms, the mask of usable rows and (valid, zero, nonfinite) counts.

    A row holding NaN/Inf has a non-finite norm, so the norms alone find every bad row (no extra passes).
    """
    t = as_rows(teacher.to(device)).to(torch.float32)
    s = as_rows(student.to(device)).to(torch.float32)
    t_norm = torch.linalg.vector_norm(t, dim=1).to(torch.float64)
    s_norm = torch.linalg.vector_norm(s, dim=1).to(torch.float64)
    finite = torch.isfinite(t_norm) & torch.isfinite(s_norm)
    zero = finite & ((t_norm == 0) | (s_norm == 0))
    valid = finite & ~zero
    counts = torch.stack((valid.sum(), zero.sum(), (~finite).sum())).tolist()
    return t, s, t_norm, s_norm, valid, counts


def _unit_residual(
    t: torch.Tensor, s: torch.Tensor, t_norm: torch.Tensor, s_norm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse row norms (out, 1) in fp32, ΔD = ŝ − t̂ (formed with one temporary) and its fp64 row energies."""
    t_inv = (1 / t_norm).to(torch.float32).unsqueeze(1)
    s_inv = (1 / s_norm).to(torch.float32).unsqueeze(1)
    residual = s * s_inv
    residual.addcmul_(t, t_inv, value=-1.0)
    residual_row_sq = torch.linalg.vector_norm(residual, dim=1).to(torch.float64).square()
    return t_inv, s_inv, residual, residual_row_sq


def _row_statistics(t_norm: torch.Tensor, s_norm: torch.Tensor, residual_row_sq: torch.Tensor) -> dict[str, Any]:
    """Mean/std/max of the per-row norm change, direction change and angle, and the whole-matrix changes."""
    norm_change = (s_norm - t_norm).abs() / t_norm
    direction_change = residual_row_sq / 2
    angle_deg = torch.rad2deg(2 * torch.asin((residual_row_sq.sqrt() / 2).clamp(max=1.0)))
    cosines = 1 - direction_change
    t_total = torch.linalg.vector_norm(t_norm)
    s_total = torch.linalg.vector_norm(s_norm)
    matrix_cos = (t_norm * s_norm * cosines).sum() / (t_total * s_total)
    nc_mean, nc_std, nc_max = _mean_std_max(norm_change)
    dc_mean, dc_std, dc_max = _mean_std_max(direction_change)
    angle_mean, angle_std, angle_max = _mean_std_max(angle_deg)
    matrix_nc, matrix_dc = torch.stack(((s_total - t_total).abs() / t_total, (1 - matrix_cos).clamp_min(0))).tolist()
    return {
        "norm_change_mean": nc_mean,
        "norm_change_std": nc_std,
        "norm_change_max": nc_max,
        "direction_change_mean": dc_mean,
        "direction_change_std": dc_std,
        "direction_change_max": dc_max,
        "angle_deg_mean": angle_mean,
        "angle_deg_std": angle_std,
        "angle_deg_max": angle_max,
        "matrix_norm_change": matrix_nc,
        "matrix_direction_change": matrix_dc,
    }


def _skipped_spectra(settings: AnalysisSettings, is_matrix: bool, direction_changed: bool) -> dict[str, Any] | None:
    """The spectral fields of a layer whose spectra are not computed, or None when they are to be computed.

    A vector has no spectra (all null), an unturned matrix has nothing to explain (rank 0), and the fast mode
    (``settings.spectra`` off) leaves them null.
    """
    if not is_matrix:
        return {k: None for k in _empty_spectra(settings, False)}
    if not direction_changed:
        return _empty_spectra(settings, zero_ranks=True)
    if not settings.spectra:
        return _empty_spectra(settings, zero_ranks=False)
    return None


def compare_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The lower of two floating precisions (the one with the larger machine epsilon; bf16 below fp16)."""
    if a == b:
        return a
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


def rounding_angle(dtype: torch.dtype) -> float:
    """The largest angle (radians) and relative norm change rounding alone gives a row: the machine epsilon.

    Rounding moves every element by at most half a unit in the last place, a relative amount of at most ε/2; two
    roundings (teacher and student) turn a row by at most ε radians and change its norm by at most a fraction ε.
    """
    return float(torch.finfo(dtype).eps)


def norm_rounding(dtype: torch.dtype, fan_in: int) -> float:
    """The relative norm change that rounding alone typically gives a row of ``fan_in`` elements: ``2ε/√fan_in``.

    Rounding both tensors moves each element by independent relative errors of at most ε/2; they mostly cancel
    in the squared norm, whose relative change has a standard deviation of about ε/√(2·fan_in) for weights of
    similar size. Twice ε/√fan_in is about three of those: a layer's mean norm change below it is rounding. (The
    worst case, every error aligned, is ε; a norm change of 0.1 % in fp16, as distilled students show, is real.)
    """
    return 2 * float(torch.finfo(dtype).eps) / math.sqrt(max(1, fan_in))


def chance_fields(record: dict[str, Any], rows: int, fan_in: int, rank_fraction: float) -> dict[str, Any]:
    """The chance baselines of a layer's spectral numbers and their excess (see :mod:`wadi_probe.chance`)."""
    chance = chance_for_shape(rows, fan_in, rank_fraction)
    fields: dict[str, Any] = {}
    for key, base, spread in (
        ("residual_energy_at_30pct_rank", chance.residual_energy, chance.residual_energy_std),
        ("lorad_explained", chance.rotation_explained, chance.rotation_explained_std),
    ):
        value = record.get(key)
        fields[f"{key}_chance"] = base
        fields[f"{key}_chance_std"] = spread
        fields[f"{key}_excess"] = value - base if value is not None and base is not None else None
    return fields


def _residual_spectrum(residual: torch.Tensor, full_rank: int, analysed_rank: int, settings: AnalysisSettings) -> dict[str, Any]:
    sigma_sq = gram_singular_values_sq(residual)
    curve = _pad_curve(energy_curve(sigma_sq), full_rank)
    total = float(sigma_sq.sum())
    top = (sigma_sq[: settings.top_singular_values] / total).sqrt() if total > 0 else sigma_sq[:0]
    record = _rank_record("residual", curve, analysed_rank, settings)
    record["residual_top_singular_values"] = [round(v, 6) for v in top.tolist()]
    record["residual_energy"] = _round_list(curve, settings.energy_decimals)
    return record


def _lorad_spectrum(
    t: torch.Tensor,
    s: torch.Tensor,
    t_inv: torch.Tensor,
    s_inv: torch.Tensor,
    residual_energy: float,
    lorad_full_rank: int,
    analysed_rank: int,
    settings: AnalysisSettings,
) -> dict[str, Any]:
    """Θ's spectrum, the fraction of ΔD a pairwise rotation explains, and the recommended rank.

    ``t``/``s`` are the (valid) rows, ``t_inv``/``s_inv`` their inverse norms (out, 1): Θ does not depend on the
    rows' scale, and the unit rows are only needed as pair lengths, so they are never formed.
    """
    record: dict[str, Any] = {}
    if lorad_full_rank == 0:  # fan-in 1: nothing to pair
        lorad_keys = [k for k in _empty_spectra(settings, False) if k.startswith("lorad") or k == "recommended_rank"]
        return {k: None for k in lorad_keys}
    teacher_pairs, student_pairs = column_pairs(t), column_pairs(s)
    product = student_pairs * teacher_pairs.conj()
    theta = pair_product_angles(product)
    del product
    if settings.truncated_explained:
        sigma_sq, vectors, left = _gram_eigh(theta)
    else:
        sigma_sq, vectors, left = gram_singular_values_sq(theta), None, True
    curve = _pad_curve(energy_curve(sigma_sq), lorad_full_rank)
    record.update(_rank_record("lorad", curve, analysed_rank, settings))
    record["lorad_energy"] = _round_list(curve, settings.energy_decimals)
    recommended = rank_at(curve, settings.recommend_threshold)
    record["recommended_rank"] = recommended
    record["lorad_explained"] = _explained_by_exact_angles(teacher_pairs, student_pairs, t, s, t_inv, s_inv, residual_energy)
    record["lorad_explained_at_recommended_rank"] = None
    if vectors is not None and recommended > 0:
        truncated = truncate_to_rank(theta, vectors, left, recommended)
        record["lorad_explained_at_recommended_rank"] = _explained(t * t_inv, s * s_inv, truncated, residual_energy)
    return record


def _explained_by_exact_angles(
    teacher_pairs: torch.Tensor,
    student_pairs: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    t_inv: torch.Tensor,
    s_inv: torch.Tensor,
    residual_energy: float,
) -> float | None:
    """:func:`_explained` for the exact per-pair Θ, without rotating anything.

    Turning the unit teacher pair t̂_p by its exact angle gives a vector of length ‖t̂_p‖ along ŝ_p, so what is
    left is ``Σ_p (‖ŝ_p‖ − ‖t̂_p‖)²`` (plus an odd fan-in's unrotated last column): only the pair lengths change.
    """
    if residual_energy <= 0:
        return None
    gap = student_pairs.abs().mul_(s_inv).sub_(teacher_pairs.abs().mul_(t_inv))
    left_over = torch.linalg.vector_norm(gap).to(torch.float64).square()
    if t.shape[1] % 2:
        left_over += torch.linalg.vector_norm(s[:, -1:] * s_inv - t[:, -1:] * t_inv).to(torch.float64).square()
    return 1.0 - float(left_over) / residual_energy


def _explained(t_unit: torch.Tensor, s_unit: torch.Tensor, theta: torch.Tensor, residual_energy: float) -> float | None:
    """``1 − ‖ŝ − R_Θ(t̂)‖² / ‖ΔD‖²``: the share of the direction change the rotation Θ reproduces."""
    if residual_energy <= 0:
        return None
    left_over = torch.linalg.vector_norm(s_unit - rotate_pairs(t_unit, theta.to(t_unit.dtype))).to(torch.float64)
    return 1.0 - float(left_over.square()) / residual_energy
