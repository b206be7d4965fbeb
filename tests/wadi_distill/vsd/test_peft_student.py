"""PEFT LoRA/DoRA students: parameter counts, budget matching, merge equals the adapted forward."""

from __future__ import annotations

import pytest
import torch

from wadi_distill.lorad.config import adapter_param_count
from wadi_distill.vsd.peft_student import inject_peft_student, merged_peft_state, rank_for_budget
from wadi_distill.plan import plan_from_preset
from wadi_probe.errors import WadiInputError


def _forward(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    e = torch.randn(2, 3, unet.config.cross_attention_dim, generator=g)
    return unet(x, torch.tensor([10, 500]), encoder_hidden_states=e).sample


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_peft_student_counts_and_merge(kind, tiny_unet):
    import copy

    from diffusers import UNet2DConditionModel

    tiny_unet = tiny_unet(seed=0)
    plan = plan_from_preset(tiny_unet, 2)
    modules = [e.module for e in plan.layers]
    shapes = [tuple(e.shape) for e in plan.layers]
    student = copy.deepcopy(tiny_unet)
    named = inject_peft_student(student, modules, 2, kind, seed=0)
    assert sum(p.numel() for _, p in named) == sum(adapter_param_count(s, 2, kind) for s in shapes)
    assert all(p.requires_grad for _, p in named)
    assert not any(p.requires_grad for n, p in student.named_parameters() if "lora_" not in n)
    with torch.no_grad():  # the adapter starts as the identity (B = 0; DoRA magnitude = row norms)
        assert torch.allclose(_forward(student), _forward(tiny_unet), atol=1e-5)
        for n, p in named:
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
        adapted = _forward(student)
    assert not torch.allclose(adapted, _forward(tiny_unet), atol=1e-4)
    state = merged_peft_state(student)
    assert set(state) == set(tiny_unet.state_dict())
    plain = UNet2DConditionModel.from_config(tiny_unet.config)
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.allclose(_forward(plain.eval()), adapted, atol=1e-4)
    # merging worked on a copy: the student still carries its adapter
    assert any("lora_" in n for n, _ in student.named_parameters())


def test_rank_for_budget_matches_counts():
    shapes = [(64, 64), (64, 32), (512, 64)]
    for kind in ("lora", "dora", "lorad"):
        rank = rank_for_budget(shapes, 10_000, kind)
        count = sum(adapter_param_count(s, rank, kind) for s in shapes)
        worse = [sum(adapter_param_count(s, r, kind) for s in shapes) for r in (rank - 1, rank + 1)]
        assert all(abs(count - 10_000) <= abs(w - 10_000) for w in worse)
    assert adapter_param_count((4, 6), 2, "lora") == 2 * (4 + 6)
    assert adapter_param_count((4, 6), 2, "dora") == 2 * (4 + 6) + 4
    assert adapter_param_count((4, 6), 2, "lorad") == 2 * (4 + 3)
    assert adapter_param_count((4, 3, 3, 3), 2, "lora") == 2 * (4 + 27)  # a conv kernel's fan-in is in·kh·kw
    with pytest.raises(WadiInputError, match="unknown adapter kind 'loha'"):
        adapter_param_count((4, 6), 2, "loha")


def test_peft_student_trains_in_the_vsd_loop(tmp_path):
    """distill_peft: the PEFT adapter is the student's only trained tensor set; final/ holds its merged weights."""
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tiny_pipelines import make_pipeline

    from wadi_distill.teachers.pipeline import load_teacher
    from wadi_distill.vsd.trainer import distill_peft
    from wadi_distill.vsd.trainer import DistillConfig

    teacher = make_pipeline(tmp_path / "sd", "sd")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    modules = [e.module for e in plan_from_preset(load_teacher(teacher, load_text_encoders=False).denoiser, 2).layers]
    config = DistillConfig(teacher=str(teacher), output_dir=str(tmp_path / "out"), prompts=str(prompts),
                           student_adapter="full", fake_rank=2, max_steps=2, batch_size=2, progress=False,
                           tensorboard=False, final_samples=1)
    result = distill_peft(config, kind="lora", rank=2, modules=modules)
    assert result.adapter_path is None and set(result.student_state) and all(
        "lora_" in k for k in result.student_state)
    assert any(v.abs().sum() > 0 for k, v in result.student_state.items() if "lora_B" in k)  # it trained
    merged = load_file(str(result.merged_path))
    base = load_teacher(teacher, load_text_encoders=False).denoiser.state_dict()
    assert merged.keys() == base.keys()
    assert any(not torch.equal(merged[k], base[k]) for k in base)
    with pytest.raises(WadiInputError, match="separate-student"):
        distill_peft(DistillConfig(teacher=str(teacher), output_dir=str(tmp_path / "o2"), prompts=str(prompts),
                                   rank=2), kind="lora", rank=2, modules=modules)


def test_peft_kinds_are_registered_student_kinds(tiny_unet, tmp_path):
    """student_adapter="peft-dora" builds the PEFT student from the config: the preset's layers at --rank."""
    from wadi_distill.vsd.config import DistillConfig, validate_config
    from wadi_distill.vsd.students import STUDENT_KINDS, AdapterStudent, FullStudent, PeftStudent, student_for

    assert {k: v.__name__ for k, v in STUDENT_KINDS.items()} == {
        "lorad": "AdapterStudent", "lora": "AdapterStudent", "full": "FullStudent", "peft-lora": "PeftStudent",
        "peft-dora": "PeftStudent"}
    config = DistillConfig(teacher="builtin:digits", output_dir=str(tmp_path / "out"), student_adapter="peft-dora",
                           rank=2)
    validate_config(config)
    student = student_for(config)
    assert isinstance(student, PeftStudent) and (student.kind, student.rank, student.modules) == ("dora", 2, None)
    base = tiny_unet(seed=0)
    student.attach(base, config, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert student.modules == [e.module for e in plan_from_preset(base, 2).layers]
    shapes = [tuple(e.shape) for e in plan_from_preset(base, 2).layers]
    assert sum(p.numel() for _, p in student.trainable(base)) == sum(adapter_param_count(s, 2, "dora") for s in shapes)
    assert isinstance(student_for(DistillConfig(teacher="x", output_dir="y", rank=1)), AdapterStudent)
    assert type(student_for(DistillConfig(teacher="x", output_dir="y", student_adapter="full"))) is FullStudent
    with pytest.raises(WadiInputError, match="give --rank"):
        validate_config(DistillConfig(teacher="builtin:digits", output_dir=str(tmp_path / "o2"),
                                      student_adapter="peft-lora", plan=__file__))
    with pytest.raises(WadiInputError, match="student_adapter must be one of lorad, lora, full, peft-lora, peft-dora"):
        validate_config(DistillConfig(teacher="builtin:digits", output_dir=str(tmp_path / "o3"),
                                      student_adapter="qlora", rank=2))
