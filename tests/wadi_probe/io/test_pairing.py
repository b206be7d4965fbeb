"""Pairing by normalised name: matched, shape-mismatched, only-in-one, filters, different architectures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_tiny_unet, write_every_layout
from wadi_probe.io.checkpoints import open_checkpoint
from wadi_probe.errors import WadiInputError
from wadi_probe.pairing import pair_checkpoints


def _state(**overrides) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in make_tiny_unet(**overrides).state_dict().items()}


def test_pairs_safetensors_file_against_diffusers_folder(tmp_path: Path) -> None:
    teacher_state = _state(seed=0)
    save_file(teacher_state, str(tmp_path / "teacher.safetensors"))
    make_tiny_unet(seed=3).save_pretrained(tmp_path / "student")
    with open_checkpoint(tmp_path / "teacher.safetensors") as t, open_checkpoint(tmp_path / "student") as s:
        pairing = pair_checkpoints(t, s)
        assert pairing.matched == t.names()  # teacher (forward-pass) order
    assert sorted(pairing.matched) == sorted(teacher_state)
    assert pairing.unmatched == 0


def test_reports_mismatches_and_filters(tmp_path: Path) -> None:
    teacher_state = _state(seed=0)
    student_state = dict(teacher_state)
    dropped = "conv_out.bias"
    del student_state[dropped]
    student_state["extra.weight"] = torch.zeros(3)
    resized = "conv_in.weight"
    student_state[resized] = torch.zeros(8, 4, 1, 1)
    save_file(teacher_state, str(tmp_path / "t.safetensors"))
    save_file(student_state, str(tmp_path / "s.safetensors"))
    with open_checkpoint(tmp_path / "t.safetensors") as t, open_checkpoint(tmp_path / "s.safetensors") as s:
        pairing = pair_checkpoints(t, s)
        assert pairing.only_in_teacher == [dropped]
        assert pairing.only_in_student == ["extra.weight"]
        assert pairing.shape_mismatch == [(resized, (8, 4, 3, 3), (8, 4, 1, 1))]
        assert len(pairing.matched) == len(teacher_state) - 2
        assert pairing.to_dict()["shape_mismatch"] == [[resized, [8, 4, 3, 3], [8, 4, 1, 1]]]

        attention = pair_checkpoints(t, s, include=r"attentions", exclude=r"\.bias$")
        assert attention.matched and all("attentions" in n and not n.endswith(".bias") for n in attention.matched)
        assert attention.unmatched == 0
        with pytest.raises(WadiInputError, match="no tensor"):
            pair_checkpoints(t, s, include="does-not-exist")
        with pytest.raises(WadiInputError, match="invalid name pattern"):
            pair_checkpoints(t, s, include="(")


def test_different_architectures_are_refused(tmp_path: Path) -> None:
    save_file(_state(seed=0), str(tmp_path / "small.safetensors"))
    save_file(_state(seed=0, block_out_channels=(16, 32), norm_num_groups=8), str(tmp_path / "wide.safetensors"))
    with open_checkpoint(tmp_path / "small.safetensors") as t, open_checkpoint(tmp_path / "wide.safetensors") as s:
        with pytest.raises(WadiInputError, match="look like different architectures"):
            pair_checkpoints(t, s)


def test_same_weights_in_every_layout_pair_completely(tmp_path: Path) -> None:
    unet = make_tiny_unet(seed=11)
    state = unet.state_dict()
    paths = write_every_layout(unet, tmp_path)
    checkpoints = [open_checkpoint(p) for p in paths.values()]
    assert [c.layout for c in checkpoints] == ["safetensors", "diffusers", "diffusers-sharded", "ldm", "ldm", "torch"]
    try:
        for i, teacher in enumerate(checkpoints):
            for student in checkpoints[i + 1:]:
                pairing = pair_checkpoints(teacher, student)
                assert pairing.unmatched == 0 and pairing.matched == teacher.names() == student.names()
        for name in checkpoints[0].names():
            assert all(torch.equal(c.tensor(name), state[name]) for c in checkpoints), name
    finally:
        for checkpoint in checkpoints:
            checkpoint.close()
