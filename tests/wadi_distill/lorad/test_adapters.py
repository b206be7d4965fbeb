"""Adapter files: save→load round trips, refusing another base, importing official theta checkpoints."""

import json

import pytest
import torch
from torch import nn

from conftest import make_tiny_unet
from wadi_distill.lorad.serialization import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, load_official_thetas, read_adapter, save_adapter
from wadi_distill.lorad import LoRaDLayer, inject_lorad, lorad_layers, use_adapter
from wadi_distill.plan import Plan, plan_from_preset
from wadi_probe.errors import WadiInputError


def unet_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 3, 16, generator=g)


def trained_student(seed=0):
    unet = make_tiny_unet()
    plan = plan_from_preset(unet, 2)
    inject_lorad(unet, plan, adapter_name="student", init="random", generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for layer in lorad_layers(unet).values():
            layer.lorad_A["student"].normal_(0, 0.3)
    return unet, plan


def test_save_load_round_trip_reproduces_the_student(tmp_path):
    unet, plan = trained_student()
    sample, ctx = unet_inputs()
    with torch.no_grad():
        expected = unet(sample, 5, encoder_hidden_states=ctx).sample
    folder = save_adapter(unet, tmp_path / "adapter", plan, adapter_name="student")
    assert (folder / ADAPTER_WEIGHTS).is_file() and (folder / ADAPTER_CONFIG).is_file()
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert config["kind"] == "lorad" and config["trainable_params"] == plan.trainable_params
    assert config["plan"]["layers"][0]["module"] == plan.layers[0].module

    fresh = make_tiny_unet()
    loaded = load_adapter(fresh, folder, adapter_name="student")
    assert loaded.ranks() == plan.ranks() and Plan.from_config(loaded).to_json() == plan.to_json()
    with torch.no_grad():
        got = fresh(sample, 5, encoder_hidden_states=ctx).sample
        assert torch.equal(got, expected)
        with use_adapter(fresh, None):
            assert not torch.allclose(fresh(sample, 5, encoder_hidden_states=ctx).sample, expected)
    # the .safetensors path inside the folder works too
    again = make_tiny_unet()
    load_adapter(again, folder / ADAPTER_WEIGHTS, adapter_name="x")
    assert set(next(iter(lorad_layers(again).values())).specs) == {"x"}


def test_lora_kind_round_trip(tmp_path):
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    inject_lorad(model, {"0": 2, "1": 2}, adapter_name="fake", kind="lora", scale=0.5, init="random")
    x = torch.randn(2, 6)
    expected = model(x).detach()
    save_adapter(model, tmp_path / "fake", adapter_name="fake")
    fresh = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k})
    load_adapter(fresh, tmp_path / "fake", adapter_name="fake")
    assert fresh[0].specs["fake"].scale == 0.5
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=1e-6)


def test_loading_onto_another_base_is_refused_and_leaves_it_untouched(tmp_path):
    unet, plan = trained_student()
    save_adapter(unet, tmp_path / "adapter", plan, adapter_name="student")
    other = make_tiny_unet(cross_attention_dim=8)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(WadiInputError, match="does not fit this base model: .* adapted layers differ: .*attn2.to_k"):
        load_adapter(other, tmp_path / "adapter", adapter_name="student")
    assert not any(isinstance(m, LoRaDLayer) for m in other.modules())
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    # the adapted layers fit, but the rest of the base differs: refused by the shape signature
    small = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    inject_lorad(small, {"0": 2}, adapter_name="a")
    save_adapter(small, tmp_path / "small", adapter_name="a")
    with pytest.raises(WadiInputError, match="different base model"):
        load_adapter(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 5)), tmp_path / "small", adapter_name="a")


def test_bad_adapter_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WadiInputError, match="no adapter.safetensors"):
        read_adapter(tmp_path / "empty")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(WadiInputError, match="not a readable safetensors file"):
        read_adapter(tmp_path / "junk.safetensors")
    with pytest.raises(WadiInputError, match="does not exist"):
        read_adapter(tmp_path / "missing")


class NeedsCode:
    def __init__(self):
        self.x = torch.zeros(1)


