"""LoRaDConfig ↔ adapter_config.json: PEFT's field names, the LoRaD-specific ones, and old files still loading."""

import json

import pytest
import torch

from conftest import make_tiny_unet
from wadi_distill.lorad import LoRaDConfig, inject_lorad, load_adapter, lorad_layers, save_adapter
from wadi_distill.lorad.config import ADAPTER_CONFIG
from wadi_distill.plan import plan_from_preset
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
    config = LoRaDConfig.from_plan(plan, kind="lora", lora_scale=0.25, base_model_name_or_path="tiny")
    assert config.ranks() == plan.ranks() and config.trainable_params is None  # the plan counts LoRaD numbers
    assert LoRaDConfig.from_plan(plan).trainable_params == plan.trainable_params
    assert config.layer_shapes[plan.layers[0].module] == list(plan.layers[0].shape)
    adapted = inject_lorad(unet, config, adapter_name="fake")
    layers = lorad_layers(unet)
    assert adapted == list(plan.ranks())
    assert {layers[m].specs["fake"].kind for m in adapted} == {"lora"}
    assert {layers[m].specs["fake"].scale for m in adapted} == {0.25}
