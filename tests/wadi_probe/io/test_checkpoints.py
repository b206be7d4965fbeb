"""Checkpoint readers: every layout gives the same names and bit-identical tensors; bad inputs get one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_tiny_unet, to_ldm_state
from wadi_probe.io.checkpoints import open_checkpoint, write_like
from wadi_probe.errors import WadiInputError


@pytest.fixture(scope="module")
def unet_state() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in make_tiny_unet(seed=1).state_dict().items()}


def assert_same_tensors(checkpoint, state: dict[str, torch.Tensor]) -> None:
    assert sorted(checkpoint.names()) == sorted(state)
    for name, expected in state.items():
        assert checkpoint.shape(name) == tuple(expected.shape)
        assert checkpoint.dtype(name) == expected.dtype
        got = checkpoint.tensor(name)
        assert got.dtype == expected.dtype and torch.equal(got, expected), name


def test_single_safetensors_file(tmp_path: Path, unet_state) -> None:
    path = tmp_path / "unet.safetensors"
    save_file(unet_state, str(path))
    with open_checkpoint(path) as ckpt:
        assert ckpt.layout == "safetensors"
        assert_same_tensors(ckpt, unet_state)
        name = "down_blocks.0.attentions.0.proj_in.weight"
        assert ckpt.source_key(name) == name


def test_diffusers_folder_model_and_pipeline_root(tmp_path: Path, tiny_unet) -> None:
    unet = tiny_unet(seed=2)
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    state = unet.state_dict()
    for path in (tmp_path / "pipe", tmp_path / "pipe" / "unet"):
        with open_checkpoint(path) as ckpt:
            assert ckpt.layout == "diffusers"
            assert_same_tensors(ckpt, state)


def test_fp16_variant_and_sharded_folders(tmp_path: Path, tiny_unet) -> None:
    unet = tiny_unet(seed=3)
    half = tiny_unet(seed=3).half()
    half.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert (tmp_path / "fp16" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    with open_checkpoint(tmp_path / "fp16") as ckpt:
        assert ckpt.layout == "diffusers"
        assert_same_tensors(ckpt, half.state_dict())
        assert ckpt.dtype("conv_in.weight") == torch.float16

    half.save_pretrained(tmp_path / "fp16-sharded", variant="fp16", max_shard_size="20KB")
    assert (tmp_path / "fp16-sharded" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    with open_checkpoint(tmp_path / "fp16-sharded") as ckpt:
        assert ckpt.layout == "diffusers-sharded"
        assert_same_tensors(ckpt, half.state_dict())

    unet.save_pretrained(tmp_path / "pipe" / "unet", max_shard_size="20KB")
    index = tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    shards = set(json.loads(index.read_text())["weight_map"].values())
    assert len(shards) > 2
    with open_checkpoint(tmp_path / "pipe") as ckpt:
        assert ckpt.layout == "diffusers-sharded"
        assert_same_tensors(ckpt, unet.state_dict())
        assert len({ckpt.source_file(n) for n in ckpt.names()}) == len(shards)


def test_torch_files_nested_and_prefixed(tmp_path: Path, unet_state) -> None:
    bf16 = {k: v.to(torch.bfloat16) for k, v in unet_state.items()}
    nested = {"epoch": 3, "state_dict": {f"module.unet.{k}": v for k, v in bf16.items()}}
    torch.save(nested, tmp_path / "train.ckpt")
    with open_checkpoint(tmp_path / "train.ckpt") as ckpt:
        assert ckpt.layout == "torch"
        assert_same_tensors(ckpt, bf16)
        assert ckpt.source_key("conv_in.weight") == "module.unet.conv_in.weight"
    torch.save({f"model.{k}": v for k, v in unet_state.items()}, tmp_path / "plain.pt")
    with open_checkpoint(tmp_path / "plain.pt") as ckpt:
        assert_same_tensors(ckpt, unet_state)


def test_whole_pipeline_file_keeps_only_the_unet(tmp_path: Path, unet_state) -> None:
    state = {f"unet.{k}": v for k, v in unet_state.items()}
    state["text_encoder.embeddings.weight"] = torch.ones(4, 2)
    save_file(state, str(tmp_path / "pipe.safetensors"))
    with open_checkpoint(tmp_path / "pipe.safetensors") as ckpt:
        assert_same_tensors(ckpt, unet_state)
        assert ckpt.ignored_keys == ["text_encoder.embeddings.weight"]


SDXL_LIKE = {
    "block_out_channels": (8, 16, 16),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 1, 2),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 4,
    "projection_class_embeddings_input_dim": 40,
}


SD1_LIKE: dict = {}
SD2_LIKE = {"use_linear_projection": True, "transformer_layers_per_block": 2}
# the first attention's proj_in, in both namings (SDXL's first down block has no attention; 2 resnets + downsampler)
FIRST_PROJ_IN = {
    id(SD1_LIKE): ("down_blocks.0.attentions.0.proj_in.weight", "input_blocks.1.1.proj_in.weight"),
    id(SD2_LIKE): ("down_blocks.0.attentions.0.proj_in.weight", "input_blocks.1.1.proj_in.weight"),
    id(SDXL_LIKE): ("down_blocks.1.attentions.0.proj_in.weight", "input_blocks.4.1.proj_in.weight"),
}


@pytest.mark.parametrize("overrides", [SD1_LIKE, SD2_LIKE, SDXL_LIKE],
                         ids=["sd1-conv-proj", "sd2-linear-proj", "sdxl-like"])
def test_ldm_single_file_maps_to_diffusers_names(tmp_path: Path, tiny_unet, overrides) -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from conftest import tiny_unet_config
    from wadi_probe.io.ldm import infer_unet_config
    from wadi_probe.pairing import pair_checkpoints

    unet = tiny_unet(seed=4, **overrides)
    state = unet.state_dict()
    ldm = to_ldm_state(state)
    # the fixture itself is checked against diffusers' own LDM converter
    converted = convert_ldm_unet_checkpoint(ldm, tiny_unet_config(**overrides))
    assert set(converted) == set(state) and all(torch.equal(converted[k], state[k]) for k in state)

    save_file(ldm, str(tmp_path / "sd.safetensors"))
    unet.save_pretrained(tmp_path / "diffusers")
    with open_checkpoint(tmp_path / "sd.safetensors") as ckpt, open_checkpoint(tmp_path / "diffusers") as folder:
        assert ckpt.layout == "ldm"
        assert_same_tensors(ckpt, state)
        diffusers_name, ldm_key = FIRST_PROJ_IN[id(overrides)]
        assert ckpt.source_key(diffusers_name) == f"model.diffusion_model.{ldm_key}"
        assert set(ckpt.ignored_keys) == {k for k in ldm if not k.startswith("model.diffusion_model.")}
        pairing = pair_checkpoints(ckpt, folder)
        assert sorted(pairing.matched) == sorted(state) and pairing.unmatched == 0
        # the UNet structure is recovered from the names and shapes alone
        config = infer_unet_config({n: ckpt.shape(n) for n in ckpt.names()})
        config.update(attention_head_dim=2, norm_num_groups=4)  # not visible in weights
        if "addition_time_embed_dim" in overrides:
            config["addition_time_embed_dim"] = overrides["addition_time_embed_dim"]
        rebuilt = UNet2DConditionModel(**config)
        rebuilt.load_state_dict({n: ckpt.tensor(n) for n in ckpt.names()}, strict=True)

    half = {k: v.half() for k, v in ldm.items()}
    torch.save({"global_step": 1, "state_dict": half}, tmp_path / "sd.ckpt")
    with open_checkpoint(tmp_path / "sd.ckpt") as ckpt:
        assert ckpt.layout == "ldm"
        assert_same_tensors(ckpt, {k: v.half() for k, v in state.items()})


# ---- bad inputs: one clear sentence each ---------------------------------------------------------------------
def test_missing_path_and_folder_without_weights(tmp_path: Path) -> None:
    with pytest.raises(WadiInputError, match="does not exist"):
        open_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("no weights here")
    with pytest.raises(WadiInputError, match="holds no model weights"):
        open_checkpoint(tmp_path / "empty")


def test_truncated_corrupt_and_text_safetensors(tmp_path: Path, unet_state) -> None:
    good = tmp_path / "good.safetensors"
    save_file(unet_state, str(good))
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(WadiInputError, match="truncated or corrupt"):
        open_checkpoint(truncated)
    cut_in_header = tmp_path / "cut.safetensors"
    cut_in_header.write_bytes(data[:20])
    with pytest.raises(WadiInputError, match="is truncated or not a safetensors file"):
        open_checkpoint(cut_in_header)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(data[:8] + b"\xff" * 40 + data[48:])
    with pytest.raises(WadiInputError, match="header is not readable JSON"):
        open_checkpoint(corrupt)
    text = tmp_path / "notes.safetensors"
    text.write_text("these are not weights, just a text file with a misleading name\n" * 3)
    with pytest.raises(WadiInputError, match="is not a valid safetensors file"):
        open_checkpoint(text)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_text("hi")
    with pytest.raises(WadiInputError, match="not a safetensors file"):
        open_checkpoint(tiny)
    text_bin = tmp_path / "notes.bin"
    text_bin.write_text("not a torch file")
    with pytest.raises(WadiInputError, match="not a readable torch checkpoint"):
        open_checkpoint(text_bin)


class _Payload:
    """Pickles into a call that would create a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("how", ["torch.save", "plain-pickle"])
