"""LoRaD layers: the pairwise rotation (docs/design.md), one weight + one call per forward, adapters, merge/unmerge, removal."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wadi_distill.lorad.layer as lorad_module
from wadi_distill.lorad.layer import LoRaDConv2d, LoRaDLinear
from wadi_distill.lorad.model import (
    adapter_disabled,
    inject_lorad,
    lorad_layers,
    lorad_param_count,
    lorad_parameters,
    merge_lorad,
    remove_lorad,
    set_active_adapter,
    unmerge_lorad,
    use_adapter,
)
import wadi_probe.rotation as rotation
from wadi_probe.errors import WadiInputError


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )


def random_adapter(layer, name="default", rank=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer.add_adapter(name, rank, init="random", dtype=dtype, generator=g)
    with torch.no_grad():
        layer.lorad_A[name].normal_(0.0, 0.5, generator=g)
    layer.set_active(name)
    return layer


def test_forward_rotates_row_pairs_per_design_and_keeps_row_norms_exactly():
    torch.manual_seed(0)
    base = nn.Linear(7, 5).double()  # odd fan-in: last column must stay unrotated
    layer = random_adapter(LoRaDLinear(base))
    a, b = layer.lorad_A["default"].detach(), layer.lorad_B["default"].detach()
    theta = a @ b
    w = base.weight.detach()
    expected = w.clone()
    for i in range(5):
        for j in range(3):
            c, s = math.cos(theta[i, j]), math.sin(theta[i, j])
            x0, x1 = w[i, 2 * j].item(), w[i, 2 * j + 1].item()
            expected[i, 2 * j] = c * x0 - s * x1
            expected[i, 2 * j + 1] = s * x0 + c * x1
    got = layer.effective_weight()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-14)
    assert torch.equal(got[:, 6], w[:, 6])
    torch.testing.assert_close(got.norm(dim=1), w.norm(dim=1), rtol=1e-14, atol=0)
    assert not torch.allclose(got, w)
    x = torch.randn(4, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ expected.T + base.bias.detach(), rtol=0, atol=1e-13)


def test_conv_kernel_norms_per_output_channel_are_kept():
    base = nn.Conv2d(3, 4, 3, padding=1).double()
    layer = random_adapter(LoRaDConv2d(base))
    w0 = base.weight.detach().reshape(4, -1)
    w1 = layer.effective_weight().reshape(4, -1)
    assert layer.theta().shape == (4, 13)  # fan_in 27 -> 13 pairs, last column unrotated
    torch.testing.assert_close(w1.norm(dim=1), w0.norm(dim=1), rtol=1e-14, atol=0)
    assert torch.equal(w1[:, 26], w0[:, 26])


def test_fresh_adapter_is_the_identity_bit_for_bit():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoRaDLinear(base)
    layer.add_adapter("default", 4)
    layer.set_active("default")
    assert torch.count_nonzero(layer.lorad_A["default"]) == 0
    assert torch.count_nonzero(layer.lorad_B["default"]) > 0
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), base(x))


def test_one_forward_forms_the_weight_once_and_calls_linear_once(monkeypatch):
    base = nn.Linear(6, 4)
    layer = random_adapter(LoRaDLinear(base), dtype=torch.float32)
    base.forward = lambda *a, **k: pytest.fail("the base layer's own forward must not run")
    calls = {"linear": 0, "rotate": 0}
    real_linear, real_rotate = F.linear, rotation._rotated_into

    def counting_linear(*a, **k):
        calls["linear"] += 1
        return real_linear(*a, **k)

    def counting_rotate(*a, **k):
        calls["rotate"] += 1
        return real_rotate(*a, **k)

    monkeypatch.setattr(lorad_module.F, "linear", counting_linear)
    monkeypatch.setattr(rotation, "_rotated_into", counting_rotate)  # merged_weight's rotation (no graph recorded)
    y = layer(torch.randn(2, 5, 6))
    assert calls == {"linear": 1, "rotate": 1}
    y.sum().backward()  # the backward forms the weight again instead of keeping it; no matmul is run again
    assert calls == {"linear": 1, "rotate": 2}
    assert layer.lorad_A["default"].grad is not None and base.weight.grad is None


def test_conv_lorad_equals_linear_lorad_on_unfolded_patches():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel_size=3, stride=2, padding=1).double()
    lin = nn.Linear(27, 5).double()
    with torch.no_grad():
        lin.weight.copy_(conv.weight.reshape(5, -1))
        lin.bias.copy_(conv.bias)
    lconv = random_adapter(LoRaDConv2d(conv), seed=1)
    llin = random_adapter(LoRaDLinear(lin), seed=1)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    y_conv = lconv(x)
    patches = F.unfold(x, kernel_size=3, stride=2, padding=1)  # (N, 27, L)
    y_lin = llin(patches.transpose(1, 2)).transpose(1, 2).reshape(y_conv.shape)
    torch.testing.assert_close(y_conv, y_lin, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_gradcheck_fp64_through_the_layer_forward(kind):
    torch.manual_seed(0)
    if kind == "linear":
        layer = random_adapter(LoRaDLinear(nn.Linear(7, 4).double()), rank=2)
        x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    else:
        layer = random_adapter(LoRaDConv2d(nn.Conv2d(2, 3, 2, padding=1).double()), rank=2)
        x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)

    def run(x_, a_, b_):
        return torch.func.functional_call(layer, {"lorad_A.default": a_, "lorad_B.default": b_}, (x_,))

    a0 = layer.lorad_A["default"].detach().clone().requires_grad_()
    b0 = layer.lorad_B["default"].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(run, (x, a0, b0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_uses_fp32_angles_and_fp32_parameters(dtype):
    torch.manual_seed(0)
    base = nn.Linear(8, 4).to(dtype)
    layer = LoRaDLinear(base)
    layer.add_adapter("default", 2, init="random")
    layer.set_active("default")
    assert layer.lorad_A["default"].dtype == torch.float32
    assert layer.theta().dtype == torch.float32
    w = layer.effective_weight()
    assert w.dtype == dtype
    ref = rotation.rotate_pairs(base.weight.float(), layer.theta().detach()).to(dtype)
    assert torch.equal(w.detach(), ref)
    y = layer(torch.randn(3, 8).to(dtype))
    assert y.dtype == dtype
    y.float().sum().backward()
    assert layer.lorad_B["default"].grad.dtype == torch.float32


def test_merge_equals_adapted_forward_and_unmerge_restores_bits():
    torch.manual_seed(0)
    for base, x in ((nn.Linear(10, 6), torch.randn(4, 10)), (nn.Conv2d(4, 6, 3, padding=1), torch.randn(2, 4, 5, 5))):
        original = base.weight.detach().clone()
        wrapper = LoRaDLinear(base) if isinstance(base, nn.Linear) else LoRaDConv2d(base)
        layer = random_adapter(wrapper, dtype=torch.float32)
        adapted = layer(x).detach()
        layer.merge()
        assert layer.merged_adapter == "default"
        assert torch.equal(layer(x), adapted)  # the merged forward uses the merged weight directly
        assert torch.equal(base(x), adapted)  # the plain layer now holds R_Θ(W)
        with adapter_disabled(layer):
            assert torch.equal(layer(x), F.linear(x, original, base.bias) if isinstance(base, nn.Linear) else base._conv_forward(x, original, base.bias))
        layer.unmerge()
        assert torch.equal(base.weight, original)
        assert torch.equal(layer(x), adapted)


def test_teacher_student_fake_share_one_frozen_base():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4))
    x = torch.randn(3, 6)
    teacher_out = model(x).detach()
    inject_lorad(model, {"0": 4, "2": 4}, adapter_name="student", init="random")
    inject_lorad(model, {"2": 2}, adapter_name="fake", init="random")
    assert isinstance(model[0], LoRaDLinear) and set(model[2].specs) == {"student", "fake"}
    set_active_adapter(model, "student")
    student_out = model(x).detach()
    with use_adapter(model, "fake"):
        assert model[0].active_adapter is None  # layer 0 has no fake adapter: plain
        fake_out = model(x).detach()
    with adapter_disabled(model):
        assert torch.equal(model(x), teacher_out)
    assert torch.equal(model(x), student_out)  # context restored the student
    assert not torch.allclose(student_out, teacher_out) and not torch.allclose(fake_out, student_out)
    names = {n for n, _ in model.named_parameters()}
    assert {"0.lorad_A.student", "0.lorad_B.student", "2.lorad_A.fake", "2.base_layer.weight"} <= names
    student_params = lorad_parameters(model, "student")
    assert len(student_params) == 4
    # r·(out + ⌊fan_in/2⌋) per layer
    assert lorad_param_count(model, "student") == 4 * (6 + 3) + 4 * (4 + 3)
    assert lorad_param_count(model, "fake") == 2 * (4 + 3)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)


def test_lora_kind_adds_scaled_low_rank_update():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    layer = LoRaDLinear(base)
    layer.add_adapter("fake", 2, kind="lora", init="random", scale=0.5)
    layer.set_active("fake")
    expected = base.weight + 0.5 * layer.lora_B["fake"] @ layer.lora_A["fake"]
    torch.testing.assert_close(layer.effective_weight(), expected, rtol=0, atol=1e-6)
    with pytest.raises(WadiInputError, match="LoRA adapter"):
        layer.theta("fake")
    fresh = LoRaDLinear(nn.Linear(6, 4))
    fresh.add_adapter("fake", 2, kind="lora")
    assert torch.equal(fresh.effective_weight("fake"), fresh.base_layer.weight)


def test_unet_inject_merge_remove_gives_a_stock_diffusers_model():
    from diffusers import UNet2DConditionModel

    unet = tiny_unet()
    teacher_sd = {k: v.clone() for k, v in unet.state_dict().items()}
    linears = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and n.startswith(("down_blocks", "mid_block", "up_blocks"))]
    inject_lorad(unet, {n: 2 for n in linears}, adapter_name="student", init="random")
    sample = torch.randn(1, 4, 8, 8)
    ctx = torch.randn(1, 3, 8)
    with torch.no_grad():
        adapted = unet(sample, 10, encoder_hidden_states=ctx).sample
        merge_lorad(unet, "student")
        torch.testing.assert_close(unet(sample, 10, encoder_hidden_states=ctx).sample, adapted, rtol=0, atol=1e-6)
        unmerge_lorad(unet)
    remove_lorad(unet, merge=True, adapter_name="student")
    assert not lorad_layers(unet)
    stock = UNet2DConditionModel.from_config(unet.config)
    stock.load_state_dict(unet.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(stock(sample, 10, encoder_hidden_states=ctx).sample, adapted, rtol=0, atol=1e-5)
    # removal without merging restores the teacher's bits
    inject_lorad(stock, {n: 2 for n in linears}, adapter_name="x", init="random")
    merge_lorad(stock, "x")
    remove_lorad(stock, merge=False)
    restored = stock.state_dict()
    changed = [k for k in teacher_sd if not torch.equal(teacher_sd[k], unet.state_dict()[k])]
    assert changed  # the merged student differs from the teacher...
    assert all(torch.equal(restored[k], unet.state_dict()[k]) for k in restored)  # ...and unmerge restored it exactly


def test_bad_injections_are_refused_with_a_sentence():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(WadiInputError, match="no module called nope"):
        inject_lorad(model, {"nope": 2})
    with pytest.raises(WadiInputError, match="only nn.Linear and nn.Conv2d"):
        inject_lorad(model, {"1": 2})
    inject_lorad(model, {"0": 2}, adapter_name="student")
    with pytest.raises(WadiInputError, match="already has an adapter"):
        inject_lorad(model, {"0": 2}, adapter_name="student")
    with pytest.raises(WadiInputError, match="no adapter called 'fake'"):
        set_active_adapter(model, "fake")
    with pytest.raises(WadiInputError, match="plain identifier"):
        inject_lorad(model, {"0": 2}, adapter_name="a.b")
    with pytest.raises(WadiInputError, match="at least 1"):
        inject_lorad(model, {"0": 0}, adapter_name="c")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_hand_written_rotation_backward_matches_autograd(dtype):
    torch.manual_seed(0)
    for base, x in ((nn.Linear(9, 5), torch.randn(4, 9)), (nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 5, 5))):
        base = base.to(dtype)
        wrapper = LoRaDLinear(base) if isinstance(base, nn.Linear) else LoRaDConv2d(base)
        layer = random_adapter(wrapper, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        x = x.to(dtype).requires_grad_(True)
        grads = []
        for fused in (True, False):
            previous = lorad_module.set_fused_rotation_backward(fused)
            try:
                layer.zero_grad()
                x.grad = None
                (layer(x).float() ** 2).sum().backward()
                grads.append([layer.lorad_A["default"].grad.clone(), layer.lorad_B["default"].grad.clone(), x.grad.clone()])
            finally:
                lorad_module.set_fused_rotation_backward(previous)
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
        for g_fused, g_auto in zip(*grads):
            torch.testing.assert_close(g_fused.float(), g_auto.float(), rtol=tol, atol=tol)


def test_angles_stay_fp32_under_autocast():
    torch.manual_seed(0)
    layer = random_adapter(LoRaDLinear(nn.Linear(16, 8)), dtype=torch.float32)
    exact = layer.theta().detach()
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theta = layer.theta()
        assert theta.dtype == torch.float32 and torch.equal(theta.detach(), exact)
        y = layer(x)
    assert y.dtype == torch.bfloat16  # the matmul itself follows autocast
    y.float().sum().backward()
    assert layer.lorad_A["default"].grad.dtype == torch.float32
