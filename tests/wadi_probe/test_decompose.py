"""Known answers for the per-layer math (docs/design.md, "The probe"): planted scales, planted rotations, spectra vs svdvals."""

from __future__ import annotations

import math

import pytest
import torch

from _planted_pairs import balanced_low_rank_angles, row_angles_deg
from wadi_probe.decompose import (
    AnalysisSettings,
    analyze_pair,
    bit_identical,
    energy_at_rank,
    energy_curve,
    gram_singular_values_sq,
    rank_at,
)
from wadi_probe.rotation import pair_angles, rotate_pairs


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(40, 150), (150, 40), (64, 64), (1, 30), (30, 1)])
def test_gram_spectrum_matches_svdvals(shape):
    gen = _gen(1)
    decay = torch.logspace(0, -2, shape[1], dtype=torch.float64)
    matrix = torch.randn(shape, generator=gen, dtype=torch.float64) * decay
    reference = torch.linalg.svdvals(matrix) ** 2
    fast = gram_singular_values_sq(matrix.float())
    assert fast.dtype == torch.float64 and fast.shape == reference.shape
    assert (fast[:-1] >= fast[1:]).all() and (fast >= 0).all()
    assert torch.allclose(fast, reference, rtol=0, atol=5e-6 * float(reference[0]))
    assert torch.allclose(energy_curve(fast), energy_curve(reference), atol=1e-5)
    precise = gram_singular_values_sq(matrix, precise=True)
    assert torch.allclose(precise, reference, rtol=0, atol=1e-12 * float(reference[0]))


def test_gram_spectrum_of_rank_deficient_matrix_clamps_to_zero():
    gen = _gen(2)
    low = torch.randn(50, 3, generator=gen) @ torch.randn(3, 80, generator=gen)
    sigma_sq = gram_singular_values_sq(low)
    assert (sigma_sq >= 0).all()
    curve = energy_curve(sigma_sq)
    assert rank_at(curve, 0.99) <= 3 and curve[2] > 0.999999
    reference = torch.linalg.svdvals(low.double()) ** 2
    assert torch.allclose(sigma_sq[:3], reference[:3], rtol=1e-5)


def test_energy_curve_and_ranks_known_values():
    curve = energy_curve(torch.tensor([4.0, 3.0, 2.0, 1.0]))
    assert torch.allclose(curve, torch.tensor([0.4, 0.7, 0.9, 1.0], dtype=torch.float64))
    assert rank_at(curve, 0.4) == 1
    assert rank_at(curve, 0.5) == 2
    assert rank_at(curve, 0.9) == 3  # reached exactly (up to rounding) counts
    assert rank_at(curve, 0.95) == 4
    assert energy_at_rank(curve, 2) == pytest.approx(0.7)
    assert energy_at_rank(curve, 10) == 1.0
    zero = energy_curve(torch.zeros(5))
    assert rank_at(zero, 0.9) == 0 and energy_at_rank(zero, 2) is None


def test_rowwise_rescale_changes_norm_exactly_and_direction_not_at_all():
    gen = _gen(3)
    teacher = torch.randn(32, 48, generator=gen)
    scale = 1 + 0.3 * torch.rand(32, 1, generator=gen) - 0.15
    record = analyze_pair(teacher, teacher * scale)
    expected = (scale.double() - 1).abs().flatten()
    assert record["norm_change_mean"] == pytest.approx(float(expected.mean()), abs=1e-6)
    assert record["norm_change_std"] == pytest.approx(float(expected.std(correction=0)), abs=1e-6)
    assert record["norm_change_max"] == pytest.approx(float(expected.max()), abs=1e-6)
    assert record["direction_change_max"] < 1e-12 and record["angle_deg_max"] < 1e-4
    assert record["identical"] is False
    # direction unchanged: nothing to explain, no rank needed
    assert record["recommended_rank"] == 0 and record["lorad_rank_99"] == 0 and record["residual_rank_90"] == 0
    whole = abs(float((teacher * scale).double().norm() / teacher.double().norm()) - 1)
    assert record["matrix_norm_change"] == pytest.approx(whole, abs=1e-6)


