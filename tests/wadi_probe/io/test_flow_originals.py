"""Flux.1 and SD3 original single files: read under diffusers names, fused tensors cut lazily, known answers."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from _flow_layouts import flux_original, sd3_original, tiny_flux, tiny_sd3
from wadi_probe.analyze import compare
from wadi_probe.cli import app
from wadi_probe.io.checkpoints import lazy_tensors, open_checkpoint, write_like
from wadi_probe.io.formats.safetensors_io import SafetensorsSource
from wadi_probe.pairing import pair_checkpoints

runner = CliRunner()
FAMILIES = {"flux": (tiny_flux, flux_original), "sd3": (tiny_sd3, sd3_original)}


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """Per family: the diffusers folder, the original file (BFL's unprefixed Flux; SD3 prefixed, with the VAE and a
    text encoder beside it), the other prefix spelling, and the teacher's state dict."""
    folder = tmp_path_factory.mktemp("flow")
    out = {}
    for family, (build, to_original) in FAMILIES.items():
        model = build(seed=3)
        model.save_pretrained(folder / family / "transformer")
        state = _state(model)
        original = to_original(state)
        if family == "sd3":  # Stability's files carry the VAE and text encoders beside the transformer
            original["first_stage_model.decoder.conv_in.weight"] = torch.randn(4, 4, 3, 3)
            original["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.randn(8)
        save_file(original, str(folder / f"{family}.safetensors"))
        # the other spelling: Flux with ComfyUI's prefix, SD3's transformer alone without it
        other = folder / f"{family}-other-prefix.safetensors"
        if family == "flux":
            save_file({"model.diffusion_model." + k: v for k, v in original.items()}, str(other))
        else:
            save_file(sd3_original(state, prefix=""), str(other))
        out[family] = {"folder": folder / family, "original": folder / f"{family}.safetensors", "other": other,
                       "state": state, "tmp": folder}
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("which", ["original", "other"])
def test_the_same_weights_in_both_layouts_read_as_identical(layouts, family, which):
    info = layouts[family]
    with open_checkpoint(info["folder"]) as folder, open_checkpoint(info[which]) as original:
        assert original.layout == family
        assert original.names() == folder.names()
        assert all(torch.equal(original.tensor(name), folder.tensor(name)) for name in folder.names())
        pairing = pair_checkpoints(folder, original)
        assert len(pairing.matched) == len(info["state"]) and pairing.unmatched == 0
        if family == "sd3" and which == "original":
            assert sorted(original.ignored_keys) == ["first_stage_model.decoder.conv_in.weight",
                                                      "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"]
    report = compare(info["folder"], info[which], spectra=False)
    layers = report.data["layers"]
    assert len(layers) == len(info["state"]) and all(layer["identical"] for layer in layers)
    if which == "other":  # one original file against the other spelling of it
        layers = compare(info["original"], info["other"], spectra=False).data["layers"]
        assert len(layers) == len(info["state"]) and all(layer["identical"] for layer in layers)


def test_fused_tensors_are_named_by_their_rows_and_read_alone(layouts, monkeypatch):
    info = layouts["flux"]
    with open_checkpoint(info["original"]) as original:
        hidden = original.shape("x_embedder.weight")[0]
        assert original.source_key("transformer_blocks.1.attn.to_k.weight") == \
            f"double_blocks.1.img_attn.qkv.weight[{hidden}:{2 * hidden}]"
        mlp = original.shape("single_transformer_blocks.0.proj_mlp.weight")[0]
        assert original.source_key("single_transformer_blocks.0.proj_mlp.bias") == \
            f"single_blocks.0.linear1.bias[{3 * hidden}:{3 * hidden + mlp}]"
        assert original.source_key("norm_out.linear.weight") == (
            f"final_layer.adaLN_modulation.1.weight[{hidden}:{2 * hidden}] + "
            f"final_layer.adaLN_modulation.1.weight[0:{hidden}]")
        # a part of a fused tensor is read as its own rows: the whole stored tensor is never read
        whole_reads = []
        real_tensor = SafetensorsSource.tensor
        monkeypatch.setattr(SafetensorsSource, "tensor", lambda self, key: whole_reads.append(key) or real_tensor(self, key))
        q = original.tensor("single_transformer_blocks.1.attn.to_q.weight")
        assert whole_reads == []
        assert torch.equal(q, info["state"]["single_transformer_blocks.1.attn.to_q.weight"])


def _direct(t: torch.Tensor, s: torch.Tensor) -> tuple[float, float]:
    """Mean relative row-norm change and mean row angle (degrees), straight from torch in float64."""
    t, s = t.double().reshape(t.shape[0], -1), s.double().reshape(s.shape[0], -1)
    tn, sn = t.norm(dim=1), s.norm(dim=1)
    cos = ((t * s).sum(dim=1) / (tn * sn)).clamp(-1, 1)
    return float(((sn - tn).abs() / tn).mean()), float(torch.rad2deg(torch.arccos(cos)).mean())


@pytest.mark.parametrize("family", FAMILIES)
def test_a_perturbed_student_in_the_original_layout_gives_the_direct_numbers(layouts, family, tmp_path):
    info = layouts[family]
    generator = torch.Generator().manual_seed(11)
    student = {}
    for name, value in info["state"].items():
        if value.ndim == 2:  # every weight matrix moves: a direction change and a row rescale
            noise = torch.randn(value.shape, generator=generator) * 0.02
            scale = 1 + 0.05 * torch.rand(value.shape[0], 1, generator=generator)
            student[name] = (value + noise) * scale
        else:
            student[name] = value.clone()
    path = tmp_path / "student.safetensors"
    save_file(FAMILIES[family][1](student), str(path))
    report = compare(info["folder"], path, spectra=False)
    layers = {layer["name"]: layer for layer in report.data["layers"]}
    assert set(layers) == set(info["state"])
    for name, value in info["state"].items():
        if value.ndim != 2:
            assert layers[name]["identical"], name
            continue
        norm_change, angle = _direct(value, student[name])
        assert math.isclose(layers[name]["norm_change_mean"], norm_change, rel_tol=1e-4), name
        assert math.isclose(layers[name]["angle_deg_mean"], angle, rel_tol=1e-3), name


@pytest.mark.parametrize("family", FAMILIES)
def test_write_like_puts_diffusers_tensors_back_into_the_fused_ones(layouts, family, tmp_path):
    info = layouts[family]
    out = tmp_path / "rewritten.safetensors"
    with open_checkpoint(info["folder"]) as folder, open_checkpoint(info["original"]) as original:
        write_like(original, lazy_tensors(folder), out)
    written, stored = SafetensorsSource(out), SafetensorsSource(info["original"])
    assert sorted(written.keys()) == sorted(stored.keys())  # the VAE / text-encoder keys are kept too
    assert all(torch.equal(written.tensor(key), stored.tensor(key)) for key in stored.keys())


def _one_sentence_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    err = " ".join(result.stderr.split())
    assert err.startswith("error:") and err.count(". ") <= 1, err
    for fragment in fragments:
        assert fragment in err, err


def _compare(teacher, student, tmp_path):
    return runner.invoke(app, ["compare", str(teacher), str(student), "-o", str(tmp_path / "r.json"), "--no-progress"])


def test_a_flux_file_missing_half_its_blocks_is_refused(layouts, tmp_path):
    info = layouts["flux"]
    original = flux_original(info["state"])
    half = {k: v for k, v in original.items() if not k.startswith(("double_blocks.0.", "single_blocks.0."))}
    save_file(half, str(tmp_path / "half.safetensors"))
    result = _compare(info["folder"], tmp_path / "half.safetensors", tmp_path)
    _one_sentence_error(result, "lacks double_blocks 0 of 0–1", "incomplete or partial file")
    assert not (tmp_path / "r.json").exists()
    # a block with tensors missing is refused the same way
    torn = {k: v for k, v in original.items() if not k.startswith("double_blocks.1.txt_attn.")}
    save_file(torn, str(tmp_path / "torn.safetensors"))
    _one_sentence_error(_compare(info["folder"], tmp_path / "torn.safetensors", tmp_path),
                        "lacks double_blocks.1.txt_attn.")


def test_a_fused_tensor_that_does_not_divide_is_refused(layouts, tmp_path):
    info = layouts["flux"]
    original = flux_original(info["state"])
    bad_qkv = dict(original)
    bad_qkv["double_blocks.0.img_attn.qkv.weight"] = bad_qkv["double_blocks.0.img_attn.qkv.weight"][:-1].contiguous()
    save_file(bad_qkv, str(tmp_path / "qkv.safetensors"))
    _one_sentence_error(_compare(info["folder"], tmp_path / "qkv.safetensors", tmp_path),
                        "double_blocks.0.img_attn.qkv.weight has 47 rows", "do not divide")
    bad_linear1 = dict(original)
    bad_linear1["single_blocks.1.linear1.weight"] = bad_linear1["single_blocks.1.linear1.weight"][:-2].contiguous()
    save_file(bad_linear1, str(tmp_path / "linear1.safetensors"))
    _one_sentence_error(_compare(info["folder"], tmp_path / "linear1.safetensors", tmp_path),
                        "single_blocks.1.linear1 has 110 rows", "do not split into q, k, v (3 × 16)")


def test_an_sd3_file_with_the_vae_only_is_refused(layouts, tmp_path):
    vae = {"first_stage_model.decoder.conv_in.weight": torch.randn(4, 4, 3, 3),
           "first_stage_model.encoder.conv_in.weight": torch.randn(4, 3, 3, 3)}
    save_file(vae, str(tmp_path / "vae.safetensors"))
    _one_sentence_error(_compare(layouts["sd3"]["folder"], tmp_path / "vae.safetensors", tmp_path),
                        "holds no denoiser, only first_stage_model.*")
    assert not (tmp_path / "r.json").exists()


# ---- transformer families in the report and the plans ------------------------------------------------------
def test_layer_types_tell_the_image_and_text_streams_apart():
    from wadi_probe.layers import block_of, layer_type_of

    cases = {
        "transformer_blocks.3.attn.to_q.weight": ("transformer.3", "attention"),
        "transformer_blocks.3.attn.add_q_proj.weight": ("transformer.3", "attention (text)"),
        "transformer_blocks.3.attn.to_add_out.weight": ("transformer.3", "attention (text)"),
        "transformer_blocks.3.ff.net.0.proj.weight": ("transformer.3", "feed-forward"),
        "transformer_blocks.3.ff_context.net.2.weight": ("transformer.3", "feed-forward (text)"),
        "transformer_blocks.3.norm1.linear.weight": ("transformer.3", "modulation"),
        "transformer_blocks.3.norm1_context.linear.weight": ("transformer.3", "modulation (text)"),
        "single_transformer_blocks.7.proj_mlp.weight": ("single.7", "feed-forward"),
        "single_transformer_blocks.7.proj_out.weight": ("single.7", "attention + feed-forward"),
        "single_transformer_blocks.7.attn.to_k.weight": ("single.7", "attention"),
        "norm_out.linear.weight": ("other", "modulation"),
        # Qwen-Image's streams, Z-Image's blocks
        "transformer_blocks.0.img_mlp.net.0.proj.weight": ("transformer.0", "feed-forward"),
        "transformer_blocks.0.txt_mlp.net.0.proj.weight": ("transformer.0", "feed-forward (text)"),
        "transformer_blocks.0.txt_mod.1.weight": ("transformer.0", "modulation (text)"),
        "layers.5.attention.to_q.weight": ("transformer.5", "attention"),
        "context_refiner.1.feed_forward.w1.weight": ("context_refiner.1", "feed-forward"),
        # a UNet's names keep their types
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight": ("down.1", "attention"),
        "down_blocks.1.attentions.0.transformer_blocks.0.norm1.weight": ("down.1", "attention"),
    }
    for name, expected in cases.items():
        assert (block_of(name), layer_type_of(name, (16, 16))) == expected, name


def test_flux_student_in_the_original_layout_gets_block_tables_rank_advice_and_a_plan(layouts, tmp_path):
    from torch import nn

    from wadi_distill.plan.from_report import plan_from_report
    from wadi_probe.report.schema import group_by_block
    from wadi_probe.rotation import rotate_pairs

    info = layouts["flux"]
    planted = {"transformer_blocks.0.attn.to_q": 1, "transformer_blocks.0.attn.add_q_proj": 2,
               "transformer_blocks.1.ff_context.net.0.proj": 3, "single_transformer_blocks.1.proj_mlp": 2}
    generator = torch.Generator().manual_seed(5)
    student = dict(info["state"])
    for module, rank in planted.items():
        w = student[f"{module}.weight"]
        theta = 0.2 * torch.randn(w.shape[0], rank, generator=generator) @ torch.randn(rank, w.shape[1] // 2,
                                                                                      generator=generator)
        student[f"{module}.weight"] = rotate_pairs(w, theta).contiguous()
    path = tmp_path / "student.safetensors"
    save_file(flux_original(student), str(path))
    report = compare(info["folder"], path)
    by_module = {layer["module"]: layer for layer in report.data["layers"] if layer["kind"] == "linear"}
    assert {m: by_module[m]["lorad_rank_90"] <= r for m, r in planted.items()} == {m: True for m in planted}
    groups = {(g["block"], g["layer_type"]): g for g in group_by_block(report.data["layers"])}
    assert groups[("transformer.0", "attention")]["identical"] == groups[("transformer.0", "attention")]["matrices"] - 1
    assert groups[("transformer.0", "attention (text)")]["matrices"] == 4  # add_q/k/v_proj, to_add_out
    assert groups[("transformer.1", "feed-forward (text)")]["identical"] == 1
    assert groups[("single.1", "feed-forward")]["identical"] == 0
    assert ("single.0", "attention + feed-forward") in groups
    model = tiny_flux(seed=3)
    plan = plan_from_report(model, report, budget=1.0, threshold=0.99, min_rank=1, multiple_of=1)
    assert plan.ranks() == planted
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {m for m, _ in plan.skipped} | set(plan.ranks()) == linears


# ---- LoRA students in these families' naming ---------------------------------------------------------------
def _lora(out: int, fan_in: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rank, fan_in, generator=generator) * 0.1, torch.randn(out, rank, generator=generator) * 0.1)


