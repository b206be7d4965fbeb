"""`wadi-distill export --format ldm [--into]` and the transfer check, on tiny SD1/SD2/SDXL-layout UNets."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from tiny_pipelines import random_lorad_adapter as _adapter, tiny_unet
from wadi_distill.cli import app
from wadi_probe.io.ldm import diffusers_to_ldm_names
from wadi_probe.rotation import rotate_pairs

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _sd15_layout():
    """SD1.5's block structure (4 blocks, 2 layers each, attention in the first three) at a tiny width."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, block_out_channels=(8, 8, 16, 16), layers_per_block=2, norm_num_groups=4,
                                cross_attention_dim=16, attention_head_dim=4)


def _teacher(tmp_path, kind):
    torch.manual_seed(0)
    unet = _sd15_layout() if kind == "sd15-layout" else tiny_unet(kind)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    unet.save_pretrained(tmp_path / "teacher" / "unet")
    return unet, tmp_path / "teacher"


def _original_checkpoint(state, path, dtype=torch.float16):
    """An original SD single file: the UNet under LDM names (fp16) beside VAE and text-encoder tensors."""
    names = diffusers_to_ldm_names(state)
    tensors = {f"model.diffusion_model.{names[k]}": v.to(dtype).contiguous() for k, v in state.items()}
    g = torch.Generator().manual_seed(5)
    tensors["first_stage_model.decoder.conv_in.weight"] = torch.randn(4, 4, 3, 3, generator=g).half()
    tensors["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.randn(10, 16, generator=g)
    tensors["model_ema.decay"] = torch.tensor(0.999)
    tensors["model_ema.diffusion_modelconv_inweight"] = torch.zeros(2)
    save_file(tensors, str(path), metadata={"modelspec.title": "teacher"})
    return path


@pytest.mark.parametrize("kind", ["sd", "sd2", "sdxl", "sd15-layout"])
def test_ldm_export_reads_back_through_diffusers_from_single_file(tmp_path, kind):
    from diffusers import UNet2DConditionModel

    unet, teacher = _teacher(tmp_path, kind)
    adapter = _adapter(unet, tmp_path / "adapter")
    diffusers_out, ldm_out = tmp_path / "student_diffusers", tmp_path / "student.safetensors"
    assert run("export", "--teacher", teacher, "--adapter", adapter, "-o", diffusers_out).exit_code == 0
    result = run("export", "--teacher", teacher, "--adapter", adapter, "-o", ldm_out, "--format", "ldm")
    assert result.exit_code == 0, result.output
    assert "UNet tensors under LDM names" in result.output and "UNet only" in result.output
    with safe_open(str(ldm_out), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("model.diffusion_model.") for k in keys)
    if kind == "sdxl":
        assert "model.diffusion_model.label_emb.0.0.weight" in keys
    # diffusers' own loader, offline, with the teacher's local config
    loaded = UNet2DConditionModel.from_single_file(str(ldm_out), config=str(teacher), subfolder="unet", local_files_only=True)
    expected = load_file(str(diffusers_out / "diffusion_pytorch_model.safetensors"))
    state = loaded.state_dict()
    assert sorted(state) == sorted(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert any(not torch.equal(expected[k], v) for k, v in unet.state_dict().items())  # the adapter did change it


def test_ldm_export_into_the_teachers_checkpoint_keeps_everything_else_byte_identical(tmp_path):
    unet, teacher = _teacher(tmp_path, "sd")
    adapter = _adapter(unet, tmp_path / "adapter")
    original = _original_checkpoint(unet.state_dict(), tmp_path / "teacher_original.safetensors")
    out = tmp_path / "complete.safetensors"
    result = run("export", "--teacher", teacher, "--adapter", adapter, "-o", out, "--format", "ldm", "--into", original)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "2 other tensors copied unchanged, 2 EMA tensors left out" in text and "float16" in text
    diffusers_out = tmp_path / "merged.safetensors"
    assert run("export", "--teacher", teacher, "--adapter", adapter, "-o", diffusers_out).exit_code == 0
    merged = load_file(str(diffusers_out))
    names = diffusers_to_ldm_names(merged)
    written, source = load_file(str(out)), load_file(str(original))
    assert sorted(written) == sorted(k for k in source if not k.startswith("model_ema."))
    for key, value in source.items():
        if key.startswith("model.diffusion_model.") or key.startswith("model_ema."):
            continue
        assert value.dtype == written[key].dtype and value.numpy().tobytes() == written[key].numpy().tobytes(), key
    for name, value in merged.items():
        got = written["model.diffusion_model." + names[name]]
        assert got.dtype == torch.float16 and torch.equal(got, value.half()), name
    from diffusers import UNet2DConditionModel

    loaded = UNet2DConditionModel.from_single_file(str(out), config=str(teacher), subfolder="unet", local_files_only=True,
                                                   torch_dtype=torch.float16).state_dict()
    assert all(torch.equal(loaded[k], v.half()) for k, v in merged.items())
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["modelspec.title"] == "teacher"
    # written with the modes the umask allows (a checkpoint shared with ComfyUI running as another user)
    import os
    import stat

    previous = os.umask(0o027)
    try:
        shared = tmp_path / "shared.safetensors"
        assert run("export", "--teacher", teacher, "--adapter", adapter, "-o", shared, "--format", "ldm").exit_code == 0
        assert stat.S_IMODE(shared.stat().st_mode) == 0o640
    finally:
        os.umask(previous)


def test_ldm_export_refusals_exit_2_and_write_nothing(tmp_path):
    unet, teacher = _teacher(tmp_path, "sd")
    adapter = _adapter(unet, tmp_path / "adapter")
    other = tiny_unet("sd2")  # linear projections: same names, other shapes
    mismatched = _original_checkpoint(other.state_dict(), tmp_path / "other.safetensors")
    no_unet = tmp_path / "vae_only.safetensors"
    save_file({"first_stage_model.decoder.conv_in.weight": torch.zeros(2, 2)}, str(no_unet))
    out = tmp_path / "out.safetensors"
    cases = [
        (["--into", mismatched], "does not match the student's"),
        (["--into", no_unet], "holds no model.diffusion_model"),
        (["--into", tmp_path / "missing.safetensors"], "--into must be an existing"),
        (["--format", "comfy"], "unknown format 'comfy'; use diffusers or ldm"),
    ]
    for extra, message in cases:
        args = ["export", "--teacher", teacher, "--adapter", adapter, "-o", out]
        if extra[0] == "--into":
            args += ["--format", "ldm"]
        result = run(*args, *extra)
        assert result.exit_code == 2, (extra, result.output)
        assert message in " ".join(result.output.split()) and "Traceback" not in result.output
        assert not out.exists() and not list(tmp_path.glob(".out*"))
    result = run("export", "--teacher", teacher, "--adapter", adapter, "-o", out, "--into", mismatched)
    assert result.exit_code == 2 and "use it with --format ldm" in result.output
    from tiny_pipelines import tiny_pixart
    from wadi_distill.single_file import ldm_unet_keys
    from wadi_probe.errors import WadiInputError

    with pytest.raises(WadiInputError, match="layout of SD1.x/2.x/XL UNets only"):
        ldm_unet_keys({k: tuple(v.shape) for k, v in tiny_pixart().state_dict().items()})


def test_export_onto_a_finetune_says_how_far_it_is_from_the_training_teacher(tmp_path, monkeypatch):
    unet, teacher = _teacher(tmp_path, "sd")
    adapter = _adapter(unet, tmp_path / "final")
    (adapter / "training.json").write_text(json.dumps({"teacher": str(teacher)}))
    finetune = type(unet).from_config(unet.config)
    finetune.load_state_dict(unet.state_dict())
    with torch.no_grad():
        for name, m in finetune.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.add_(0.02 * torch.randn_like(m.weight))
    finetune.save_pretrained(tmp_path / "finetune" / "unet")
    on_teacher, on_finetune = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    same = run("export", "--teacher", teacher, "--adapter", adapter, "-o", on_teacher)
    assert same.exit_code == 0 and "not the teacher" not in same.output
    monkeypatch.setenv("COLUMNS", "80")
    result = run("export", "--teacher", tmp_path / "finetune", "--adapter", adapter, "-o", on_finetune)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "is not the teacher the adapter was trained on" in text and "weight matrices" in text
    # direct check: what the export did to the fine-tune's change D, from the two written files
    a, b, t, f = load_file(str(on_teacher)), load_file(str(on_finetune)), unet.state_dict(), finetune.state_dict()
    dot = total = 0.0
    for name in t:
        if t[name].ndim < 2:
            continue
        change = (f[name] - t[name]).double()
        dot += float(((b[name] - a[name]).double() * change).sum())
        total += float((change * change).sum())
    assert f"cosine {dot / total:.4f}" in text and dot / total < 0.9999
    # norms of D are kept exactly by the rotation
    layer = next(n for n in lorad_layers_modules(adapter) if n + ".weight" in t)
    moved = (b[layer + ".weight"] - a[layer + ".weight"]).double()
    torch.testing.assert_close(moved.norm(), (f[layer + ".weight"] - t[layer + ".weight"]).double().norm(), rtol=1e-5, atol=0)
    # another architecture than the training teacher: one sentence, exit 2
    wide = tiny_unet("sd2")
    wide.save_pretrained(tmp_path / "wide" / "unet")
    bad = run("export", "--teacher", tmp_path / "wide", "--adapter", adapter, "-o", tmp_path / "c.safetensors")
    assert bad.exit_code == 2 and "not the architecture of the training teacher" in " ".join(bad.output.split())
    assert not (tmp_path / "c.safetensors").exists()
    # a recorded teacher that is not on this machine
    (adapter / "training.json").write_text(json.dumps({"teacher": "someone/sd-model"}))
    far = run("export", "--teacher", tmp_path / "finetune", "--adapter", adapter, "-o", tmp_path / "d.safetensors")
    assert far.exit_code == 0 and "which is not on this machine" in " ".join(far.output.split())


def lorad_layers_modules(adapter):
    return list(json.loads((adapter / "adapter_config.json").read_text())["target_modules"])


def test_rotation_is_linear_so_the_finetune_change_is_rotated_with_its_norm():
    w, d = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    theta = torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(rotate_pairs(w + d, theta), rotate_pairs(w, theta) + rotate_pairs(d, theta))
    torch.testing.assert_close(rotate_pairs(d, theta).norm(dim=1), d.norm(dim=1))