def test_constant_pair_angle_gives_that_angle_on_every_row():
    gen = _gen(4)
    teacher = torch.randn(24, 40, generator=gen, dtype=torch.float64)
    theta0 = 0.3
    student = rotate_pairs(teacher, torch.full((24, 20), theta0, dtype=torch.float64))
    record = analyze_pair(teacher.float(), student.float())
    assert record["angle_deg_mean"] == pytest.approx(math.degrees(theta0), abs=1e-4)
    assert record["angle_deg_max"] == pytest.approx(math.degrees(theta0), abs=1e-4)
    assert record["direction_change_mean"] == pytest.approx(1 - math.cos(theta0), rel=1e-5)
    assert record["direction_change_std"] < 1e-6
    assert record["norm_change_max"] < 1e-6
    assert record["matrix_direction_change"] == pytest.approx(1 - math.cos(theta0), rel=1e-5)
    assert record["lorad_rank_99"] == 1 and record["recommended_rank"] == 1
    assert record["lorad_explained"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("out,fan_in,rank", [(48, 70, 3), (120, 36, 4), (16, 9 * 6, 2)])
def test_planted_low_rank_rotation_is_recovered(out, fan_in, rank):
    gen = _gen(5)
    teacher = torch.randn(out, fan_in, generator=gen, dtype=torch.float64)
    theta = balanced_low_rank_angles(out, fan_in // 2, rank, scale=1.5, gen=gen)
    student = rotate_pairs(teacher, theta)
    record = analyze_pair(teacher.float(), student.float(), AnalysisSettings(truncated_explained=True))
    assert record["norm_change_max"] < 1e-6
    assert record["lorad_full_rank"] == min(out, fan_in // 2)
    assert record["full_rank"] == min(out, fan_in)
    assert record["lorad_rank_99"] == rank
    assert record["lorad_energy"][rank - 1] == pytest.approx(1.0, abs=1e-4)
    assert record["lorad_energy"][rank - 2] < 0.99
    assert record["lorad_explained"] == pytest.approx(1.0, abs=1e-5)
    assert record["recommended_rank"] == rank_at(torch.tensor(record["lorad_energy"], dtype=torch.float64), 0.9)
    assert record["lorad_explained_at_recommended_rank"] <= record["lorad_explained"] + 1e-9
    angles = row_angles_deg(teacher, student)
    assert record["angle_deg_mean"] == pytest.approx(float(angles.mean()), abs=1e-3)
    assert record["angle_deg_max"] == pytest.approx(float(angles.max()), abs=1e-3)
    # the recovered field is the planted one
    assert torch.allclose(pair_angles(teacher, student), theta, atol=1e-9)


def test_truncated_rotation_explains_all_at_the_planted_rank():
    gen = _gen(6)
    teacher = torch.randn(64, 64, generator=gen, dtype=torch.float64)
    theta = balanced_low_rank_angles(64, 32, 2, scale=1.0, gen=gen)
    record = analyze_pair(teacher.float(), rotate_pairs(teacher, theta).float(),
                          AnalysisSettings(recommend_threshold=0.99, truncated_explained=True))
    assert record["recommended_rank"] == 2
    assert record["lorad_explained_at_recommended_rank"] == pytest.approx(1.0, abs=1e-5)
    # a rank-1 truncation of that rank-2 field explains less, and the default leaves the field empty
    partial = analyze_pair(teacher.float(), rotate_pairs(teacher, theta).float(),
                           AnalysisSettings(recommend_threshold=0.5, truncated_explained=True))
    assert partial["recommended_rank"] == 1 and partial["lorad_explained_at_recommended_rank"] < 0.9
    assert analyze_pair(teacher.float(), rotate_pairs(teacher, theta).float())["lorad_explained_at_recommended_rank"] is None


def test_direction_change_matches_one_minus_cosine_in_fp64():
    gen = _gen(7)
    teacher = torch.randn(30, 50, generator=gen, dtype=torch.float64)
    student = teacher + 0.4 * torch.randn(30, 50, generator=gen, dtype=torch.float64)
    record = analyze_pair(teacher.float(), student.float())
    cos = (teacher * student).sum(1) / (teacher.norm(dim=1) * student.norm(dim=1))
    nc = (student.norm(dim=1) - teacher.norm(dim=1)).abs() / teacher.norm(dim=1)
    assert record["direction_change_mean"] == pytest.approx(float((1 - cos).mean()), rel=1e-5)
    assert record["direction_change_std"] == pytest.approx(float((1 - cos).std(correction=0)), rel=1e-4)
    assert record["norm_change_mean"] == pytest.approx(float(nc.mean()), rel=1e-5)
    matrix_cos = (teacher * student).sum() / (teacher.norm() * student.norm())
    assert record["matrix_direction_change"] == pytest.approx(float(1 - matrix_cos), rel=1e-5)
    # the residual spectrum equals svdvals of the fp64 residual
    residual = student / student.norm(dim=1, keepdim=True) - teacher / teacher.norm(dim=1, keepdim=True)
    reference = energy_curve(torch.linalg.svdvals(residual) ** 2)
    assert torch.allclose(torch.tensor(record["residual_energy"], dtype=torch.float64), reference, atol=1e-4)
    k = math.ceil(0.3 * 30)
    assert record["residual_energy_at_30pct_rank"] == pytest.approx(float(reference[k - 1]), abs=1e-5)
    top = (torch.linalg.svdvals(residual) / residual.norm())[:16]
    assert torch.allclose(torch.tensor(record["residual_top_singular_values"], dtype=torch.float64), top, atol=1e-5)


def test_identical_tensors_are_exact_zeros():
    teacher = torch.randn(12, 20, generator=_gen(8))
    record = analyze_pair(teacher, teacher.clone())
    assert record["identical"] is True
    for key in ("norm_change_mean", "norm_change_std", "direction_change_mean", "direction_change_max",
                "angle_deg_max", "matrix_norm_change", "matrix_direction_change"):
        assert record[key] == 0.0
    assert record["recommended_rank"] == 0 and record["residual_energy"] == []
    # bit identity, not numeric equality: -0.0 vs 0.0 differ in bits
    a, b = torch.zeros(3, 4), torch.zeros(3, 4)
    b[0, 0] = -0.0
    assert bit_identical(a, a.clone()) and not bit_identical(a, b)


def test_zero_and_nonfinite_rows_are_counted_and_left_out():
    gen = _gen(9)
    clean_t = torch.randn(10, 16, generator=gen)
    clean_s = clean_t * 1.1 + 0.05 * torch.randn(10, 16, generator=gen)
    teacher = torch.cat((clean_t, torch.zeros(1, 16), torch.randn(2, 16, generator=gen)))
    student = torch.cat((clean_s, torch.randn(1, 16, generator=gen), torch.randn(2, 16, generator=gen)))
    teacher[11, 3] = float("nan")
    student[12, 0] = float("inf")
    record = analyze_pair(teacher, student)
    clean = analyze_pair(clean_t, clean_s)
    assert record["zero_rows"] == 1 and record["nonfinite"] == 2 and record["rows"] == 10
    for key in ("norm_change_mean", "direction_change_mean", "angle_deg_max", "residual_energy_at_30pct_rank",
                "lorad_explained", "matrix_direction_change"):
        assert record[key] == pytest.approx(clean[key], rel=1e-6, abs=1e-9), key
    assert all(math.isfinite(v) for v in record["residual_energy"])


def test_all_rows_bad_gives_nulls_not_errors():
    record = analyze_pair(torch.zeros(4, 6), torch.zeros(4, 6) + 1)
    assert record["zero_rows"] == 4 and record["norm_change_mean"] is None and record["recommended_rank"] is None


def test_vectors_use_the_whole_vector_and_have_no_spectra():
    gen = _gen(10)
    bias = torch.randn(20, generator=gen)
    record = analyze_pair(bias, bias * 0.8)
    assert record["norm_change_mean"] == pytest.approx(0.2, abs=1e-6)
    assert record["direction_change_mean"] < 1e-12 and record["norm_change_std"] == 0.0
    assert record["full_rank"] is None and record["residual_energy"] is None and record["recommended_rank"] is None
    other = torch.randn(20, generator=gen)
    record = analyze_pair(bias, other)
    cos = float(torch.dot(bias.double(), other.double()) / (bias.double().norm() * other.double().norm()))
    assert record["direction_change_mean"] == pytest.approx(1 - cos, rel=1e-5)
    assert record["angle_deg_mean"] == pytest.approx(math.degrees(math.acos(cos)), abs=1e-3)


def test_conv_kernels_are_flattened_per_output_channel():
    gen = _gen(11)
    kernel = torch.randn(8, 4, 3, 3, generator=gen)
    student = kernel + 0.1 * torch.randn(8, 4, 3, 3, generator=gen)
    as_conv = analyze_pair(kernel, student)
    as_matrix = analyze_pair(kernel.reshape(8, 36), student.reshape(8, 36))
    for key, value in as_matrix.items():
        assert as_conv[key] == value, key
    assert as_conv["full_rank"] == 8 and as_conv["lorad_full_rank"] == 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_upcast(dtype):
    gen = _gen(12)
    teacher = torch.randn(16, 32, generator=gen).to(dtype)
    student = (teacher.float() + 0.2 * torch.randn(16, 32, generator=gen)).to(dtype)
    half = analyze_pair(teacher, student)
    full = analyze_pair(teacher.float(), student.float())
    for key in ("norm_change_mean", "direction_change_mean", "angle_deg_mean", "residual_energy_at_30pct_rank",
                "lorad_explained", "recommended_rank"):
        assert half[key] == pytest.approx(full[key], rel=1e-6), key


def test_no_spectra_keeps_statistics_and_drops_ranks():
    gen = _gen(13)
    teacher = torch.randn(16, 32, generator=gen)
    student = teacher + 0.1 * torch.randn(16, 32, generator=gen)
    full = analyze_pair(teacher, student)
    fast = analyze_pair(teacher, student, AnalysisSettings(spectra=False))
    assert fast["direction_change_mean"] == full["direction_change_mean"]
    assert fast["residual_rank_90"] is None and fast["lorad_explained"] is None and fast["recommended_rank"] is None


def test_inputs_are_not_modified():
    gen = _gen(14)
    teacher = torch.randn(16, 32, generator=gen)
    student = teacher + 0.1 * torch.randn(16, 32, generator=gen)
    before_t, before_s = teacher.clone(), student.clone()
    analyze_pair(teacher, student)
    assert torch.equal(teacher, before_t) and torch.equal(student, before_s)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    gen = _gen(15)
    teacher = torch.randn(64, 96, generator=gen)
    student = rotate_pairs(teacher, 0.1 * torch.randn(64, 4, generator=gen) @ torch.randn(4, 48, generator=gen))
    cpu = analyze_pair(teacher, student)
    gpu = analyze_pair(teacher, student, device="cuda")
    for key in ("norm_change_mean", "direction_change_mean", "angle_deg_mean", "residual_energy_at_30pct_rank",
                "lorad_rank_99", "lorad_explained", "recommended_rank"):
        assert gpu[key] == pytest.approx(cpu[key], rel=1e-4, abs=1e-6), key
