"""Norm/direction hybrids (`wadi-probe swap`): per-row norms and directions land where they should."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from wadi_probe.cli import app
from wadi_probe.errors import WadiInputError
from wadi_probe.hybrid import swap_hybrid, swap_rows, write_hybrid

from conftest import make_tiny_unet


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.double().reshape(t.shape[0] if t.ndim >= 2 else 1, -1)


def _directions(t: torch.Tensor) -> torch.Tensor:
    rows = _rows(t)
    return rows / rows.norm(dim=1, keepdim=True)


def _perturbed(state: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """A 'student': every row turned a little and rescaled by up to ±20 %."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        rows = _rows(t)
        turned = rows + 0.3 * rows.norm(dim=1, keepdim=True) * torch.randn(rows.shape, generator=gen, dtype=torch.float64) / rows.shape[1] ** 0.5
        turned = turned / turned.norm(dim=1, keepdim=True) * rows.norm(dim=1, keepdim=True)
        scale = 1 + 0.2 * (2 * torch.rand(rows.shape[0], 1, generator=gen, dtype=torch.float64) - 1)
        out[name] = (turned * scale).reshape(t.shape).to(t.dtype)
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, dict, dict]:
    folder = tmp_path_factory.mktemp("swap")
    teacher = {k: v.contiguous() for k, v in make_tiny_unet(seed=0).state_dict().items()}
    student = _perturbed(teacher)
    save_file(teacher, folder / "teacher.safetensors")
    save_file(student, folder / "student.safetensors")
    return folder / "teacher.safetensors", folder / "student.safetensors", teacher, student


def test_swap_rows_matches_the_definitions_on_a_conv_kernel():
    teacher = torch.randn(4, 3, 3, 3)
    student = torch.randn(4, 3, 3, 3)
    norms, _ = swap_rows(teacher, student, "norm")
    torch.testing.assert_close(_rows(norms).norm(dim=1), _rows(teacher).norm(dim=1))
    torch.testing.assert_close(_directions(norms), _directions(student))
    directions, _ = swap_rows(teacher, student, "direction")
    torch.testing.assert_close(_rows(directions).norm(dim=1), _rows(student).norm(dim=1))
    torch.testing.assert_close(_directions(directions), _directions(teacher))


