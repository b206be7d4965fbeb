"""The adapted layer's training forward (``_AdaptedMatmul``): the weight is formed again in backward, nothing
weight-sized is kept, and outputs and gradients equal the plain autograd graph of the same formula."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wadi_distill.lorad.layer as lorad_module
from wadi_distill.lorad.layer import LoRaDConv2d, LoRaDLinear
from wadi_probe import rotation


def adapted(base, kind="lorad", dtype=torch.float32, name="s", seed=0):
    """``base`` wrapped, with a random adapter ``name`` of ``kind`` active (factors in ``dtype``)."""
    layer = LoRaDLinear(base) if isinstance(base, nn.Linear) else LoRaDConv2d(base)
    g = torch.Generator().manual_seed(seed)
    layer.add_adapter(name, 3, kind=kind, init="random", dtype=dtype, generator=g)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.4, generator=g)
    layer.set_active(name)
    return layer


def cases(dtype=torch.float32):
    torch.manual_seed(0)
    return [
        (nn.Linear(9, 6), torch.randn(2, 5, 9)),  # odd fan-in, tokens folded into rows
        (nn.Linear(8, 4, bias=False), torch.randn(3, 8)),
        (nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 5, 5)),
        (nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False, groups=2), torch.randn(1, 4, 6, 6)),
    ]


def plain_graph(layer, x):
    """The layer's output through autograd's own graph: the adapted weight, then the base layer's operation."""
    return layer._matmul(x, layer.effective_weight())


def counted(monkeypatch):
    calls = {"n": 0}
    real = lorad_module._AdaptedMatmul.apply

    def count(*args):
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(lorad_module._AdaptedMatmul, "apply", count)
    return calls


def grads_of(layer, x, run, autocast):
    layer.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = run(layer, x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.dtype))
    return [y.detach(), x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]


@pytest.mark.parametrize("kind", ["lorad", "lora"])
@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_outputs_and_gradients_equal_the_plain_graph_bit_for_bit(monkeypatch, kind, dtype, autocast):
    calls = counted(monkeypatch)
    for base, x in cases():
        layer = adapted(base.to(dtype), kind=kind)
        ours = grads_of(layer, x.to(dtype), lambda m, v: m(v), autocast)
        plain = grads_of(layer, x.to(dtype), plain_graph, autocast)
        for got, want in zip(ours, plain, strict=True):
            assert got.dtype == want.dtype and torch.equal(got, want)
    assert calls["n"] == len(cases())


@pytest.mark.parametrize("which", ["linear", "conv"])
def test_gradcheck_fp64_against_the_formula(which):
    torch.manual_seed(0)
    if which == "linear":
        layer = adapted(nn.Linear(7, 4).double(), dtype=torch.float64)
        x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    else:
        layer = adapted(nn.Conv2d(2, 3, 2, stride=2, padding=1).double(), dtype=torch.float64)
        x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    a0 = layer.lorad_A["s"].detach().clone().requires_grad_()
    b0 = layer.lorad_B["s"].detach().clone().requires_grad_()

    def ours(x_, a_, b_):
        return torch.func.functional_call(layer, {"lorad_A.s": a_, "lorad_B.s": b_}, (x_,))

    def formula(x_, a_, b_):  # R_Θ(W) written out with autograd's own rotation, then the base operation
        w = rotation.rotate_pairs(rotation.as_matrix(layer.base_layer.weight), a_ @ b_)
        return layer._matmul(x_, w.reshape(layer.weight_shape))

    assert torch.autograd.gradcheck(ours, (x, a0, b0))
    y, y_ref = ours(x, a0, b0), formula(x, a0, b0)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    g = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, (x, a0, b0), g), torch.autograd.grad(y_ref, (x, a0, b0), g)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("autocast", [False, True])
