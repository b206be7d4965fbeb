import math

import pytest
import torch

from wadi_probe.rotation import as_matrix, merged_weight, pair_angles, rotate_pairs


def test_rotation_keeps_every_row_norm_exactly():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 10, dtype=torch.float64, generator=g)
    theta = torch.randn(7, 5, dtype=torch.float64, generator=g)
    r = rotate_pairs(w, theta)
    torch.testing.assert_close(r.norm(dim=1), w.norm(dim=1), rtol=1e-14, atol=0)


def test_zero_angles_are_the_identity_bit_for_bit():
    w = torch.randn(4, 9)
    assert torch.equal(rotate_pairs(w, torch.zeros(4, 4)), w)


def test_known_quarter_turn_and_odd_fan_in_keeps_last_column():
    w = torch.tensor([[1.0, 0.0, 0.0, 2.0, 5.0]], dtype=torch.float64)
    theta = torch.tensor([[math.pi / 2, math.pi / 2]], dtype=torch.float64)
    r = rotate_pairs(w, theta)
    # (1, 0) -> (0, 1); (0, 2) -> (-2, 0); the fifth column is untouched.
    torch.testing.assert_close(r, torch.tensor([[0.0, 1.0, -2.0, 0.0, 5.0]], dtype=torch.float64), atol=1e-15, rtol=0)


def test_pair_angles_recover_planted_angles():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 12, dtype=torch.float64, generator=g)
    theta = (torch.rand(6, 6, dtype=torch.float64, generator=g) - 0.5) * 2.0  # |θ| < 1 rad < π
    s = rotate_pairs(w, theta)
    torch.testing.assert_close(pair_angles(w, s), theta, rtol=0, atol=1e-12)


def test_pair_angles_are_zero_where_a_pair_is_zero():
    t = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    s = torch.tensor([[3.0, 4.0, 0.0, 0.0]])
    assert torch.equal(pair_angles(t, s), torch.zeros(1, 2))


def test_half_precision_weight_is_rotated_with_fp32_angles():
    w = torch.randn(3, 8).half()
    theta = torch.full((3, 4), 1e-3)
    r = rotate_pairs(w, theta)
    assert r.dtype == torch.float16
    expected = rotate_pairs(w.float(), theta).half()
    assert torch.equal(r, expected)


def test_conv_kernel_flattens_per_output_channel():
    k = torch.randn(4, 3, 2, 2)
    assert as_matrix(k).shape == (4, 12)
    with pytest.raises(ValueError):
        as_matrix(torch.randn(5))


def test_bad_theta_shape_is_refused():
    with pytest.raises(ValueError, match="theta must have shape"):
        rotate_pairs(torch.randn(3, 8), torch.zeros(3, 3))


def test_rotation_is_differentiable():
    w = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    theta = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(rotate_pairs, (w, theta))


def test_merged_weight_is_the_one_merge_the_layer_export_and_probe_share():
    from wadi_distill.lorad import inject_lorad, lorad_layers
    from wadi_probe.io.formats.adapters import ModuleAdapter, merge_module
    from wadi_probe.rotation import merged_weight

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 4, 3, 3, generator=g).half()  # a conv kernel in fp16: fan-in 36, 18 pairs
    a, b = 0.2 * torch.randn(6, 2, generator=g), torch.randn(2, 18, generator=g)
    expected = rotate_pairs(as_matrix(weight).float(), a @ b).reshape(weight.shape)
    torch.testing.assert_close(merged_weight(weight, a, b, dtype=torch.float32), expected, rtol=0, atol=1e-6)
    assert merged_weight(weight, a, b).dtype == torch.float16
    assert torch.equal(merged_weight(weight, a, b), merged_weight(weight, a, b, dtype=torch.float32).half())
    # the probe's adapter view keeps fp32; a LoRaD layer's merge writes the fp16 cast of the same numbers
    assert torch.equal(merge_module(weight, ModuleAdapter("lorad", {"a": a, "b": b}), 1.0),
                       merged_weight(weight, a, b, dtype=torch.float32))
    conv = torch.nn.Conv2d(4, 6, 3).half()
    with torch.no_grad():
        conv.weight.copy_(weight)
    model = torch.nn.Sequential(conv)
    inject_lorad(model, {"0": 2}, adapter_name="s")
    layer = lorad_layers(model)["0"]
    with torch.no_grad():
        layer.lorad_A["s"].copy_(a)
        layer.lorad_B["s"].copy_(b)
    layer.merge("s")
    assert torch.equal(layer.base_layer.weight, merged_weight(weight, a, b))
    # LoRA: W + scale·B·A, kohya's 4-D conv factors flattened
    down, up = torch.randn(3, 4, 3, 3, generator=g), torch.randn(6, 3, 1, 1, generator=g)
    lora = as_matrix(weight).float() + 0.5 * (up.reshape(6, 3) @ down.reshape(3, 36))
    torch.testing.assert_close(merged_weight(weight, down, up, kind="lora", scale=0.5, dtype=torch.float32),
                               lora.reshape(weight.shape), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        merged_weight(weight, down[:, :2], up, kind="lora")
    with pytest.raises(ValueError, match="unknown adapter kind"):
        merged_weight(weight, a, b, kind="dora")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("fan_in", [6, 9])
def test_rotation_without_a_graph_gives_the_graph_formulas_bits(dtype, fan_in):
    """The preallocated no-graph rotation (used by merge, the guided passes and the layers' forward) and the
    autograd formula (used when Θ or W needs a gradient) round each product and sum alike."""
    gen = torch.Generator().manual_seed(3)
    weight = (torch.randn(fan_in, 5, generator=gen) * 3).to(dtype).t()  # a strided (transposed) weight
    theta = torch.randn(5, fan_in // 2, generator=gen) * 2
    with torch.no_grad():
        fast = rotate_pairs(weight, theta)
    graph = rotate_pairs(weight, theta.clone().requires_grad_(True))
    assert fast.dtype == graph.dtype == dtype
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[fast.element_size()]
    assert torch.equal(fast.view(as_int), graph.detach().view(as_int))  # the bits, zeros' signs included
    if fan_in % 2:
        assert torch.equal(fast[:, -1], weight[:, -1])  # an odd fan-in's last column untouched


def test_merged_weight_refuses_angles_that_would_broadcast():
    with pytest.raises(ValueError, match="theta must have shape"):
        merged_weight(torch.randn(4, 6), torch.zeros(4, 1), torch.zeros(1, 1))  # Θ (4, 1) for 3 pairs