def official_checkpoint(unet, seed=0, swap=False):
    """Factors in the official layout for two attention layers, as `unet.<module>.theta_a/.theta_b`."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    names = [n for n in modules if n.endswith("attn1.to_q") or n.endswith("attn2.to_v")][:2]
    state, factors = {}, {}
    for n in names:
        out, fan_in = modules[n].weight.shape
        a, b = 0.3 * torch.randn(out, 3, generator=g), torch.randn(3, fan_in // 2, generator=g)
        factors[n] = (a, b)
        state[f"unet.{n}.theta_a"], state[f"unet.{n}.theta_b"] = (b, a) if swap else (a, b)
    return state, factors


def design_rotation(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The LoRaD rotation written out (docs/design.md): w'_{i,2j} = cos·w_{i,2j} − sin·w_{i,2j+1}, w'_{i,2j+1} = sin·w_{i,2j} + cos·w_{i,2j+1}."""
    out = w.clone()
    c, s = torch.cos(theta), torch.sin(theta)
    out[:, 0::2][:, : theta.shape[1]] = c * w[:, 0 : 2 * theta.shape[1] : 2] - s * w[:, 1 : 2 * theta.shape[1] : 2]
    out[:, 1::2][:, : theta.shape[1]] = s * w[:, 0 : 2 * theta.shape[1] : 2] + c * w[:, 1 : 2 * theta.shape[1] : 2]
    return out


@pytest.mark.parametrize("fmt, swap", [("pt", False), ("safetensors", False), ("pt", True)])
def test_official_thetas_reproduce_the_design_rotation(tmp_path, fmt, swap):
    unet = make_tiny_unet()
    state, factors = official_checkpoint(unet, swap=swap)
    path = tmp_path / f"wadi.{fmt}"
    if fmt == "pt":
        torch.save({"state_dict": state, "step": 1000}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    raw = load_official_thetas(path)
    assert set(raw) == set(factors)
    config = load_adapter(unet, path, adapter_name="student")
    layers = lorad_layers(unet)
    assert set(layers) == set(factors)
    # an official file carries no config: the one returned is made from its factors and the base's shapes
    assert config.ranks() == {m: a.shape[1] for m, (a, _) in factors.items()} and config.plan is None
    assert config.trainable_params == sum(a.numel() + b.numel() for a, b in factors.values())
    plan = Plan.from_config(config, source=f"official:{path.name}")
    assert plan.trainable_params == config.trainable_params and plan.source == f"official:{path.name}"
    assert {e.module: e.shape for e in plan.layers} == {m: tuple(layers[m].weight_shape) for m in factors}
    for module, (a, b) in factors.items():
        layer = layers[module]
        w = layer.base_layer.weight.detach().double()
        expected = design_rotation(w, (a @ b).double())
        torch.testing.assert_close(layer.effective_weight().detach().double(), expected, rtol=0, atol=1e-6)


def test_official_checkpoint_needing_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x.theta_a": torch.zeros(2, 1), "obj": NeedsCode()}, path)
    with pytest.raises(WadiInputError, match="weights_only=True"):
        load_official_thetas(path)
    torch.save({"x.theta_a": torch.zeros(2, 1)}, tmp_path / "half.pt")
    with pytest.raises(WadiInputError, match="theta_a without theta_b"):
        load_official_thetas(tmp_path / "half.pt")


def test_official_thetas_under_ldm_names_load_onto_a_diffusers_unet(tmp_path):
    """The one adapter parser resolves LDM module names, so an official file saved from an LDM model loads too."""
    from safetensors.torch import save_file

    from wadi_probe.io.ldm import diffusers_to_ldm_names

    unet = make_tiny_unet()
    state, factors = official_checkpoint(unet, seed=3)
    to_ldm = diffusers_to_ldm_names(unet.state_dict())
    ldm_state = {}
    for key, value in state.items():
        module, which = key.removeprefix("unet.").rsplit(".", 1)
        ldm_module = to_ldm[f"{module}.weight"].removesuffix(".weight")
        ldm_state[f"model.diffusion_model.{ldm_module}.{which}"] = value.contiguous()
    assert not set(ldm_state) & {f"model.diffusion_model.{k.removeprefix('unet.')}" for k in state}  # names differ
    save_file(ldm_state, str(tmp_path / "wadi_ldm.safetensors"))
    load_adapter(unet, tmp_path / "wadi_ldm.safetensors", adapter_name="student")
    layers = lorad_layers(unet)
    assert set(layers) == set(factors)
    for module, (a, b) in factors.items():
        assert torch.equal(layers[module].lorad_A["student"], a) and torch.equal(layers[module].lorad_B["student"], b)