def test_nothing_weight_sized_is_kept_for_backward(autocast):
    for base, x in cases():
        layer = adapted(base)
        big = layer.base_layer.weight.numel()
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # what the forward keeps
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = layer(x.clone().requires_grad_(True))
        y.float().sum().backward()
        # the frozen base weight itself (a reference, not a copy), the input as the matmul takes it, the factors
        others = [t for t in saved if t.data_ptr() != layer.base_layer.weight.data_ptr()]
        a, b = layer.lorad_A["s"], layer.lorad_B["s"]
        assert len(saved) == 4 and sorted(t.numel() for t in others) == sorted([x.numel(), a.numel(), b.numel()])
        assert [t.dtype for t in others if t.numel() == x.numel()] == [torch.bfloat16 if autocast else x.dtype]

        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # the plain graph keeps R_Θ(W)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                plain_graph(layer, x.clone().requires_grad_(True))
        assert any(t.numel() == big and t.data_ptr() != layer.base_layer.weight.data_ptr() for t in saved)


def test_no_grad_passes_and_frozen_adapters_take_the_plain_path(monkeypatch):
    calls = counted(monkeypatch)
    base, x = cases()[0]
    layer = adapted(base)
    with torch.no_grad():
        y = layer(x)
    layer.set_active(None)
    teacher = layer(x.requires_grad_(False))
    layer.set_active("s")
    layer.requires_grad_(False)  # a frozen adapter and an input without grad: no graph to record
    y_frozen = layer(x)
    assert calls["n"] == 0 and not y_frozen.requires_grad
    assert torch.equal(y, y_frozen) and torch.equal(teacher, F.linear(x, base.weight, base.bias))


def test_backward_uses_the_adapter_of_its_forward_not_the_active_one():
    base, x = cases()[0]
    layer = adapted(base, name="student", seed=1)
    layer.add_adapter("fake", 2, init="random", generator=torch.Generator().manual_seed(2))
    y_ref = grads_of(layer, x, plain_graph, False)[:2]
    expected = y_ref + [layer.lorad_A["student"].grad, layer.lorad_B["student"].grad]
    layer.zero_grad()
    x1 = x.clone().requires_grad_(True)
    y = layer(x1)
    layer.set_active("fake")  # as VSD does between the student's forward and its backward
    with torch.no_grad():
        layer(x)
    layer.set_active(None)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)))
    got = [y.detach(), x1.grad, layer.lorad_A["student"].grad, layer.lorad_B["student"].grad]
    for g, want in zip(got, expected, strict=True):
        assert torch.equal(g, want)
    assert layer.lorad_A["fake"].grad is None


def test_changing_the_base_weight_before_backward_is_an_error():
    base, x = cases()[0]
    layer = adapted(base)
    y = layer(x.requires_grad_(True))
    layer.merge("s")  # writes into the base weight the backward forms R_Θ(W) from again
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("autocast_dtype", [None, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_cuda_adapted_layers_match_the_cpu(autocast_dtype):
    """Outputs and gradients of the adapted Linear and Conv2d on CUDA against the same layers on the CPU (fp32;
    under fp16/bf16 autocast, against the CPU in fp32 within the low precision's rounding)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tolerance = {None: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}[autocast_dtype]
    import copy

    for base, x in cases():
        cpu_layer = adapted(base)
        gpu_layer = adapted(copy.deepcopy(base)).cuda()  # a copy: wrapping the same module would move it too
        gpu_layer.load_state_dict(cpu_layer.state_dict())
        g = torch.randn(cpu_layer(x).shape, generator=torch.Generator().manual_seed(5))
        results = []
        for layer, device in ((cpu_layer, "cpu"), (gpu_layer, "cuda")):
            layer.zero_grad()
            xd = x.to(device).requires_grad_(True)
            with torch.autocast("cuda", dtype=autocast_dtype or torch.float16, enabled=device == "cuda" and autocast_dtype is not None):
                y = layer(xd)
            y.float().backward(g.to(device))
            results.append([y.detach().float().cpu(), xd.grad.float().cpu()]
                           + [p.grad.float().cpu() for p in layer.parameters() if p.requires_grad])
        for cpu_value, gpu_value in zip(*results):
            scale = cpu_value.abs().max().clamp_min(1e-6)
            assert ((gpu_value - cpu_value).abs().max() / scale).item() < tolerance
