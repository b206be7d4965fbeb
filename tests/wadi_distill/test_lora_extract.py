"""`wadi-distill extract-lora`: known SVD answers, diffusers' loader, the probe, kohya layout, bad input."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tiny_pipelines import make_pipeline
from wadi_distill.cli import app
from wadi_distill.lora_extract import extract_lora, low_rank_factors

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny SD pipeline (teacher) and a full fine-tune of its UNet (every weight, bias and norm moved)."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("extract")
    make_pipeline(root / "teacher", "sd")
    student = UNet2DConditionModel.from_pretrained(root / "teacher" / "unet")
    torch.manual_seed(3)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    student.save_pretrained(root / "student")
    return root


def test_truncated_svd_error_is_the_eckart_young_optimum():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(24, 40, generator=g, dtype=torch.float64)
    s = np.linalg.svd(delta.numpy(), compute_uv=False)
    for rank in (1, 5, 24):
        down, up, method = low_rank_factors(delta, rank=rank)
        error = float((delta.float() - up @ down).norm() / delta.norm())
        assert method == "svd" and down.shape == (rank, 40) and up.shape == (24, rank)
        assert error == pytest.approx(np.sqrt((s[rank:] ** 2).sum() / (s ** 2).sum()), abs=1e-5)
    share = np.cumsum(s ** 2) / (s ** 2).sum()
    down, _, _ = low_rank_factors(delta, energy=0.9)
    assert down.shape[0] == int(np.searchsorted(share, 0.9)) + 1
    assert share[down.shape[0] - 1] >= 0.9 > share[down.shape[0] - 2]
    # a big matrix at a small rank goes randomized and still reaches the optimum for a planted low rank + noise
    big = torch.randn(600, 8, generator=g) @ torch.randn(8, 640, generator=g) + 1e-3 * torch.randn(600, 640, generator=g)
    down, up, method = low_rank_factors(big, rank=8)
    optimum = np.sqrt((np.linalg.svd(big.double().numpy(), compute_uv=False)[8:] ** 2).sum()) / float(big.double().norm())
    assert method == "randomized" and float((big - up @ down).norm() / big.norm()) == pytest.approx(optimum, rel=1e-3)
    # --energy on a big matrix: the rank from its spectrum (the Gram's eigenvalues), the factors randomized
    s_big = np.linalg.svd(big.double().numpy(), compute_uv=False)
    share_big = np.cumsum(s_big ** 2) / (s_big ** 2).sum()
    down, up, method = low_rank_factors(big, energy=0.999)
    assert down.shape[0] == int(np.searchsorted(share_big, 0.999)) + 1 and method == "randomized"
    assert float((big - up @ down).norm() / big.norm()) <= np.sqrt(1 - 0.999) * 1.01


def test_extracted_lora_loads_in_diffusers_and_gives_the_recorded_error(pair, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    out = tmp_path / "lora.safetensors"
    result = run("extract-lora", "--teacher", pair / "teacher", "--student", pair / "student", "-o", out,
                 "--rank", 4, "--dtype", "float32")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "lora.json").read_text())
    text = " ".join(result.output.split())
    assert f"total relative error ‖ΔW − B·A‖/‖ΔW‖ {record['total_relative_error']:.4f}" in text
    assert f"({out.stat().st_size / 1e6:.2f} MB)" in text and record["bytes"] == out.stat().st_size
    assert all(layer["rank"] == min(4, layer["full_rank"]) for layer in record["layers"])
    teacher = UNet2DConditionModel.from_pretrained(pair / "teacher" / "unet").state_dict()
    student = UNet2DConditionModel.from_pretrained(pair / "student").state_dict()
    pipe = StableDiffusionPipeline.from_pretrained(pair / "teacher")
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = pipe.unet.state_dict()
    residual = delta = 0.0
    for layer in record["layers"]:
        name = layer["module"] + ".weight"
        d, e = (student[name] - teacher[name]).double(), (student[name] - fused[name]).double()
        assert float(e.norm() / d.norm()) == pytest.approx(layer["relative_error"], rel=1e-3, abs=1e-6), name
        residual, delta = residual + float(e.square().sum()), delta + float(d.square().sum())
    assert np.sqrt(residual / delta) == pytest.approx(record["total_relative_error"], rel=1e-4)
    # the probe reads the same file as an adapter and reports what the record says
    from wadi_probe.analyze import compare
    from wadi_probe.io.checkpoints import open_checkpoint

    with open_checkpoint(pair / "teacher") as t:
        merged = open_checkpoint(out, base=t)
        report = compare(merged, pair / "student", spectra=False, device="cpu")
    by_module = {r["name"][: -len(".weight")]: r for r in report.layers if r["name"].endswith(".weight")}
    for layer in record["layers"]:
        probed = by_module[layer["module"]]
        assert probed["matrix_direction_change"] == pytest.approx(layer["probe_direction_change"], rel=1e-6, abs=1e-12)
        assert probed["matrix_norm_change"] == pytest.approx(layer["probe_norm_change"], rel=1e-6, abs=1e-12)
    probe_cli = __import__("wadi_probe.cli", fromlist=["app"]).app
    shown = runner.invoke(probe_cli, ["compare", str(pair / "teacher"), str(out), "--adapter", "--no-spectra"])
    assert shown.exit_code == 0, shown.output
    assert f"over {len(record['layers'])} weight matrices" in " ".join(shown.output.split())


def test_full_energy_reproduces_a_lorad_adapter_student_and_fp16_rounding_is_the_floor(tmp_path):
    from diffusers import UNet2DConditionModel

    from wadi_distill.lorad.model import inject_lorad, lorad_layers
    from wadi_distill.lorad.serialization import save_adapter
    from wadi_distill.plan import plan_from_preset

    make_pipeline(tmp_path / "teacher", "sd")
    model = UNet2DConditionModel.from_pretrained(tmp_path / "teacher" / "unet")
    plan = plan_from_preset(model, 2)
    inject_lorad(model, plan, adapter_name="student", init="random", generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for layer in lorad_layers(model).values():
            layer.lorad_A["student"].normal_(0, 0.3)
    save_adapter(model, tmp_path / "final", plan, adapter_name="student")
    result = extract_lora(tmp_path / "teacher", tmp_path / "final", tmp_path / "lora.safetensors", energy=1.0,
                          dtype="float16")
    assert len(result.layers) == len(plan.layers) and result.unchanged_matrices > 0
    assert result.rounding_error > 0 and result.total_relative_error < 5 * result.rounding_error
    assert not result.extra_tensors and not result.dropped_tensors  # a LoRaD adapter changes weights only


def test_kohya_layout_with_exact_deltas_and_without(pair, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    out = tmp_path / "kohya.safetensors"
    result = extract_lora(pair / "teacher", pair / "student", out, rank=2, format="kohya", dtype="float32")
    tensors = load_file(str(out))
    teacher = UNet2DConditionModel.from_pretrained(pair / "teacher" / "unet").state_dict()
    student = UNet2DConditionModel.from_pretrained(pair / "student").state_dict()
    norm = "down_blocks.0.resnets.0.norm1"
    torch.testing.assert_close(tensors[f"lora_unet_{norm.replace('.', '_')}.diff"], student[norm + ".weight"] - teacher[norm + ".weight"])
    conv = "down_blocks.0.resnets.0.conv1"
    flat = f"lora_unet_{conv.replace('.', '_')}"
    assert tensors[f"{flat}.lora_down.weight"].shape == (2, 8, 3, 3) and tensors[f"{flat}.lora_up.weight"].shape == (8, 2, 1, 1)
    assert float(tensors[f"{flat}.alpha"]) == 2.0
    torch.testing.assert_close(tensors[f"{flat}.diff_b"], student[conv + ".bias"] - teacher[conv + ".bias"])
    assert result.extra_tensors and not result.dropped_tensors
    # the probe reads the kohya file too, merging exactly teacher + up·down
    from wadi_probe.io.checkpoints import open_checkpoint

    with open_checkpoint(pair / "teacher") as base:
        merged = open_checkpoint(out, base=base).tensor(conv + ".weight")
    up, down = tensors[f"{flat}.lora_up.weight"].reshape(8, 2), tensors[f"{flat}.lora_down.weight"].reshape(2, -1)
    torch.testing.assert_close(merged, teacher[conv + ".weight"] + (up @ down).reshape(merged.shape))
    plain = extract_lora(pair / "teacher", pair / "student", tmp_path / "plain.safetensors", rank=2, format="kohya",
                         dtype="float32", deltas=False)
    assert len(plain.dropped_tensors) == len(result.extra_tensors)
    pipe = StableDiffusionPipeline.from_pretrained(pair / "teacher")
    pipe.load_lora_weights(str(tmp_path / "plain.safetensors"))  # diffusers' kohya converter reads it
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = pipe.unet.state_dict()
    name = conv + ".weight"
    e, d = student[name] - fused[name], student[name] - teacher[name]
    assert float(e.norm() / d.norm()) == pytest.approx(next(entry.relative_error for entry in plain.layers if entry.module == conv), rel=1e-3)


def test_bad_input_is_one_sentence_exit_2_and_writes_nothing(pair, tmp_path):
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel.from_pretrained(pair / "teacher" / "unet")
    other = UNet2DConditionModel.from_config({**other.config, "cross_attention_dim": 8})
    other.save_pretrained(tmp_path / "other")
    out = tmp_path / "lora.safetensors"
    cases = [
        (["--student", tmp_path / "other", "--rank", 2], "not the teacher's architecture"),
        (["--student", pair / "student", "--rank", 999], "larger than any layer of this model allows"),
        (["--student", pair / "student", "--energy", 1.5], "must be in (0, 1]"),
        (["--student", pair / "student"], "exactly one of --rank and --energy"),
        (["--student", pair / "student", "--rank", 2, "--format", "webui"], "unknown format 'webui'; use diffusers or kohya"),
        (["--student", tmp_path / "missing", "--rank", 2], "does not exist"),
        (["--student", pair / "teacher", "--rank", 2], "nothing to extract"),
    ]
    for args, message in cases:
        result = run("extract-lora", "--teacher", pair / "teacher", *args, "-o", out)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()) and "Traceback" not in result.output
        assert not out.exists() and not (tmp_path / "lora.json").exists()


def test_a_single_file_ldm_student_gives_the_same_lora_as_its_diffusers_folder(pair, tmp_path):
    from wadi_distill.single_file import export_single_file

    ldm = export_single_file(pair / "student", None, tmp_path / "student-ldm.safetensors").path
    a = extract_lora(pair / "teacher", pair / "student", tmp_path / "a.safetensors", rank=3, dtype="float32")
    b = extract_lora(pair / "teacher", ldm, tmp_path / "b.safetensors", rank=3, dtype="float32")
    assert [(x.module, x.rank, x.relative_error) for x in a.layers] == [(x.module, x.rank, x.relative_error) for x in b.layers]
    assert load_file(str(tmp_path / "a.safetensors")).keys() == load_file(str(tmp_path / "b.safetensors")).keys()


def test_the_printed_table_keeps_every_column_piped_at_80_columns(pair, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "lora.safetensors"
    env = {**os.environ, "COLUMNS": "80"}
    done = subprocess.run([sys.executable, "-c", "from wadi_distill.cli import main; main()", "extract-lora",
                           "--teacher", str(pair / "teacher"), "--student", str(pair / "student"), "-o", str(out),
                           "--rank", "4", "--top", "3"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    header = next(line for line in lines if line.lstrip().startswith("layer"))
    assert header.split() == ["layer", "shape", "rank", "of", "error"]
    worst = max(json.loads((tmp_path / "lora.json").read_text())["layers"], key=lambda layer: layer["relative_error"])
    assert f"{worst['relative_error']:.4f}" in done.stdout and "…" not in done.stdout
