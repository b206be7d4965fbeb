"""Plans: the paper preset's counts (meta device, from config dicts), plans from probe reports, budgets, bad input."""

import json

import pytest
import torch
from torch import nn

from conftest import make_tiny_unet, tiny_unet_config
from wadi_distill.lorad.config import adapter_param_count
from wadi_distill.plan import (
    Plan,
    load_model_config_only,
    model_from_config,
    plan_from_preset,
    plan_from_report,
)
from wadi_probe.errors import WadiInputError
from wadi_probe.rotation import as_matrix, pair_angles, rotate_pairs

SD15 = {"_class_name": "UNet2DConditionModel", "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
        "cross_attention_dim": 768, "attention_head_dim": 8, "sample_size": 64}
SD21 = {"_class_name": "UNet2DConditionModel", "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
        "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True, "sample_size": 96}


@pytest.mark.parametrize("config, layers, params", [(SD15, 182, 83_795_968), (SD21, 214, 94_429_184)])
def test_paper_preset_counts_on_the_meta_device(config, layers, params):
    model = model_from_config(config)
    assert next(model.parameters()).device.type == "meta"
    plan = plan_from_preset(model, 256, "paper")
    assert len(plan.layers) == layers
    assert plan.trainable_params == params
    assert all(e.rank == 256 for e in plan.layers)
    assert all(e.module.split(".")[0] in ("down_blocks", "mid_block", "up_blocks") for e in plan.layers)
    if config is SD15:
        assert plan.backbone_params == 859_520_964
        assert abs(plan.fraction - 0.0975) < 5e-4  # 9.75 % of 859.5M (the paper's SD1.5 setup, docs/design.md)
        skipped = dict(plan.skipped)
        assert "time_embedding.linear_1" in skipped


def test_paper_preset_on_a_dit_takes_the_transformer_blocks():
    from diffusers import PixArtTransformer2DModel

    with torch.device("meta"):
        dit = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                       num_layers=2, sample_size=8, cross_attention_dim=16, caption_channels=12,
                                       norm_num_groups=4)
    plan = plan_from_preset(dit, 4)
    expected = [n for n, m in dit.named_modules() if isinstance(m, nn.Linear) and n.startswith("transformer_blocks.")]
    assert [e.module for e in plan.layers] == expected and len(expected) > 0
    assert plan.trainable_params == sum(4 * (m.weight.shape[0] + m.weight.shape[1] // 2)
                                        for n, m in dit.named_modules() if n in expected)


def test_params_formula_and_conv_preset():
    assert adapter_param_count((1280, 5120), 256) == 256 * (1280 + 2560)
    assert adapter_param_count((8, 3, 3, 3), 2) == 2 * (8 + 13)
    unet = make_tiny_unet()
    plan = plan_from_preset(unet, 2, "paper-conv")
    convs = [n for n, m in unet.named_modules() if isinstance(m, nn.Conv2d) and n.startswith(("down_blocks", "up_blocks", "mid_block"))]
    assert set(convs) <= {e.module for e in plan.layers}
    with pytest.raises(WadiInputError, match="unknown preset"):
        plan_from_preset(unet, 2, "nope")


def test_plan_round_trips_through_json(tmp_path):
    plan = plan_from_preset(make_tiny_unet(), 3)
    path = plan.save(tmp_path / "plan.json")
    again = Plan.load(path)
    assert again.to_json() == plan.to_json()
    assert again.ranks() == plan.ranks()
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(WadiInputError, match="not valid JSON"):
        Plan.load(tmp_path / "bad.json")


def test_config_only_loading_from_model_folder_and_pipeline_root(tmp_path):
    config = {"_class_name": "UNet2DConditionModel", **tiny_unet_config()}
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    (tmp_path / "pipe" / "unet").mkdir(parents=True)
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    (tmp_path / "pipe" / "unet" / "config.json").write_text(json.dumps(config))
    reference = sum(p.numel() for p in make_tiny_unet().parameters())
    for folder in (tmp_path / "model", tmp_path / "pipe"):
        model = load_model_config_only(folder)
        assert all(p.device.type == "meta" for p in model.parameters())
        assert sum(p.numel() for p in model.parameters()) == reference
    with pytest.raises(WadiInputError, match="no config.json"):
        load_model_config_only(tmp_path)
    with pytest.raises(WadiInputError, match="does not exist"):
        load_model_config_only(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- reports
def _energy(theta: torch.Tensor) -> list[float]:
    s2 = torch.linalg.svdvals(theta.double()) ** 2
    if s2.sum() == 0:
        return [1.0] * s2.numel()
    return [round(float(v), 4) for v in s2.cumsum(0) / s2.sum()]


def report_for(teacher: nn.Module, student: nn.Module, schema_version=1) -> dict:
    """A report in the report.json schema with the fields plans use, computed from the definitions in docs/design.md."""
    records = []
    s_modules = dict(student.named_modules())
    for order, (name, m) in enumerate(teacher.named_modules()):
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        t = as_matrix(m.weight.detach()).double()
        s = as_matrix(s_modules[name].weight.detach()).double()
        cos = (t * s).sum(1) / (t.norm(dim=1) * s.norm(dim=1))
        curve = _energy(pair_angles(t, s))
        kind = "linear" if isinstance(m, nn.Linear) else ("conv1x1" if m.kernel_size == (1, 1) else "conv")
        records.append({"name": f"{name}.weight", "module": name, "kind": kind, "order": order,
                        "shape": list(m.weight.shape), "identical": bool(torch.equal(t, s)),
                        "direction_change_mean": float((1 - cos).mean()), "lorad_energy": curve,
                        "lorad_rank_90": next(k + 1 for k, v in enumerate(curve) if v >= 0.9)})
    return {"schema_version": schema_version, "tool": "wadi-probe", "layers": records, "summary": {}, "settings": {}}


def planted_student(teacher: nn.Module, ranks: dict[str, int], scale: dict[str, float] | None = None, seed: int = 0):
    """Copy of the teacher whose listed Linear layers are rotated by a rank-r angle field."""
    student = make_tiny_unet()
    student.load_state_dict(teacher.state_dict())
    g = torch.Generator().manual_seed(seed)
    modules = dict(student.named_modules())
    with torch.no_grad():
        for name, r in ranks.items():
            w = modules[name].weight
            theta = (scale or {}).get(name, 0.2) * torch.randn(w.shape[0], r, generator=g) @ torch.randn(r, w.shape[1] // 2, generator=g)
            w.copy_(rotate_pairs(w, theta))
    return student


def attn_linears(unet):
    return [n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and ".attn1." in n]


def test_report_plan_picks_needed_ranks_and_freezes_unchanged_layers():
    teacher = make_tiny_unet()
    names = attn_linears(teacher)[:3]
    student = planted_student(teacher, {names[0]: 1, names[1]: 3, names[2]: 2}, scale={names[2]: 1e-4})
    report = report_for(teacher, student)
    plan = plan_from_report(teacher, report, budget=1.0, threshold=0.99, min_rank=1, multiple_of=1)
    ranks = plan.ranks()
    assert ranks == {names[0]: 1, names[1]: 3}
    skipped = dict(plan.skipped)
    assert skipped[names[2]].startswith("direction hardly changed")  # tiny rotation: frozen
    others = [r["module"] for r in report["layers"] if r["kind"] == "linear" and r["module"] not in names]
    assert all(skipped[m] == "identical in teacher and student" for m in others)
    assert any("Conv2d" in reason for reason in skipped.values())
    for e in plan.layers:
        assert e.params == adapter_param_count(e.shape, e.rank) and e.energy >= 0.99


def test_report_plan_respects_the_budget_and_favours_energy_per_parameter():
    teacher = make_tiny_unet()
    names = attn_linears(teacher)
    student = planted_student(teacher, {n: 4 for n in names}, seed=3)
    report = report_for(teacher, student)
    total = sum(p.numel() for p in teacher.parameters())
    full = plan_from_report(teacher, report, budget=1.0, threshold=1.0, min_rank=1, multiple_of=1)
    assert len(full.layers) == len(names) and 4 in {e.rank for e in full.layers}
    assert all(e.rank <= 4 and e.energy == 1.0 for e in full.layers)  # planted rank 4 (curves rounded to 4 decimals)
    captured = []
    for share in (0.2, 0.5, 0.8):
        budget = share * full.trainable_params / total
        plan = plan_from_report(teacher, report, budget=budget, threshold=1.0, min_rank=1, multiple_of=1)
        assert 0 < plan.trainable_params <= budget * total
        assert plan.trainable_params < full.trainable_params
        captured.append(sum(e.energy for e in plan.layers))
    assert captured == sorted(captured) and captured[0] < captured[-1]  # more budget, more angle energy
    # rounding to a multiple and bounds
    plan = plan_from_report(teacher, report, budget=1.0, threshold=0.5, min_rank=2, max_rank=2, multiple_of=2)
    assert {e.rank for e in plan.layers} == {2}
    # one layer moved much more: with room for one, it is the one chosen
    student = planted_student(teacher, {names[0]: 1, names[1]: 1}, scale={names[0]: 0.01, names[1]: 0.5}, seed=1)
    report = report_for(teacher, student)
    per_layer = adapter_param_count(dict(teacher.named_modules())[names[1]].weight.shape, 1)
    plan = plan_from_report(teacher, report, budget=1.5 * per_layer / total, threshold=0.9, min_rank=1, multiple_of=1,
                            freeze_below=0.0)
    assert plan.ranks() == {names[1]: 1}
    assert dict(plan.skipped)[names[0]].startswith("no budget left")


def test_report_plan_bad_inputs(tmp_path):
    teacher = make_tiny_unet()
    names = attn_linears(teacher)
    report = report_for(teacher, planted_student(teacher, {names[0]: 2}))
    other = make_tiny_unet(block_out_channels=(16, 32), norm_num_groups=8)
    with pytest.raises(WadiInputError, match="another architecture"):
        plan_from_report(other, report)
    renamed = json.loads(json.dumps(report))
    renamed["layers"][0]["module"] = "down_blocks.0.nothing_here"
    renamed["layers"][1]["module"] = "mid_block.missing"
    with pytest.raises(WadiInputError, match="down_blocks.0.nothing_here, mid_block.missing"):
        plan_from_report(teacher, renamed)
    with pytest.raises(WadiInputError, match="schema_version 7"):
        plan_from_report(teacher, {**report, "schema_version": 7})
    (tmp_path / "r.json").write_text('{"schema_version": 1, "layers": [')
    with pytest.raises(WadiInputError, match="JSON"):
        plan_from_report(teacher, tmp_path / "r.json")
    with pytest.raises(WadiInputError, match="cannot hold even one layer"):
        plan_from_report(teacher, report, budget=1e-9)
    with pytest.raises(WadiInputError, match="budget must be"):
        plan_from_report(teacher, report, budget=1.5)
