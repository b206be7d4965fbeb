"""LoRaDConfig ↔ adapter_config.json: PEFT's field names, the LoRaD-specific ones, and old files still loading."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import make_tiny_unet
from wadi_distill.lorad import LoRaDConfig, inject_lorad, load_adapter, lorad_layers, save_adapter
from wadi_distill.lorad.config import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_param_count
from wadi_distill.plan import Plan, plan_from_preset
from wadi_probe.errors import WadiInputError


def test_from_ranks_uses_r_for_the_common_rank_and_rank_pattern_for_the_rest():
    config = LoRaDConfig.from_ranks({"a.q": 4, "a.k": 4, "b.v": 2, "c.out": 4})
    assert config.r == 4 and config.rank_pattern == {"b.v": 2}
    assert config.target_modules == ["a.q", "a.k", "b.v", "c.out"]
    assert config.ranks() == {"a.q": 4, "a.k": 4, "b.v": 2, "c.out": 4}
    # PEFT's suffix semantics for a pattern key that is not a full path
    suffix = LoRaDConfig(r=8, target_modules=["x.attn1.to_q", "y.attn2.to_q", "y.attn2.to_k"], rank_pattern={"to_q": 2})
    assert suffix.ranks() == {"x.attn1.to_q": 2, "y.attn2.to_q": 2, "y.attn2.to_k": 8}


def test_saved_config_has_peft_names_and_round_trips(tmp_path):
    unet = make_tiny_unet()
    plan = plan_from_preset(unet, 2)
    inject_lorad(unet, plan, adapter_name="student")
    save_adapter(unet, tmp_path / "a", plan, adapter_name="student", base_model_name_or_path="teachers/tiny")
    data = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    assert data["r"] == 2 and data["rank_pattern"] == {} and data["peft_type"] == "LORAD"
    assert data["target_modules"] == [e.module for e in plan.layers]
    assert data["base_model_name_or_path"] == "teachers/tiny" and data["version"] == 2
    assert data["layer_shapes"][plan.layers[0].module] == list(plan.layers[0].shape)
    loaded = LoRaDConfig.load(tmp_path / "a")
    assert loaded.to_dict() == data and loaded.ranks() == plan.ranks()


def _version_1_config(config: LoRaDConfig) -> dict:
    """The adapter_config.json the first release wrote (kind, layers {module: {rank, shape}}, scales)."""
    return {"format": "wadi-lorad-adapter", "version": 1, "adapter_name": config.adapter_name, "kind": config.kind,
            "scales": None, "model_class": config.model_class, "base_signature": config.base_signature,
            "layers": {m: {"rank": config.rank_of(m), "shape": config.layer_shapes[m]} for m in config.target_modules},
            "trainable_params": config.trainable_params, "plan": config.plan}


def test_version_1_files_still_load_and_give_the_same_student(tmp_path):
    unet = make_tiny_unet()
    ranks = {e.module: (2 if i % 2 else 3) for i, e in enumerate(plan_from_preset(unet, 2).layers)}
    inject_lorad(unet, ranks, adapter_name="s", init="random", generator=torch.Generator().manual_seed(0))
    save_adapter(unet, tmp_path / "new", adapter_name="s")
    config = LoRaDConfig.load(tmp_path / "new")
    old = tmp_path / "old"
    old.mkdir()
    (old / "adapter.safetensors").write_bytes((tmp_path / "new" / "adapter.safetensors").read_bytes())
    (old / ADAPTER_CONFIG).write_text(json.dumps(_version_1_config(config)))
    assert LoRaDConfig.load(old).ranks() == ranks
    fresh = make_tiny_unet()
    load_adapter(fresh, old, adapter_name="s")
    got = {m: layer.lorad_A["s"] for m, layer in lorad_layers(fresh).items()}
    want = {m: layer.lorad_A["s"] for m, layer in lorad_layers(unet).items()}
    assert got.keys() == want.keys() and all(torch.equal(got[m], want[m]) for m in got)


def test_bad_configs_are_one_sentence(tmp_path):
    with pytest.raises(WadiInputError, match="is not a wadi LoRaD adapter config"):
        LoRaDConfig.from_dict({"r": 4, "peft_type": "LORA"})
    with pytest.raises(WadiInputError, match="version 3 is not supported"):
        LoRaDConfig.from_dict({"format": "wadi-lorad-adapter", "version": 3})
    with pytest.raises(WadiInputError, match="unknown adapter kind 'dora'"):
        LoRaDConfig(kind="dora")
    with pytest.raises(WadiInputError, match="at least 1"):
        LoRaDConfig.from_ranks({"a": 0, "b": 0})
    with pytest.raises(WadiInputError, match="does not exist"):
        LoRaDConfig.load(tmp_path)
    # newer files may carry keys this version does not know: they are left aside
    newer = {**LoRaDConfig(r=3, target_modules=["m"]).to_dict(), "some_future_field": 1}
    assert LoRaDConfig.from_dict(newer).ranks() == {"m": 3}


def test_a_plan_becomes_a_config_that_injects_the_same_adapter():
    unet = make_tiny_unet()
    plan = plan_from_preset(unet, 3)
    config = plan.to_config(kind="lora", lora_scale=0.25, base_model_name_or_path="tiny")
    assert config.ranks() == plan.ranks() and config.plan == plan.to_json() and config.model_class == plan.model_class
    assert plan.to_config().trainable_params == plan.trainable_params  # the plan counts LoRaD numbers
    assert config.trainable_params == sum(3 * (e.shape[0] + math.prod(e.shape[1:])) for e in plan.layers)  # LoRA's
    assert config.layer_shapes[plan.layers[0].module] == list(plan.layers[0].shape)
    adapted = inject_lorad(unet, config, adapter_name="fake")
    layers = lorad_layers(unet)
    assert adapted == list(plan.ranks())
    assert {layers[m].specs["fake"].kind for m in adapted} == {"lora"}
    assert {layers[m].specs["fake"].scale for m in adapted} == {0.25}
    # the count without a model is the count of the factors the model got
    assert config.trainable_params == sum(layers[m].lora_A["fake"].numel() + layers[m].lora_B["fake"].numel()
                                          for m in adapted)
    assert Plan.from_config(config).to_json() == plan.to_json()


def test_one_parameter_count_for_every_kind():
    assert adapter_param_count((1280, 5120), 256) == 256 * (1280 + 2560)
    assert adapter_param_count((8, 3, 3, 3), 2, "lorad") == 2 * (8 + 13)  # an odd fan-in leaves a column alone
    assert adapter_param_count((8, 3, 3, 3), 2, "lora") == 2 * (8 + 27)
    assert adapter_param_count((8, 3, 3, 3), 2, "dora") == 2 * (8 + 27) + 8
    with pytest.raises(WadiInputError, match="unknown adapter kind 'loha' to count"):
        adapter_param_count((8, 8), 2, "loha")


BASE_ADAPTERS = Path(__file__).resolve().parents[2] / "data" / "base_adapters"


@pytest.mark.parametrize("name, adapter_name", [("lorad_with_plan", "student"), ("lora_without_plan", "fake")])
def test_adapter_folders_from_the_previous_release_load_and_are_written_again_byte_for_byte(tmp_path, name, adapter_name):
    """Folders written by the release before LoRaDConfig became the one description (see data/base_adapters/README.md):
    a LoRaD student saved with its plan, and a LoRA fake score saved without one (whose config holds a plan rebuilt
    from its layers). They load, give their plan back, and the current code writes them again: the config byte for byte, the same tensors."""
    folder = BASE_ADAPTERS / name
    stored = json.loads((folder / ADAPTER_CONFIG).read_text())
    unet = make_tiny_unet()
    config = load_adapter(unet, folder, adapter_name=adapter_name)
    assert config.to_dict() == stored and config.kind == stored["kind"]
    plan = Plan.from_config(config)
    assert plan.to_json() == stored["plan"] and plan.ranks() == config.ranks()
    save_adapter(unet, tmp_path / name, plan, adapter_name=adapter_name,
                 base_model_name_or_path=config.base_model_name_or_path)
    assert (tmp_path / name / ADAPTER_CONFIG).read_bytes() == (folder / ADAPTER_CONFIG).read_bytes()
    # the weights file: the same tensors and metadata (safetensors writes its metadata keys in no fixed order)
    with safe_open(folder / ADAPTER_WEIGHTS, "pt") as old, safe_open(tmp_path / name / ADAPTER_WEIGHTS, "pt") as new:
        assert old.metadata() == new.metadata() and list(old.keys()) == list(new.keys())
        assert all(torch.equal(old.get_tensor(k), new.get_tensor(k)) for k in old.keys())
