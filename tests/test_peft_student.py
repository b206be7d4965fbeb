"""PEFT LoRA/DoRA students: parameter counts, budget matching, merge equals the adapted forward."""

from __future__ import annotations

import pytest
import torch

from wadi_distill.vsd.peft_student import inject_peft_student, merged_peft_state, peft_param_count, rank_for_budget
from wadi_distill.plan import lorad_params_for, plan_from_preset
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
    assert sum(p.numel() for _, p in named) == peft_param_count(shapes, 2, kind)
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
        count = (sum(lorad_params_for(s, rank) for s in shapes) if kind == "lorad"
                 else peft_param_count(shapes, rank, kind))
        worse = [sum(lorad_params_for(s, r) for s in shapes) if kind == "lorad" else peft_param_count(shapes, r, kind)
                 for r in (rank - 1, rank + 1)]
        assert all(abs(count - 10_000) <= abs(w - 10_000) for w in worse)
    assert peft_param_count([(4, 6)], 2, "lora") == 2 * (4 + 6)
    assert peft_param_count([(4, 6)], 2, "dora") == 2 * (4 + 6) + 4
    with pytest.raises(WadiInputError):
        peft_param_count([(4, 6)], 2, "lorad")