def test_swap_rows_treats_a_vector_as_one_row_and_keeps_zero_rows():
    teacher, student = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0])
    hybrid, kept = swap_rows(teacher, student, "norm")
    torch.testing.assert_close(hybrid, torch.tensor([0.0, 5.0]))  # student direction, teacher norm 5
    assert kept == 0
    teacher = torch.tensor([[1.0, 0.0], [0.0, 0.0], [float("nan"), 1.0], [0.0, 0.0]])
    student = torch.tensor([[0.0, 2.0], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    hybrid, kept = swap_rows(teacher, student, "direction")
    torch.testing.assert_close(hybrid, torch.tensor([[2.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]))
    assert kept == 2  # the zero-teacher row and the NaN row; an all-zero pair needs no swap


@pytest.mark.parametrize("take", ["norm", "direction"])
def test_every_row_gets_the_right_norm_and_direction(pair, take):
    teacher_path, student_path, teacher, student = pair
    hybrid = swap_hybrid(teacher_path, student_path, take)
    assert set(hybrid) == set(student)
    norm_from, direction_from = (teacher, student) if take == "norm" else (student, teacher)
    for name, tensor in hybrid.items():
        assert tensor.dtype == student[name].dtype and tensor.shape == student[name].shape
        torch.testing.assert_close(_rows(tensor).norm(dim=1), _rows(norm_from[name]).norm(dim=1), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(_directions(tensor), _directions(direction_from[name]), rtol=1e-5, atol=1e-6)


def test_identical_inputs_give_the_identical_checkpoint(pair, tmp_path):
    teacher_path = pair[0]
    for take in ("norm", "direction"):
        write_hybrid(teacher_path, teacher_path, take, tmp_path / f"{take}.safetensors")
        written = load_file(tmp_path / f"{take}.safetensors")
        original = load_file(teacher_path)
        assert written.keys() == original.keys()
        assert all(torch.equal(written[k], original[k]) for k in original)


def test_written_in_the_students_key_names_and_dtype(pair, tmp_path):
    teacher_path, _, teacher, student = pair
    prefixed = {f"unet.{k}": v.half() for k, v in student.items()}
    save_file(prefixed, tmp_path / "student_fp16.safetensors")
    out = write_hybrid(teacher_path, tmp_path / "student_fp16.safetensors", "norm", tmp_path / "hybrid.safetensors")
    assert len(out.swapped) == len(student) and out.kept == []
    written = load_file(tmp_path / "hybrid.safetensors")
    assert set(written) == set(prefixed)
    assert {v.dtype for v in written.values()} == {torch.float16}
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    torch.testing.assert_close(_rows(written[f"unet.{name}"]).norm(dim=1), _rows(teacher[name]).norm(dim=1), rtol=2e-3, atol=1e-4)


def test_tensors_only_the_student_has_stay_untouched(pair, tmp_path):
    teacher_path, _, teacher, student = pair
    extra = dict(student, **{"extra.weight": torch.randn(3, 3)})
    save_file(extra, tmp_path / "student_extra.safetensors")
    result = write_hybrid(teacher_path, tmp_path / "student_extra.safetensors", "direction", tmp_path / "h.safetensors",
                          include="attn")
    written = load_file(tmp_path / "h.safetensors")
    assert "extra.weight" in result.kept and torch.equal(written["extra.weight"], extra["extra.weight"])
    assert all("attn" in n for n in result.swapped)
    untouched = next(n for n in student if "conv_in" in n)
    assert torch.equal(written[untouched], student[untouched])


def test_cli_swap_writes_the_hybrid(pair, tmp_path):
    teacher_path, student_path, teacher, _ = pair
    out = tmp_path / "hybrid.safetensors"
    result = CliRunner().invoke(app, ["swap", str(teacher_path), str(student_path), "--take", "direction", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "teacher's per-row direction" in result.output
    written = load_file(out)
    name = "conv_in.weight"
    torch.testing.assert_close(_directions(written[name]), _directions(teacher[name]))


@pytest.mark.parametrize(
    "make_args,message",
    [
        (lambda t, s, o: [t, s, "--take", "size", "-o", o], "must be 'norm' or 'direction'"),
        (lambda t, s, o: [t + ".missing", s, "--take", "norm", "-o", o], "does not exist"),
        (lambda t, s, o: [t, s, "--take", "norm", "-o", o[: -len(".safetensors")] + ".txt"], "should end in .safetensors"),
        (lambda t, s, o: [t, s, "--take", "norm", "-o", s], "student.safetensors is the input"),
    ],
)
def test_cli_swap_refuses_bad_input_and_writes_nothing(pair, tmp_path, make_args, message):
    teacher_path, student_path, _, _ = pair
    out = tmp_path / "hybrid.safetensors"
    out.write_bytes(b"previous result")
    before = student_path.read_bytes()
    result = CliRunner().invoke(app, ["swap", *make_args(str(teacher_path), str(student_path), str(out))])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert out.read_bytes() == b"previous result"
    assert student_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hybrid.safetensors"]


def test_different_architectures_are_refused(pair, tmp_path):
    teacher_path = pair[0]
    other = {k: v.contiguous() for k, v in make_tiny_unet(seed=0, block_out_channels=(16, 32)).state_dict().items()}
    save_file(other, tmp_path / "other.safetensors")
    with pytest.raises(WadiInputError, match="different architectures"):
        write_hybrid(teacher_path, tmp_path / "other.safetensors", "norm", tmp_path / "h.safetensors")
    assert not (tmp_path / "h.safetensors").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_swap_rows_on_cuda_matches_the_cpu_result():
    teacher, student = torch.randn(32, 8, 3, 3, dtype=torch.float16), torch.randn(32, 8, 3, 3, dtype=torch.float16)
    for take in ("norm", "direction"):
        on_gpu, _ = swap_rows(teacher.cuda(), student.cuda(), take)
        assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float16
        torch.testing.assert_close(on_gpu.cpu(), swap_rows(teacher, student, take)[0])