@pytest.mark.parametrize("style", ["peft-transformer-prefix", "kohya-lora-transformer", "lightning-diffusion-model"])
def test_lora_students_in_transformer_naming_merge_onto_the_teacher(layouts, tmp_path, style):
    info = layouts["flux"]
    state = info["state"]
    modules = ["transformer_blocks.1.attn.add_k_proj", "single_transformer_blocks.0.proj_mlp", "x_embedder"]
    factors, tensors, alpha = {}, {}, 4.0
    for i, module in enumerate(modules):
        out, fan_in = state[f"{module}.weight"].shape
        down, up = _lora(out, fan_in, rank=2, seed=i)
        factors[module] = (down, up)
        if style == "peft-transformer-prefix":
            tensors[f"transformer.{module}.lora_A.weight"], tensors[f"transformer.{module}.lora_B.weight"] = down, up
        elif style == "kohya-lora-transformer":
            flat = "lora_transformer_" + module.replace(".", "_")
            tensors[f"{flat}.lora_down.weight"], tensors[f"{flat}.lora_up.weight"] = down, up
            tensors[f"{flat}.alpha"] = torch.tensor(alpha)
        else:  # Qwen-Image-Lightning's files: diffusion_model. prefix, lora_down/lora_up and alpha
            tensors[f"diffusion_model.{module}.lora_down.weight"] = down
            tensors[f"diffusion_model.{module}.lora_up.weight"] = up
            tensors[f"diffusion_model.{module}.alpha"] = torch.tensor(alpha)
    path = tmp_path / "lora.safetensors"
    save_file(tensors, str(path))
    scale = 1.0 if style == "peft-transformer-prefix" else alpha / 2
    for teacher_path in (info["folder"], info["original"]):
        with open_checkpoint(teacher_path) as teacher, open_checkpoint(path, base=teacher) as merged:
            assert merged.adapted_names() == sorted((f"{m}.weight" for m in modules), key=merged.names().index)
            for module, (down, up) in factors.items():
                expected = state[f"{module}.weight"] + scale * up @ down
                assert torch.allclose(merged.tensor(f"{module}.weight"), expected, atol=1e-6), module
    report = compare(info["original"], path, student_is_adapter=True, spectra=False)
    changed = {layer["module"] for layer in report.data["layers"] if not layer["identical"]}
    assert changed == set(modules)