def test_pickle_that_runs_code_is_refused_without_running(tmp_path: Path, how: str) -> None:
    import pickle

    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.bin"
    state = {"conv_in.weight": torch.zeros(2, 2), "hook": _Payload(marker)}
    if how == "torch.save":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))
    # sanity: the payload really would run under a plain unpickler
    probe = tmp_path / "probe-marker"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()
    with pytest.raises(WadiInputError, match="needs code to run|not a readable torch checkpoint"):
        open_checkpoint(path)
    assert not marker.exists()


def test_index_naming_a_missing_shard(tmp_path: Path, tiny_unet) -> None:
    folder = tmp_path / "unet"
    tiny_unet(seed=5).save_pretrained(folder, max_shard_size="20KB")
    shard = sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(WadiInputError, match=f"names shard {shard.name}, which does not exist"):
        open_checkpoint(folder)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text("{not json")
    with pytest.raises(WadiInputError, match="not a valid shard index"):
        open_checkpoint(folder)


def test_adapter_without_base_is_explained(tmp_path: Path) -> None:
    save_file({"unet.conv_in.lora_A.weight": torch.zeros(2, 4), "unet.conv_in.lora_B.weight": torch.zeros(4, 2)},
              str(tmp_path / "lora.safetensors"))
    with pytest.raises(WadiInputError, match="is an adapter"):
        open_checkpoint(tmp_path / "lora.safetensors")


