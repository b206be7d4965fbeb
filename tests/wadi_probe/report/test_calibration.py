"""Known answers for what the probe says: the first-order ratio, chance baselines, the precision floor, pairing
told in full, and outputs that cannot hurt the inputs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from wadi_probe import WadiInputError, compare
from wadi_probe.chance import ABOVE_CHANCE_MARGIN, chance_for_shape, chance_rotation_explained
from wadi_probe.cli import app
from wadi_probe.decompose import analyze_pair
from wadi_probe.report.summary import headline

ROOT = Path(__file__).resolve().parents[3]
runner = CliRunner()


def _turn_rows(t: torch.Tensor, angle: float, gen: torch.Generator) -> torch.Tensor:
    """Every row of ``t`` turned by exactly ``angle`` radians towards a random direction orthogonal to it."""
    d = torch.randn(t.shape, generator=gen, dtype=torch.float64)
    unit = t / t.norm(dim=1, keepdim=True)
    d -= (d * unit).sum(1, keepdim=True) * unit
    d = d / d.norm(dim=1, keepdim=True) * t.norm(dim=1, keepdim=True)
    return math.cos(angle) * t + math.sin(angle) * d


def test_first_order_ratio_on_a_planted_pair():
    gen = torch.Generator().manual_seed(0)
    angle, scale = 0.02, 0.004  # every row turned by 0.02 rad and lengthened by 0.4 %
    teacher = {f"blocks.{i}.proj.weight": torch.randn(48, 40, generator=gen, dtype=torch.float64) for i in range(3)}
    student = {k: _turn_rows(v, angle, gen) * (1 + scale) for k, v in teacher.items()}
    s = compare({k: v.float() for k, v in teacher.items()}, {k: v.float() for k, v in student.items()}, device="cpu").summary
    assert s["angle_rad_mean"] == pytest.approx(angle, rel=1e-4)
    assert s["norm_change_mean"] == pytest.approx(scale, rel=1e-4)
    assert s["angle_to_norm_ratio"] == pytest.approx(angle / scale, rel=1e-3)  # 5×: first order on both sides
    assert s["paper_direction_to_norm_ratio"] == pytest.approx((1 - math.cos(angle)) / scale, rel=1e-3)  # 0.05×
    text = headline(_report(s)).plain
    assert "5× farther sideways" in text and "paper's ratio" in text and "0.05×" in text


def _report(summary):
    from wadi_probe.report.schema import Report

    return Report({"summary": summary, "layers": [], "inputs": {}, "settings": {}, "pairing": {}})


def _numpy_chance(rows: int, fan_in: int, draws: int, seed: int) -> float:
    """Independent estimate: i.i.d. Gaussian rows of equal length (no tangent projection), numpy SVD."""
    rng = np.random.default_rng(seed)
    k = math.ceil(0.3 * min(rows, fan_in))
    shares = []
    for _ in range(draws):
        m = rng.standard_normal((rows, fan_in))
        m /= np.linalg.norm(m, axis=1, keepdims=True)
        sv = np.linalg.svd(m, compute_uv=False) ** 2
        shares.append(sv[:k].sum() / sv.sum())
    return float(np.mean(shares))


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32), (16, 8 * 3 * 3), (256, 768)],
                         ids=["square", "wide", "tall", "conv-flattened", "large-closed-form"])
def test_chance_baseline_against_an_independent_monte_carlo(shape):
    chance = chance_for_shape(*shape)
    assert (chance.draws == 0) == (min(shape) >= 256)  # the closed form from 256 on the smaller side
    draws = 64 if min(shape) < 256 else 4
    assert chance.residual_energy == pytest.approx(_numpy_chance(*shape, draws=draws, seed=1), abs=0.015)
    assert chance.rotation_explained == chance_rotation_explained(shape[1]) == (shape[1] // 2) / shape[1]
    assert chance_for_shape(*shape) is chance  # cached per shape


def test_chance_is_the_same_in_a_process_with_another_hash_seed():
    code = "from wadi_probe.chance import chance_for_shape; print(repr(chance_for_shape(24, 40).residual_energy))"
    values = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": seed}
        values.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    assert len(values) == 1 and float(values.pop()) == chance_for_shape(24, 40).residual_energy


def test_a_pure_noise_direction_change_is_reported_at_chance():
    gen = torch.Generator().manual_seed(3)
    teacher = {f"b.{i}.weight": torch.randn(96, 80, generator=gen, dtype=torch.float64) for i in range(4)}
    student = {k: _turn_rows(v, 0.01, gen).float() for k, v in teacher.items()}
    report = compare({k: v.float() for k, v in teacher.items()}, student, device="cpu")
    for record in report.layers:
        assert abs(record["residual_energy_at_30pct_rank_excess"]) < ABOVE_CHANCE_MARGIN
        assert abs(record["lorad_explained_excess"]) < ABOVE_CHANCE_MARGIN
    s = report.summary
    assert s["residual_energy_at_30pct_rank_above_chance"] is False and s["lorad_explained_above_chance"] is False
    text = headline(report).plain
    assert "low-rank beyond chance" not in text and "rotational beyond chance" not in text
    assert text.count("at chance") == 2


def test_a_planted_low_rank_rotation_is_above_chance():
    from wadi_probe.rotation import rotate_pairs

    gen = torch.Generator().manual_seed(4)
    teacher = torch.randn(64, 64, generator=gen)
    theta = 0.05 * torch.randn(64, 2, generator=gen) @ torch.randn(2, 32, generator=gen)
    record = analyze_pair(teacher, rotate_pairs(teacher, theta))
    assert record["residual_energy_at_30pct_rank_excess"] > 0.1 and record["lorad_explained_excess"] > 0.45


def test_an_fp16_cast_of_the_teacher_reads_as_unchanged():
    gen = torch.Generator().manual_seed(5)
    teacher = {f"b.{i}.weight": torch.randn(32, 24, generator=gen) for i in range(3)}
    report = compare(teacher, {k: v.half() for k, v in teacher.items()}, device="cpu")
    s = report.summary
    assert s["identical"] == 3 and s["recommended_layers"] == 0 and s["recommended_rank_median"] is None
    assert s["precision"]["compared_dtypes"] == ["float16"] and s["precision"]["lowered"] == 3
    text = headline(report).plain
    assert "identical" in text and "compared at the lower precision (float16)" in text


def test_a_rounding_level_change_gets_no_rank_advice_and_no_plan():
    gen = torch.Generator().manual_seed(6)
    teacher = torch.randn(32, 24, generator=gen).half()
    bits = teacher.view(torch.int16).clone()
    bits[::3, ::5] += 1  # one unit in the last place on some elements: what re-rounding does
    record = analyze_pair(teacher, bits.view(torch.float16))
    assert record["rounding_level"] is True and record["recommended_rank"] == 0
    assert record["lorad_energy"]  # the spectrum is still reported


def test_rows_rescaled_then_saved_in_fp16_are_a_rounding_level_turn():
    gen = torch.Generator().manual_seed(10)
    teacher = torch.randn(40, 36, generator=gen)
    scale = 1 + 0.01 * torch.rand(40, 1, generator=gen)  # a real norm change of up to 1 %, no turn at all
    record = analyze_pair(teacher, (teacher * scale).half())
    assert record["compared_dtype"] == "float16" and record["rounding_level"] is True
    assert record["recommended_rank"] == 0 and record["norm_change_max"] > 0.005
    summary = compare({"a.weight": teacher}, {"a.weight": (teacher * scale).half()}, device="cpu").summary
    assert summary["recommended_layers"] == 0 and summary["precision"]["rounding_level_names"] == ["a.weight"]


def test_the_tiny_student_in_fp16_gets_the_fp32_ranks():
    teacher = {k: v.float() for k, v in load_file(ROOT / "wadi_distill/builtin/digits/digits_unet.safetensors").items()}
    student = load_file(ROOT / "reports/demo/full_student.safetensors")
    full = compare(teacher, student, device="cpu")
    half = compare(teacher, {k: v.half() for k, v in student.items()}, device="cpu")
    assert half.summary["precision"]["compared_dtypes"] == ["float16"]
    for a, b in zip(full.layers, half.layers):
        if len(a["shape"]) >= 2:
            assert abs((a["recommended_rank"] or 0) - (b["recommended_rank"] or 0)) <= 8, a["name"]
    assert abs(full.summary["recommended_rank_median"] - half.summary["recommended_rank_median"]) <= 8


def test_unmatched_tensors_and_nonfinite_layers_are_named():
    gen = torch.Generator().manual_seed(7)
    teacher = {f"b.{i}.weight": torch.randn(16, 12, generator=gen) for i in range(30)}
    student = {k: v * 1.01 for k, v in teacher.items()}
    student["b.0.weight"] = torch.randn(16, 14, generator=gen)  # other width
    del student["b.1.weight"]
    student["b.2.weight"][3, 4] = float("nan")
    s = compare(teacher, student, device="cpu").summary
    assert s["unmatched"] == 2 and s["unmatched_names"] == ["b.0.weight", "b.1.weight"]
    assert s["nonfinite_layers"] == ["b.2.weight"]
    text = headline(compare(teacher, student, device="cpu")).plain
    assert "b.0.weight, b.1.weight" in text and "NaN/Inf" in text and "b.2.weight" in text


def test_mostly_unmatched_or_unrelated_pairs_are_refused_unless_partial():
    gen = torch.Generator().manual_seed(8)
    teacher = {f"b.{i}.weight": torch.randn(16, 12, generator=gen) for i in range(10)}
    half = {k: (v if i < 5 else torch.randn(16, 10, generator=gen)) for i, (k, v) in enumerate(teacher.items())}
    with pytest.raises(WadiInputError, match="different architectures.*--partial"):
        compare(teacher, half, device="cpu")
    assert compare(teacher, half, device="cpu", partial=True).summary["unmatched"] == 5
    unrelated = {k: torch.randn(v.shape, generator=gen) for k, v in teacher.items()}
    with pytest.raises(WadiInputError, match="look unrelated"):
        compare(teacher, unrelated, device="cpu")
    assert compare(teacher, unrelated, device="cpu", partial=True).summary["angle_deg_mean"] > 80


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("outputs")
    gen = torch.Generator().manual_seed(9)
    teacher = {f"b.{i}.weight": torch.randn(16, 12, generator=gen) for i in range(4)}
    student = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in teacher.items()}
    paths = folder / "t.safetensors", folder / "s.safetensors"
    save_file(teacher, str(paths[0]))
    save_file(student, str(paths[1]))
    return paths


@pytest.mark.parametrize("flag", ["-o", "--csv"])
def test_an_output_onto_an_input_is_refused_and_the_input_kept(files, flag):
    before = files[1].read_bytes()
    result = runner.invoke(app, ["compare", str(files[0]), str(files[1]), flag, str(files[1]), "--no-progress"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{files[1]} is the input {files[1]}" in " ".join(result.stderr.split())
    assert files[1].read_bytes() == before
    # the same file through a relative path
    rel = os.path.relpath(files[1])
    assert runner.invoke(app, ["compare", str(files[0]), str(files[1]), flag, rel, "--no-progress"]).exit_code == 2


def test_two_outputs_at_one_place_and_unwritable_outputs_are_refused_before_computing(files, tmp_path):
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["compare", str(files[0]), str(files[1]), "-o", str(out), "--csv", str(out)])
    assert result.exit_code == 2 and "both be written" in " ".join(result.stderr.split()) and not out.exists()
    result = runner.invoke(app, ["compare", str(files[0]), str(files[1]), "-o", "/proc/x.json", "--no-progress"])
    assert result.exit_code == 2 and "cannot write" in result.stderr and "Traceback" not in result.output


def test_a_broken_pipe_while_printing_leaves_the_report_written(files, tmp_path):
    out = tmp_path / "r.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}
    code = "from wadi_probe.cli import main; main()"
    command = (f"{sys.executable} -c '{code}' compare {files[0]} {files[1]} -o {out} --no-progress --top 40 "
               "| head -c 1 > /dev/null")
    done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    from wadi_probe import load_report

    assert load_report(out).summary["matrices"] == 4


def test_every_column_and_caption_survives_80_columns_and_a_pipe(files):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}
    done = subprocess.run([sys.executable, "-c", "from wadi_probe.cli import main; main()", "compare", str(files[0]),
                           str(files[1]), "--no-progress"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    for header in ("layer and shape", "angle mean/max", "norm chg", "E@30% (±ch.)", "rot. (±ch.)", "rank", "mats",
                   "params", "ident.", "1−cos", "round."):
        assert header in text, header
    joined = " ".join(text.split())  # the legend, whole: nothing of the caption is lost
    assert "rank = median recommended LoRaD rank; ≤ε = no larger than rounding makes it" in joined
    assert joined.endswith("(angles: ε = 1.19e-07 of the compared precision; norm changes: 2ε/√fan-in; 1 − cos: ε²/2).")


def test_a_schema_1_report_is_upgraded_on_reading(tmp_path):
    import json

    from wadi_probe import load_report

    current = load_report(ROOT / "reports" / "demo" / "report.json")
    old = json.loads(json.dumps(current.data))
    old["schema_version"] = 1
    for record in old["layers"]:
        for key in [k for k in record if "chance" in k or "excess" in k] + ["rounding_level", "angle_deg_std",
                                                                          "compared_dtype", "student_dtype"]:
            record.pop(key, None)
    old["summary"] = {"direction_to_norm_ratio": 0.064, "layers": len(old["layers"])}
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(old))
    upgraded = load_report(path)
    assert upgraded.data["schema_version"] == 2 and upgraded.data["upgraded_from"] == 1
    for a, b in zip(upgraded.layers, current.layers):
        assert a["residual_energy_at_30pct_rank_chance"] == b["residual_energy_at_30pct_rank_chance"]
    assert upgraded.summary["angle_to_norm_ratio"] == pytest.approx(current.summary["angle_to_norm_ratio"])
    assert upgraded.summary["residual_energy_at_30pct_rank_above_chance"] is True


def test_a_partly_matched_identical_pair_is_not_called_identical_without_saying_so():
    gen = torch.Generator().manual_seed(11)
    teacher = {f"b.{i}.weight": torch.randn(8, 6, generator=gen) for i in range(20)}
    teacher["conv_in.weight"] = torch.randn(8, 4, 3, 3, generator=gen)
    teacher["proj_out.weight"] = torch.randn(4, 8, generator=gen)
    student = {k: v.clone() for k, v in teacher.items()}
    student["conv_in.weight"] = torch.randn(8, 9, 3, 3, generator=gen)  # another input width
    del student["proj_out.weight"]
    report = compare(teacher, student, device="cpu")
    text = headline(report)
    assert "that were compared are identical" in text.plain
    assert "2 tensors were not compared" in text.plain and "conv_in.weight, proj_out.weight" in text.plain
    assert not any("green" in str(span.style) for span in text.spans)


def test_a_real_small_norm_change_in_fp16_is_not_called_rounding():
    # DMD2-like: an fp16 student whose rows grew by 0.1 % (about fp16's ε) and turned by 0.5°; fp32 teacher
    gen = torch.Generator().manual_seed(12)
    teacher = {f"b.{i}.weight": torch.randn(64, 320, generator=gen, dtype=torch.float64) for i in range(3)}
    student = {k: (_turn_rows(v, math.radians(0.5), gen) * 1.001).half() for k, v in teacher.items()}
    s = compare({k: v.float() for k, v in teacher.items()}, student, device="cpu").summary
    assert s["norm_change_at_rounding_level"] is False and s["norm_change_mean"] == pytest.approx(1e-3, rel=0.05)
    assert s["angle_to_norm_ratio"] == pytest.approx(math.radians(0.5) / 1e-3, rel=0.05)
    assert s["precision"]["norm_change_rounding_mean"] == pytest.approx(2 * 2**-10 / math.sqrt(320))


def test_unwritable_reason_is_the_one_output_folder_check(tmp_path):
    from wadi_probe.io.atomic import unwritable_reason

    assert unwritable_reason(tmp_path / "new" / "deeper") is None  # created later, its nearest parent is writable
    a_file = tmp_path / "f"
    a_file.write_text("x")
    assert unwritable_reason(a_file / "sub") == f"{a_file} is a file, not a folder"
    assert unwritable_reason("/proc/wadi-out").startswith("/proc: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # the check leaves nothing behind