def test_a_kohya_lora_on_flux_fused_modules_is_split_by_rows(layouts, tmp_path):
    info = layouts["flux"]
    state = info["state"]
    hidden = state["x_embedder.weight"].shape[0]
    mlp = state["single_transformer_blocks.1.proj_mlp.weight"].shape[0]
    qkv_down, qkv_up = _lora(3 * hidden, hidden, rank=3, seed=7)
    l1_down, l1_up = _lora(3 * hidden + mlp, hidden, rank=2, seed=8)
    tensors = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": qkv_down,
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": qkv_up,
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(3.0),
        "lora_unet_single_blocks_1_linear1.lora_down.weight": l1_down,
        "lora_unet_single_blocks_1_linear1.lora_up.weight": l1_up,
        "lora_unet_single_blocks_1_linear1.alpha": torch.tensor(1.0),
    }
    path = tmp_path / "kohya-flux.safetensors"
    save_file(tensors, str(path))
    fused_delta = {"transformer_blocks.0.attn": qkv_up @ qkv_down, "single_transformer_blocks.1": 0.5 * l1_up @ l1_down}
    expected = {}
    for i, x in enumerate("qkv"):
        rows = slice(i * hidden, (i + 1) * hidden)
        expected[f"transformer_blocks.0.attn.to_{x}.weight"] = fused_delta["transformer_blocks.0.attn"][rows]
        expected[f"single_transformer_blocks.1.attn.to_{x}.weight"] = fused_delta["single_transformer_blocks.1"][rows]
    expected["single_transformer_blocks.1.proj_mlp.weight"] = fused_delta["single_transformer_blocks.1"][3 * hidden:]
    with open_checkpoint(info["original"]) as teacher, open_checkpoint(path, base=teacher) as merged:
        assert set(merged.adapted_names()) == set(expected)
        for name, delta in expected.items():
            assert torch.allclose(merged.tensor(name), state[name] + delta, atol=1e-6), name
    # against the diffusers folder the fused rows cannot be placed: one sentence, exit 2
    result = _compare(info["folder"], path, tmp_path)
    _one_sentence_error(result, "original single-file layout", "give the teacher as that original file")