# ---- adapters merged onto a base --------------------------------------------------------------------------------
def _kohya_flat(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def test_peft_lora_merge_matches_peft(tmp_path: Path, tiny_unet) -> None:
    from peft import LoraConfig, get_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = tiny_unet(seed=6)
    base.save_pretrained(tmp_path / "teacher")
    config = LoraConfig(r=2, lora_alpha=3, init_lora_weights=False,
                        target_modules=["to_q", "to_v", "to_out.0", "proj_in", "conv1"])
    student = tiny_unet(seed=6)
    student.add_adapter(config)
    lora_state = get_peft_model_state_dict(student)
    save_file({f"unet.{k}": v.contiguous() for k, v in lora_state.items()}, str(tmp_path / "lora.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(config.to_dict(), default=list))
    for module in student.modules():  # PEFT's own merge is the reference answer
        if isinstance(module, BaseTunerLayer):
            module.merge()
    expected = {k.replace(".base_layer", ""): v for k, v in student.state_dict().items() if "lora_" not in k}

    with open_checkpoint(tmp_path / "teacher") as teacher, \
            open_checkpoint(tmp_path / "lora.safetensors", base=teacher) as merged:
        assert merged.layout == "adapter"
        assert merged.names() == teacher.names()
        adapted = merged.adapted_names()
        assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight" in adapted
        assert "down_blocks.0.resnets.0.conv1.weight" in adapted
        for name in merged.names():
            got = merged.tensor(name)
            assert torch.allclose(got, expected[name], atol=1e-6), name
            if name not in adapted:
                assert torch.equal(got, teacher.tensor(name))
        # the known answer, spelled out for one linear layer: W + (alpha / r) · B·A
        name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
        a = lora_state[f"{name}.lora_A.weight"]
        b = lora_state[f"{name}.lora_B.weight"]
        assert torch.allclose(merged.tensor(f"{name}.weight"), teacher.tensor(f"{name}.weight") + 1.5 * b @ a, atol=1e-6)


def test_kohya_and_old_diffusers_lora(tmp_path: Path, tiny_unet) -> None:
    from wadi_probe.io.ldm import diffusers_to_ldm_names

    base = tiny_unet(seed=7)
    state = base.state_dict()
    save_file(state, str(tmp_path / "teacher.safetensors"))
    torch.manual_seed(0)
    linear = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    conv = "up_blocks.1.resnets.1.conv1"
    ldm_style = "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"
    old_style = "mid_block.attentions.0.transformer_blocks.0.attn1.to_v"
    rank = 3
    factors = {}
    for module in (linear, conv, ldm_style, old_style):
        weight = state[f"{module}.weight"]
        factors[module] = (torch.randn(rank, *weight.shape[1:]), torch.randn(weight.shape[0], rank, *([1, 1] if weight.ndim == 4 else [])))
    ldm_name = diffusers_to_ldm_names(state)[f"{ldm_style}.weight"][: -len(".weight")]
    adapter = {}
    for module, flat in ((linear, _kohya_flat(linear)), (conv, _kohya_flat(conv)), (ldm_style, "lora_unet_" + ldm_name.replace(".", "_"))):
        down, up = factors[module]
        adapter[f"{flat}.lora_down.weight"] = down
        adapter[f"{flat}.lora_up.weight"] = up
        adapter[f"{flat}.alpha"] = torch.tensor(1.5)
    down, up = factors[old_style]
    adapter[f"{old_style.replace('.to_v', '.processor.to_v_lora')}.down.weight"] = down
    adapter[f"{old_style.replace('.to_v', '.processor.to_v_lora')}.up.weight"] = up
    adapter["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(2, 4)
    save_file(adapter, str(tmp_path / "kohya.safetensors"))

    with open_checkpoint(tmp_path / "teacher.safetensors") as teacher, \
            open_checkpoint(tmp_path / "kohya.safetensors", base=teacher) as merged:
        assert sorted(merged.adapted_names()) == sorted(f"{m}.weight" for m in factors)
        assert merged.ignored_keys == ["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"]
        for module, (down, up) in factors.items():
            weight = state[f"{module}.weight"]
            scale = 1.0 if module == old_style else 1.5 / rank
            delta = (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)).reshape(weight.shape)
            assert torch.allclose(merged.tensor(f"{module}.weight"), weight + scale * delta, atol=1e-5), module
        assert torch.equal(merged.tensor("conv_in.weight"), state["conv_in.weight"])


def test_lorad_adapter_rotates_pairs_and_keeps_row_norms(tmp_path: Path, tiny_unet) -> None:
    from wadi_probe.rotation import as_matrix, rotate_pairs

    half = tiny_unet(seed=8).half()
    state = half.state_dict()
    save_file(state, str(tmp_path / "teacher.safetensors"))
    torch.manual_seed(1)
    modules = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.1.resnets.0.conv1"]
    thetas = {}
    adapter = {}
    for module in modules:
        weight = state[f"{module}.weight"]
        pairs = as_matrix(weight).shape[1] // 2
        a, b = 0.3 * torch.randn(weight.shape[0], 2), torch.randn(2, pairs)
        adapter[f"unet.{module}.theta_a"], adapter[f"unet.{module}.theta_b"] = a, b
        thetas[module] = a @ b
    save_file(adapter, str(tmp_path / "lorad.safetensors"))
    with open_checkpoint(tmp_path / "teacher.safetensors") as teacher, \
            open_checkpoint(tmp_path / "lorad.safetensors", base=teacher) as merged:
        assert sorted(merged.adapted_names()) == sorted(f"{m}.weight" for m in modules)
        for module in modules:
            name = f"{module}.weight"
            weight = state[name]
            got = merged.tensor(name)
            assert got.dtype == merged.dtype(name) == torch.float32 and merged.stored_dtype(name) == torch.float16
            expected = rotate_pairs(as_matrix(weight.float()), thetas[module]).reshape(weight.shape)
            assert torch.allclose(got, expected, atol=1e-6)
            assert torch.allclose(as_matrix(got).norm(dim=1), as_matrix(weight.float()).norm(dim=1), rtol=1e-5)
            assert not torch.allclose(got, weight.float(), atol=1e-3)


def test_adapter_for_another_model_is_refused(tmp_path: Path, unet_state) -> None:
    save_file(unet_state, str(tmp_path / "teacher.safetensors"))
    save_file({"unet.not_a_module.lora_A.weight": torch.zeros(2, 4), "unet.not_a_module.lora_B.weight": torch.zeros(4, 2)},
              str(tmp_path / "lora.safetensors"))
    wrong_shape = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{wrong_shape}.lora_A.weight": torch.zeros(2, 5), f"{wrong_shape}.lora_B.weight": torch.zeros(8, 2)},
              str(tmp_path / "lora2.safetensors"))
    with open_checkpoint(tmp_path / "teacher.safetensors") as teacher:
        with pytest.raises(WadiInputError, match="does not have"):
            open_checkpoint(tmp_path / "lora.safetensors", base=teacher)
        with pytest.raises(WadiInputError, match="do not fit"):
            open_checkpoint(tmp_path / "lora2.safetensors", base=teacher)


# ---- write_like: round trips in the reference's own layout ---------------------------------------------------------
def test_write_like_round_trips_every_layout(tmp_path: Path, tiny_unet) -> None:
    from wadi_probe.io.checkpoints import lazy_tensors

    unet = tiny_unet(seed=9)
    state = unet.state_dict()
    half = {k: v.half() for k, v in state.items()}
    unet.half().save_pretrained(tmp_path / "fp16", variant="fp16")
    save_file(to_ldm_state(state), str(tmp_path / "sd.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "train.pt")
    changed = {k: v.float() * 2 + 1 for k, v in state.items()}

    cases = [(tmp_path / "fp16", "out.safetensors", half), (tmp_path / "sd.safetensors", "sd_out.safetensors", state),
             (tmp_path / "train.pt", "train_out.pt", state), (tmp_path / "sd.safetensors", "sd_out.ckpt", state)]
    for source, out_name, stored in cases:
        out = tmp_path / out_name
        with open_checkpoint(source) as reference:
            write_like(reference, changed, out)
            with open_checkpoint(out) as written:
                assert written.layout == reference.layout or (reference.layout == "diffusers" and written.layout == "safetensors")
                assert written.names() == reference.names()
                for name in reference.names():
                    assert written.source_key(name) == reference.source_key(name)
                    assert written.dtype(name) == stored[name].dtype
                    assert torch.equal(written.tensor(name), changed[name].to(stored[name].dtype)), name
                assert written.ignored_keys == reference.ignored_keys  # VAE / text encoder carried over
                for key in reference.ignored_keys:
                    assert torch.equal(written._ignored_sources[key].tensor(key), reference._ignored_sources[key].tensor(key))
            # a lazy mapping gives the same file, tensor by tensor
            write_like(reference, lazy_tensors(reference), tmp_path / f"copy_{out_name}")
            with open_checkpoint(tmp_path / f"copy_{out_name}") as copy:
                assert all(torch.equal(copy.tensor(n), reference.tensor(n)) for n in reference.names())
    raw = torch.load(tmp_path / "train_out.pt", weights_only=True)
    assert list(raw) == ["state_dict"] and "module.conv_in.weight" in raw["state_dict"]


def test_write_like_is_atomic_and_refuses_bad_tensors(tmp_path: Path, unet_state) -> None:
    reference_path = tmp_path / "ref.safetensors"
    save_file(unet_state, str(reference_path))
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    with open_checkpoint(reference_path) as reference:
        bad = dict(unet_state)
        bad["conv_out.weight"] = torch.zeros(1)
        with pytest.raises(WadiInputError, match="shape"):
            write_like(reference, bad, out)
        with pytest.raises(WadiInputError, match="is not a tensor of"):
            write_like(reference, {"nope.weight": torch.zeros(1)}, out)
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "ref.safetensors"]


def test_write_merged_adapter_in_base_layout(tmp_path: Path, unet_state) -> None:
    from wadi_probe.io.checkpoints import lazy_tensors

    base_state = {k: v.half() for k, v in unet_state.items()}
    save_file(base_state, str(tmp_path / "teacher.safetensors"))
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    out_features, in_features = base_state[f"{module}.weight"].shape
    save_file({f"{module}.lora_A.weight": torch.randn(2, in_features), f"{module}.lora_B.weight": torch.randn(out_features, 2)},
              str(tmp_path / "lora.safetensors"))
    with open_checkpoint(tmp_path / "teacher.safetensors") as teacher, \
            open_checkpoint(tmp_path / "lora.safetensors", base=teacher) as merged:
        write_like(merged, lazy_tensors(merged), tmp_path / "merged.safetensors")
        with open_checkpoint(tmp_path / "merged.safetensors") as written:
            assert written.dtype(f"{module}.weight") == torch.float16
            assert torch.equal(written.tensor(f"{module}.weight"), merged.tensor(f"{module}.weight").half())
            assert not torch.equal(written.tensor(f"{module}.weight"), teacher.tensor(f"{module}.weight"))


def test_project_adapter_folders_and_swapped_official_thetas(tmp_path: Path, unet_state) -> None:
    from wadi_probe.rotation import as_matrix, rotate_pairs

    save_file(unet_state, str(tmp_path / "teacher.safetensors"))
    module = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"
    weight = unet_state[f"{module}.weight"]
    out_features, fan_in = weight.shape
    torch.manual_seed(2)
    a, b = 0.2 * torch.randn(out_features, 3), torch.randn(3, fan_in // 2)
    down, up = torch.randn(2, fan_in), torch.randn(out_features, 2)
    # the project's own LoRaD and LoRA adapter folders (factors without ".weight", per-module scales in the config)
    (tmp_path / "lorad").mkdir()
    save_file({f"{module}.lorad_A": a, f"{module}.lorad_B": b}, str(tmp_path / "lorad" / "adapter.safetensors"))
    (tmp_path / "lorad" / "adapter_config.json").write_text(json.dumps({"kind": "lorad", "scales": None}))
    (tmp_path / "lora").mkdir()
    save_file({f"{module}.lora_A": down, f"{module}.lora_B": up}, str(tmp_path / "lora" / "adapter.safetensors"))
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"kind": "lora", "scales": {module: 0.25}}))
    # an official angle checkpoint in a torch file, factors stored the other way round
    torch.save({f"model.diffusion_model.{module}.theta_a": b, f"model.diffusion_model.{module}.theta_b": a}, tmp_path / "official.pt")

    rotated = rotate_pairs(as_matrix(weight), a @ b)
    with open_checkpoint(tmp_path / "teacher.safetensors") as teacher:
        for adapter, expected in (("lorad", rotated), ("official.pt", rotated), ("lora", weight + 0.25 * up @ down)):
            with open_checkpoint(tmp_path / adapter, base=teacher) as merged:
                assert merged.adapted_names() == [f"{module}.weight"], adapter
                assert torch.allclose(merged.tensor(f"{module}.weight"), expected, atol=1e-6), adapter


def test_transformer_pipeline_root(tmp_path: Path) -> None:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(sample_size=8, num_layers=2, attention_head_dim=4, num_attention_heads=2, in_channels=4,
                                     out_channels=8, cross_attention_dim=8, caption_channels=12, patch_size=2)
    model.save_pretrained(tmp_path / "pixart" / "transformer")
    (tmp_path / "pixart" / "model_index.json").write_text("{}")
    with open_checkpoint(tmp_path / "pixart") as ckpt:
        assert ckpt.layout == "diffusers"
        assert_same_tensors(ckpt, model.state_dict())
        names = ckpt.names()
        assert names[0].startswith("pos_embed.") and names.index("transformer_blocks.1.attn1.to_q.weight") > names.index(
            "transformer_blocks.0.ff.net.2.weight")


SD15_SHAPED = {  # SD1.5's block structure (4 down blocks, 2 layers each, attention in the first three)
    "block_out_channels": (8, 16, 16, 16),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}


@pytest.mark.parametrize("overrides", [SD1_LIKE, SD15_SHAPED, SD2_LIKE, SDXL_LIKE],
                         ids=["sd1-conv-proj", "sd15-shaped", "sd2-linear-proj", "sdxl-like"])
def test_ldm_name_map_is_diffusers_converter_and_its_inverse(tiny_unet, overrides) -> None:
    """Parity: the lazy name map puts every LDM tensor where diffusers' converter puts it, and writing inverts it."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from conftest import tiny_unet_config
    from wadi_probe.io.ldm import diffusers_to_ldm_names, ldm_to_diffusers_names

    state = tiny_unet(seed=5, **overrides).state_dict()
    ldm = to_ldm_state(state)
    unet_keys = [k[len("model.diffusion_model."):] for k in ldm if k.startswith("model.diffusion_model.")]
    mapping = ldm_to_diffusers_names(unet_keys)
    converted = convert_ldm_unet_checkpoint(ldm, tiny_unet_config(**overrides))  # real tensors, diffusers' way
    by_identity = {id(tensor): name for name, tensor in converted.items()}
    assert {ldm_key: by_identity[id(ldm["model.diffusion_model." + ldm_key])] for ldm_key in unet_keys} == mapping
    inverse = diffusers_to_ldm_names(state)
    assert {v: k for k, v in inverse.items()} == mapping and len(set(mapping.values())) == len(mapping) == len(state)


def test_ldm_layouts_the_converter_cannot_place_are_refused(tiny_unet) -> None:
    from wadi_probe.io.ldm import diffusers_to_ldm_names, ldm_to_diffusers_names

    names = list(diffusers_to_ldm_names(tiny_unet(seed=0, **SD15_SHAPED).state_dict()).values())
    fewer_outputs = [n for n in names if not n.startswith("output_blocks.11.")]
    with pytest.raises(WadiInputError, match="has 11 output blocks but its input blocks imply 12"):
        ldm_to_diffusers_names(fewer_outputs)
    uneven = [n for n in names if not n.startswith("input_blocks.2.")]  # first down block one layer short
    with pytest.raises(WadiInputError, match="do not all have the same number of layers"):
        ldm_to_diffusers_names([n.replace("input_blocks.3.0.op", "input_blocks.2.0.op") for n in uneven])
    # names it does not know keep their LDM spelling (they then show up as unmatched, not lost)
    assert ldm_to_diffusers_names([*names, "some_new_head.weight"])["some_new_head.weight"] == "some_new_head.weight"
