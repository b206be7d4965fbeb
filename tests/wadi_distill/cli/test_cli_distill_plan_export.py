"""`wadi-distill plan` and `wadi-distill export` end to end on tiny diffusers folders (exit codes, files, messages)."""

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn
from typer.testing import CliRunner

from conftest import make_tiny_unet
from wadi_distill.lorad.serialization import save_adapter
from wadi_distill.cli import app
from wadi_distill.lorad.model import inject_lorad, lorad_layers, merge_lorad, remove_lorad
from wadi_distill.plan import Plan, plan_from_preset
from wadi_probe.rotation import rotate_pairs

runner = CliRunner()


def write_pipeline(root, unet):
    unet.save_pretrained(root / "unet")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A teacher pipeline folder, a student (teacher + planted rotations) folder, and a trained-looking adapter."""
    root = tmp_path_factory.mktemp("cli")
    teacher = make_tiny_unet()
    write_pipeline(root / "teacher", teacher)
    student = make_tiny_unet()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, m in student.named_modules():
            if isinstance(m, nn.Linear) and ".attn" in name:
                theta = 0.2 * torch.randn(m.weight.shape[0], 2, generator=g) @ torch.randn(2, m.weight.shape[1] // 2, generator=g)
                m.weight.copy_(rotate_pairs(m.weight, theta))
    student.save_pretrained(root / "student")
    adapted = make_tiny_unet()
    plan = plan_from_preset(adapted, 2)
    inject_lorad(adapted, plan, adapter_name="student", init="random", generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for layer in lorad_layers(adapted).values():
            layer.lorad_A["student"].normal_(0, 0.3, generator=g)
    save_adapter(adapted, root / "adapter", plan, adapter_name="student")
    return {"root": root, "teacher": root / "teacher", "student": root / "student", "adapter": root / "adapter", "adapted": adapted}


@pytest.fixture(scope="module")
def report_path(folders):
    from wadi_probe.analyze import compare

    path = folders["root"] / "report.json"
    compare(folders["teacher"], folders["student"], device="cpu").save(path)
    return path


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_plan_preset_json_and_file(folders, tmp_path):
    out = tmp_path / "plan.json"
    result = run("plan", "--teacher", folders["teacher"], "--preset", "paper", "--rank", 4, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    expected = plan_from_preset(make_tiny_unet(), 4)
    assert printed["trainable_params"] == expected.trainable_params
    assert [(e["module"], e["rank"], e["params"]) for e in printed["layers"]] == [(e.module, e.rank, e.params) for e in expected.layers]
    assert Plan.load(out).to_json() == printed
    table = run("plan", "--teacher", folders["teacher"] / "unet", "--preset", "paper", "--rank", 4)
    assert table.exit_code == 0, table.output
    assert f"{len(expected.layers)} layers, {expected.trainable_params:,} trainable parameters" in " ".join(table.output.split())


def test_plan_from_a_real_probe_report(folders, report_path, tmp_path):
    result = run("plan", "--teacher", folders["teacher"], "--rank-from-probe", report_path, "--budget", 0.05,
                 "--min-rank", 1, "--multiple-of", 1, "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    backbone = sum(p.numel() for p in make_tiny_unet().parameters())
    assert 0 < plan["trainable_params"] <= 0.05 * backbone
    adapted = {e["module"] for e in plan["layers"]}
    assert adapted and all(".attn" in m for m in adapted)  # only the rotated layers are worth adapting
    reasons = {s["module"]: s["reason"] for s in plan["skipped"]}
    assert any(r == "identical in teacher and student" for r in reasons.values())
    assert all(e["rank"] <= 2 for e in plan["layers"])  # planted rank 2
    table = run("plan", "--teacher", folders["teacher"], "--rank-from-probe", report_path)
    assert table.exit_code == 0 and "left out:" in table.output


def test_plan_bad_inputs_exit_2_and_write_nothing(folders, report_path, tmp_path):
    out = tmp_path / "plan.json"
    other = write_pipeline(tmp_path / "other", make_tiny_unet(block_out_channels=(16, 32), norm_num_groups=8))
    report = json.loads(report_path.read_text())
    (tmp_path / "v9.json").write_text(json.dumps({**report, "schema_version": 9}))
    (tmp_path / "broken.json").write_text(report_path.read_text()[:100])
    renamed = json.loads(json.dumps(report))
    linear_records = [r for r in renamed["layers"] if r["kind"] == "linear"]
    linear_records[0]["module"] = "down_blocks.0.not_a_layer"
    (tmp_path / "renamed.json").write_text(json.dumps(renamed))
    cases = [
        (["--teacher", folders["teacher"]], "exactly one of --preset"),
        (["--teacher", folders["teacher"], "--preset", "paper"], "needs --rank"),
        (["--teacher", other, "--rank-from-probe", report_path], "another architecture"),
        (["--teacher", folders["teacher"], "--rank-from-probe", tmp_path / "renamed.json"], "down_blocks.0.not_a_layer"),
        (["--teacher", folders["teacher"], "--rank-from-probe", tmp_path / "v9.json"], "schema_version 9"),
        (["--teacher", folders["teacher"], "--rank-from-probe", tmp_path / "broken.json"], "not valid JSON"),
        (["--teacher", folders["teacher"], "--rank-from-probe", report_path, "--budget", 1e-7], "cannot hold even one layer"),
        (["--teacher", folders["teacher"], "--rank-from-probe", report_path, "--budget", 3], "budget must be"),
        (["--teacher", tmp_path / "nowhere", "--preset", "paper", "--rank", 2], "does not exist"),
    ]
    for args, message in cases:
        result = run("plan", *args, "-o", out)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (message, result.output)
        assert "Traceback" not in result.output
        assert not out.exists()


def _teacher_state(folders):
    from safetensors.torch import load_file

    return load_file(str(folders["teacher"] / "unet" / "diffusion_pytorch_model.safetensors"))


def test_export_safetensors_matches_in_model_merge_and_loads_strictly(folders, tmp_path):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "merged.safetensors"
    result = run("export", "--teacher", folders["teacher"], "--adapter", folders["adapter"], "-o", out)
    assert result.exit_code == 0, result.output
    assert "merged" in result.output and "float32" in result.output
    teacher_sd = _teacher_state(folders)
    with safe_open(str(out), "pt") as f:
        assert sorted(f.keys()) == sorted(teacher_sd)
        merged = {k: f.get_tensor(k) for k in f.keys()}
    # the same student merged in memory, then unwrapped: identical bits
    reference = make_tiny_unet()
    reference.load_state_dict({k.replace(".base_layer", ""): v for k, v in folders["adapted"].state_dict().items() if ".lorad_" not in k})
    inject_lorad(reference, {m: layer.specs["student"].rank for m, layer in lorad_layers(folders["adapted"]).items()}, adapter_name="student")
    reference.load_state_dict(folders["adapted"].state_dict(), strict=True)
    merge_lorad(reference, "student")
    remove_lorad(reference, merge=True)
    for k, v in reference.state_dict().items():
        assert torch.equal(merged[k], v), k
    changed = [k for k in merged if not torch.equal(merged[k], teacher_sd[k])]
    assert changed and all(k.endswith(".weight") for k in changed)
    stock = UNet2DConditionModel.from_config(reference.config)
    stock.load_state_dict(merged, strict=True)


def test_export_folder_from_fp16_teacher_keeps_dtype_and_loads_with_from_pretrained(folders, tmp_path):
    from diffusers import UNet2DConditionModel

    fp16 = write_pipeline(tmp_path / "fp16", make_tiny_unet().half())
    out = tmp_path / "student_folder"
    result = run("export", "--teacher", fp16, "--adapter", folders["adapter"], "-o", out)
    assert result.exit_code == 0, result.output
    model = UNet2DConditionModel.from_pretrained(out, torch_dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in model.parameters())
    with safe_open(str(out / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}


def test_export_official_thetas_and_refusals(folders, tmp_path):
    teacher = make_tiny_unet()
    name = next(n for n, m in teacher.named_modules() if n.endswith("attn1.to_q"))
    w = dict(teacher.named_modules())[name].weight.detach()
    a, b = 0.5 * torch.randn(w.shape[0], 2), torch.randn(2, w.shape[1] // 2)
    torch.save({f"{name}.theta_a": a, f"{name}.theta_b": b}, tmp_path / "official.pt")
    out = tmp_path / "official_merged.safetensors"
    result = run("export", "--teacher", folders["teacher"], "--adapter", tmp_path / "official.pt", "-o", out)
    assert result.exit_code == 0, result.output
    assert "official theta checkpoint" in result.output and "merged 1 layers" in result.output
    with safe_open(str(out), "pt") as f:
        torch.testing.assert_close(f.get_tensor(f"{name}.weight"), rotate_pairs(w, a @ b), rtol=0, atol=0)
    # an adapter made for another base: exit 2, nothing written
    other = write_pipeline(tmp_path / "other", make_tiny_unet(cross_attention_dim=8))
    bad_out = tmp_path / "bad.safetensors"
    result = run("export", "--teacher", other, "--adapter", folders["adapter"], "-o", bad_out)
    assert result.exit_code == 2 and "does not fit this base model" in " ".join(result.output.split())
    assert not bad_out.exists() and not list(tmp_path.glob(".bad*"))
    result = run("export", "--teacher", folders["teacher"], "--adapter", tmp_path / "nope", "-o", bad_out)
    assert result.exit_code == 2 and "does not exist" in result.output
    teacher_file = folders["teacher"] / "unet" / "diffusion_pytorch_model.safetensors"
    before = teacher_file.read_bytes()
    result = run("export", "--teacher", folders["teacher"], "--adapter", folders["adapter"], "-o", teacher_file)
    assert result.exit_code == 2 and "is inside the input" in " ".join(result.output.split())
    assert teacher_file.read_bytes() == before


def test_plan_for_the_builtin_teacher():
    from wadi_distill.builtin.digits.model import load_digits

    result = run("plan", "--teacher", "builtin:digits", "--preset", "paper", "--rank", 8, "--json")
    assert result.exit_code == 0, result.output
    expected = plan_from_preset(load_digits("builtin:digits").unet, 8)
    assert json.loads(result.output)["trainable_params"] == expected.trainable_params
    result = run("plan", "--teacher", "builtin:nope", "--preset", "paper", "--rank", 8)
    assert result.exit_code == 2 and "no built-in model" in " ".join(result.output.split())