def test_the_paper_preset_adapts_the_linear_layers_of_transformer_blocks():
    from torch import nn

    from wadi_distill.plan.presets import plan_from_preset

    flux = tiny_flux(seed=0)
    plan = plan_from_preset(flux, rank=2)
    in_blocks = {n for n, m in flux.named_modules() if isinstance(m, nn.Linear)
                 and n.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    assert set(plan.ranks()) == in_blocks and len(in_blocks) == 2 * 14 + 2 * 6  # per double block 14 Linears, per single 6
    # Z-Image's blocks: layers.N and the two refiners (a stand-in with its module names)
    zimage = nn.Module()
    for root in ("layers", "noise_refiner", "context_refiner"):
        block = nn.Module()
        block.attention = nn.Module()
        block.attention.to_q = nn.Linear(8, 8)
        setattr(zimage, root, nn.ModuleList([block]))
    zimage.x_embedder = nn.Linear(4, 8)
    plan = plan_from_preset(zimage, rank=2)
    assert set(plan.ranks()) == {"layers.0.attention.to_q", "noise_refiner.0.attention.to_q",
                                 "context_refiner.0.attention.to_q"}


def test_a_lora_merged_onto_an_original_file_is_written_back_in_its_layout(layouts, tmp_path):
    info = layouts["flux"]
    down, up = _lora(16, 16, rank=2, seed=4)
    save_file({"transformer_blocks.0.attn.to_v.lora_A.weight": down, "transformer_blocks.0.attn.to_v.lora_B.weight": up},
              str(tmp_path / "lora.safetensors"))
    out = tmp_path / "merged.safetensors"
    with open_checkpoint(info["original"]) as teacher, open_checkpoint(tmp_path / "lora.safetensors", base=teacher) as merged:
        write_like(merged, lazy_tensors(merged), out)
    written, stored = SafetensorsSource(out), SafetensorsSource(info["original"])
    assert sorted(written.keys()) == sorted(stored.keys())
    qkv = stored.tensor("double_blocks.0.img_attn.qkv.weight")
    qkv[32:48] += up @ down
    assert torch.allclose(written.tensor("double_blocks.0.img_attn.qkv.weight"), qkv, atol=1e-6)
    assert all(torch.equal(written.tensor(k), stored.tensor(k)) for k in stored.keys() if k != "double_blocks.0.img_attn.qkv.weight")


def test_a_kohya_lora_on_sd3_joint_blocks_is_split_by_rows(layouts, tmp_path):
    info = layouts["sd3"]
    state = info["state"]
    hidden = state["context_embedder.weight"].shape[0]
    down, up = _lora(3 * hidden, hidden, rank=2, seed=9)
    flat = "lora_unet_joint_blocks_1_context_block_attn_qkv"
    save_file({f"{flat}.lora_down.weight": down, f"{flat}.lora_up.weight": up, f"{flat}.alpha": torch.tensor(1.0)},
              str(tmp_path / "kohya-sd3.safetensors"))
    with open_checkpoint(info["original"]) as teacher, open_checkpoint(tmp_path / "kohya-sd3.safetensors", base=teacher) as merged:
        for i, x in enumerate("qkv"):
            name = f"transformer_blocks.1.attn.add_{x}_proj.weight"
            expected = state[name] + 0.5 * (up @ down)[i * hidden:(i + 1) * hidden]
            assert torch.allclose(merged.tensor(name), expected, atol=1e-6), name
        assert len(merged.adapted_names()) == 3


def test_an_original_file_saved_by_torch_reads_the_same(layouts, tmp_path):
    info = layouts["flux"]
    path = tmp_path / "flux1.ckpt"
    torch.save({"state_dict": {"model.diffusion_model." + k: v for k, v in flux_original(info["state"]).items()}}, path)
    with open_checkpoint(path) as original:
        assert original.layout == "flux" and set(original.names()) == set(info["state"])
        assert all(torch.equal(original.tensor(name), value) for name, value in info["state"].items())
